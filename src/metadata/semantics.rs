//! What the metadata operations mean, written once for every backend.
//!
//! A backend is storage: inside one transaction it reads the rows an operation depends
//! on, hands them to a function here, and stores what comes back in its own terms (SQL
//! statements, or changes to the bucket store's in-memory state). The fenced writes go
//! through one planner: the backend reads the rows of the partitions an operation is
//! fenced on ([`Op::fences`]), [`plan`] answers the [`Write`]s to apply. Everything an
//! operation decides (which epochs fence it, what a missing partition means, that a high
//! watermark or a log start offset never moves backwards, which ranges a segment
//! replaces, which offsets go) is decided here. The unfenced operations' rules are plain
//! functions beside it: topic creation, deletion and growth ([`create_topic`],
//! [`stored_topic`], [`new_partitions`]), claims and releases ([`claim`], [`release`]),
//! producer ids and broker sessions ([`next_producer_id`], [`next_session`]), broker
//! registrations ([`heartbeat`], [`deregisters`], [`is_live`]) and write-ahead garbage
//! ([`unreferenced_wal_objects`]). So the three backends cannot drift apart, and a new
//! operation is one function here plus the storage it needs. The conformance suite
//! (`conformance.rs`) holds every backend to it.

use std::collections::HashMap;
use std::ops::Range;

use super::{
    AbortedTxnRecord, BrokerRecord, CommittedOffset, Fence, MetaError, MetaResult, PartitionKey,
    PartitionOwner, ProducerStateRecord, SegmentRecord, TopicRecord, TxnOffsetRecord, TxnRecord,
    TxnState, WalCommit, WalRangeRecord,
};

/// The first producer id handed out. Persisted (every backend's counter starts here);
/// stable.
pub(crate) const FIRST_PRODUCER_ID: i64 = 1000;
/// The first session of a broker id.
const FIRST_SESSION: i64 = 1;

/// A fenced write, as callers ask for it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op<'a> {
    /// One or more write-ahead objects, committed together in this order.
    CommitWal(&'a [WalCommit]),
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
    /// Compaction's swap: the segments at `replaced` (base offsets) give way to
    /// `segments`, which cover the same offsets.
    ReplaceSegments {
        key: PartitionKey,
        leader_epoch: i32,
        replaced: &'a [i64],
        segments: &'a [SegmentRecord],
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
    /// A transactional id's new record (completing a transaction also settles the
    /// offsets committed in it).
    PutTxn { record: &'a TxnRecord, fence: Fence },
    DeleteTxn {
        transactional_id: &'a str,
        fence: Fence,
    },
    CommitTxnOffsets {
        group: &'a str,
        offsets: &'a [TxnOffsetRecord],
        fence: Option<Fence>,
    },
}

/// The stored scalar columns of one partition: what the semantics read, and what a
/// claim or a release writes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PartitionRow {
    pub leader_epoch: i32,
    pub high_watermark: i64,
    pub log_start_offset: i64,
    /// The broker that claimed it last; `None` once released (or never claimed).
    pub owner: Option<i32>,
}

impl PartitionRow {
    /// A partition as topic creation and growth make it: epoch 0, an empty log, no
    /// owner.
    pub(crate) const NEW: PartitionRow = PartitionRow {
        leader_epoch: 0,
        high_watermark: 0,
        log_start_offset: 0,
        owner: None,
    };

    /// Who holds the partition `key` of this row, for assignment and Metadata answers.
    pub(crate) fn as_owner(&self, key: PartitionKey) -> PartitionOwner {
        PartitionOwner {
            key,
            leader_epoch: self.leader_epoch,
            owner: self.owner,
        }
    }
}

/// The rows read for an operation's fences; a key absent here does not exist.
pub(crate) type Rows = HashMap<PartitionKey, PartitionRow>;

/// A change in storage terms. Each backend implements every variant once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Write<'a> {
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
    /// Drop the segments at `drop` (base offsets), then insert `insert` (which may reuse
    /// those base offsets), in this order.
    ReplaceSegments {
        key: PartitionKey,
        drop: &'a [i64],
        insert: &'a [SegmentRecord],
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
    /// Remember an aborted transaction of a partition (nothing if known).
    InsertAbortedTxn {
        key: PartitionKey,
        aborted: &'a AbortedTxnRecord,
    },
    /// Forget a partition's aborted transactions whose marker is below `offset`.
    DropAbortedBelow {
        key: PartitionKey,
        offset: i64,
    },
    /// Insert or replace a transactional id's record.
    UpsertTxn {
        record: &'a TxnRecord,
    },
    DeleteTxn {
        transactional_id: &'a str,
    },
    /// Insert or replace a pending transactional offset (keyed by group, topic,
    /// partition and producer id).
    UpsertTxnOffset {
        group: &'a str,
        pending: &'a TxnOffsetRecord,
    },
    /// Settle a producer's pending offsets of a group: with `commit`, each replaces the
    /// group's committed offset of its partition; either way they are then deleted.
    SettleTxnOffsets {
        group: &'a str,
        producer_id: i64,
        commit: bool,
    },
}

impl Op<'_> {
    /// The partitions (or coordinator slots) whose rows the operation reads.
    pub(crate) fn fences(&self) -> Vec<PartitionKey> {
        match self {
            Op::CommitWal(commits) => commits
                .iter()
                .flat_map(|c| c.partitions.iter().map(|p| p.key))
                .collect(),
            Op::CommitSegment { key, .. }
            | Op::TrimLog { key, .. }
            | Op::ReplaceSegments { key, .. } => vec![*key],
            Op::CommitOffsets { fence, .. }
            | Op::DeleteOffsets { fence, .. }
            | Op::ExpireOffsets { fence, .. }
            | Op::CommitTxnOffsets { fence, .. } => fence.iter().map(|f| f.key).collect(),
            Op::PutTxn { fence, .. } | Op::DeleteTxn { fence, .. } => vec![fence.key],
        }
    }
}

/// The epoch check of a write on one partition (or coordinator slot): a missing one is
/// `PartitionNotFound`, a newer epoch `Fenced`.
pub(crate) fn check_epoch(
    key: PartitionKey,
    stored: Option<&PartitionRow>,
    leader_epoch: i32,
) -> MetaResult<&PartitionRow> {
    let row = stored.ok_or(MetaError::PartitionNotFound)?;
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

fn require(rows: &Rows, key: PartitionKey, leader_epoch: i32) -> MetaResult<&PartitionRow> {
    check_epoch(key, rows.get(&key), leader_epoch)
}

/// The fence check of a coordinator's write (none: unfenced). Also what a write that
/// turns out to change nothing still answers.
pub(crate) fn check_fence(rows: &Rows, fence: Option<Fence>) -> MetaResult<()> {
    match fence {
        Some(f) => require(rows, f.key, f.leader_epoch).map(|_| ()),
        None => Ok(()),
    }
}

/// Decides an operation against the rows its fences read: the writes to apply, or why
/// nothing is applied. Writes that count (offset deletions) make the operation's
/// answer the sum of their counts.
pub(crate) fn plan<'a>(rows: &Rows, op: Op<'a>) -> MetaResult<Vec<Write<'a>>> {
    match op {
        Op::CommitWal(commits) => {
            // Every partition at its writer's epoch, or nothing at all; a partition
            // that no longer exists (its topic was deleted) is fenced with the stale
            // ones: its owner has lost it for good, and the rest can be retried.
            let mut fenced: Vec<PartitionKey> = Vec::new();
            for p in commits.iter().flat_map(|c| &c.partitions) {
                let current = rows.get(&p.key).map(|r| r.leader_epoch) == Some(p.leader_epoch);
                if !current && !fenced.contains(&p.key) {
                    fenced.push(p.key);
                }
            }
            if !fenced.is_empty() {
                tracing::debug!(objects = commits.len(), ?fenced, "fenced wal commit");
                return Err(MetaError::Fenced(fenced));
            }
            let mut writes = Vec::new();
            let mut high: HashMap<PartitionKey, i64> = HashMap::new();
            for commit in commits {
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
                    writes.extend(part.aborted.iter().map(|aborted| Write::InsertAbortedTxn {
                        key: part.key,
                        aborted,
                    }));
                }
            }
            for part in commits.iter().flat_map(|c| &c.partitions) {
                if let Some(hw) = high.remove(&part.key) {
                    writes.push(Write::SetHighWatermark {
                        key: part.key,
                        high_watermark: hw,
                    });
                }
            }
            writes.extend(commits.iter().map(|c| Write::RememberWalObject {
                object_key: &c.object_key,
                created_ms: c.created_ms,
            }));
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
            // The log start offset only rises; aborted transactions whose marker it
            // passed no longer concern any reader.
            let log_start_offset = row.log_start_offset.max(log_start_offset);
            let mut writes = vec![
                Write::SetLogStartOffset {
                    key,
                    log_start_offset,
                },
                Write::DropAbortedBelow {
                    key,
                    offset: log_start_offset,
                },
            ];
            writes.extend(
                drop_segment_base_offsets
                    .iter()
                    .map(|&base_offset| Write::DropSegment { key, base_offset }),
            );
            Ok(writes)
        }
        Op::ReplaceSegments {
            key,
            leader_epoch,
            replaced,
            segments,
        } => {
            // Only the owner at this epoch changes its manifest, and its owner task
            // commits the swap itself after checking its view still holds exactly the
            // replaced segments: so the manifest the compaction read is the one it
            // replaces. The store checks the epoch, and that a trim the owner never
            // heard of (its answer lost) did not drop what the pass read: a trim drops
            // every segment wholly below the log start, so a swap wholly below it
            // would bring dropped offsets back as an island before a hole.
            let row = require(rows, key, leader_epoch)?;
            let end = segments.last().map_or(i64::MAX, |s| s.end_offset);
            if end <= row.log_start_offset {
                return Err(MetaError::Conflict(format!(
                    "the swapped segments end at {end}, at or below the log start offset {}",
                    row.log_start_offset
                )));
            }
            Ok(vec![Write::ReplaceSegments {
                key,
                drop: replaced,
                insert: segments,
            }])
        }
        Op::CommitOffsets {
            group,
            offsets,
            fence,
        } => {
            check_fence(rows, fence)?;
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
            check_fence(rows, fence)?;
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
            check_fence(rows, fence)?;
            Ok(groups
                .iter()
                .map(|group| Write::ExpireOffsets { group, before_ms })
                .collect())
        }
        Op::PutTxn { record, fence } => {
            check_fence(rows, Some(fence))?;
            let mut writes = vec![Write::UpsertTxn { record }];
            let settle = match record.state {
                TxnState::CompleteCommit => Some(true),
                TxnState::CompleteAbort => Some(false),
                _ => None,
            };
            if let Some(commit) = settle {
                writes.extend(record.groups.iter().map(|group| Write::SettleTxnOffsets {
                    group,
                    producer_id: record.producer_id,
                    commit,
                }));
            }
            Ok(writes)
        }
        Op::DeleteTxn {
            transactional_id,
            fence,
        } => {
            check_fence(rows, Some(fence))?;
            Ok(vec![Write::DeleteTxn { transactional_id }])
        }
        Op::CommitTxnOffsets {
            group,
            offsets,
            fence,
        } => {
            check_fence(rows, fence)?;
            Ok(offsets
                .iter()
                .map(|pending| Write::UpsertTxnOffset { group, pending })
                .collect())
        }
    }
}

/// Creating a topic: a name already taken is `TopicExists`; otherwise the topic is
/// stored with its partitions `0..partitions`, each [`PartitionRow::NEW`].
pub(crate) fn create_topic(name_taken: bool, topic: &TopicRecord) -> MetaResult<Range<i32>> {
    if name_taken {
        return Err(MetaError::TopicExists);
    }
    Ok(0..topic.partitions)
}

/// The topic an operation names (deletion, configs, growth): one that is not stored is
/// `TopicNotFound`. Deleting a topic removes its partitions with everything they hold;
/// the write-ahead objects they referenced stay (as garbage once unreferenced) and so
/// do committed offsets (keyed by topic name; the broker removes them).
pub(crate) fn stored_topic<T>(stored: Option<T>) -> MetaResult<T> {
    stored.ok_or(MetaError::TopicNotFound)
}

/// Growing a topic to `count` partitions: the partitions to add, each
/// [`PartitionRow::NEW`], or `None` when `count` is not above the current count (a
/// topic never shrinks, and callers validate requests, so that is a no-op, not an
/// error).
pub(crate) fn new_partitions(topic: &TopicRecord, count: i32) -> Option<Range<i32>> {
    (count > topic.partitions).then_some(topic.partitions..count)
}

/// What a claim stores: the partition's new row and the epoch history entry it adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claim {
    pub row: PartitionRow,
    /// (the new epoch, the first offset it writes: the high watermark at the claim).
    pub history: (i32, i64),
}

/// Claiming a partition: the leader epoch goes one past the stored one (fencing every
/// earlier owner) and the claimer becomes the owner. A missing partition is
/// `PartitionNotFound`; an epoch that cannot grow is `Corrupt`.
pub(crate) fn claim(
    key: PartitionKey,
    stored: Option<PartitionRow>,
    broker_id: i32,
) -> MetaResult<Claim> {
    let row = stored.ok_or(MetaError::PartitionNotFound)?;
    let leader_epoch = row.leader_epoch.checked_add(1).ok_or_else(|| {
        MetaError::Corrupt(format!(
            "leader epoch of {key:?} cannot grow past {}",
            row.leader_epoch
        ))
    })?;
    Ok(Claim {
        row: PartitionRow {
            leader_epoch,
            owner: Some(broker_id),
            ..row
        },
        history: (leader_epoch, row.high_watermark),
    })
}

/// Releasing a partition (graceful hand-off): only at the caller's epoch (else `Fenced`,
/// or `PartitionNotFound`); the row loses its owner and keeps its epoch, so the next
/// claim fences the releaser all the same.
pub(crate) fn release(
    key: PartitionKey,
    stored: Option<PartitionRow>,
    leader_epoch: i32,
) -> MetaResult<PartitionRow> {
    let row = *check_epoch(key, stored.as_ref(), leader_epoch)?;
    Ok(PartitionRow { owner: None, ..row })
}

/// The next producer id after the last one handed out (`None`: none yet). Ids are never
/// reused, so exhausting them is an error rather than a wrap.
pub(crate) fn next_producer_id(last: Option<i64>) -> MetaResult<i64> {
    match last {
        None => Ok(FIRST_PRODUCER_ID),
        Some(last) => last
            .checked_add(1)
            .ok_or_else(|| MetaError::Corrupt(format!("producer ids are exhausted at {last}"))),
    }
}

/// The next session of a broker id after its last one (`None`: never started): higher
/// than every earlier one, so a restarted broker supersedes its old self.
pub(crate) fn next_session(last: Option<i64>) -> MetaResult<i64> {
    match last {
        None => Ok(FIRST_SESSION),
        Some(last) => last
            .checked_add(1)
            .ok_or_else(|| MetaError::Corrupt(format!("broker sessions are exhausted at {last}"))),
    }
}

/// A heartbeat against the stored registration's session (`None`: not registered):
/// refused with `Superseded` when a newer session of the broker id is registered;
/// otherwise `broker` replaces the stored registration (same or newer session).
pub(crate) fn heartbeat(stored_session: Option<i64>, broker: &BrokerRecord) -> MetaResult<()> {
    match stored_session {
        Some(stored) if stored > broker.session => Err(MetaError::Superseded),
        _ => Ok(()),
    }
}

/// Whether deregistering `session` removes the stored registration (`None`: not
/// registered): only its own, never a newer session's.
pub(crate) fn deregisters(stored_session: Option<i64>, session: i64) -> bool {
    stored_session == Some(session)
}

/// Whether a registered broker is live at `now_ms`: strictly before its lease expires.
pub(crate) fn is_live(broker: &BrokerRecord, now_ms: i64) -> bool {
    broker.lease_expires_ms > now_ms
}

/// A remembered write-ahead object, as garbage collection judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WalObject {
    pub object_key: String,
    pub created_ms: i64,
    /// Whether any partition's range still points into it.
    pub referenced: bool,
}

/// The write-ahead objects that are garbage: those no range references, oldest first
/// (ties by key), so collection deletes in the order they were written.
pub(crate) fn unreferenced_wal_objects(
    objects: impl IntoIterator<Item = WalObject>,
) -> Vec<String> {
    let mut garbage: Vec<(i64, String)> = objects
        .into_iter()
        .filter(|o| !o.referenced)
        .map(|o| (o.created_ms, o.object_key))
        .collect();
    garbage.sort();
    garbage.into_iter().map(|(_, key)| key).collect()
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
                        owner: None,
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
                    aborted: vec![],
                },
                PartitionCommit {
                    key: key(1),
                    leader_epoch: 1,
                    range: range(0, 5),
                    producers: vec![],
                    aborted: vec![],
                },
                PartitionCommit {
                    key: key(2),
                    leader_epoch: 1,
                    range: range(0, 5),
                    producers: vec![],
                    aborted: vec![],
                },
            ],
        };
        // Partition 1 has a newer owner, partition 2 is gone.
        let stale = rows(&[(0, 2, 10, 0), (1, 3, 0, 0)]);
        match plan(&stale, Op::CommitWal(std::slice::from_ref(&commit))) {
            Err(MetaError::Fenced(keys)) => assert_eq!(keys, vec![key(1), key(2)]),
            other => panic!("{other:?}"),
        }
        let current = rows(&[(0, 2, 10, 0), (1, 1, 0, 0), (2, 1, 30, 0)]);
        let writes =
            plan(&current, Op::CommitWal(std::slice::from_ref(&commit))).expect("current epochs");
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

    /// Several objects in one commit: ranges in order, the high watermark at the last
    /// one's end, every object remembered; one stale epoch anywhere fences it all.
    #[test]
    fn several_objects_commit_as_one() {
        let object = |name: &str, base, end| WalCommit {
            object_key: name.into(),
            created_ms: 7,
            partitions: vec![PartitionCommit {
                key: key(0),
                leader_epoch: 2,
                range: range(base, end),
                producers: vec![],
                aborted: vec![],
            }],
        };
        let commits = [object("wal/1", 10, 20), object("wal/2", 20, 25)];
        let writes = plan(&rows(&[(0, 2, 10, 0)]), Op::CommitWal(&commits)).expect("current");
        let ranges: Vec<(&str, i64)> = writes
            .iter()
            .filter_map(|w| match w {
                Write::InsertRange { range, .. } => {
                    Some((range.object_key.as_str(), range.end_offset))
                }
                _ => None,
            })
            .collect();
        assert_eq!(ranges, vec![("wal/1", 20), ("wal/2", 25)]);
        assert!(writes.contains(&Write::SetHighWatermark {
            key: key(0),
            high_watermark: 25
        }));
        let remembered = writes
            .iter()
            .filter(|w| matches!(w, Write::RememberWalObject { .. }))
            .count();
        assert_eq!(remembered, 2);
        match plan(&rows(&[(0, 3, 10, 0)]), Op::CommitWal(&commits)) {
            Err(MetaError::Fenced(keys)) => assert_eq!(keys, vec![key(0)], "named once"),
            other => panic!("{other:?}"),
        }
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

    fn topic(partitions: i32) -> TopicRecord {
        TopicRecord {
            name: "t".into(),
            id: uuid::Uuid::nil(),
            partitions,
            configs: Default::default(),
            created_ms: 0,
        }
    }

    #[test]
    fn topics_are_created_once_and_only_grow() {
        assert_eq!(create_topic(false, &topic(3)).expect("new name"), 0..3);
        assert!(matches!(
            create_topic(true, &topic(3)),
            Err(MetaError::TopicExists)
        ));
        assert!(matches!(
            stored_topic::<TopicRecord>(None),
            Err(MetaError::TopicNotFound)
        ));
        assert_eq!(new_partitions(&topic(3), 5), Some(3..5));
        assert_eq!(new_partitions(&topic(3), 3), None);
        assert_eq!(new_partitions(&topic(3), 1), None, "never shrinks");
    }

    #[test]
    fn a_claim_bumps_the_epoch_and_records_where_it_starts() {
        let stored = PartitionRow {
            leader_epoch: 4,
            high_watermark: 70,
            log_start_offset: 10,
            owner: Some(1),
        };
        let claimed = claim(key(0), Some(stored), 2).expect("claim");
        assert_eq!(
            claimed,
            Claim {
                row: PartitionRow {
                    leader_epoch: 5,
                    owner: Some(2),
                    ..stored
                },
                history: (5, 70),
            }
        );
        assert!(matches!(
            claim(key(0), None, 2),
            Err(MetaError::PartitionNotFound)
        ));
        let worn_out = PartitionRow {
            leader_epoch: i32::MAX,
            ..stored
        };
        assert!(matches!(
            claim(key(0), Some(worn_out), 2),
            Err(MetaError::Corrupt(_))
        ));
    }

    #[test]
    fn only_the_current_epoch_releases() {
        let stored = PartitionRow {
            leader_epoch: 4,
            high_watermark: 70,
            log_start_offset: 10,
            owner: Some(1),
        };
        assert_eq!(
            release(key(0), Some(stored), 4).expect("current"),
            PartitionRow {
                owner: None,
                ..stored
            }
        );
        assert!(matches!(
            release(key(0), Some(stored), 3),
            Err(MetaError::Fenced(_))
        ));
        assert!(matches!(
            release(key(0), None, 4),
            Err(MetaError::PartitionNotFound)
        ));
    }

    #[test]
    fn counters_start_at_their_documented_values_and_never_wrap() {
        assert_eq!(next_producer_id(None).expect("first"), FIRST_PRODUCER_ID);
        assert_eq!(next_producer_id(Some(1000)).expect("next"), 1001);
        assert!(matches!(
            next_producer_id(Some(i64::MAX)),
            Err(MetaError::Corrupt(_))
        ));
        assert_eq!(next_session(None).expect("first"), 1);
        assert_eq!(next_session(Some(7)).expect("next"), 8);
        assert!(matches!(
            next_session(Some(i64::MAX)),
            Err(MetaError::Corrupt(_))
        ));
    }

    #[test]
    fn a_newer_session_supersedes_and_only_its_own_session_deregisters() {
        let broker = BrokerRecord {
            broker_id: 1,
            session: 2,
            host: "h".into(),
            port: 9092,
            zone: None,
            lease_expires_ms: 100,
            draining: false,
        };
        assert!(heartbeat(None, &broker).is_ok(), "first registration");
        assert!(heartbeat(Some(2), &broker).is_ok(), "renewal");
        assert!(heartbeat(Some(1), &broker).is_ok(), "restart takes over");
        assert!(matches!(
            heartbeat(Some(3), &broker),
            Err(MetaError::Superseded)
        ));
        assert!(deregisters(Some(2), 2));
        assert!(!deregisters(Some(3), 2), "a newer session stays");
        assert!(!deregisters(None, 2));
        assert!(is_live(&broker, 99));
        assert!(!is_live(&broker, 100), "live strictly before expiry");
    }

    #[test]
    fn garbage_is_the_unreferenced_objects_oldest_first() {
        let object = |key: &str, created_ms, referenced| WalObject {
            object_key: key.into(),
            created_ms,
            referenced,
        };
        let garbage = unreferenced_wal_objects([
            object("wal/c", 2, false),
            object("wal/a", 1, true),
            object("wal/b", 2, false),
            object("wal/d", 1, false),
        ]);
        assert_eq!(garbage, vec!["wal/d", "wal/b", "wal/c"]);
    }
}
