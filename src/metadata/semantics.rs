//! What the fenced metadata writes mean, written once for every backend.
//!
//! A backend is storage: inside one transaction it reads the rows of the partitions an
//! operation is fenced on ([`Op::fences`]), hands them to [`plan`], and applies the
//! [`Write`]s that come back in its own terms (SQL statements, or changes to the bucket
//! store's in-memory state). Everything an operation decides (which epochs fence it,
//! what a missing partition means, that a high watermark or a log start offset never
//! moves backwards, which ranges a segment replaces, which offsets go) is decided here,
//! so the three backends cannot drift apart, and a new operation is one planner plus
//! the storage writes it needs. The conformance suite (`conformance.rs`) holds every
//! backend to it.

use std::collections::HashMap;

use super::{
    CommittedOffset, Fence, MetaError, MetaResult, PartitionKey, ProducerStateRecord,
    SegmentRecord, WalCommit, WalRangeRecord,
};

/// A fenced write, as callers ask for it.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    CommitWal(&'a WalCommit),
    CommitSegment {
        key: PartitionKey,
        leader_epoch: i32,
        segment: &'a SegmentRecord,
    },
    TrimLog {
        key: PartitionKey,
        leader_epoch: i32,
        log_start_offset: i64,
        drop_segment_base_offsets: &'a [i64],
    },
    CommitOffsets {
        group: &'a str,
        offsets: &'a [CommittedOffset],
        fence: Option<Fence>,
    },
    DeleteOffsets {
        group: &'a str,
        /// `None`: every committed offset of the group.
        partitions: Option<&'a [(String, i32)]>,
        fence: Option<Fence>,
    },
    ExpireOffsets {
        groups: &'a [String],
        before_ms: i64,
        fence: Option<Fence>,
    },
}

/// The stored scalar columns of one partition that the semantics read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRow {
    pub leader_epoch: i32,
    pub high_watermark: i64,
    pub log_start_offset: i64,
}

/// The rows read for an operation's fences; a key absent here does not exist.
pub type Rows = HashMap<PartitionKey, PartitionRow>;

/// A change in storage terms. Each backend implements every variant once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write<'a> {
    InsertRange {
        key: PartitionKey,
        range: WalRangeRecord,
    },
    SetHighWatermark {
        key: PartitionKey,
        high_watermark: i64,
    },
    UpsertProducer {
        key: PartitionKey,
        state: &'a ProducerStateRecord,
    },
    /// Remember a write-ahead object (for garbage collection); nothing if known.
    RememberWalObject {
        object_key: &'a str,
        created_ms: i64,
    },
    InsertSegment {
        key: PartitionKey,
        segment: &'a SegmentRecord,
    },
    /// Drop the ranges that end at or before `end_offset`.
    DropRangesThrough {
        key: PartitionKey,
        end_offset: i64,
    },
    SetLogStartOffset {
        key: PartitionKey,
        log_start_offset: i64,
    },
    DropSegment {
        key: PartitionKey,
        base_offset: i64,
    },
    UpsertOffset {
        group: &'a str,
        offset: &'a CommittedOffset,
    },
    /// Delete one committed offset, or all of a group's (`None`). Counts what it deleted.
    DeleteOffsets {
        group: &'a str,
        partition: Option<(&'a str, i32)>,
    },
    /// Delete a group's offsets committed before `before_ms`. Counts what it deleted.
    ExpireOffsets {
        group: &'a str,
        before_ms: i64,
    },
}

impl Op<'_> {
    /// The partitions (or coordinator slots) whose rows the operation reads.
    pub fn fences(&self) -> Vec<PartitionKey> {
        match self {
            Op::CommitWal(commit) => commit.partitions.iter().map(|p| p.key).collect(),
            Op::CommitSegment { key, .. } | Op::TrimLog { key, .. } => vec![*key],
            Op::CommitOffsets { fence, .. }
            | Op::DeleteOffsets { fence, .. }
            | Op::ExpireOffsets { fence, .. } => fence.iter().map(|f| f.key).collect(),
        }
    }
}

/// The epoch check of a write on one partition (or coordinator slot): a missing one is
/// `PartitionNotFound`, a newer epoch `Fenced`.
fn require(rows: &Rows, key: PartitionKey, leader_epoch: i32) -> MetaResult<&PartitionRow> {
    let row = rows.get(&key).ok_or(MetaError::PartitionNotFound)?;
    if row.leader_epoch != leader_epoch {
        tracing::debug!(
            ?key,
            stored = row.leader_epoch,
            leader_epoch,
            "fenced write"
        );
        return Err(MetaError::Fenced(vec![key]));
    }
    Ok(row)
}

fn require_fence(rows: &Rows, fence: Option<Fence>) -> MetaResult<()> {
    match fence {
        Some(f) => require(rows, f.key, f.leader_epoch).map(|_| ()),
        None => Ok(()),
    }
}

/// Decides an operation against the rows its fences read: the writes to apply, or why
/// nothing is applied. Writes that count (offset deletions) make the operation's
/// answer the sum of their counts.
pub fn plan<'a>(rows: &Rows, op: Op<'a>) -> MetaResult<Vec<Write<'a>>> {
    match op {
        Op::CommitWal(commit) => {
            // Every partition at its writer's epoch, or nothing at all; a partition
            // that no longer exists (its topic was deleted) is fenced with the stale
            // ones: its owner has lost it for good, and the rest can be retried.
            let fenced: Vec<PartitionKey> = commit
                .partitions
                .iter()
                .filter(|p| rows.get(&p.key).map(|r| r.leader_epoch) != Some(p.leader_epoch))
                .map(|p| p.key)
                .collect();
            if !fenced.is_empty() {
                tracing::debug!(object_key = %commit.object_key, ?fenced, "fenced wal commit");
                return Err(MetaError::Fenced(fenced));
            }
            let mut writes = Vec::new();
            let mut high: HashMap<PartitionKey, i64> = HashMap::new();
            for part in &commit.partitions {
                let mut range = part.range.clone();
                range.object_key.clone_from(&commit.object_key);
                let hw = high
                    .entry(part.key)
                    .or_insert(rows[&part.key].high_watermark);
                // The high watermark only rises (a retried commit changes nothing).
                *hw = (*hw).max(range.end_offset);
                writes.push(Write::InsertRange {
                    key: part.key,
                    range,
                });
                writes.extend(part.producers.iter().map(|state| Write::UpsertProducer {
                    key: part.key,
                    state,
                }));
            }
            for part in &commit.partitions {
                if let Some(hw) = high.remove(&part.key) {
                    writes.push(Write::SetHighWatermark {
                        key: part.key,
                        high_watermark: hw,
                    });
                }
            }
            writes.push(Write::RememberWalObject {
                object_key: &commit.object_key,
                created_ms: commit.created_ms,
            });
            Ok(writes)
        }
        Op::CommitSegment {
            key,
            leader_epoch,
            segment,
        } => {
            require(rows, key, leader_epoch)?;
            // The segment replaces the write-ahead ranges it covers.
            Ok(vec![
                Write::InsertSegment { key, segment },
                Write::DropRangesThrough {
                    key,
                    end_offset: segment.end_offset,
                },
            ])
        }
        Op::TrimLog {
            key,
            leader_epoch,
            log_start_offset,
            drop_segment_base_offsets,
        } => {
            let row = require(rows, key, leader_epoch)?;
            // The log start offset only rises.
            let mut writes = vec![Write::SetLogStartOffset {
                key,
                log_start_offset: row.log_start_offset.max(log_start_offset),
            }];
            writes.extend(
                drop_segment_base_offsets
                    .iter()
                    .map(|&base_offset| Write::DropSegment { key, base_offset }),
            );
            Ok(writes)
        }
        Op::CommitOffsets {
            group,
            offsets,
            fence,
        } => {
            require_fence(rows, fence)?;
            Ok(offsets
                .iter()
                .map(|offset| Write::UpsertOffset { group, offset })
                .collect())
        }
        Op::DeleteOffsets {
            group,
            partitions,
            fence,
        } => {
            require_fence(rows, fence)?;
            Ok(match partitions {
                None => vec![Write::DeleteOffsets {
                    group,
                    partition: None,
                }],
                Some(list) => list
                    .iter()
                    .map(|(topic, p)| Write::DeleteOffsets {
                        group,
                        partition: Some((topic.as_str(), *p)),
                    })
                    .collect(),
            })
        }
        Op::ExpireOffsets {
            groups,
            before_ms,
            fence,
        } => {
            require_fence(rows, fence)?;
            Ok(groups
                .iter()
                .map(|group| Write::ExpireOffsets { group, before_ms })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::PartitionCommit;

    fn key(p: i32) -> PartitionKey {
        PartitionKey {
            topic_id: uuid::Uuid::nil(),
            partition: p,
        }
    }

    fn rows(list: &[(i32, i32, i64, i64)]) -> Rows {
        list.iter()
            .map(|&(p, leader_epoch, high_watermark, log_start_offset)| {
                (
                    key(p),
                    PartitionRow {
                        leader_epoch,
                        high_watermark,
                        log_start_offset,
                    },
                )
            })
            .collect()
    }

    fn range(base: i64, end: i64) -> WalRangeRecord {
        WalRangeRecord {
            base_offset: base,
            end_offset: end,
            object_key: String::new(),
            position: 0,
            len: 1,
            max_timestamp: 0,
            object_size: 1,
        }
    }

    #[test]
    fn a_wal_commit_applies_whole_or_names_every_stale_partition() {
        let commit = WalCommit {
            object_key: "wal/1".into(),
            created_ms: 5,
            partitions: vec![
                PartitionCommit {
                    key: key(0),
                    leader_epoch: 2,
                    range: range(10, 20),
                    producers: vec![],
                },
                PartitionCommit {
                    key: key(1),
                    leader_epoch: 1,
                    range: range(0, 5),
                    producers: vec![],
                },
                PartitionCommit {
                    key: key(2),
                    leader_epoch: 1,
                    range: range(0, 5),
                    producers: vec![],
                },
            ],
        };
        // Partition 1 has a newer owner, partition 2 is gone.
        let stale = rows(&[(0, 2, 10, 0), (1, 3, 0, 0)]);
        match plan(&stale, Op::CommitWal(&commit)) {
            Err(MetaError::Fenced(keys)) => assert_eq!(keys, vec![key(1), key(2)]),
            other => panic!("{other:?}"),
        }
        let current = rows(&[(0, 2, 10, 0), (1, 1, 0, 0), (2, 1, 30, 0)]);
        let writes = plan(&current, Op::CommitWal(&commit)).expect("current epochs");
        // The high watermark only rises: partition 2 already stood at 30.
        assert!(writes.contains(&Write::SetHighWatermark {
            key: key(0),
            high_watermark: 20
        }));
        assert!(writes.contains(&Write::SetHighWatermark {
            key: key(2),
            high_watermark: 30
        }));
        assert!(writes.iter().all(|w| match w {
            Write::InsertRange { range, .. } => range.object_key == "wal/1",
            _ => true,
        }));
    }

    #[test]
    fn single_partition_writes_are_fenced_and_never_move_back() {
        let r = rows(&[(0, 4, 100, 50)]);
        let trim = |epoch, start| Op::TrimLog {
            key: key(0),
            leader_epoch: epoch,
            log_start_offset: start,
            drop_segment_base_offsets: &[],
        };
        assert!(matches!(plan(&r, trim(3, 60)), Err(MetaError::Fenced(_))));
        assert!(matches!(
            plan(&rows(&[]), trim(4, 60)),
            Err(MetaError::PartitionNotFound)
        ));
        assert_eq!(
            plan(&r, trim(4, 10)).expect("current")[0],
            Write::SetLogStartOffset {
                key: key(0),
                log_start_offset: 50
            }
        );
    }

    #[test]
    fn offset_writes_under_a_fence_need_the_current_epoch() {
        let slot = rows(&[(7, 2, 0, 0)]);
        let fence = |leader_epoch| {
            Some(Fence {
                key: key(7),
                leader_epoch,
            })
        };
        let delete = |f| Op::DeleteOffsets {
            group: "g",
            partitions: None,
            fence: f,
        };
        assert!(matches!(
            plan(&slot, delete(fence(1))),
            Err(MetaError::Fenced(_))
        ));
        assert_eq!(plan(&slot, delete(fence(2))).expect("current").len(), 1);
        assert_eq!(plan(&rows(&[]), delete(None)).expect("unfenced").len(), 1);
        let expire = Op::ExpireOffsets {
            groups: &["a".to_string(), "b".to_string()],
            before_ms: 9,
            fence: fence(1),
        };
        assert!(matches!(plan(&slot, expire), Err(MetaError::Fenced(_))));
    }
}
