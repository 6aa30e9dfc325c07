//! The metadata store: the small, transactional source of truth beside the object store.
//!
//! It owns topics, per-partition leadership epochs, the partition manifests (sealed
//! segments and the write-ahead ranges after them), the high watermark, idempotent
//! producer state and producer-id allocation. The log bytes themselves never pass
//! through it. What the operations mean (epochs, claims, ranges, trims, offsets, topic
//! rules, counters, broker sessions) is written once, in `semantics`; the backends read
//! and store rows (SQLite and PostgreSQL decode each table's row in the one function
//! `rows` has for it). One conformance suite (`conformance`) holds the three to
//! the same behaviour.
//!
//! Every write that belongs to a partition is conditional on the caller's leader epoch,
//! so a former owner can never commit after its successor claimed the partition.

pub(crate) mod bucket;
#[cfg(test)]
pub(crate) mod conformance;
pub(crate) mod instrumented;
pub(crate) mod postgres;
mod rows;
pub(crate) mod semantics;
pub(crate) mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use uuid::Uuid;

/// Errors a caller branches on. Backend failures are `Unavailable` (retriable).
#[derive(Debug, thiserror::Error)]
pub(crate) enum MetaError {
    #[error("topic already exists")]
    TopicExists,
    #[error("topic not found")]
    TopicNotFound,
    #[error("partition {0:?} is owned by a newer leader epoch")]
    Fenced(Vec<PartitionKey>),
    #[error("partition not found")]
    PartitionNotFound,
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    #[error("stored metadata is corrupt: {0}")]
    Corrupt(String),
    #[error("a newer session of this broker id is registered")]
    Superseded,
    /// The write assumed a manifest the store no longer holds (a final answer: the
    /// writer's view is stale and must be read again).
    #[error("the manifest changed: {0}")]
    Conflict(String),
}

impl MetaError {
    /// Whether trying again later may succeed: only an unavailable store. Fencing,
    /// missing topics and corrupt records are final answers.
    pub(crate) fn is_retriable(&self) -> bool {
        matches!(self, MetaError::Unavailable(_))
    }
}

pub(crate) type MetaResult<T> = Result<T, MetaError>;

/// A topic as the metadata store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct TopicRecord {
    pub name: String,
    pub id: Uuid,
    pub partitions: i32,
    /// Topic-level overrides, Kafka names (`retention.ms`, ...). Absent keys use broker defaults.
    pub configs: BTreeMap<String, String>,
    pub created_ms: i64,
}

/// Identifies one partition. Topic ids (not names) so a re-created topic never sees old data.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub(crate) struct PartitionKey {
    pub topic_id: Uuid,
    pub partition: i32,
}

/// A sealed, uploaded segment object of one partition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SegmentRecord {
    pub base_offset: i64,
    /// Exclusive: the offset after the last record in the segment.
    pub end_offset: i64,
    pub object_key: String,
    /// Whole object size in bytes.
    pub size_bytes: u64,
    /// Bytes of record batches at the start of the object (the index follows them).
    pub data_bytes: u64,
    pub max_timestamp: i64,
    pub created_ms: i64,
    /// When the compaction pass that wrote it ran; 0: never compacted (its records are
    /// "dirty": they may hold keys that newer records replace).
    #[serde(default)]
    pub compacted_ms: i64,
}

/// A contiguous run of one partition's batches inside a write-ahead object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct WalRangeRecord {
    pub base_offset: i64,
    /// Exclusive.
    pub end_offset: i64,
    pub object_key: String,
    pub position: u64,
    pub len: u64,
    pub max_timestamp: i64,
    /// Size of the whole write-ahead object, so readers other than the writer can read
    /// it through the block cache (0: not recorded, from before schema version 4).
    #[serde(default)]
    pub object_size: u64,
}

/// One batch remembered for idempotent-producer duplicate detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ProducerBatch {
    pub first_seq: i32,
    pub last_seq: i32,
    pub base_offset: i64,
    pub last_offset: i64,
    pub timestamp: i64,
}

/// Idempotent producer state of one producer id on one partition (at most 5 batches kept).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ProducerStateRecord {
    pub producer_id: i64,
    pub epoch: i16,
    pub batches: Vec<ProducerBatch>,
    pub last_update_ms: i64,
    /// The offset of the producer's first batch in its open transaction on this
    /// partition (-1: none open). The last stable offset stops at the lowest of them.
    #[serde(default = "no_offset")]
    pub txn_first_offset: i64,
    /// The transaction coordinator's epoch of the producer's last marker here (-1:
    /// none); a marker from an older coordinator is refused.
    #[serde(default = "no_epoch")]
    pub coordinator_epoch: i32,
}

fn no_offset() -> i64 {
    -1
}

fn no_epoch() -> i32 {
    -1
}

/// A transaction aborted on one partition: the offsets from its first batch to its
/// abort marker. read_committed consumers skip that producer's batches in the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct AbortedTxnRecord {
    pub producer_id: i64,
    pub first_offset: i64,
    /// The abort marker's offset.
    pub last_offset: i64,
}

/// Where a transaction is, as Kafka's coordinator names its states (persisted by name).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub(crate) enum TxnState {
    Empty,
    Ongoing,
    PrepareCommit,
    PrepareAbort,
    CompleteCommit,
    CompleteAbort,
}

impl TxnState {
    /// Kafka's name (DescribeTransactions, ListTransactions, the CLI).
    pub(crate) fn name(self) -> &'static str {
        match self {
            TxnState::Empty => "Empty",
            TxnState::Ongoing => "Ongoing",
            TxnState::PrepareCommit => "PrepareCommit",
            TxnState::PrepareAbort => "PrepareAbort",
            TxnState::CompleteCommit => "CompleteCommit",
            TxnState::CompleteAbort => "CompleteAbort",
        }
    }
}

/// A transactional id as its coordinator keeps it. Stored whole (JSON) after every
/// transition, fenced by the coordinator's lease on the id's slot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct TxnRecord {
    pub transactional_id: String,
    pub producer_id: i64,
    pub producer_epoch: i16,
    /// The epoch before the last bump (-1: none), so an InitProducerId retried after
    /// its answer was lost gets the same answer (KIP-360).
    pub last_producer_epoch: i16,
    pub timeout_ms: i32,
    pub state: TxnState,
    /// Partitions in the transaction: (topic, partition), sorted.
    pub partitions: Vec<(String, i32)>,
    /// Groups whose offsets the transaction commits, sorted.
    pub groups: Vec<String>,
    /// When the transaction started (-1: none open).
    pub start_ms: i64,
    pub updated_ms: i64,
}

/// An offset committed inside a transaction: visible to the group only once the
/// transaction commits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct TxnOffsetRecord {
    pub producer_id: i64,
    pub offset: CommittedOffset,
}

/// Everything a new owner needs to carry a partition on from where it was left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartitionState {
    /// The epoch just claimed; every later commit must carry it.
    pub leader_epoch: i32,
    pub log_start_offset: i64,
    /// Exclusive end of the durable log (next offset to assign).
    pub high_watermark: i64,
    /// Sorted by base offset.
    pub segments: Vec<SegmentRecord>,
    /// Sorted by base offset; all at or after the last segment's end.
    pub wal_ranges: Vec<WalRangeRecord>,
    pub producers: Vec<ProducerStateRecord>,
    /// (leader epoch, first offset written in it), ascending; includes the epoch just claimed.
    pub epoch_history: Vec<(i32, i64)>,
    /// Transactions aborted at or after the log start offset, by marker offset.
    pub aborted: Vec<AbortedTxnRecord>,
}

/// One partition's part of a write-ahead commit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PartitionCommit {
    pub key: PartitionKey,
    pub leader_epoch: i32,
    pub range: WalRangeRecord,
    /// Producer states touched by this flush, replacing the stored ones.
    pub producers: Vec<ProducerStateRecord>,
    /// Transactions whose abort marker is in this range.
    #[serde(default)]
    pub aborted: Vec<AbortedTxnRecord>,
}

/// All partitions' new ranges from one write-ahead object, committed atomically.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct WalCommit {
    pub object_key: String,
    pub created_ms: i64,
    pub partitions: Vec<PartitionCommit>,
}

/// Who holds a partition (or a coordinator slot) and under which leader epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PartitionOwner {
    pub key: PartitionKey,
    pub leader_epoch: i32,
    /// The broker that claimed it last; `None` once released (or never claimed).
    pub owner: Option<i32>,
}

/// The lease a write is conditional on: the writer's epoch on a partition or a
/// coordinator slot. A write under a stale fence fails with `Fenced`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Fence {
    pub key: PartitionKey,
    pub leader_epoch: i32,
}

/// A broker's registration: who it is, where clients reach it, and until when its
/// lease holds. Brokers renew the lease by heartbeat; one whose lease has expired is
/// not live.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct BrokerRecord {
    pub broker_id: i32,
    /// The session from `start_broker_session`: a restarted broker supersedes its old
    /// self, whose heartbeats are then refused.
    pub session: i64,
    pub host: String,
    pub port: i32,
    /// Availability zone (Kafka's rack), if known.
    pub zone: Option<String>,
    /// Milliseconds since the epoch after which the broker is no longer live.
    pub lease_expires_ms: i64,
    /// Live but giving its partitions and groups away and taking none (drain, shutdown).
    #[serde(default)]
    pub draining: bool,
}

/// A consumer group's committed offset for one partition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct CommittedOffset {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Leader epoch of the last consumed record, -1 if unknown.
    pub leader_epoch: i32,
    /// Client-supplied metadata string (bounded by the caller).
    pub metadata: String,
    pub commit_timestamp_ms: i64,
}

#[async_trait]
pub(crate) trait MetadataStore: Send + Sync + std::fmt::Debug + 'static {
    /// `TopicExists` if the name is taken. Creates its partitions (epoch 0, empty logs).
    async fn create_topic(&self, topic: &TopicRecord) -> MetaResult<()>;
    /// Removes the topic and all its partition rows; returns what was removed.
    async fn delete_topic(&self, name: &str) -> MetaResult<TopicRecord>;
    async fn list_topics(&self) -> MetaResult<Vec<TopicRecord>>;
    /// Replaces the topic's config overrides.
    async fn set_topic_configs(
        &self,
        name: &str,
        configs: &BTreeMap<String, String>,
    ) -> MetaResult<()>;
    /// Grows the partition count (never shrinks); creates the new partition rows.
    async fn set_partition_count(&self, name: &str, count: i32) -> MetaResult<()>;

    /// Takes ownership: bumps the leader epoch, records it in the epoch history with the
    /// current high watermark as start offset, and returns the state to recover from.
    async fn claim_partition(
        &self,
        key: PartitionKey,
        broker_id: i32,
    ) -> MetaResult<PartitionState>;
    /// The partition's current state without claiming it (`leader_epoch` is the
    /// owner's): what a broker serving reads for clients in its zone reads from.
    async fn read_partition(&self, key: PartitionKey) -> MetaResult<PartitionState>;
    /// Gives ownership up (graceful hand-off): clears the owner if the epoch is still the
    /// caller's, so the next owner can claim at once. `Fenced` if someone claimed since.
    async fn release_partition(&self, key: PartitionKey, leader_epoch: i32) -> MetaResult<()>;
    /// Every partition's owner and epoch, for assignment and for Metadata answers.
    async fn partition_owners(&self) -> MetaResult<Vec<PartitionOwner>>;
    /// One transaction for one or more write-ahead objects, in order: for every
    /// partition, check its leader epoch, append the ranges, set the high watermark to
    /// the last range's end, replace the given producer states; and remember the
    /// objects. If any epoch is stale nothing is applied and `Fenced` names the stale
    /// partitions.
    async fn commit_wal(&self, commits: &[WalCommit]) -> MetaResult<()>;
    /// Records a sealed segment and drops the write-ahead ranges it covers
    /// (`end_offset <= segment.end_offset`). Epoch-checked.
    async fn commit_segment(
        &self,
        key: PartitionKey,
        leader_epoch: i32,
        segment: &SegmentRecord,
    ) -> MetaResult<()>;
    /// Retention and DeleteRecords: raises the log start offset (never lowers it) and
    /// forgets the listed segments. Epoch-checked.
    async fn trim_log(
        &self,
        key: PartitionKey,
        leader_epoch: i32,
        log_start_offset: i64,
        drop_segment_base_offsets: &[i64],
    ) -> MetaResult<()>;
    /// Compaction's swap, in one transaction: forgets the segments at `replaced` (base
    /// offsets) and records `segments` in their place (the same offsets, fewer records).
    /// Epoch-checked.
    async fn replace_segments(
        &self,
        key: PartitionKey,
        leader_epoch: i32,
        replaced: &[i64],
        segments: &[SegmentRecord],
    ) -> MetaResult<()>;
    /// Write-ahead objects no partition range references any more (garbage).
    async fn unreferenced_wal_objects(&self) -> MetaResult<Vec<String>>;
    /// Every object the metadata references or remembers: the segment objects of every
    /// partition and every write-ahead object not yet forgotten (referenced or awaiting
    /// garbage collection). Anything else under `segments/` or `wal/` is an orphan.
    async fn known_objects(&self) -> MetaResult<Vec<String>>;
    /// Forgets write-ahead objects after they were deleted from the object store.
    async fn forget_wal_objects(&self, keys: &[String]) -> MetaResult<()>;
    /// Allocates a new, never reused producer id.
    async fn next_producer_id(&self) -> MetaResult<i64>;
    /// Stores committed offsets of one group in one transaction (replacing earlier
    /// commits of the same partitions). With a fence, only while the fence's epoch is
    /// current (the coordinator's lease on the group's slot), else `Fenced`.
    async fn commit_offsets(
        &self,
        group: &str,
        offsets: &[CommittedOffset],
        fence: Option<Fence>,
    ) -> MetaResult<()>;
    /// Every committed offset of a group, sorted by topic and partition.
    async fn fetch_offsets(&self, group: &str) -> MetaResult<Vec<CommittedOffset>>;
    /// Deletes a group's committed offsets: all of them (`None`) or the listed
    /// (topic, partition) pairs. Returns how many were deleted. With a fence, only
    /// while the fence's epoch is current (the coordinator's lease), else `Fenced`.
    async fn delete_offsets(
        &self,
        group: &str,
        partitions: Option<&[(String, i32)]>,
        fence: Option<Fence>,
    ) -> MetaResult<usize>;
    /// Names of all groups that have committed offsets, sorted.
    async fn offset_groups(&self) -> MetaResult<Vec<String>>;
    /// Deletes every committed offset older than `before_ms` of the listed groups
    /// (offset retention for groups without members). Returns how many were deleted.
    /// With a fence, only while the fence's epoch is current, else `Fenced`.
    async fn expire_offsets(
        &self,
        groups: &[String],
        before_ms: i64,
        fence: Option<Fence>,
    ) -> MetaResult<usize>;
    /// Stores a transactional id's record, replacing the previous one, while `fence`
    /// (the coordinator's lease on the id's slot) is current, else `Fenced`. Completing
    /// a transaction does more in the same transaction: `CompleteCommit` makes the
    /// offsets the producer committed in it for `record.groups` the groups' committed
    /// offsets, `CompleteAbort` discards them.
    async fn put_txn(&self, record: &TxnRecord, fence: Fence) -> MetaResult<()>;
    /// Forgets a transactional id (expiry), while `fence` is current.
    async fn delete_txn(&self, transactional_id: &str, fence: Fence) -> MetaResult<()>;
    /// Every transactional id's record, sorted by id.
    async fn list_txns(&self) -> MetaResult<Vec<TxnRecord>>;
    /// Stores offsets a group commits inside a producer's transaction (replacing that
    /// producer's earlier pending ones of the same partitions), while `fence` (the
    /// group coordinator's lease) is current.
    async fn commit_txn_offsets(
        &self,
        group: &str,
        offsets: &[TxnOffsetRecord],
        fence: Option<Fence>,
    ) -> MetaResult<()>;
    /// A group's offsets committed in transactions not yet ended, sorted by topic,
    /// partition and producer id.
    async fn pending_txn_offsets(&self, group: &str) -> MetaResult<Vec<TxnOffsetRecord>>;
    /// Starts a broker session: returns a number higher than any before for this broker,
    /// used in object names so objects are never overwritten.
    async fn start_broker_session(&self, broker_id: i32) -> MetaResult<i64>;
    /// Registers the broker or renews its lease (replacing address, zone and expiry).
    /// `Superseded` if a newer session of the same broker id is registered.
    async fn heartbeat_broker(&self, broker: &BrokerRecord) -> MetaResult<()>;
    /// Brokers whose lease expires after `now_ms`, by id.
    async fn live_brokers(&self, now_ms: i64) -> MetaResult<Vec<BrokerRecord>>;
    /// Removes the broker's registration if it is still this session's (graceful
    /// shutdown: the others need not wait for the lease to expire).
    async fn deregister_broker(&self, broker_id: i32, session: i64) -> MetaResult<()>;
    /// Operations waiting in the store's own queue, against its capacity; `None` for a
    /// store without one (only the bucket store queues for its single writer).
    fn queue_depth(&self) -> Option<(usize, usize)> {
        None
    }
}

/// Opens the metadata store named by a URL: `sqlite://PATH` (fsyncing every commit
/// when `sqlite_synced`), `postgres://...`, or `bucket://` (kept in `objects`, the
/// broker's object store, under `meta/`, its writer's queue `bucket_queue_length`
/// long), measured and bounded by `timeout` per operation (see [`instrumented`]).
pub(crate) async fn open(
    url: &str,
    objects: &std::sync::Arc<tiering::Store>,
    timeout: std::time::Duration,
    bucket_queue_length: usize,
    sqlite_synced: bool,
) -> anyhow::Result<std::sync::Arc<dyn MetadataStore>> {
    let store: std::sync::Arc<dyn MetadataStore> = if url == "bucket://" {
        let options = bucket::BucketOptions {
            queue_length: bucket_queue_length,
            write_deadline: timeout,
        };
        std::sync::Arc::new(bucket::BucketStore::open_with(objects.clone(), options).await?)
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        let path = std::path::PathBuf::from(path);
        std::sync::Arc::new(
            tokio::task::spawn_blocking(move || {
                sqlite::SqliteStore::open_with(&path, sqlite_synced)
            })
            .await??,
        )
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        std::sync::Arc::new(postgres::PostgresStore::connect(url).await?)
    } else {
        anyhow::bail!(
            "unsupported metadata URL {url:?}: expected sqlite://PATH, postgres://... or bucket://"
        )
    };
    Ok(std::sync::Arc::new(instrumented::Instrumented::new(
        store, timeout,
    )))
}
