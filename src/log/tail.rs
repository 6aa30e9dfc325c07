//! The unsealed tail of a partition: which part of it to seal into a segment object
//! next, and the check every segment passes before it is uploaded.
//!
//! Between the last sealed segment object and the high watermark, every committed
//! batch is in a write-ahead object (the manifest's ranges); local segment files are
//! only a cache of it. The local files may have holes: a partition taken over starts
//! with none, a disk that filled up stopped a file short, a file that failed its check
//! was thrown away. So sealing works in offset order from the end of the sealed log:
//! a closed local file that starts there is uploaded from disk, and any stretch no
//! local file holds is built from the write-ahead ranges instead. Either way the
//! segment's bytes are checked first: whole batches, each with a good CRC, in offset
//! order with no offset missing, from the segment's base to its end. A segment that
//! fails is never committed, so the write-ahead objects behind it are never collected;
//! a local file that fails is dropped and its stretch rebuilt from them.

use bytes::Bytes;
use tiering::segment::BatchEntry;

use super::batch::{self, BatchHeader};

/// A local segment file as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LocalSpan {
    pub base: i64,
    /// Exclusive.
    pub end: i64,
    /// Still taking appends: sealed later, by size or age.
    pub active: bool,
}

/// What to seal and upload next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NextUpload {
    /// The closed local segment file starting at `base`.
    Local { base: i64 },
    /// `[base, end)`, which no local file holds, built from the write-ahead ranges.
    WriteAhead { base: i64, end: i64 },
}

/// The tail as the planner sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TailState<'a> {
    /// End of the log sealed in segment objects: the next upload starts here.
    pub sealed_end: i64,
    pub high_watermark: i64,
    /// Local segment files, ascending, possibly with holes between them.
    pub local: &'a [LocalSpan],
    /// Whether a stretch reaching the high watermark that no local file holds (the disk
    /// cannot take writes) is big or old enough to be sealed now.
    pub open_stretch_due: bool,
}

/// The next upload, if any is due. It always starts at the end of the sealed log, so
/// segment objects follow each other with no offset missing.
pub(crate) fn next_upload(t: &TailState<'_>) -> Option<NextUpload> {
    if t.sealed_end >= t.high_watermark {
        return None;
    }
    if let Some(seg) = t
        .local
        .iter()
        .find(|s| s.base == t.sealed_end && s.end > s.base)
    {
        return (!seg.active).then_some(NextUpload::Local { base: seg.base });
    }
    let next_local = t
        .local
        .iter()
        .map(|s| s.base)
        .filter(|&b| b > t.sealed_end)
        .min();
    match next_local {
        Some(end) => Some(NextUpload::WriteAhead {
            base: t.sealed_end,
            end: end.min(t.high_watermark),
        }),
        None if t.open_stretch_due => Some(NextUpload::WriteAhead {
            base: t.sealed_end,
            end: t.high_watermark,
        }),
        None => None,
    }
}

/// Why a segment's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CheckError {
    #[error("the bytes could not be read: {0}")]
    Read(String),
    #[error("no readable batch at byte {position} where offset {expected} should start")]
    Unreadable { expected: i64, position: u64 },
    #[error("the batch of offset {base_offset} at byte {position} fails its crc")]
    Crc { base_offset: i64, position: u64 },
    #[error("the batch at byte {position} starts at offset {found}; offset {expected} is missing")]
    Gap {
        expected: i64,
        found: i64,
        position: u64,
    },
    #[error("the batch of offset {base_offset} holds {records} records for {offsets} offsets")]
    RecordCount {
        base_offset: i64,
        records: i32,
        offsets: i64,
    },
    #[error("the batches end at offset {found}, the segment at {expected}")]
    End { expected: i64, found: i64 },
}

/// What a checked segment holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentContents {
    /// One entry per batch, positions counted across all parts.
    pub entries: Vec<BatchEntry>,
    /// Largest record timestamp (-1 without batches).
    pub max_timestamp: i64,
}

/// Checks that `parts` (whole batches each) hold exactly offsets `base..end`: every
/// batch readable, its CRC good, its record count within its offsets, and each batch
/// starting where the one before ended.
pub(crate) fn check_segment(
    parts: &[Bytes],
    base: i64,
    end: i64,
) -> Result<SegmentContents, CheckError> {
    let mut entries = Vec::new();
    let mut expected = base;
    let mut max_timestamp = -1;
    let mut at = 0u64;
    for part in parts {
        let mut pos = 0usize;
        while pos < part.len() {
            let position = at + pos as u64;
            let header = part
                .get(pos..)
                .and_then(|rest| BatchHeader::parse(rest).ok())
                .filter(|h| pos + h.total_len <= part.len() && h.last_offset_delta >= 0)
                .ok_or(CheckError::Unreadable { expected, position })?;
            let bytes = &part[pos..pos + header.total_len];
            if !batch::crc_matches(bytes) {
                return Err(CheckError::Crc {
                    base_offset: header.base_offset,
                    position,
                });
            }
            if header.base_offset != expected {
                return Err(CheckError::Gap {
                    expected,
                    found: header.base_offset,
                    position,
                });
            }
            let offsets = header.offset_count();
            if header.record_count < 1 || i64::from(header.record_count) > offsets {
                return Err(CheckError::RecordCount {
                    base_offset: header.base_offset,
                    records: header.record_count,
                    offsets,
                });
            }
            entries.push(BatchEntry {
                base_offset: header.base_offset,
                last_offset: header.last_offset(),
                max_timestamp: header.max_timestamp,
                position,
                len: header.total_len as u32,
            });
            max_timestamp = max_timestamp.max(header.max_timestamp);
            expected = header.last_offset() + 1;
            pos += header.total_len;
        }
        at += part.len() as u64;
    }
    if expected != end {
        return Err(CheckError::End {
            expected: end,
            found: expected,
        });
    }
    Ok(SegmentContents {
        entries,
        max_timestamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::batch::{stamp, tests::make_batch};
    use proptest::prelude::*;

    /// Stamped batches of the given record counts from offset `base`.
    fn batches(base: i64, counts: &[i32]) -> Vec<Bytes> {
        let mut offset = base;
        counts
            .iter()
            .map(|&n| {
                let b = stamp(&make_batch(n, -1, -1, -1, offset), offset, 0);
                offset += i64::from(n);
                b
            })
            .collect()
    }

    #[test]
    fn a_whole_run_passes_and_is_indexed() {
        let parts = batches(100, &[2, 3, 1]);
        let len0 = parts[0].len() as u64;
        let got = check_segment(&parts, 100, 106).expect("passes");
        assert_eq!(got.entries.len(), 3);
        assert_eq!(got.entries[1].base_offset, 102);
        assert_eq!(got.entries[1].position, len0);
        assert_eq!(got.entries[2].last_offset, 105);
    }

    #[test]
    fn a_missing_batch_is_refused() {
        let mut parts = batches(0, &[2, 3, 1]);
        parts.remove(1);
        assert_eq!(
            check_segment(&parts, 0, 6),
            Err(CheckError::Gap {
                expected: 2,
                found: 5,
                position: parts[0].len() as u64
            })
        );
    }

    #[test]
    fn a_short_or_corrupt_segment_is_refused() {
        let parts = batches(0, &[2, 3]);
        assert_eq!(
            check_segment(&parts[..1], 0, 5),
            Err(CheckError::End {
                expected: 5,
                found: 2
            })
        );
        let mut bad = parts[1].to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        let corrupt = vec![parts[0].clone(), Bytes::from(bad)];
        assert!(matches!(
            check_segment(&corrupt, 0, 5),
            Err(CheckError::Crc { base_offset: 2, .. })
        ));
        let truncated = vec![parts[0].slice(..parts[0].len() - 1)];
        assert!(matches!(
            check_segment(&truncated, 0, 2),
            Err(CheckError::Unreadable { expected: 0, .. })
        ));
    }

    proptest! {
        /// Dropping, duplicating or swapping any batch of a run is always caught, and
        /// the intact run always passes, however it is split into parts.
        #[test]
        fn any_hole_or_reordering_is_caught(
            counts in prop::collection::vec(1i32..5, 1..12),
            split in 0usize..12,
            damage in 0usize..3,
            pick in any::<prop::sample::Index>(),
        ) {
            let all = batches(7, &counts);
            let end = 7 + counts.iter().map(|&c| i64::from(c)).sum::<i64>();
            let split = split.min(all.len());
            let joined = |v: &[Bytes]| -> Vec<Bytes> {
                let cut = split.min(v.len());
                [&v[..cut], &v[cut..]]
                    .iter()
                    .filter(|p| !p.is_empty())
                    .map(|p| Bytes::from(p.concat()))
                    .collect()
            };
            prop_assert!(check_segment(&joined(&all), 7, end).is_ok());
            let i = pick.index(all.len());
            let mut damaged = all.clone();
            match damage {
                0 => { damaged.remove(i); }
                1 => { damaged.insert(i, all[i].clone()); }
                _ => {
                    if all.len() < 2 { return Ok(()); }
                    let j = (i + 1) % all.len();
                    damaged.swap(i, j);
                }
            }
            prop_assert!(check_segment(&joined(&damaged), 7, end).is_err());
        }

        /// Sealing whatever `next_upload` picks, again and again, seals the whole tail
        /// in offset order with no offset skipped, and never picks the active file.
        #[test]
        fn uploads_seal_the_tail_in_order(
            cuts in prop::collection::btree_set(1i64..200, 0..10),
            present in prop::collection::vec(any::<bool>(), 11),
            active_last in any::<bool>(),
        ) {
            // Stretches [0, c1), [c1, c2), ... [ck, 200); some are local files.
            let bounds: Vec<i64> = std::iter::once(0).chain(cuts).chain(std::iter::once(200)).collect();
            let mut local: Vec<LocalSpan> = bounds
                .windows(2)
                .zip(&present)
                .filter(|(_, &p)| p)
                .map(|(w, _)| LocalSpan { base: w[0], end: w[1], active: false })
                .collect();
            let active_at_end = active_last && local.last().is_some_and(|s| s.end == 200);
            if active_at_end {
                if let Some(s) = local.last_mut() { s.active = true; }
            }
            let mut sealed_end = 0;
            let mut rounds = 0;
            while let Some(next) = next_upload(&TailState {
                sealed_end,
                high_watermark: 200,
                local: &local,
                open_stretch_due: true,
            }) {
                rounds += 1;
                prop_assert!(rounds <= 32);
                match next {
                    NextUpload::Local { base } => {
                        prop_assert_eq!(base, sealed_end);
                        let i = local.iter().position(|s| s.base == base).expect("picked a file");
                        prop_assert!(!local[i].active);
                        sealed_end = local.remove(i).end;
                    }
                    NextUpload::WriteAhead { base, end } => {
                        prop_assert_eq!(base, sealed_end);
                        prop_assert!(end > base);
                        prop_assert!(local.iter().all(|s| s.end <= base || s.base >= end));
                        sealed_end = end;
                    }
                }
            }
            let expected_end = if active_at_end { local.last().map_or(200, |s| s.base) } else { 200 };
            prop_assert_eq!(sealed_end, expected_end);
        }
    }
}
