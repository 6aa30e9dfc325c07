//! When a partition is compacted and over which segments, decided from its manifest alone.
//!
//! A partition's sealed segments are a compacted prefix (`compacted_ms > 0`: written by an
//! earlier pass) followed by dirty ones. A pass maps the keys of the dirty segments that
//! are old enough (`min.compaction.lag.ms`, by their newest record) and rewrites every
//! segment from the log start through the last one it mapped, so older values in the
//! compacted prefix give way to newer ones too. It is due when the dirty bytes are at
//! least `min.cleanable.dirty.ratio` of the sealed bytes it considers, or when the oldest
//! dirty segment is older than `max.compaction.lag.ms`.

use crate::config::TopicConfig;
use crate::metadata::SegmentRecord;

/// The dirty share of a partition's sealed bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Dirt {
    pub dirty_bytes: u64,
    pub total_bytes: u64,
}

impl Dirt {
    pub(crate) fn ratio(&self) -> f64 {
        if self.total_bytes == 0 {
            0.0
        } else {
            self.dirty_bytes as f64 / self.total_bytes as f64
        }
    }
}

/// One pass: the segments it reads, from the log start, and where the dirty ones begin.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    pub segments: Vec<SegmentRecord>,
    pub first_dirty: usize,
}

/// The dirty bytes of `segments` against all of them.
pub(crate) fn dirt(segments: &[SegmentRecord]) -> Dirt {
    let total_bytes = segments.iter().map(|s| s.data_bytes).sum();
    let dirty_bytes = segments
        .iter()
        .filter(|s| s.compacted_ms == 0)
        .map(|s| s.data_bytes)
        .sum();
    Dirt {
        dirty_bytes,
        total_bytes,
    }
}

/// The pass due now, if any. `horizon`: the earliest delete horizon of the tombstones
/// the last pass kept; once it has passed, a pass over the compacted part alone removes
/// them even with nothing dirty. `stable_end`: the last stable offset; a segment
/// reaching past it holds records of a transaction still open, so it waits (as Kafka's
/// cleaner never passes the last stable offset).
pub(crate) fn plan(
    segments: &[SegmentRecord],
    config: &TopicConfig,
    now_ms: i64,
    horizon: Option<i64>,
    stable_end: i64,
) -> Option<Plan> {
    if !config.cleanup.compact {
        return None;
    }
    let first_dirty = segments.iter().take_while(|s| s.compacted_ms > 0).count();
    let cleanable_before = now_ms.saturating_sub(config.min_compaction_lag_ms);
    let cleanable = segments[first_dirty..]
        .iter()
        .take_while(|s| {
            s.compacted_ms == 0 && s.max_timestamp <= cleanable_before && s.end_offset <= stable_end
        })
        .count();
    if cleanable == 0 {
        let expired = first_dirty > 0 && horizon.is_some_and(|h| now_ms >= h);
        return expired.then(|| Plan {
            segments: segments[..first_dirty].to_vec(),
            first_dirty,
        });
    }
    let considered = &segments[..first_dirty + cleanable];
    let overdue =
        segments[first_dirty].max_timestamp <= now_ms.saturating_sub(config.max_compaction_lag_ms);
    if dirt(considered).ratio() < config.min_cleanable_dirty_ratio && !overdue {
        return None;
    }
    Some(Plan {
        segments: considered.to_vec(),
        first_dirty,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CleanupPolicy;
    use std::collections::BTreeMap;

    fn seg(
        base: i64,
        end: i64,
        bytes: u64,
        max_timestamp: i64,
        compacted_ms: i64,
    ) -> SegmentRecord {
        SegmentRecord {
            base_offset: base,
            end_offset: end,
            object_key: format!("s/{base}"),
            size_bytes: bytes + 100,
            data_bytes: bytes,
            max_timestamp,
            created_ms: max_timestamp,
            compacted_ms,
        }
    }

    fn config(ratio: f64, min_lag: i64, max_lag: i64) -> TopicConfig {
        TopicConfig {
            cleanup: CleanupPolicy {
                delete: false,
                compact: true,
            },
            min_cleanable_dirty_ratio: ratio,
            min_compaction_lag_ms: min_lag,
            max_compaction_lag_ms: max_lag,
            ..TopicConfig::resolve(&BTreeMap::new(), &BTreeMap::new())
        }
    }

    #[test]
    fn a_pass_is_due_by_ratio_or_by_age_and_never_takes_young_segments() {
        let segments = vec![
            seg(0, 10, 600, 100, 5),
            seg(10, 20, 300, 200, 0),
            seg(20, 30, 300, 900, 0),
        ];
        // 600 dirty of 1,200: due at a ratio of 0.5, not 0.6.
        let p = plan(&segments, &config(0.5, 0, i64::MAX), 1_000, None, i64::MAX).expect("due");
        assert_eq!((p.segments.len(), p.first_dirty), (3, 1));
        assert_eq!(
            plan(&segments, &config(0.6, 0, i64::MAX), 1_000, None, i64::MAX),
            None
        );
        // The min lag keeps the young segment out: 300 dirty of 900.
        let p = plan(
            &segments,
            &config(0.3, 500, i64::MAX),
            1_000,
            None,
            i64::MAX,
        )
        .expect("due");
        assert_eq!(p.segments.len(), 2);
        assert_eq!(
            plan(
                &segments,
                &config(0.4, 500, i64::MAX),
                1_000,
                None,
                i64::MAX
            ),
            None
        );
        // Past the max lag, any ratio will do.
        let p = plan(&segments, &config(0.9, 0, 700), 1_000, None, i64::MAX).expect("overdue");
        assert_eq!(p.segments.len(), 3);
        // Nothing dirty, or not a compacted topic: nothing to do.
        assert_eq!(
            plan(&segments[..1], &config(0.0, 0, 1), 1_000, None, i64::MAX),
            None
        );
        let delete_only = TopicConfig {
            cleanup: CleanupPolicy {
                delete: true,
                compact: false,
            },
            ..config(0.0, 0, 1)
        };
        assert_eq!(plan(&segments, &delete_only, 1_000, None, i64::MAX), None);
        // Nothing dirty, but kept tombstones past their horizon: the compacted part alone.
        let p = plan(
            &segments[..1],
            &config(0.5, 0, i64::MAX),
            1_000,
            Some(900),
            i64::MAX,
        )
        .expect("due");
        assert_eq!((p.segments.len(), p.first_dirty), (1, 1));
        assert_eq!(
            plan(
                &segments[..1],
                &config(0.5, 0, i64::MAX),
                1_000,
                Some(1_001),
                i64::MAX
            ),
            None
        );
    }

    /// A segment holding records of an open transaction (past the last stable offset)
    /// is not cleanable yet, nor is any after it.
    #[test]
    fn a_pass_stops_at_the_last_stable_offset() {
        let segments = vec![
            seg(0, 10, 300, 100, 0),
            seg(10, 20, 300, 200, 0),
            seg(20, 30, 300, 300, 0),
        ];
        let all = config(0.0, 0, i64::MAX);
        let p = plan(&segments, &all, 1_000, None, 15).expect("due");
        assert_eq!(p.segments, segments[..1].to_vec());
        assert_eq!(plan(&segments, &all, 1_000, None, 5), None);
        let p = plan(&segments, &all, 1_000, None, 30).expect("due");
        assert_eq!(p.segments.len(), 3);
    }
}
