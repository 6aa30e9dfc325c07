//! The metadata store kept in the object store itself (`--metadata bucket://`), so a
//! single broker on S3 needs nothing else and survives losing its disk entirely.
//!
//! The state is small and lives in memory; the bucket holds a log of the operations
//! that changed it, plus periodic snapshots:
//! * `meta/log/{seq}.json` — one record per metadata transaction batch: the operations,
//!   in order. Records are written create-only at consecutive sequence numbers, so the
//!   log is linear: a writer that is not up to date (a paused former broker, a second
//!   process on the same bucket) finds its sequence number taken, catches up, and
//!   re-checks its operations against the state it missed. This is the fence: every
//!   epoch-checked write (`commit_wal`, `commit_segment`, `trim_log`) is judged against
//!   the state after every earlier record, exactly as a database transaction would be.
//! * `meta/snapshots/{seq}.json` — the whole state after record `seq`, written every
//!   [`SNAPSHOT_EVERY`] records; opening reads the newest snapshot and the records after
//!   it, and records a snapshot covers are deleted once a newer snapshot exists.
//!
//! One writer task applies operations: it checks each (by the rules of [`semantics`],
//! which decide every operation for all three stores) against a working copy of the
//! state (an operation that fails changes nothing and is answered at once), writes the
//! batch as one record (one PUT, however many callers were waiting: group commit), and
//! only then applies the batch to the state that readers see and answers the callers.
//! A failed write resets the working copy; a lost race (the sequence number is taken)
//! catches up from the log first. Callers see `Unavailable` (retriable) in both cases.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use object_store::path::Path;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::semantics;
use super::{
    AbortedTxnRecord, BrokerRecord, CommittedOffset, Fence, MetaError, MetaResult, MetadataStore,
    PartitionKey, PartitionOwner, PartitionState, ProducerStateRecord, SegmentRecord, TopicRecord,
    TxnOffsetRecord, TxnRecord, WalCommit, WalRangeRecord,
};

/// Records between two snapshots.
pub(crate) const SNAPSHOT_EVERY: u64 = 1000;
/// Operations written in one record at most.
const MAX_BATCH: usize = 512;
/// How the bucket store's writer is bounded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BucketOptions {
    /// Operations waiting for the writer at most (`metadata.bucket.queue.length`);
    /// callers beyond it wait for room.
    pub queue_length: usize,
    /// How long one record write keeps retrying before its callers see `Unavailable`
    /// (`metadata.request.timeout.ms`).
    pub write_deadline: Duration,
}

impl Default for BucketOptions {
    fn default() -> Self {
        BucketOptions {
            queue_length: 4096,
            write_deadline: Duration::from_secs(10),
        }
    }
}

/// One partition's row.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Partition {
    leader_epoch: i32,
    owner: Option<i32>,
    log_start_offset: i64,
    high_watermark: i64,
    /// By base offset.
    segments: BTreeMap<i64, SegmentRecord>,
    /// By base offset.
    wal_ranges: BTreeMap<i64, WalRangeRecord>,
    producers: BTreeMap<i64, ProducerStateRecord>,
    epoch_history: Vec<(i32, i64)>,
    /// Aborted transactions by their abort marker's offset (format 5).
    #[serde(default)]
    aborted: BTreeMap<i64, AbortedTxnRecord>,
}

impl Partition {
    /// A new partition of a created or grown topic.
    fn new() -> Partition {
        let mut p = Partition::default();
        p.set_row(semantics::PartitionRow::NEW);
        p
    }

    /// The scalar columns, as the semantics read them.
    fn row(&self) -> semantics::PartitionRow {
        semantics::PartitionRow {
            leader_epoch: self.leader_epoch,
            high_watermark: self.high_watermark,
            log_start_offset: self.log_start_offset,
            owner: self.owner,
        }
    }

    /// Stores the scalar columns the semantics decided.
    fn set_row(&mut self, row: semantics::PartitionRow) {
        self.leader_epoch = row.leader_epoch;
        self.high_watermark = row.high_watermark;
        self.log_start_offset = row.log_start_offset;
        self.owner = row.owner;
    }

    /// What a claim or a read answers: everything an owner or a reader needs.
    fn state(&self) -> PartitionState {
        PartitionState {
            leader_epoch: self.leader_epoch,
            log_start_offset: self.log_start_offset,
            high_watermark: self.high_watermark,
            segments: self.segments.values().cloned().collect(),
            wal_ranges: self.wal_ranges.values().cloned().collect(),
            producers: self.producers.values().cloned().collect(),
            epoch_history: self.epoch_history.clone(),
            aborted: self.aborted.values().copied().collect(),
        }
    }
}

/// A committed offset without its (map) key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Offset {
    offset: i64,
    leader_epoch: i32,
    metadata: String,
    commit_timestamp_ms: i64,
}

impl From<&CommittedOffset> for Offset {
    fn from(o: &CommittedOffset) -> Offset {
        Offset {
            offset: o.offset,
            leader_epoch: o.leader_epoch,
            metadata: o.metadata.clone(),
            commit_timestamp_ms: o.commit_timestamp_ms,
        }
    }
}

/// Everything the store knows.
#[derive(Debug, Clone, Default)]
struct State {
    topics: BTreeMap<String, TopicRecord>,
    partitions: HashMap<PartitionKey, Partition>,
    /// Write-ahead objects by key, with their creation time.
    wal_objects: BTreeMap<String, i64>,
    /// Number of ranges referencing each write-ahead object.
    wal_refs: HashMap<String, usize>,
    /// The last producer id handed out (0: none yet).
    last_producer_id: i64,
    /// group -> (topic, partition) -> offset.
    offsets: BTreeMap<String, BTreeMap<(String, i32), Offset>>,
    sessions: BTreeMap<i32, i64>,
    brokers: BTreeMap<i32, BrokerRecord>,
    /// Transactional ids' records, by id.
    txns: BTreeMap<String, TxnRecord>,
    /// group -> (topic, partition, producer id) -> offset committed in a transaction not
    /// yet ended.
    txn_offsets: BTreeMap<String, BTreeMap<PendingKey, TxnOffsetRecord>>,
}

/// What a group's pending transactional offset is keyed by: (topic, partition,
/// producer id).
type PendingKey = (String, i32, i64);

fn pending_key(pending: &TxnOffsetRecord) -> PendingKey {
    let o = &pending.offset;
    (o.topic.clone(), o.partition, pending.producer_id)
}

/// One group's offsets as stored in a snapshot: (topic, partition, offset).
type GroupOffsets = Vec<(String, i32, Offset)>;

/// The version of the record and snapshot format this code writes. 1: the first (no
/// `format` field); 2: offset deletions and expiries carry the coordinator's fence; 3:
/// one write-ahead commit may hold several objects (`CommitWals`); 4: compaction's swap
/// (`ReplaceSegments`) and segments that record when compaction wrote them; 5:
/// transactions: transactional ids' records (`PutTxn`, `DeleteTxn`), offsets committed
/// inside a transaction (`CommitTxnOffsets`), the aborted transactions a write-ahead
/// commit records per partition (`aborted`) and producer states' transaction fields
/// (`txn_first_offset`, `coordinator_epoch`); snapshots add each partition's `aborted`,
/// `txns` and `txn_offsets`. A reader refuses a newer format than its own, so an older
/// broker never misreads the log of a newer one; every format is pinned by golden files
/// (`testdata/`).
const FORMAT: u32 = 5;

fn format_1() -> u32 {
    1
}

/// The serialized form of [`State`] (JSON needs string map keys, so maps keyed by
/// structs become lists).
#[derive(Serialize, Deserialize)]
struct Snapshot {
    #[serde(default = "format_1")]
    format: u32,
    seq: u64,
    topics: Vec<TopicRecord>,
    partitions: Vec<(PartitionKey, Partition)>,
    wal_objects: Vec<(String, i64)>,
    last_producer_id: i64,
    offsets: Vec<(String, GroupOffsets)>,
    sessions: Vec<(i32, i64)>,
    #[serde(default)]
    brokers: Vec<BrokerRecord>,
    /// Transactional ids' records, by id (format 5).
    #[serde(default)]
    txns: Vec<TxnRecord>,
    /// Each group's pending transactional offsets, by topic, partition and producer id
    /// (format 5).
    #[serde(default)]
    txn_offsets: Vec<(String, Vec<TxnOffsetRecord>)>,
}

/// One change of the state, as logged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    CreateTopic {
        topic: TopicRecord,
    },
    DeleteTopic {
        name: String,
    },
    SetTopicConfigs {
        name: String,
        configs: BTreeMap<String, String>,
    },
    SetPartitionCount {
        name: String,
        count: i32,
    },
    Claim {
        key: PartitionKey,
        broker_id: i32,
    },
    /// One object (formats 1 and 2; replayed, no longer written).
    CommitWal {
        commit: WalCommit,
    },
    /// One or more objects, committed together (format 3).
    CommitWals {
        commits: Vec<WalCommit>,
    },
    CommitSegment {
        key: PartitionKey,
        leader_epoch: i32,
        segment: SegmentRecord,
    },
    TrimLog {
        key: PartitionKey,
        leader_epoch: i32,
        log_start_offset: i64,
        drop: Vec<i64>,
    },
    /// Compaction's swap (format 4).
    ReplaceSegments {
        key: PartitionKey,
        leader_epoch: i32,
        replaced: Vec<i64>,
        segments: Vec<SegmentRecord>,
    },
    ForgetWal {
        keys: Vec<String>,
    },
    NextProducerId,
    CommitOffsets {
        group: String,
        offsets: Vec<CommittedOffset>,
        /// The coordinator's lease, checked before anything is stored.
        #[serde(default)]
        fence: Option<Fence>,
    },
    Release {
        key: PartitionKey,
        leader_epoch: i32,
    },
    DeleteOffsets {
        group: String,
        partitions: Option<Vec<(String, i32)>>,
        /// The coordinator's lease (absent in records of earlier versions: unfenced).
        #[serde(default)]
        fence: Option<Fence>,
    },
    ExpireOffsets {
        groups: Vec<String>,
        before_ms: i64,
        #[serde(default)]
        fence: Option<Fence>,
    },
    StartSession {
        broker_id: i32,
    },
    HeartbeatBroker {
        broker: BrokerRecord,
    },
    DeregisterBroker {
        broker_id: i32,
        session: i64,
    },
    /// A transactional id's new record; completing a transaction settles the offsets
    /// committed in it (format 5).
    PutTxn {
        record: TxnRecord,
        /// The transaction coordinator's lease on the id's slot.
        fence: Fence,
    },
    /// Forgets a transactional id (format 5).
    DeleteTxn {
        transactional_id: String,
        fence: Fence,
    },
    /// Offsets a group commits inside producers' transactions (format 5).
    CommitTxnOffsets {
        group: String,
        offsets: Vec<TxnOffsetRecord>,
        /// The group coordinator's lease.
        fence: Option<Fence>,
    },
}

/// What an operation answers.
#[derive(Debug)]
enum Out {
    Unit,
    Topic(TopicRecord),
    Claimed(PartitionState),
    Number(i64),
}

/// A record of the log.
#[derive(Serialize, Deserialize)]
struct Record {
    #[serde(default = "format_1")]
    format: u32,
    seq: u64,
    ops: Vec<Op>,
}

/// Decodes a stored record or snapshot (`what` names it in errors), refusing a format
/// newer than this code's.
fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
    format: impl Fn(&T) -> u32,
) -> MetaResult<T> {
    let value: T =
        serde_json::from_slice(bytes).map_err(|e| MetaError::Corrupt(format!("{what}: {e}")))?;
    let found = format(&value);
    if found > FORMAT {
        return Err(MetaError::Corrupt(format!(
            "{what} has format {found}, newer than this broker's {FORMAT}: upgrade the broker"
        )));
    }
    Ok(value)
}

impl State {
    fn partition(&self, key: PartitionKey) -> MetaResult<&Partition> {
        self.partitions
            .get(&key)
            .ok_or(MetaError::PartitionNotFound)
    }

    /// The stored rows of the partitions (or coordinator slots) `keys`, as the semantics
    /// read them.
    fn rows(&self, keys: impl IntoIterator<Item = PartitionKey>) -> semantics::Rows {
        keys.into_iter()
            .filter_map(|key| Some((key, self.partitions.get(&key)?.row())))
            .collect()
    }

    /// The fence check of a write that turned out to change nothing.
    fn check_fence(&self, fence: Option<Fence>) -> MetaResult<()> {
        semantics::check_fence(&self.rows(fence.map(|f| f.key)), fence)
    }

    /// Adds a topic's new partitions.
    fn add_partitions(&mut self, topic_id: uuid::Uuid, partitions: std::ops::Range<i32>) {
        for partition in partitions {
            let key = PartitionKey {
                topic_id,
                partition,
            };
            self.partitions.insert(key, Partition::new());
        }
    }

    fn unref(&mut self, object_key: &str) {
        if let Some(n) = self.wal_refs.get_mut(object_key) {
            *n -= 1;
            if *n == 0 {
                self.wal_refs.remove(object_key);
            }
        }
    }

    /// A fenced write: planned by the shared semantics against the rows it reads,
    /// then applied (the writes cannot fail, so a refused operation changes nothing).
    /// Answers the number of offsets deleted, for the writes that count.
    fn fenced(&mut self, op: semantics::Op<'_>) -> MetaResult<Out> {
        let rows = self.rows(op.fences());
        let counts = matches!(
            op,
            semantics::Op::DeleteOffsets { .. } | semantics::Op::ExpireOffsets { .. }
        );
        let mut counted = 0;
        for write in semantics::plan(&rows, op)? {
            counted += self.write(write);
        }
        Ok(if counts {
            Out::Number(counted as i64)
        } else {
            Out::Unit
        })
    }

    /// One storage write; returns how many offsets it deleted.
    fn write(&mut self, write: semantics::Write<'_>) -> usize {
        use semantics::Write;
        let mut released = Vec::new();
        match write {
            Write::InsertRange { key, range } => {
                let object_key = range.object_key.clone();
                if let Some(p) = self.partitions.get_mut(&key) {
                    if let Some(old) = p.wal_ranges.insert(range.base_offset, range) {
                        released.push(old.object_key);
                    }
                    *self.wal_refs.entry(object_key).or_default() += 1;
                }
            }
            Write::SetHighWatermark {
                key,
                high_watermark,
            } => {
                if let Some(p) = self.partitions.get_mut(&key) {
                    p.high_watermark = high_watermark;
                }
            }
            Write::UpsertProducer { key, state } => {
                if let Some(p) = self.partitions.get_mut(&key) {
                    p.producers.insert(state.producer_id, state.clone());
                }
            }
            Write::RememberWalObject {
                object_key,
                created_ms,
            } => {
                self.wal_objects
                    .entry(object_key.to_owned())
                    .or_insert(created_ms);
            }
            Write::InsertSegment { key, segment } => {
                if let Some(p) = self.partitions.get_mut(&key) {
                    p.segments.insert(segment.base_offset, segment.clone());
                }
            }
            Write::DropRangesThrough { key, end_offset } => {
                if let Some(p) = self.partitions.get_mut(&key) {
                    p.wal_ranges.retain(|_, r| {
                        let keep = r.end_offset > end_offset;
                        if !keep {
                            released.push(r.object_key.clone());
                        }
                        keep
                    });
                }
            }
            Write::SetLogStartOffset {
                key,
                log_start_offset,
            } => {
                if let Some(p) = self.partitions.get_mut(&key) {
                    p.log_start_offset = log_start_offset;
                }
            }
            Write::DropSegment { key, base_offset } => {
                if let Some(p) = self.partitions.get_mut(&key) {
                    p.segments.remove(&base_offset);
                }
            }
            Write::ReplaceSegments { key, drop, insert } => {
                if let Some(p) = self.partitions.get_mut(&key) {
                    for base in drop {
                        p.segments.remove(base);
                    }
                    for segment in insert {
                        p.segments.insert(segment.base_offset, segment.clone());
                    }
                }
            }
            Write::UpsertOffset { group, offset: o } => {
                self.offsets
                    .entry(group.to_owned())
                    .or_default()
                    .insert((o.topic.clone(), o.partition), o.into());
            }
            Write::DeleteOffsets { group, partition } => {
                let Some(stored) = self.offsets.get_mut(group) else {
                    return 0;
                };
                let deleted = match partition {
                    None => std::mem::take(stored).len(),
                    Some((topic, p)) => {
                        usize::from(stored.remove(&(topic.to_owned(), p)).is_some())
                    }
                };
                if stored.is_empty() {
                    self.offsets.remove(group);
                }
                return deleted;
            }
            Write::ExpireOffsets { group, before_ms } => {
                let Some(stored) = self.offsets.get_mut(group) else {
                    return 0;
                };
                let before = stored.len();
                stored.retain(|_, o| o.commit_timestamp_ms >= before_ms);
                let deleted = before - stored.len();
                if stored.is_empty() {
                    self.offsets.remove(group);
                }
                return deleted;
            }
            Write::InsertAbortedTxn { key, aborted } => {
                if let Some(p) = self.partitions.get_mut(&key) {
                    p.aborted.entry(aborted.last_offset).or_insert(*aborted);
                }
            }
            Write::DropAbortedBelow { key, offset } => {
                if let Some(p) = self.partitions.get_mut(&key) {
                    p.aborted.retain(|&last_offset, _| last_offset >= offset);
                }
            }
            Write::UpsertTxn { record } => {
                self.txns
                    .insert(record.transactional_id.clone(), record.clone());
            }
            Write::DeleteTxn { transactional_id } => {
                self.txns.remove(transactional_id);
            }
            Write::UpsertTxnOffset { group, pending } => {
                self.txn_offsets
                    .entry(group.to_owned())
                    .or_default()
                    .insert(pending_key(pending), pending.clone());
            }
            Write::SettleTxnOffsets {
                group,
                producer_id,
                commit,
            } => {
                let mut settled = Vec::new();
                if let Some(stored) = self.txn_offsets.get_mut(group) {
                    stored.retain(|_, pending| {
                        let keep = pending.producer_id != producer_id;
                        if !keep {
                            settled.push(pending.offset.clone());
                        }
                        keep
                    });
                    if stored.is_empty() {
                        self.txn_offsets.remove(group);
                    }
                }
                if commit && !settled.is_empty() {
                    let committed = self.offsets.entry(group.to_owned()).or_default();
                    for o in &settled {
                        committed.insert((o.topic.clone(), o.partition), o.into());
                    }
                }
            }
        }
        for object_key in released {
            self.unref(&object_key);
        }
        0
    }

    /// Applies one operation. Every check comes before the first change, so an
    /// operation that fails leaves the state as it was.
    fn apply(&mut self, op: &Op) -> MetaResult<Out> {
        match op {
            Op::CreateTopic { topic } => {
                let partitions =
                    semantics::create_topic(self.topics.contains_key(&topic.name), topic)?;
                self.add_partitions(topic.id, partitions);
                self.topics.insert(topic.name.clone(), topic.clone());
                Ok(Out::Unit)
            }
            Op::DeleteTopic { name } => {
                let topic = semantics::stored_topic(self.topics.remove(name))?;
                // What stays (write-ahead objects, committed offsets) is `stored_topic`'s
                // rule; the ranges of the removed partitions stop referencing objects.
                for partition in 0..topic.partitions {
                    let key = PartitionKey {
                        topic_id: topic.id,
                        partition,
                    };
                    if let Some(p) = self.partitions.remove(&key) {
                        for r in p.wal_ranges.values() {
                            self.unref(&r.object_key);
                        }
                    }
                }
                Ok(Out::Topic(topic))
            }
            Op::SetTopicConfigs { name, configs } => {
                let topic = semantics::stored_topic(self.topics.get_mut(name))?;
                topic.configs = configs.clone();
                Ok(Out::Unit)
            }
            Op::SetPartitionCount { name, count } => {
                let topic = semantics::stored_topic(self.topics.get_mut(name))?;
                let Some(added) = semantics::new_partitions(topic, *count) else {
                    return Ok(Out::Unit);
                };
                topic.partitions = *count;
                let id = topic.id;
                self.add_partitions(id, added);
                Ok(Out::Unit)
            }
            Op::Claim { key, broker_id } => {
                let stored = self.partitions.get_mut(key);
                let claim = semantics::claim(*key, stored.as_ref().map(|p| p.row()), *broker_id)?;
                // Present: the claim answered a missing partition already.
                let p = stored.ok_or(MetaError::PartitionNotFound)?;
                p.set_row(claim.row);
                p.epoch_history.push(claim.history);
                Ok(Out::Claimed(p.state()))
            }
            Op::CommitWal { commit } => {
                self.fenced(semantics::Op::CommitWal(std::slice::from_ref(commit)))
            }
            Op::CommitWals { commits } => self.fenced(semantics::Op::CommitWal(commits)),
            Op::CommitSegment {
                key,
                leader_epoch,
                segment,
            } => self.fenced(semantics::Op::CommitSegment {
                key: *key,
                leader_epoch: *leader_epoch,
                segment,
            }),
            Op::TrimLog {
                key,
                leader_epoch,
                log_start_offset,
                drop,
            } => self.fenced(semantics::Op::TrimLog {
                key: *key,
                leader_epoch: *leader_epoch,
                log_start_offset: *log_start_offset,
                drop_segment_base_offsets: drop,
            }),
            Op::ReplaceSegments {
                key,
                leader_epoch,
                replaced,
                segments,
            } => self.fenced(semantics::Op::ReplaceSegments {
                key: *key,
                leader_epoch: *leader_epoch,
                replaced,
                segments,
            }),
            Op::ForgetWal { keys } => {
                for k in keys {
                    self.wal_objects.remove(k);
                }
                Ok(Out::Unit)
            }
            Op::NextProducerId => {
                // 0: none handed out yet.
                let last = Some(self.last_producer_id).filter(|&id| id != 0);
                self.last_producer_id = semantics::next_producer_id(last)?;
                Ok(Out::Number(self.last_producer_id))
            }
            Op::Release { key, leader_epoch } => {
                let stored = self.partitions.get_mut(key);
                let released =
                    semantics::release(*key, stored.as_ref().map(|p| p.row()), *leader_epoch)?;
                // Present: the release answered a missing partition already.
                stored
                    .ok_or(MetaError::PartitionNotFound)?
                    .set_row(released);
                Ok(Out::Unit)
            }
            Op::CommitOffsets {
                group,
                offsets,
                fence,
            } => self.fenced(semantics::Op::CommitOffsets {
                group,
                offsets,
                fence: *fence,
            }),
            Op::DeleteOffsets {
                group,
                partitions,
                fence,
            } => self.fenced(semantics::Op::DeleteOffsets {
                group,
                partitions: partitions.as_deref(),
                fence: *fence,
            }),
            Op::ExpireOffsets {
                groups,
                before_ms,
                fence,
            } => self.fenced(semantics::Op::ExpireOffsets {
                groups,
                before_ms: *before_ms,
                fence: *fence,
            }),
            Op::HeartbeatBroker { broker } => {
                let stored = self.brokers.get(&broker.broker_id).map(|b| b.session);
                semantics::heartbeat(stored, broker)?;
                self.brokers.insert(broker.broker_id, broker.clone());
                Ok(Out::Unit)
            }
            Op::DeregisterBroker { broker_id, session } => {
                let stored = self.brokers.get(broker_id).map(|b| b.session);
                if semantics::deregisters(stored, *session) {
                    self.brokers.remove(broker_id);
                }
                Ok(Out::Unit)
            }
            Op::StartSession { broker_id } => {
                let session = semantics::next_session(self.sessions.get(broker_id).copied())?;
                self.sessions.insert(*broker_id, session);
                Ok(Out::Number(session))
            }
            Op::PutTxn { record, fence } => self.fenced(semantics::Op::PutTxn {
                record,
                fence: *fence,
            }),
            Op::DeleteTxn {
                transactional_id,
                fence,
            } => self.fenced(semantics::Op::DeleteTxn {
                transactional_id,
                fence: *fence,
            }),
            Op::CommitTxnOffsets {
                group,
                offsets,
                fence,
            } => self.fenced(semantics::Op::CommitTxnOffsets {
                group,
                offsets,
                fence: *fence,
            }),
        }
    }

    fn snapshot(&self, seq: u64) -> Snapshot {
        Snapshot {
            format: FORMAT,
            seq,
            topics: self.topics.values().cloned().collect(),
            partitions: {
                // In key order, so a snapshot of the same state is the same bytes.
                let mut partitions: Vec<_> = self
                    .partitions
                    .iter()
                    .map(|(k, p)| (*k, p.clone()))
                    .collect();
                partitions.sort_by_key(|(k, _)| *k);
                partitions
            },
            wal_objects: self
                .wal_objects
                .iter()
                .map(|(k, t)| (k.clone(), *t))
                .collect(),
            last_producer_id: self.last_producer_id,
            offsets: self
                .offsets
                .iter()
                .map(|(g, o)| {
                    (
                        g.clone(),
                        o.iter()
                            .map(|((t, p), v)| (t.clone(), *p, v.clone()))
                            .collect(),
                    )
                })
                .collect(),
            sessions: self.sessions.iter().map(|(b, s)| (*b, *s)).collect(),
            brokers: self.brokers.values().cloned().collect(),
            txns: self.txns.values().cloned().collect(),
            txn_offsets: self
                .txn_offsets
                .iter()
                .map(|(g, o)| (g.clone(), o.values().cloned().collect()))
                .collect(),
        }
    }

    fn from_snapshot(s: Snapshot) -> State {
        let mut wal_refs: HashMap<String, usize> = HashMap::new();
        for (_, p) in &s.partitions {
            for r in p.wal_ranges.values() {
                *wal_refs.entry(r.object_key.clone()).or_default() += 1;
            }
        }
        State {
            topics: s.topics.into_iter().map(|t| (t.name.clone(), t)).collect(),
            partitions: s.partitions.into_iter().collect(),
            wal_objects: s.wal_objects.into_iter().collect(),
            wal_refs,
            last_producer_id: s.last_producer_id,
            offsets: s
                .offsets
                .into_iter()
                .map(|(g, o)| (g, o.into_iter().map(|(t, p, v)| ((t, p), v)).collect()))
                .collect(),
            sessions: s.sessions.into_iter().collect(),
            brokers: s.brokers.into_iter().map(|b| (b.broker_id, b)).collect(),
            txns: s
                .txns
                .into_iter()
                .map(|t| (t.transactional_id.clone(), t))
                .collect(),
            txn_offsets: s
                .txn_offsets
                .into_iter()
                .map(|(g, o)| (g, o.into_iter().map(|t| (pending_key(&t), t)).collect()))
                .collect(),
        }
    }
}

fn log_key(seq: u64) -> Path {
    Path::from(format!("meta/log/{seq:020}.json"))
}

fn snapshot_key(seq: u64) -> Path {
    Path::from(format!("meta/snapshots/{seq:020}.json"))
}

/// The sequence number in a `meta/log/` or `meta/snapshots/` key.
fn seq_of(key: &Path) -> Option<u64> {
    key.filename()?.strip_suffix(".json")?.parse().ok()
}

fn unavailable(e: impl std::fmt::Display) -> MetaError {
    MetaError::Unavailable(e.to_string())
}

type Request = (Op, oneshot::Sender<MetaResult<Out>>);

/// The metadata store in the bucket. See the module docs.
pub(crate) struct BucketStore {
    name: String,
    state: Arc<RwLock<State>>,
    requests: mpsc::Sender<Request>,
}

impl std::fmt::Debug for BucketStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketStore")
            .field("store", &self.name)
            .finish()
    }
}

/// The writer's view: the log position and the working copy of the state.
struct Writer {
    store: Arc<tiering::Store>,
    state: Arc<RwLock<State>>,
    working: State,
    /// The next record's sequence number.
    next_seq: u64,
    /// Sequence number of the newest snapshot (0: none).
    snapshot_seq: u64,
    write_deadline: Duration,
}

impl BucketStore {
    #[cfg(test)]
    /// Loads the state from the store's `meta/` objects (empty if there are none) and
    /// starts the writer, with the default bounds.
    pub(crate) async fn open(store: Arc<tiering::Store>) -> MetaResult<BucketStore> {
        Self::open_with(store, BucketOptions::default()).await
    }

    /// Loads the state and starts the writer, bounded by `options`.
    pub(crate) async fn open_with(
        store: Arc<tiering::Store>,
        options: BucketOptions,
    ) -> MetaResult<BucketStore> {
        let (state, next_seq, snapshot_seq) = load(&store).await?;
        tracing::info!(store = %store.name(), records = next_seq - 1, snapshot = snapshot_seq, "opened metadata in the object store");
        let state = Arc::new(RwLock::new(state));
        let writer = Writer {
            store: store.clone(),
            working: state.read().expect("metadata state lock poisoned").clone(),
            state: state.clone(),
            next_seq,
            snapshot_seq,
            write_deadline: options.write_deadline,
        };
        let (tx, rx) = mpsc::channel(options.queue_length.max(1));
        tokio::spawn(writer.run(rx));
        Ok(BucketStore {
            name: store.name().to_owned(),
            state,
            requests: tx,
        })
    }

    async fn submit(&self, op: Op) -> MetaResult<Out> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send((op, tx))
            .await
            .map_err(|_| unavailable("the metadata writer stopped"))?;
        rx.await
            .map_err(|_| unavailable("the metadata writer stopped"))?
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.read().expect("metadata state lock poisoned"))
    }
}

/// Reads the newest snapshot and the records after it: (state, next seq, snapshot seq).
async fn load(store: &tiering::Store) -> MetaResult<(State, u64, u64)> {
    let snapshots = store
        .list(&Path::from("meta/snapshots"))
        .await
        .map_err(unavailable)?;
    let newest = snapshots.iter().filter_map(|m| seq_of(&m.location)).max();
    let (mut state, snapshot_seq) = match newest {
        Some(seq) => {
            let bytes = store
                .get(&snapshot_key(seq))
                .await
                .map_err(unavailable)?
                .ok_or_else(|| unavailable(format!("snapshot {seq} vanished while opening")))?;
            let snapshot: Snapshot = decode(
                &bytes,
                &format!("metadata snapshot {seq}"),
                |s: &Snapshot| s.format,
            )?;
            (State::from_snapshot(snapshot), seq)
        }
        None => (State::default(), 0),
    };
    let mut records: Vec<u64> = store
        .list(&Path::from("meta/log"))
        .await
        .map_err(unavailable)?
        .iter()
        .filter_map(|m| seq_of(&m.location))
        .filter(|s| *s > snapshot_seq)
        .collect();
    records.sort_unstable();
    let mut next = snapshot_seq + 1;
    for seq in records {
        if seq != next {
            return Err(MetaError::Corrupt(format!(
                "metadata log record {next} is missing (found {seq})"
            )));
        }
        replay(store, &mut state, seq).await?;
        next += 1;
    }
    Ok((state, next, snapshot_seq))
}

/// Applies the stored record `seq`; `false` if there is no such record.
async fn replay(store: &tiering::Store, state: &mut State, seq: u64) -> MetaResult<bool> {
    let Some(bytes) = store.get(&log_key(seq)).await.map_err(unavailable)? else {
        return Ok(false);
    };
    let record: Record = decode(
        &bytes,
        &format!("metadata log record {seq}"),
        |r: &Record| r.format,
    )?;
    for op in &record.ops {
        state.apply(op).map_err(|e| {
            MetaError::Corrupt(format!("metadata log record {seq} does not apply: {e}"))
        })?;
    }
    Ok(true)
}

impl Writer {
    async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        while let Some(first) = requests.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match requests.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            self.commit(batch).await;
        }
    }

    /// Checks the batch against the working state, writes what applies as one record,
    /// then publishes it and answers.
    async fn commit(&mut self, batch: Vec<Request>) {
        let mut ops = Vec::with_capacity(batch.len());
        let mut answers = Vec::with_capacity(batch.len());
        for (op, reply) in batch {
            match self.working.apply(&op) {
                Ok(out) => {
                    ops.push(op);
                    answers.push((reply, out));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        if ops.is_empty() {
            return;
        }
        let record = Record {
            format: FORMAT,
            seq: self.next_seq,
            ops,
        };
        let written = match serde_json::to_vec(&record) {
            Ok(bytes) => self
                .store
                .put_new(
                    &log_key(record.seq),
                    bytes.into(),
                    Some(crate::clock::instant() + self.write_deadline),
                )
                .await
                .map_err(|e| {
                    (
                        matches!(e, tiering::Error::AlreadyExists { .. }),
                        unavailable(e),
                    )
                }),
            Err(e) => Err((false, MetaError::Corrupt(e.to_string()))),
        };
        match written {
            Ok(()) => {
                {
                    let mut state = self.state.write().expect("metadata state lock poisoned");
                    for op in &record.ops {
                        // Applied to an identical state just now, so it applies again.
                        let _ = state.apply(op);
                    }
                }
                self.next_seq += 1;
                for (reply, out) in answers {
                    let _ = reply.send(Ok(out));
                }
                if record.seq - self.snapshot_seq >= SNAPSHOT_EVERY {
                    self.snapshot().await;
                }
            }
            Err((taken, e)) => {
                for (reply, _) in answers {
                    let _ = reply.send(Err(unavailable(&e)));
                }
                if taken {
                    tracing::warn!(
                        seq = record.seq,
                        "another writer appended to the metadata log; catching up"
                    );
                }
                self.resync().await;
            }
        }
    }

    /// After a failed or lost write: the working state goes back to the published
    /// one, and records other writers appended are applied to both.
    async fn resync(&mut self) {
        let mut state = self
            .state
            .read()
            .expect("metadata state lock poisoned")
            .clone();
        loop {
            match replay(&self.store, &mut state, self.next_seq).await {
                Ok(true) => self.next_seq += 1,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, seq = self.next_seq, "could not catch up with the metadata log");
                    break;
                }
            }
        }
        self.working = state.clone();
        *self.state.write().expect("metadata state lock poisoned") = state;
    }

    /// Writes the published state as a snapshot, then deletes what the previous
    /// snapshot covered (the newest snapshot and its records are always kept).
    async fn snapshot(&mut self) {
        let seq = self.next_seq - 1;
        let bytes = {
            let state = self.state.read().expect("metadata state lock poisoned");
            serde_json::to_vec(&state.snapshot(seq))
        };
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "could not encode a metadata snapshot");
                return;
            }
        };
        if let Err(e) = self
            .store
            .put_new(&snapshot_key(seq), bytes.into(), None)
            .await
        {
            tracing::warn!(error = %e, seq, "could not write a metadata snapshot; will retry later");
            return;
        }
        let previous = std::mem::replace(&mut self.snapshot_seq, seq);
        if previous == 0 {
            return;
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            for prefix in ["meta/log", "meta/snapshots"] {
                let Ok(objects) = store.list(&Path::from(prefix)).await else {
                    continue;
                };
                for m in objects {
                    if seq_of(&m.location).is_some_and(|s| s < previous) {
                        let _ = store.delete(&m.location).await;
                    }
                }
            }
        });
    }
}

#[async_trait]
impl MetadataStore for BucketStore {
    fn queue_depth(&self) -> Option<(usize, usize)> {
        let capacity = self.requests.max_capacity();
        Some((capacity - self.requests.capacity(), capacity))
    }
    async fn create_topic(&self, topic: &TopicRecord) -> MetaResult<()> {
        self.submit(Op::CreateTopic {
            topic: topic.clone(),
        })
        .await
        .map(|_| ())
    }

    async fn delete_topic(&self, name: &str) -> MetaResult<TopicRecord> {
        match self
            .submit(Op::DeleteTopic {
                name: name.to_owned(),
            })
            .await?
        {
            Out::Topic(t) => Ok(t),
            other => Err(MetaError::Corrupt(format!(
                "delete_topic answered {other:?}"
            ))),
        }
    }

    async fn list_topics(&self) -> MetaResult<Vec<TopicRecord>> {
        Ok(self.read(|s| s.topics.values().cloned().collect()))
    }

    async fn set_topic_configs(
        &self,
        name: &str,
        configs: &BTreeMap<String, String>,
    ) -> MetaResult<()> {
        self.submit(Op::SetTopicConfigs {
            name: name.to_owned(),
            configs: configs.clone(),
        })
        .await
        .map(|_| ())
    }

    async fn set_partition_count(&self, name: &str, count: i32) -> MetaResult<()> {
        self.submit(Op::SetPartitionCount {
            name: name.to_owned(),
            count,
        })
        .await
        .map(|_| ())
    }

    async fn claim_partition(
        &self,
        key: PartitionKey,
        broker_id: i32,
    ) -> MetaResult<PartitionState> {
        // Fail fast without a write for a partition that does not exist.
        self.read(|s| s.partition(key).map(|_| ()))?;
        match self.submit(Op::Claim { key, broker_id }).await? {
            Out::Claimed(state) => Ok(state),
            other => Err(MetaError::Corrupt(format!("claim answered {other:?}"))),
        }
    }

    async fn read_partition(&self, key: PartitionKey) -> MetaResult<PartitionState> {
        self.read(|s| s.partition(key).map(Partition::state))
    }

    async fn release_partition(&self, key: PartitionKey, leader_epoch: i32) -> MetaResult<()> {
        self.submit(Op::Release { key, leader_epoch })
            .await
            .map(|_| ())
    }

    async fn partition_owners(&self) -> MetaResult<Vec<PartitionOwner>> {
        Ok(self.read(|s| {
            s.partitions
                .iter()
                .map(|(key, p)| p.row().as_owner(*key))
                .collect()
        }))
    }

    async fn commit_wal(&self, commits: &[WalCommit]) -> MetaResult<()> {
        self.submit(Op::CommitWals {
            commits: commits.to_vec(),
        })
        .await
        .map(|_| ())
    }

    async fn commit_segment(
        &self,
        key: PartitionKey,
        leader_epoch: i32,
        segment: &SegmentRecord,
    ) -> MetaResult<()> {
        self.submit(Op::CommitSegment {
            key,
            leader_epoch,
            segment: segment.clone(),
        })
        .await
        .map(|_| ())
    }

    async fn trim_log(
        &self,
        key: PartitionKey,
        leader_epoch: i32,
        log_start_offset: i64,
        drop_segment_base_offsets: &[i64],
    ) -> MetaResult<()> {
        self.submit(Op::TrimLog {
            key,
            leader_epoch,
            log_start_offset,
            drop: drop_segment_base_offsets.to_vec(),
        })
        .await
        .map(|_| ())
    }

    async fn replace_segments(
        &self,
        key: PartitionKey,
        leader_epoch: i32,
        replaced: &[i64],
        segments: &[SegmentRecord],
    ) -> MetaResult<()> {
        self.submit(Op::ReplaceSegments {
            key,
            leader_epoch,
            replaced: replaced.to_vec(),
            segments: segments.to_vec(),
        })
        .await
        .map(|_| ())
    }

    async fn unreferenced_wal_objects(&self) -> MetaResult<Vec<String>> {
        Ok(self.read(|s| {
            semantics::unreferenced_wal_objects(s.wal_objects.iter().map(|(key, created_ms)| {
                semantics::WalObject {
                    object_key: key.clone(),
                    created_ms: *created_ms,
                    referenced: s.wal_refs.contains_key(key),
                }
            }))
        }))
    }

    async fn known_objects(&self) -> MetaResult<Vec<String>> {
        Ok(self.read(|s| {
            let segments = s
                .partitions
                .values()
                .flat_map(|p| p.segments.values().map(|seg| seg.object_key.clone()));
            s.wal_objects.keys().cloned().chain(segments).collect()
        }))
    }

    async fn heartbeat_broker(&self, broker: &BrokerRecord) -> MetaResult<()> {
        self.submit(Op::HeartbeatBroker {
            broker: broker.clone(),
        })
        .await
        .map(|_| ())
    }

    async fn live_brokers(&self, now_ms: i64) -> MetaResult<Vec<BrokerRecord>> {
        Ok(self.read(|s| {
            s.brokers
                .values()
                .filter(|b| semantics::is_live(b, now_ms))
                .cloned()
                .collect()
        }))
    }

    async fn deregister_broker(&self, broker_id: i32, session: i64) -> MetaResult<()> {
        self.submit(Op::DeregisterBroker { broker_id, session })
            .await
            .map(|_| ())
    }

    async fn forget_wal_objects(&self, keys: &[String]) -> MetaResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        self.submit(Op::ForgetWal {
            keys: keys.to_vec(),
        })
        .await
        .map(|_| ())
    }

    async fn next_producer_id(&self) -> MetaResult<i64> {
        match self.submit(Op::NextProducerId).await? {
            Out::Number(n) => Ok(n),
            other => Err(MetaError::Corrupt(format!(
                "producer id answered {other:?}"
            ))),
        }
    }

    async fn commit_offsets(
        &self,
        group: &str,
        offsets: &[CommittedOffset],
        fence: Option<Fence>,
    ) -> MetaResult<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        self.submit(Op::CommitOffsets {
            group: group.to_owned(),
            offsets: offsets.to_vec(),
            fence,
        })
        .await
        .map(|_| ())
    }

    async fn fetch_offsets(&self, group: &str) -> MetaResult<Vec<CommittedOffset>> {
        Ok(self.read(|s| {
            s.offsets.get(group).map_or_else(Vec::new, |o| {
                o.iter()
                    .map(|((topic, partition), v)| CommittedOffset {
                        topic: topic.clone(),
                        partition: *partition,
                        offset: v.offset,
                        leader_epoch: v.leader_epoch,
                        metadata: v.metadata.clone(),
                        commit_timestamp_ms: v.commit_timestamp_ms,
                    })
                    .collect()
            })
        }))
    }

    async fn delete_offsets(
        &self,
        group: &str,
        partitions: Option<&[(String, i32)]>,
        fence: Option<Fence>,
    ) -> MetaResult<usize> {
        // Nothing to delete is an answer without a write, once the fence holds.
        if !self.read(|s| s.offsets.contains_key(group)) {
            return self.read(|s| s.check_fence(fence)).map(|()| 0);
        }
        match self
            .submit(Op::DeleteOffsets {
                group: group.to_owned(),
                partitions: partitions.map(<[(String, i32)]>::to_vec),
                fence,
            })
            .await?
        {
            Out::Number(n) => Ok(n as usize),
            other => Err(MetaError::Corrupt(format!("delete answered {other:?}"))),
        }
    }

    async fn offset_groups(&self) -> MetaResult<Vec<String>> {
        Ok(self.read(|s| s.offsets.keys().cloned().collect()))
    }

    async fn expire_offsets(
        &self,
        groups: &[String],
        before_ms: i64,
        fence: Option<Fence>,
    ) -> MetaResult<usize> {
        let any = self.read(|s| {
            groups.iter().any(|g| {
                s.offsets
                    .get(g)
                    .is_some_and(|o| o.values().any(|v| v.commit_timestamp_ms < before_ms))
            })
        });
        if !any {
            return self.read(|s| s.check_fence(fence)).map(|()| 0);
        }
        match self
            .submit(Op::ExpireOffsets {
                groups: groups.to_vec(),
                before_ms,
                fence,
            })
            .await?
        {
            Out::Number(n) => Ok(n as usize),
            other => Err(MetaError::Corrupt(format!("expire answered {other:?}"))),
        }
    }

    async fn put_txn(&self, record: &TxnRecord, fence: Fence) -> MetaResult<()> {
        self.submit(Op::PutTxn {
            record: record.clone(),
            fence,
        })
        .await
        .map(|_| ())
    }

    async fn delete_txn(&self, transactional_id: &str, fence: Fence) -> MetaResult<()> {
        self.submit(Op::DeleteTxn {
            transactional_id: transactional_id.to_owned(),
            fence,
        })
        .await
        .map(|_| ())
    }

    async fn list_txns(&self) -> MetaResult<Vec<TxnRecord>> {
        Ok(self.read(|s| s.txns.values().cloned().collect()))
    }

    async fn commit_txn_offsets(
        &self,
        group: &str,
        offsets: &[TxnOffsetRecord],
        fence: Option<Fence>,
    ) -> MetaResult<()> {
        // Nothing to store is an answer without a write, once the fence holds.
        if offsets.is_empty() {
            return self.read(|s| s.check_fence(fence));
        }
        self.submit(Op::CommitTxnOffsets {
            group: group.to_owned(),
            offsets: offsets.to_vec(),
            fence,
        })
        .await
        .map(|_| ())
    }

    async fn pending_txn_offsets(&self, group: &str) -> MetaResult<Vec<TxnOffsetRecord>> {
        Ok(self.read(|s| {
            s.txn_offsets
                .get(group)
                .map_or_else(Vec::new, |o| o.values().cloned().collect())
        }))
    }

    async fn start_broker_session(&self, broker_id: i32) -> MetaResult<i64> {
        match self.submit(Op::StartSession { broker_id }).await? {
            Out::Number(n) => Ok(n),
            other => Err(MetaError::Corrupt(format!("session answered {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::conformance::{self, metadata_store_conformance};
    use uuid::Uuid;

    fn memory() -> Arc<tiering::Store> {
        Arc::new(
            tiering::Store::open("memory://", &tiering::StoreOptions::default())
                .expect("memory store"),
        )
    }

    /// The golden files of the log format: `STRATA_UPDATE_GOLDEN=1` rewrites the ones of
    /// the current format (never those of older formats, which are history).
    fn golden(name: &str, current: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/metadata/testdata")
            .join(name);
        if std::env::var_os("STRATA_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, current).expect("write golden file");
        }
        std::fs::read_to_string(&path)
            .expect("golden file")
            .trim_end()
            .to_owned()
    }

    fn golden_ops() -> Vec<Op> {
        let topic = Uuid::from_u128(10);
        let key = PartitionKey {
            topic_id: topic,
            partition: 0,
        };
        let compacted = PartitionKey {
            topic_id: Uuid::from_u128(11),
            partition: 0,
        };
        let fence = Some(Fence {
            key,
            leader_epoch: 1,
        });
        vec![
            Op::CreateTopic {
                topic: TopicRecord {
                    name: "orders".into(),
                    id: topic,
                    partitions: 1,
                    configs: BTreeMap::new(),
                    created_ms: 1_700_000_000_000,
                },
            },
            Op::Claim { key, broker_id: 1 },
            Op::CommitWals {
                commits: vec![WalCommit {
                    object_key: "wal/1/1/0".into(),
                    created_ms: 1_700_000_000_001,
                    partitions: vec![crate::metadata::PartitionCommit {
                        key,
                        leader_epoch: 1,
                        range: WalRangeRecord {
                            base_offset: 0,
                            end_offset: 5,
                            object_key: "wal/1/1/0".into(),
                            position: 0,
                            len: 100,
                            max_timestamp: 1_700_000_000_001,
                            object_size: 120,
                        },
                        producers: vec![],
                        aborted: vec![],
                    }],
                }],
            },
            Op::CommitOffsets {
                group: "g".into(),
                offsets: vec![CommittedOffset {
                    topic: "orders".into(),
                    partition: 0,
                    offset: 5,
                    leader_epoch: 1,
                    metadata: String::new(),
                    commit_timestamp_ms: 1_700_000_000_002,
                }],
                fence,
            },
            Op::DeleteOffsets {
                group: "h".into(),
                partitions: None,
                fence,
            },
            Op::ExpireOffsets {
                groups: vec!["g".into()],
                before_ms: 0,
                fence,
            },
            // Format 4: a segment committed, then compacted in place.
            Op::CreateTopic {
                topic: TopicRecord {
                    name: "prices".into(),
                    id: compacted.topic_id,
                    partitions: 1,
                    configs: BTreeMap::from([("cleanup.policy".into(), "compact".into())]),
                    created_ms: 1_700_000_000_003,
                },
            },
            Op::Claim {
                key: compacted,
                broker_id: 1,
            },
            Op::CommitSegment {
                key: compacted,
                leader_epoch: 1,
                segment: golden_segment(0),
            },
            Op::ReplaceSegments {
                key: compacted,
                leader_epoch: 1,
                replaced: vec![0],
                segments: vec![golden_segment(1_700_000_000_005)],
            },
        ]
        .into_iter()
        .chain(golden_txn_ops(key))
        .collect()
    }

    /// Format 5: two transactions on `ledger` with offsets of group g; one commits,
    /// one aborts (its marker recorded with the write-ahead commit), a third stays open
    /// with a pending offset; the aborted one's id expires. Fenced on `slot`.
    fn golden_txn_ops(slot: PartitionKey) -> Vec<Op> {
        let ledger = PartitionKey {
            topic_id: Uuid::from_u128(12),
            partition: 0,
        };
        let fence = Fence {
            key: slot,
            leader_epoch: 1,
        };
        let txn = |id: &str, producer_id, state| TxnRecord {
            transactional_id: id.into(),
            producer_id,
            producer_epoch: 0,
            last_producer_epoch: -1,
            timeout_ms: 60_000,
            state,
            partitions: vec![("ledger".into(), 0)],
            groups: vec!["g".into()],
            start_ms: 1_700_000_000_010,
            updated_ms: 1_700_000_000_011,
        };
        let pending = |producer_id, offset| TxnOffsetRecord {
            producer_id,
            offset: CommittedOffset {
                topic: "ledger".into(),
                partition: 0,
                offset,
                leader_epoch: 1,
                metadata: String::new(),
                commit_timestamp_ms: 1_700_000_000_012,
            },
        };
        vec![
            Op::CreateTopic {
                topic: TopicRecord {
                    name: "ledger".into(),
                    id: ledger.topic_id,
                    partitions: 1,
                    configs: BTreeMap::new(),
                    created_ms: 1_700_000_000_009,
                },
            },
            Op::Claim {
                key: ledger,
                broker_id: 1,
            },
            Op::PutTxn {
                record: txn("tx-1", 1000, crate::metadata::TxnState::Ongoing),
                fence,
            },
            Op::PutTxn {
                record: txn("tx-2", 1001, crate::metadata::TxnState::Ongoing),
                fence,
            },
            Op::CommitTxnOffsets {
                group: "g".into(),
                offsets: vec![pending(1000, 3), pending(1001, 2)],
                fence: Some(fence),
            },
            Op::CommitWals {
                commits: vec![WalCommit {
                    object_key: "wal/1/1/1".into(),
                    created_ms: 1_700_000_000_013,
                    partitions: vec![crate::metadata::PartitionCommit {
                        key: ledger,
                        leader_epoch: 1,
                        range: WalRangeRecord {
                            base_offset: 0,
                            end_offset: 4,
                            object_key: "wal/1/1/1".into(),
                            position: 0,
                            len: 200,
                            max_timestamp: 1_700_000_000_013,
                            object_size: 220,
                        },
                        producers: vec![ProducerStateRecord {
                            producer_id: 1000,
                            epoch: 0,
                            batches: vec![crate::metadata::ProducerBatch {
                                first_seq: 0,
                                last_seq: 0,
                                base_offset: 0,
                                last_offset: 0,
                                timestamp: 1_700_000_000_012,
                            }],
                            last_update_ms: 1_700_000_000_013,
                            txn_first_offset: 0,
                            coordinator_epoch: 1,
                        }],
                        // tx-2's batch at 1, its abort marker at 2.
                        aborted: vec![AbortedTxnRecord {
                            producer_id: 1001,
                            first_offset: 1,
                            last_offset: 2,
                        }],
                    }],
                }],
            },
            Op::PutTxn {
                record: txn("tx-2", 1001, crate::metadata::TxnState::CompleteAbort),
                fence,
            },
            Op::PutTxn {
                record: txn("tx-1", 1000, crate::metadata::TxnState::CompleteCommit),
                fence,
            },
            Op::PutTxn {
                record: txn("tx-3", 1002, crate::metadata::TxnState::Ongoing),
                fence,
            },
            Op::CommitTxnOffsets {
                group: "g".into(),
                offsets: vec![pending(1002, 4)],
                fence: Some(fence),
            },
            Op::DeleteTxn {
                transactional_id: "tx-2".into(),
                fence,
            },
        ]
    }

    fn golden_segment(compacted_ms: i64) -> SegmentRecord {
        SegmentRecord {
            base_offset: 0,
            end_offset: 7,
            object_key: format!("segments/prices/0/{compacted_ms}.seg"),
            size_bytes: 300,
            data_bytes: 200,
            max_timestamp: 1_700_000_000_004,
            created_ms: 1_700_000_000_004,
            compacted_ms,
        }
    }

    /// What this code writes is exactly the golden record and snapshot of its format.
    #[test]
    fn the_current_format_is_pinned() {
        let record = Record {
            format: FORMAT,
            seq: 3,
            ops: golden_ops(),
        };
        let encoded = serde_json::to_string(&record).expect("encode");
        assert_eq!(encoded, golden("bucket-record-v5.json", &encoded));
        let mut state = State::default();
        for op in &record.ops {
            state.apply(op).expect("applies");
        }
        let snapshot = serde_json::to_string(&state.snapshot(3)).expect("encode");
        assert_eq!(snapshot, golden("bucket-snapshot-v5.json", &snapshot));
    }

    /// Snapshots of every earlier format still load (what they lack starts empty), and
    /// the current one loads to the state it was taken of.
    #[test]
    fn snapshots_of_every_format_load() {
        for name in [
            "bucket-snapshot-v3.json",
            "bucket-snapshot-v4.json",
            "bucket-snapshot-v5.json",
        ] {
            let bytes = std::fs::read(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("src/metadata/testdata")
                    .join(name),
            )
            .expect("golden file");
            let snapshot: Snapshot = decode(&bytes, name, |s: &Snapshot| s.format).expect(name);
            let state = State::from_snapshot(snapshot);
            let orders = PartitionKey {
                topic_id: Uuid::from_u128(10),
                partition: 0,
            };
            let p = &state.partitions[&orders];
            assert_eq!((p.leader_epoch, p.high_watermark), (1, 5), "{name}");
            assert_eq!(state.wal_refs.get("wal/1/1/0"), Some(&1), "{name}");
            if !name.ends_with("v5.json") {
                assert!(state.txns.is_empty(), "{name}");
                assert!(state.txn_offsets.is_empty(), "{name}");
                assert!(state.partitions.values().all(|p| p.aborted.is_empty()));
            }
        }
        let mut state = State::default();
        for op in &golden_ops() {
            state.apply(op).expect("applies");
        }
        let encoded = serde_json::to_vec(&state.snapshot(3)).expect("encode");
        let loaded = State::from_snapshot(serde_json::from_slice(&encoded).expect("decode"));
        assert_eq!(
            serde_json::to_string(&loaded.snapshot(3)).expect("encode"),
            serde_json::to_string(&state.snapshot(3)).expect("encode")
        );
        assert_eq!(loaded.wal_refs, state.wal_refs);
    }

    /// Records of every earlier format still replay, with their meaning then: format 1
    /// had no fences on offset deletion and expiry; formats 1 and 2 committed one
    /// write-ahead object at a time.
    #[test]
    fn records_of_every_format_replay() {
        for name in [
            "bucket-record-v1.json",
            "bucket-record-v2.json",
            "bucket-record-v3.json",
            "bucket-record-v4.json",
            "bucket-record-v5.json",
        ] {
            let bytes = std::fs::read(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("src/metadata/testdata")
                    .join(name),
            )
            .expect("golden file");
            let record: Record = decode(&bytes, name, |r: &Record| r.format).expect(name);
            let mut state = State::default();
            for op in &record.ops {
                state.apply(op).expect(name);
            }
            let orders = PartitionKey {
                topic_id: Uuid::from_u128(10),
                partition: 0,
            };
            let p = &state.partitions[&orders];
            assert_eq!((p.leader_epoch, p.high_watermark), (1, 5), "{name}");
            assert_eq!(p.wal_ranges.len(), 1, "{name}");
            if name.ends_with("v4.json") || name.ends_with("v5.json") {
                let prices = PartitionKey {
                    topic_id: Uuid::from_u128(11),
                    partition: 0,
                };
                let compacted = &state.partitions[&prices];
                let segments: Vec<_> = compacted.segments.values().collect();
                assert_eq!(segments.len(), 1, "{name}");
                assert_eq!(segments[0].compacted_ms, 1_700_000_000_005, "{name}");
            }
            if name.ends_with("v5.json") {
                let ledger = PartitionKey {
                    topic_id: Uuid::from_u128(12),
                    partition: 0,
                };
                let p = &state.partitions[&ledger];
                assert_eq!(p.high_watermark, 4, "{name}");
                assert_eq!(
                    p.state().aborted,
                    vec![AbortedTxnRecord {
                        producer_id: 1001,
                        first_offset: 1,
                        last_offset: 2,
                    }],
                    "{name}"
                );
                assert_eq!(p.producers[&1000].txn_first_offset, 0, "{name}");
                // tx-1 committed its offset, tx-2's was discarded and its id expired,
                // tx-3's is pending.
                assert_eq!(
                    state.txns.keys().collect::<Vec<_>>(),
                    vec!["tx-1", "tx-3"],
                    "{name}"
                );
                assert_eq!(state.offsets["g"][&("ledger".to_owned(), 0)].offset, 3);
                let pending: Vec<_> = state.txn_offsets["g"].keys().collect();
                assert_eq!(pending, vec![&("ledger".to_owned(), 0, 1002)], "{name}");
            }
            // Group h was deleted; g's offset was committed after `before_ms` 0.
            assert_eq!(
                state.offsets.keys().collect::<Vec<_>>(),
                vec!["g"],
                "{name}"
            );
        }
    }

    #[test]
    fn a_newer_format_is_refused() {
        let newer = br#"{"format":99,"seq":1,"ops":[]}"#;
        let refused = decode(newer, "record 1", |r: &Record| r.format);
        assert!(
            matches!(&refused, Err(MetaError::Corrupt(m)) if m.contains("newer")),
            "{:?}",
            refused.err()
        );
    }

    metadata_store_conformance!(BucketStore::open(memory()).await.expect("open"));

    #[tokio::test]
    async fn conformance_suite_on_one_store() {
        let store = BucketStore::open(memory()).await.expect("open");
        conformance::run_all(&store).await;
    }

    #[tokio::test]
    async fn state_survives_reopening_and_snapshots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().display());
        let objects =
            Arc::new(tiering::Store::open(&url, &tiering::StoreOptions::default()).expect("store"));
        let store = BucketStore::open(objects.clone()).await.expect("open");
        let topic = TopicRecord {
            name: "t".into(),
            id: crate::clock::unique_id(),
            partitions: 2,
            configs: BTreeMap::new(),
            created_ms: 1,
        };
        store.create_topic(&topic).await.expect("create");
        // Enough records for a snapshot and some after it.
        let n = SNAPSHOT_EVERY + 10;
        for i in 0..n {
            store
                .commit_offsets(
                    "g",
                    &[CommittedOffset {
                        topic: "t".into(),
                        partition: 0,
                        offset: i as i64,
                        leader_epoch: -1,
                        metadata: String::new(),
                        commit_timestamp_ms: 5,
                    }],
                    None,
                )
                .await
                .expect("commit");
        }
        let key = PartitionKey {
            topic_id: topic.id,
            partition: 1,
        };
        let claimed = store.claim_partition(key, 7).await.expect("claim");
        drop(store);
        let snapshots = objects
            .list(&Path::from("meta/snapshots"))
            .await
            .expect("list");
        assert_eq!(snapshots.len(), 1, "one snapshot after {n} records");

        let reopened = BucketStore::open(objects.clone()).await.expect("reopen");
        assert_eq!(
            reopened.list_topics().await.expect("topics"),
            vec![topic.clone()]
        );
        let offsets = reopened.fetch_offsets("g").await.expect("offsets");
        assert_eq!(offsets[0].offset, n as i64 - 1);
        let again = reopened.claim_partition(key, 7).await.expect("claim");
        assert_eq!(again.leader_epoch, claimed.leader_epoch + 1);
    }

    #[tokio::test]
    async fn a_second_writer_is_fenced_by_the_log() {
        // Two stores over one bucket: the one that is behind loses its write, catches
        // up, and then judges the epoch against the state it missed.
        let objects = memory();
        let a = BucketStore::open(objects.clone()).await.expect("open a");
        let topic = TopicRecord {
            name: "t".into(),
            id: crate::clock::unique_id(),
            partitions: 1,
            configs: BTreeMap::new(),
            created_ms: 1,
        };
        a.create_topic(&topic).await.expect("create");
        let key = PartitionKey {
            topic_id: topic.id,
            partition: 0,
        };
        let old = a.claim_partition(key, 1).await.expect("claim by a");
        let b = BucketStore::open(objects.clone()).await.expect("open b");
        let new = b.claim_partition(key, 2).await.expect("claim by b");
        assert_eq!(new.leader_epoch, old.leader_epoch + 1);

        let range = WalRangeRecord {
            base_offset: 0,
            end_offset: 1,
            object_key: "wal/x".into(),
            position: 0,
            len: 10,
            max_timestamp: 0,
            object_size: 1 << 20,
        };
        let commit = WalCommit {
            object_key: "wal/x".into(),
            created_ms: 1,
            partitions: vec![super::super::PartitionCommit {
                key,
                leader_epoch: old.leader_epoch,
                range,
                producers: vec![],
                aborted: vec![],
            }],
        };
        // a's record number was taken by b: retriable failure, then a catches up ...
        let first = a.commit_wal(std::slice::from_ref(&commit)).await;
        assert!(matches!(first, Err(MetaError::Unavailable(_))), "{first:?}");
        // ... and the same commit is now fenced by b's newer epoch.
        let second = a.commit_wal(std::slice::from_ref(&commit)).await;
        assert!(matches!(second, Err(MetaError::Fenced(_))), "{second:?}");
    }
}
