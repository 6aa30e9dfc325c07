//! The owner task of one partition: the single writer of its log.
//!
//! It checks idempotent-producer sequences, assigns offsets (stamping them into the batch
//! bytes), hands batches to the broker's write-ahead flusher, and on each commit raises
//! the high watermark, records the committed write-ahead range, appends the now-durable
//! batches to the local segment (when the cache disk takes writes) and answers the
//! waiting `acks=all` producers. It seals the unsealed tail into segment objects in
//! offset order (`super::tail`), applies retention, and serves DeleteRecords. Readers
//! never talk to the task: they read the shared [`PartitionView`] under a short lock and
//! wait on the high watermark through a watch channel.
//!
//! Local files are a cache of the write-ahead ranges, never the only copy: a local
//! append that fails leaves the file as it was and stops it there; what no local file
//! holds is read from, and sealed from, the write-ahead objects.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::{debug, info, warn};

use super::appender::{Appender, Durable};
use super::batch::ValidBatch;
use super::compact::swap::{self, Swap};
use super::local::LocalSegment;
use super::marker::Marker;
use super::producer::{MarkerError, ProducerTable, SeqError};
use super::segments::{
    AfterUpload, DeleteTo, Manifest, SegmentRules, Segments, Trim, UploadFrom, UploadOutcome,
};
use super::tail::{self, CheckError};
use crate::clock::now_ms;
use crate::config::TopicConfig;
use crate::disk::{CacheDisk, WriteFailure};
use crate::metadata::{MetaError, MetadataStore, PartitionKey, SegmentRecord, WalRangeRecord};
use crate::wal::{FlushItem, FlushNotice};

/// Broker-wide parts every partition task uses.
#[derive(Debug)]
pub(crate) struct LogContext {
    pub store: Arc<tiering::Store>,
    pub blocks: Arc<tiering::BlockCache>,
    pub meta: Arc<dyn MetadataStore>,
    pub flusher: crate::wal::FlushQueue,
    pub cache_dir: PathBuf,
    /// Whether the cache disk takes writes now.
    pub disk: Arc<CacheDisk>,
    pub upload_permits: Arc<Semaphore>,
    /// Compaction passes running at once on this broker (`log.cleaner.threads`).
    pub compaction_permits: Arc<Semaphore>,
    pub cleaner: CleanerSettings,
    pub retention_check_interval: Duration,
    pub queue_length: usize,
    pub broker_id: i32,
    /// Where owner tasks and uploads are registered.
    pub tasks: Arc<crate::tasks::Tasks>,
}

/// The broker's compaction settings, as each owner applies them.
#[derive(Debug, Clone)]
pub(crate) struct CleanerSettings {
    /// Each pass's share of `log.cleaner.dedupe.buffer.size`.
    pub map_bytes: usize,
    /// How often an owner checks whether a pass is due (`log.cleaner.backoff.ms`).
    pub backoff: Duration,
    /// How long replaced objects stay for readers of the old manifest
    /// (`file.delete.delay.ms`).
    pub delete_delay: Duration,
    /// `batch.decompressed.max.bytes`.
    pub batch_limit: usize,
    /// `log.cleaner.io.max.bytes.per.second`, shared by every pass.
    pub throttle: Arc<crate::log::compact::throttle::Throttle>,
}

/// What readers see of a partition; written only by the owner task.
#[derive(Debug)]
pub(crate) struct PartitionView {
    /// The log start offset, the sealed segment objects, the write-ahead ranges after
    /// them (every offset up to the high watermark) and the local files caching the
    /// tail; with the owner's decisions about them.
    pub segments: Segments<LocalSegment>,
    /// (leader epoch, start offset), ascending.
    pub epoch_history: Vec<(i32, i64)>,
    /// Where `read_committed` consumers stop: the first offset of the oldest
    /// transaction without a committed marker, or the high watermark.
    pub last_stable_offset: i64,
    /// Transactions aborted at or after the log start offset, by marker offset (shared
    /// with reads and compaction passes, copied only when it changes).
    pub aborted: Arc<Vec<crate::metadata::AbortedTxnRecord>>,
}

#[derive(Debug)]
pub(crate) struct PartitionShared {
    pub key: PartitionKey,
    pub leader_epoch: i32,
    /// Exclusive end of the durable log: the high watermark.
    pub hw: watch::Sender<i64>,
    pub view: RwLock<PartitionView>,
    /// Set once a newer owner fenced this one.
    pub fenced: std::sync::atomic::AtomicBool,
    /// Set when the partition is being handed off: no new writes are taken.
    pub releasing: std::sync::atomic::AtomicBool,
    /// Producers with a transaction open here (batches taken, no marker yet), so a
    /// produce knows when its transaction must be verified first.
    pub open_txns: RwLock<std::collections::HashSet<i64>>,
    /// Counts the markers taken, so a verification can tell whether one came since.
    pub markers: std::sync::atomic::AtomicU64,
}

impl PartitionShared {
    pub(crate) fn high_watermark(&self) -> i64 {
        *self.hw.borrow()
    }

    /// The view, for reading (a short lock: never held across an await).
    pub(crate) fn view(&self) -> std::sync::RwLockReadGuard<'_, PartitionView> {
        self.view.read().expect("partition view lock poisoned")
    }

    /// The view, for the owner task to change.
    fn view_mut(&self) -> std::sync::RwLockWriteGuard<'_, PartitionView> {
        self.view.write().expect("partition view lock poisoned")
    }

    /// Whether the producer has a transaction open here.
    pub(crate) fn txn_open(&self, producer_id: i64) -> bool {
        self.open_txns
            .read()
            .expect("open transactions lock poisoned")
            .contains(&producer_id)
    }

    /// The markers taken so far.
    pub(crate) fn marker_generation(&self) -> u64 {
        self.markers.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Where `read_committed` consumers stop (at most the high watermark).
    pub(crate) fn last_stable_offset(&self) -> i64 {
        let hw = self.high_watermark();
        self.view().last_stable_offset.min(hw)
    }

    pub(crate) fn log_start_offset(&self) -> i64 {
        self.view
            .read()
            .map(|v| v.segments.log_start_offset())
            .unwrap_or(0)
    }

    pub(crate) fn is_fenced(&self) -> bool {
        self.fenced.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether this broker still leads the partition: not fenced, not handing it off.
    pub(crate) fn is_serving(&self) -> bool {
        !self.is_fenced() && !self.releasing.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AppendOk {
    pub base_offset: i64,
    pub log_start_offset: i64,
    /// When the commit that made it durable succeeded (`acks=all`).
    pub durable_at: Option<std::time::Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AppendError {
    #[error(transparent)]
    Sequence(#[from] SeqError),
    #[error("the batch could not be made durable in time; retry")]
    NotDurable,
    /// `acks=0/1` produces are answered on the local append; while the cache disk is
    /// full there is none, so they are refused (KAFKA_STORAGE_ERROR) rather than
    /// acknowledged.
    #[error("the broker's cache disk is full; acks=1 writes are refused until it has room")]
    DiskFull,
    #[error("this broker no longer owns the partition")]
    NotLeader,
    #[error(transparent)]
    Marker(#[from] MarkerError),
    /// A transactional batch would open the producer's transaction here without a
    /// verification that still holds (a marker of the producer came since): retry.
    #[error("the transaction was not verified to include the partition; retry")]
    NotVerified,
}

pub(crate) type AppendReply = oneshot::Sender<Result<AppendOk, AppendError>>;

/// Requests to the owner task.
#[derive(Debug)]
pub(crate) enum PartitionCmd {
    Append {
        batches: Vec<ValidBatch>,
        acks: i16,
        /// When the request reached the broker.
        arrived: std::time::Instant,
        /// The batches' room in the flusher's queue, reserved by the handler.
        queue_bytes: Option<crate::wal::QueueBytes>,
        /// The marker generation as of which the producer's transaction was verified
        /// to include this partition (KIP-890), if it was.
        verified: Option<u64>,
        reply: AppendReply,
    },
    /// DeleteRecords: raise the log start offset (`-1` = the high watermark).
    DeleteRecords {
        offset: i64,
        reply: oneshot::Sender<Result<i64, DeleteRecordsError>>,
    },
    Configure(TopicConfig),
    /// A transaction marker from the coordinator, answered once it is committed.
    WriteMarker {
        marker: Marker,
        reply: AppendReply,
    },
    /// DescribeProducers: the state of every producer with committed batches.
    DescribeProducers(oneshot::Sender<Vec<crate::metadata::ProducerStateRecord>>),
    /// Hand-off: stop taking writes and answer once every batch already taken is
    /// committed (or failed), so nothing in flight is lost or failed by the hand-off.
    Release(oneshot::Sender<()>),
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DeleteRecordsError {
    #[error("offset is beyond the high watermark")]
    OffsetOutOfRange,
    #[error("metadata store unavailable")]
    Unavailable,
    #[error("this broker no longer owns the partition")]
    NotLeader,
}

/// The outcome of a compaction pass, reported to the owner task.
type CompactionDone =
    Result<crate::log::compact::job::Compacted, crate::log::compact::job::CompactError>;

/// The owner's record of compaction: whether a pass runs, when it last looked.
#[derive(Debug, Default)]
struct CompactionState {
    running: bool,
    checked: Option<std::time::Instant>,
    /// The earliest delete horizon of the tombstones the last pass kept (not kept across
    /// restarts: a new owner learns it from its first pass).
    horizon: Option<i64>,
}

/// The outcome of a segment upload, reported to the owner task (unbounded: at most one
/// upload of a partition is in flight).
type UploadDone = Result<SegmentRecord, UploadError>;

/// Why a segment upload did not commit.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UploadError {
    /// The segment's bytes failed the check: never uploaded.
    #[error("segment {base}..{end} from {source_name} failed its check: {error}")]
    Check {
        base: i64,
        end: i64,
        source_name: &'static str,
        error: CheckError,
    },
    /// A newer owner holds the partition.
    #[error("fenced by a newer owner")]
    Fenced,
    /// The segment's bytes could not be read from the write-ahead objects.
    #[error("reading write-ahead ranges: {0}")]
    Read(#[source] super::read::ReadError),
    /// The segment object could not be written.
    #[error("uploading the segment: {0}")]
    Store(#[source] tiering::Error),
    /// The manifest could not be updated.
    #[error("committing the segment: {0}")]
    Meta(#[source] MetaError),
    /// A step of the upload did not finish (its task panicked, or the broker is stopping).
    #[error("{0}")]
    Task(String),
}

impl UploadError {
    /// The outcome the segments' decisions see.
    fn outcome(&self) -> UploadOutcome {
        match self {
            UploadError::Fenced => UploadOutcome::Fenced,
            UploadError::Check {
                base, source_name, ..
            } if *source_name == LOCAL => UploadOutcome::LocalRefused { base_offset: *base },
            e => UploadOutcome::Failed {
                retriable: e.is_retriable(),
            },
        }
    }

    /// Whether trying again may succeed. A segment that failed its check, or an upload
    /// fenced by a newer owner, will fail the same way again; so will a store's final
    /// answer (an object already there with other bytes).
    pub(crate) fn is_retriable(&self) -> bool {
        match self {
            UploadError::Check { .. } | UploadError::Fenced => false,
            UploadError::Store(e) => e.is_retriable(),
            UploadError::Meta(e) => e.is_retriable(),
            UploadError::Read(_) | UploadError::Task(_) => true,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct PartitionHandle {
    pub topic: Arc<str>,
    pub partition: i32,
    pub cmd: mpsc::Sender<PartitionCmd>,
    pub shared: Arc<PartitionShared>,
}

/// Claims a partition and starts its owner task.
///
/// Nothing is replayed before the partition serves: the write-ahead ranges after the
/// last sealed segment are read (through the block cache) only when a reader asks for
/// them, and sealed into a segment object in the background, so taking a partition
/// over costs the claim whatever its tail holds. New batches go to a fresh local file
/// from the high watermark.
pub(crate) async fn start(
    ctx: Arc<LogContext>,
    topic: Arc<str>,
    key: PartitionKey,
    config: TopicConfig,
) -> anyhow::Result<(PartitionHandle, tokio::task::JoinHandle<()>)> {
    let mut state = ctx.meta.claim_partition(key, ctx.broker_id).await?;
    let stream: Arc<str> = Arc::from(format!("{}/{}", key.topic_id, key.partition));
    let dir = ctx
        .cache_dir
        .join(format!("{}-{}", key.topic_id, key.partition));
    let local = open_local_tail(&ctx.disk, dir.clone(), state.high_watermark).await;
    info!(
        topic = %topic, partition = key.partition, epoch = state.leader_epoch,
        high_watermark = state.high_watermark, segments = state.segments.len(),
        wal_ranges = state.wal_ranges.len(), local = local.is_some(), "partition claimed"
    );
    let (hw, _) = watch::channel(state.high_watermark);
    let segments = Segments::new(
        SegmentRules::from_config(&config),
        Manifest::take_from(&mut state),
        local,
        now_ms(),
    );
    let shared = Arc::new(PartitionShared {
        key,
        leader_epoch: state.leader_epoch,
        hw,
        view: RwLock::new(PartitionView {
            segments,
            epoch_history: state.epoch_history,
            last_stable_offset: state.high_watermark,
            aborted: Arc::default(),
        }),
        fenced: std::sync::atomic::AtomicBool::new(false),
        releasing: std::sync::atomic::AtomicBool::new(false),
        open_txns: RwLock::new(std::collections::HashSet::new()),
        markers: std::sync::atomic::AtomicU64::new(0),
    });
    let (cmd_tx, cmd_rx) = mpsc::channel(ctx.queue_length);
    let (flush_tx, flush_rx) = mpsc::unbounded_channel();
    let (upload_tx, upload_rx) = mpsc::unbounded_channel();
    let (compact_tx, compact_rx) = mpsc::unbounded_channel();
    let producers = ProducerTable::from_records(state.producers);
    let writes = Appender::new(state.leader_epoch, state.high_watermark, producers);
    {
        let mut view = shared.view_mut();
        view.last_stable_offset = writes.last_stable_offset();
        view.aborted = Arc::new(state.aborted);
    }
    *shared
        .open_txns
        .write()
        .expect("open transactions lock poisoned") = writes.open_txn_producers();
    let tasks = ctx.tasks.clone();
    let owner = Owner {
        ctx,
        key,
        topic: topic.clone(),
        stream,
        shared: shared.clone(),
        dir,
        writes,
        config,
        flush_tx,
        upload_tx,
        compact_tx,
        compaction: CompactionState::default(),
        released: None,
        last_marker: std::collections::HashMap::new(),
    };
    let task = tasks.spawn(owner.run(cmd_rx, flush_rx, upload_rx, compact_rx));
    Ok((
        PartitionHandle {
            topic,
            partition: key.partition,
            cmd: cmd_tx,
            shared,
        },
        task,
    ))
}

/// Starts the partition's local directory afresh (it may hold batches that were never
/// committed, or be gone) with an empty file from `base`; `None` when the cache disk
/// cannot take it.
async fn open_local_tail(disk: &Arc<CacheDisk>, dir: PathBuf, base: i64) -> Option<LocalSegment> {
    let writable = disk.writable();
    let opened = tokio::task::spawn_blocking(move || {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        if !writable {
            return Ok(None);
        }
        LocalSegment::create(&dir, base, now_ms()).map(Some)
    })
    .await;
    match opened {
        Ok(Ok(local)) => local,
        Ok(Err(e)) => {
            disk.note_error("starting a local tail", &e);
            None
        }
        Err(e) => {
            warn!(error = %e, "starting a local tail panicked");
            None
        }
    }
}

/// Write-ahead range reads one segment built from them keeps in flight.
const RANGE_READS_IN_FLIGHT: usize = 32;

struct Owner {
    ctx: Arc<LogContext>,
    key: PartitionKey,
    topic: Arc<str>,
    stream: Arc<str>,
    shared: Arc<PartitionShared>,
    dir: PathBuf,
    /// Offsets, producer sequences and waiting producers (the write state machine).
    writes: Appender<(AppendOk, AppendReply)>,
    config: TopicConfig,
    /// Handed to the flusher with every batch.
    flush_tx: mpsc::UnboundedSender<FlushNotice>,
    /// Handed to every upload job.
    upload_tx: mpsc::UnboundedSender<UploadDone>,
    /// Handed to every compaction pass (at most one at a time).
    compact_tx: mpsc::UnboundedSender<CompactionDone>,
    compaction: CompactionState,
    /// A hand-off waiting for the in-flight batches to finish.
    released: Option<oneshot::Sender<()>>,
    /// The marker generation of each producer's last marker taken here.
    last_marker: std::collections::HashMap<i64, u64>,
}

impl Owner {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<PartitionCmd>,
        mut flushes: mpsc::UnboundedReceiver<FlushNotice>,
        mut uploads: mpsc::UnboundedReceiver<UploadDone>,
        mut compactions: mpsc::UnboundedReceiver<CompactionDone>,
    ) {
        let mut tick = crate::clock::interval(
            self.ctx
                .retention_check_interval
                .min(Duration::from_secs(1)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_retention = crate::clock::instant();
        loop {
            tokio::select! {
                biased;
                Some(notice) = flushes.recv() => self.on_flush_notice(notice).await,
                Some(done) = uploads.recv() => self.on_uploaded(done),
                Some(done) = compactions.recv() => self.on_compacted(done).await,
                cmd = cmds.recv() => match cmd {
                    Some(PartitionCmd::Stop) | None => break,
                    Some(cmd) => self.on_cmd(cmd).await,
                },
                _ = tick.tick() => {
                    self.maybe_seal();
                    self.maybe_upload();
                    self.maybe_compact();
                    if last_retention.elapsed() >= self.ctx.retention_check_interval {
                        last_retention = crate::clock::instant();
                        self.apply_retention().await;
                    }
                }
            }
        }
        self.fail_waiters(AppendError::NotLeader);
        debug!(topic = %self.topic, partition = self.key.partition, "partition owner stopped");
    }

    async fn on_cmd(&mut self, cmd: PartitionCmd) {
        match cmd {
            PartitionCmd::Append {
                batches,
                acks,
                arrived,
                queue_bytes,
                verified,
                reply,
            } => {
                self.append(batches, acks, arrived, queue_bytes, verified, reply)
                    .await
            }
            PartitionCmd::DeleteRecords { offset, reply } => {
                let result = self.delete_records(offset).await;
                let _ = reply.send(result);
            }
            PartitionCmd::WriteMarker { marker, reply } => self.write_marker(marker, reply).await,
            PartitionCmd::DescribeProducers(reply) => {
                let _ = reply.send(self.writes.durable_producers());
            }
            PartitionCmd::Configure(config) => {
                self.config = config;
                self.shared
                    .view_mut()
                    .segments
                    .configure(SegmentRules::from_config(&self.config));
                self.maybe_seal();
                self.maybe_upload();
            }
            PartitionCmd::Release(reply) => {
                self.shared
                    .releasing
                    .store(true, std::sync::atomic::Ordering::Release);
                self.released = Some(reply);
                self.maybe_released();
            }
            PartitionCmd::Stop => {}
        }
    }

    /// Answers a pending hand-off once nothing taken is still waiting for its flush.
    fn maybe_released(&mut self) {
        if self.writes.all_settled() {
            if let Some(reply) = self.released.take() {
                let _ = reply.send(());
            }
        }
    }

    async fn append(
        &mut self,
        batches: Vec<ValidBatch>,
        acks: i16,
        arrived: std::time::Instant,
        queue_bytes: Option<crate::wal::QueueBytes>,
        verified: Option<u64>,
        reply: AppendReply,
    ) {
        if !self.shared.is_serving() {
            let _ = reply.send(Err(AppendError::NotLeader));
            return;
        }
        if acks == 1 && !self.ctx.disk.writable() {
            let _ = reply.send(Err(AppendError::DiskFull));
            return;
        }
        let transactional = batches.iter().any(|b| b.header.is_transactional());
        if transactional && !self.verification_holds(&batches, verified) {
            let _ = reply.send(Err(AppendError::NotVerified));
            return;
        }
        let appended = match self.writes.append(&batches, now_ms()) {
            Ok(a) => a,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        if transactional {
            // A transaction opens here; one already open stays (no lock taken).
            for b in batches.iter().filter(|b| b.header.is_transactional()) {
                let pid = b.header.producer_id;
                if !self.shared.txn_open(pid) {
                    self.shared
                        .open_txns
                        .write()
                        .expect("open transactions lock poisoned")
                        .insert(pid);
                }
            }
        }
        self.submit(appended, acks, arrived, queue_bytes, reply)
            .await;
    }

    /// Whether transactional batches may be taken: each producer's transaction is open
    /// here already, or was verified to include the partition as of a marker
    /// generation no marker of the producer has come after.
    fn verification_holds(&self, batches: &[ValidBatch], verified: Option<u64>) -> bool {
        batches
            .iter()
            .filter(|b| b.header.is_transactional())
            .all(|b| {
                let pid = b.header.producer_id;
                self.writes.txn_open(pid)
                    || verified.is_some_and(|g| {
                        self.last_marker.get(&pid).is_none_or(|&marked| marked <= g)
                    })
            })
    }

    /// Tells producers' requests which transactions are open here, afresh (after a
    /// marker or a failed flush; an append only adds).
    fn publish_open_txns(&self) {
        *self
            .shared
            .open_txns
            .write()
            .expect("open transactions lock poisoned") = self.writes.open_txn_producers();
    }

    /// Writes a transaction marker like an `acks=all` batch: answered once committed.
    async fn write_marker(&mut self, marker: Marker, reply: AppendReply) {
        if !self.shared.is_serving() {
            let _ = reply.send(Err(AppendError::NotLeader));
            return;
        }
        match self.writes.append_marker(&marker, now_ms()) {
            Ok(appended) => {
                let g = self
                    .shared
                    .markers
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
                    + 1;
                self.last_marker.insert(marker.producer_id, g);
                self.publish_open_txns();
                self.submit(appended, -1, crate::clock::instant(), None, reply)
                    .await
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
            }
        }
    }

    /// Hands appended batches to the flusher and answers `reply` as `acks` asks: at
    /// once, or (`-1`) once they are committed.
    async fn submit(
        &mut self,
        appended: super::appender::Appended,
        acks: i16,
        arrived: std::time::Instant,
        mut queue_bytes: Option<crate::wal::QueueBytes>,
        reply: AppendReply,
    ) {
        let last = appended.batches.len().saturating_sub(1);
        for (i, b) in appended.batches.into_iter().enumerate() {
            let item = FlushItem {
                key: self.key,
                stream: self.stream.clone(),
                leader_epoch: self.shared.leader_epoch,
                gen: self.writes.generation(),
                base_offset: b.base_offset,
                end_offset: b.end_offset,
                max_timestamp: b.max_timestamp,
                batch: b.bytes,
                producer: b.producer,
                aborted: b.aborted,
                notify: self.flush_tx.clone(),
                urgent: acks == -1,
                arrived,
            };
            // The last batch holds the append's room: the queue is taken in order.
            let bytes = if i == last { queue_bytes.take() } else { None };
            if self.ctx.flusher.send(item, bytes).await.is_err() {
                let _ = reply.send(Err(AppendError::NotDurable));
                return;
            }
        }
        let ok = AppendOk {
            base_offset: appended.base_offset,
            log_start_offset: self.shared.log_start_offset(),
            durable_at: None,
        };
        if acks != -1 {
            let _ = reply.send(Ok(ok));
        } else if let Some((ok, reply)) = self.writes.wait(appended.end_offset, (ok, reply)) {
            let _ = reply.send(Ok(ok));
        }
    }

    async fn on_flush_notice(&mut self, notice: FlushNotice) {
        match notice {
            FlushNotice::Flushed {
                gen,
                range,
                committed_at,
            } => self.on_flushed(gen, range, committed_at).await,
            FlushNotice::Failed {
                gen,
                fenced,
                uncertain,
            } => self.on_flush_failed(gen, fenced, uncertain),
        }
    }

    async fn on_flushed(
        &mut self,
        gen: u64,
        range: WalRangeRecord,
        committed_at: std::time::Instant,
    ) {
        let end_offset = range.end_offset;
        // `None`: a generation abandoned after a failed flush.
        let Some(Durable {
            from,
            batches,
            answered,
            aborted,
        }) = self.writes.flushed(gen, end_offset)
        else {
            return;
        };
        // The local copy is written first, outside the view's lock and off the
        // runtime's workers: a write the kernel throttles (dirty-page write-back after a
        // burst) holds up this partition only, never readers or other tasks. Nothing
        // written is visible until recorded below.
        let planned = {
            let shared = self.shared.clone();
            let mut view = shared.view_mut();
            self.plan_local(&mut view.segments, &batches, from)
        };
        let written = match planned {
            Some((file, entries)) => {
                let write = tokio::task::spawn_blocking(move || {
                    super::local::write_planned(&file, &entries, &batches).map(|()| entries)
                });
                Some(
                    write
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e))),
                )
            }
            None => None,
        };
        {
            let shared = self.shared.clone();
            let mut view = shared.view_mut();
            // The range is recorded before the high watermark moves, so every offset
            // below it is readable from the write-ahead objects whatever the disk does;
            // so are the transactions it ends.
            view.segments.committed(range);
            if !aborted.is_empty() {
                Arc::make_mut(&mut view.aborted).extend(aborted);
            }
            view.last_stable_offset = self.writes.last_stable_offset();
            match written {
                Some(Ok(entries)) => {
                    if let Some(active) = view.segments.active_mut() {
                        active.record(entries);
                    }
                }
                Some(Err(e)) => {
                    let failure = self.ctx.disk.note_error("appending to a local segment", &e);
                    warn!(
                        topic = %self.topic, partition = self.key.partition, offset = from,
                        reason = failure.label(), error = %e,
                        "local segment append failed; the tail is served and sealed from write-ahead objects"
                    );
                    stop_appending(&mut view.segments);
                }
                None => {}
            }
        }
        self.shared.hw.send_replace(end_offset);
        for (ok, reply) in answered {
            let ok = AppendOk {
                durable_at: Some(committed_at),
                ..ok
            };
            let _ = reply.send(Ok(ok));
        }
        self.maybe_seal();
        self.maybe_upload();
        self.maybe_released();
    }

    /// Where a commit's batches (offsets from `from`) go in the active local file,
    /// opening one if none is active: the file and the planned entries. `None` when
    /// nothing is to be written: a full disk rules local writes out, or batches that do
    /// not follow on; then the file stops where it was (whole batches, no offset
    /// missing), the batches stay readable from their write-ahead range, and sealing
    /// rebuilds the stretch from there.
    fn plan_local(
        &self,
        segments: &mut Segments<LocalSegment>,
        durable: &[Bytes],
        from: i64,
    ) -> Option<(Arc<std::fs::File>, Vec<tiering::segment::BatchEntry>)> {
        let disk = self.ctx.disk.clone();
        if !disk.writable() {
            disk.note_failure(WriteFailure::Skipped, "local append", None);
            stop_appending(segments);
            return None;
        }
        if !segments.appending() {
            match LocalSegment::create(&self.dir, from, now_ms()) {
                Ok(seg) => segments.start_appending(seg),
                Err(e) => {
                    disk.note_error("opening a local segment", &e);
                    return None;
                }
            }
        }
        let active = segments.active_mut()?;
        match active.plan(durable) {
            Ok(entries) => Some((active.file.clone(), entries)),
            Err(e) => {
                let failure = disk.note_error("appending to a local segment", &e);
                warn!(
                    topic = %self.topic, partition = self.key.partition, offset = from,
                    reason = failure.label(), error = %e,
                    "local segment append refused; the tail is served and sealed from write-ahead objects"
                );
                stop_appending(segments);
                None
            }
        }
    }

    /// A flush failed. Its batches are abandoned and offsets continue from the high
    /// watermark, unless the commit may have applied (`uncertain`): then this owner no
    /// longer knows its own high watermark and producer state, so it stops serving like a
    /// fenced one, and the next ownership pass claims the partition again, reading both
    /// from the metadata store (a retried batch is then recognised as a duplicate).
    fn on_flush_failed(&mut self, gen: u64, fenced: bool, uncertain: bool) {
        let abandoned = self.writes.unflushed_len();
        let Some(waiting) = self.writes.failed(gen) else {
            return;
        };
        warn!(topic = %self.topic, partition = self.key.partition, fenced, uncertain, abandoned, "write-ahead flush failed; abandoning unflushed batches");
        self.publish_open_txns();
        let error = if fenced || uncertain {
            self.shared
                .fenced
                .store(true, std::sync::atomic::Ordering::Release);
            AppendError::NotLeader
        } else {
            AppendError::NotDurable
        };
        for (_, reply) in waiting {
            let _ = reply.send(Err(error));
        }
        self.maybe_released();
    }

    fn fail_waiters(&mut self, error: AppendError) {
        for (_, reply) in self.writes.take_waiters() {
            let _ = reply.send(Err(error));
        }
    }

    /// Seals the active local file when it is big or old enough: it then waits for
    /// upload, and commits go to a fresh file (or, on a full disk, to write-ahead
    /// objects only).
    fn maybe_seal(&mut self) {
        let mut view = self.shared.view_mut();
        let now = now_ms();
        let Some(end) = view.segments.seal_due(now) else {
            return;
        };
        let next = if self.ctx.disk.writable() {
            LocalSegment::create(&self.dir, end, now)
                .map_err(|e| self.ctx.disk.note_error("opening a local segment", &e))
                .ok()
        } else {
            None
        };
        view.segments.sealed(next, now);
    }

    /// Starts the next upload when one is due and none is running (see
    /// `super::segments`).
    fn maybe_upload(&mut self) {
        let job = {
            let mut view = self.shared.view_mut();
            let Some(upload) = view.segments.next_upload(crate::clock::instant(), now_ms()) else {
                return;
            };
            let source = match upload.from {
                UploadFrom::Local(seg) => UploadSource::Local {
                    file: seg.file.clone(),
                    size: seg.size,
                },
                UploadFrom::WriteAhead(ranges) => UploadSource::WriteAhead(ranges),
            };
            self.upload_job(upload.base_offset, upload.end_offset, source)
        };
        self.ctx.tasks.spawn(job.run());
    }

    fn upload_job(&self, base_offset: i64, end_offset: i64, source: UploadSource) -> UploadJob {
        UploadJob {
            ctx: self.ctx.clone(),
            key: self.key,
            stream: self.stream.clone(),
            leader_epoch: self.shared.leader_epoch,
            base_offset,
            end_offset,
            source,
            index_interval_bytes: self.config.index_interval_bytes,
            notify: self.upload_tx.clone(),
        }
    }

    fn on_uploaded(&mut self, result: Result<SegmentRecord, UploadError>) {
        let outcome = match &result {
            Ok(record) => UploadOutcome::Committed(record.clone()),
            Err(e) => e.outcome(),
        };
        let after = self
            .shared
            .view_mut()
            .segments
            .uploaded(outcome, crate::clock::instant());
        match (after, result) {
            (AfterUpload::Committed { dropped }, Ok(record)) => {
                if let Some(file) = dropped {
                    file.remove_file();
                }
                info!(topic = %self.topic, partition = self.key.partition, base = record.base_offset, end = record.end_offset, bytes = record.size_bytes, "segment uploaded");
            }
            (AfterUpload::Fenced, _) => {
                self.shared
                    .fenced
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            (AfterUpload::LocalDropped(dropped), result) => {
                crate::metrics::metrics()
                    .segment_check_failures
                    .with_label_values(&[LOCAL])
                    .inc();
                if let Err(e) = result {
                    warn!(topic = %self.topic, partition = self.key.partition, error = %e, "dropping the local file; its stretch is sealed from the write-ahead objects");
                }
                if let Some(file) = dropped {
                    file.remove_file();
                }
            }
            (AfterUpload::RetryIn(wait), Err(e)) => self.upload_failed(&e, wait),
            (AfterUpload::Committed { .. } | AfterUpload::RetryIn(_), _) => {}
        }
        self.maybe_seal();
        self.maybe_upload();
    }

    /// Reports an upload that is tried again after `wait`.
    fn upload_failed(&self, e: &UploadError, wait: Duration) {
        let retry_in_ms = wait.as_millis() as u64;
        if let UploadError::Check { source_name, .. } = e {
            // Committed data that does not read back whole: never sealed, so its
            // write-ahead objects are kept. Loud, and retried slowly.
            crate::metrics::metrics()
                .segment_check_failures
                .with_label_values(&[source_name])
                .inc();
            tracing::error!(topic = %self.topic, partition = self.key.partition, error = %e, retry_in_ms, "a stretch of committed write-ahead data failed its check; it stays unsealed");
        } else if e.is_retriable() {
            warn!(topic = %self.topic, partition = self.key.partition, error = %e, retry_in_ms, "segment upload failed; will retry");
        } else {
            tracing::error!(topic = %self.topic, partition = self.key.partition, error = %e, retry_in_ms, "segment upload failed in a way a retry will not fix; trying again slowly");
        }
    }

    async fn apply_retention(&mut self) {
        let trim = self.shared.view().segments.retention(now_ms());
        let Some(trim) = trim else {
            return;
        };
        if let Err(e) = self.trim(&trim).await {
            warn!(topic = %self.topic, partition = self.key.partition, error = %e, "retention failed; will retry");
        }
    }

    /// Raises the log start offset in the metadata store, then forgets and deletes the
    /// dropped segments.
    async fn trim(&mut self, trim: &Trim) -> Result<(), MetaError> {
        let bases: Vec<i64> = trim.drop.iter().map(|s| s.base_offset).collect();
        self.ctx
            .meta
            .trim_log(
                self.key,
                self.shared.leader_epoch,
                trim.log_start_offset,
                &bases,
            )
            .await?;
        {
            let mut view = self.shared.view_mut();
            view.segments.trimmed(trim);
            let start = view.segments.log_start_offset();
            if view.aborted.iter().any(|a| a.last_offset < start) {
                Arc::make_mut(&mut view.aborted).retain(|a| a.last_offset >= start);
            }
        }
        for seg in &trim.drop {
            let key = object_store::path::Path::from(seg.object_key.as_str());
            self.ctx
                .blocks
                .forget_object(&seg.object_key, seg.size_bytes);
            if let Err(e) = self.ctx.store.delete(&key).await {
                warn!(object = %seg.object_key, error = %e, "could not delete a dropped segment; the orphan collector will");
            }
        }
        info!(topic = %self.topic, partition = self.key.partition, log_start_offset = trim.log_start_offset, dropped = trim.drop.len(), "log trimmed");
        Ok(())
    }

    /// Starts a compaction pass when one is due (checked every `log.cleaner.backoff.ms`),
    /// at most one per partition.
    fn maybe_compact(&mut self) {
        let now = crate::clock::instant();
        if !self.config.cleanup.compact
            || self.compaction.running
            || !self.shared.is_serving()
            || self
                .compaction
                .checked
                .is_some_and(|at| now.duration_since(at) < self.ctx.cleaner.backoff)
        {
            return;
        }
        self.compaction.checked = Some(now);
        let now_ms = now_ms();
        let (plan, aborted) = {
            let view = self.shared.view();
            let plan = crate::log::compact::plan::plan(
                view.segments.remote(),
                &self.config,
                now_ms,
                self.compaction.horizon,
                view.last_stable_offset,
            );
            (plan, view.aborted.clone())
        };
        let Some(plan) = plan else {
            return;
        };
        self.compaction.running = true;
        let job = crate::log::compact::job::Job {
            store: self.ctx.store.clone(),
            throttle: self.ctx.cleaner.throttle.clone(),
            stream: self.stream.clone(),
            leader_epoch: self.shared.leader_epoch,
            plan,
            now_ms,
            delete_retention_ms: self.config.delete_retention_ms,
            segment_bytes: self.config.segment_bytes,
            index_interval_bytes: self.config.index_interval_bytes,
            batch_limit: self.ctx.cleaner.batch_limit,
            map_bytes: self.ctx.cleaner.map_bytes,
            aborted,
        };
        let permits = self.ctx.compaction_permits.clone();
        let notify = self.compact_tx.clone();
        self.ctx.tasks.spawn(async move {
            let done = match permits.acquire_owned().await {
                Ok(_permit) => job.run().await,
                Err(e) => Err(crate::log::compact::job::CompactError::Task(e.to_string())),
            };
            let _ = notify.send(done);
        });
    }

    /// Commits a finished pass: only if the manifest still starts with what the pass
    /// read (this owner is its one writer, so this is the check that nothing changed
    /// it), in one fenced transaction. Replaced objects are deleted after
    /// `file.delete.delay.ms`, so readers of the old manifest finish first; objects the
    /// pass wrote and could not commit are deleted at once.
    async fn on_compacted(&mut self, done: CompactionDone) {
        self.compaction.running = false;
        let m = crate::metrics::metrics();
        let c = match done {
            Ok(c) => c,
            Err(e) => {
                m.compaction_passes.with_label_values(&[e.reason()]).inc();
                warn!(topic = %self.topic, partition = self.key.partition, error = %e, "compaction pass failed");
                return;
            }
        };
        let written: Vec<&SegmentRecord> = c
            .segments
            .iter()
            .filter(|s| !c.replaced.iter().any(|r| r.object_key == s.object_key))
            .collect();
        let current =
            self.shared.is_serving() && self.shared.view().segments.starts_with(&c.replaced);
        let swap = swap::swap(
            self.ctx.meta.as_ref(),
            self.key,
            self.shared.leader_epoch,
            &c,
            current,
        )
        .await;
        m.compaction_passes
            .with_label_values(&[swap.outcome()])
            .inc();
        if let Swap::Failed(e) | Swap::Unknown(e) = &swap {
            warn!(topic = %self.topic, partition = self.key.partition, error = %e, "compaction swap not committed; the orphan collector deletes what the pass wrote");
        }
        if matches!(swap, Swap::Fenced | Swap::Unknown(_)) {
            // A newer epoch holds it, or this owner's view may be wrong: claim again.
            self.shared
                .fenced
                .store(true, std::sync::atomic::Ordering::Release);
        }
        if swap != Swap::Committed {
            if swap.discard_written() {
                for s in written {
                    let key = object_store::path::Path::from(s.object_key.as_str());
                    if let Err(e) = self.ctx.store.delete(&key).await {
                        warn!(object = %s.object_key, error = %e, "could not delete an uncommitted compacted segment; the orphan collector will");
                    }
                }
            }
            return;
        }
        let rewritten = written.len() as u64;
        self.compaction.horizon = c.counts.next_horizon;
        self.shared
            .view_mut()
            .segments
            .compacted(c.replaced.len(), c.segments.clone());
        m.compaction_bytes
            .with_label_values(&["read"])
            .inc_by(c.read_bytes);
        m.compaction_bytes
            .with_label_values(&["written"])
            .inc_by(c.written_bytes);
        m.compaction_records
            .with_label_values(&["kept"])
            .inc_by(c.counts.kept);
        m.compaction_records
            .with_label_values(&["removed"])
            .inc_by(c.counts.read - c.counts.kept);
        m.compaction_objects
            .with_label_values(&["segments"])
            .inc_by(rewritten);
        let gone: Vec<SegmentRecord> = c
            .replaced
            .into_iter()
            .filter(|r| !c.segments.iter().any(|s| s.object_key == r.object_key))
            .collect();
        info!(
            topic = %self.topic, partition = self.key.partition,
            replaced = gone.len(), written = rewritten,
            records_read = c.counts.read, records_kept = c.counts.kept,
            "compaction pass committed"
        );
        let (store, blocks, delay) = (
            self.ctx.store.clone(),
            self.ctx.blocks.clone(),
            self.ctx.cleaner.delete_delay,
        );
        // Shutdown does not wait for the delay: what is left, the orphan collector takes.
        let cancelled = self.ctx.tasks.cancelled();
        self.ctx.tasks.spawn(async move {
            tokio::select! {
                _ = crate::clock::sleep(delay) => {}
                _ = cancelled => return,
            }
            for seg in gone {
                blocks.forget_object(&seg.object_key, seg.size_bytes);
                let key = object_store::path::Path::from(seg.object_key.as_str());
                if let Err(e) = store.delete(&key).await {
                    warn!(object = %seg.object_key, error = %e, "could not delete a replaced segment; the orphan collector will");
                }
            }
        });
    }

    async fn delete_records(&mut self, offset: i64) -> Result<i64, DeleteRecordsError> {
        if !self.shared.is_serving() {
            return Err(DeleteRecordsError::NotLeader);
        }
        let decided = self.shared.view().segments.delete_records(offset);
        let trim = match decided {
            Err(_) => return Err(DeleteRecordsError::OffsetOutOfRange),
            Ok(DeleteTo::Already(start)) => return Ok(start),
            Ok(DeleteTo::Trim(trim)) => trim,
        };
        match self.trim(&trim).await {
            Ok(()) => Ok(trim.log_start_offset),
            Err(MetaError::Fenced(_)) => Err(DeleteRecordsError::NotLeader),
            Err(_) => Err(DeleteRecordsError::Unavailable),
        }
    }
}

/// Closes the active local file (an empty one is deleted): later commits go to
/// write-ahead objects only until the disk takes writes again.
fn stop_appending(segments: &mut Segments<LocalSegment>) {
    if let Some(empty) = segments.stop_appending(now_ms()) {
        empty.remove_file();
    }
}

/// Where a segment's bytes come from (the label of `strata_segment_check_failures_total`).
const LOCAL: &str = "local";
const WRITE_AHEAD: &str = "write_ahead";

enum UploadSource {
    /// A closed local segment file of `size` bytes.
    Local { file: Arc<std::fs::File>, size: u64 },
    /// The committed write-ahead ranges of a stretch no local file holds.
    WriteAhead(Vec<WalRangeRecord>),
}

impl UploadSource {
    fn name(&self) -> &'static str {
        match self {
            UploadSource::Local { .. } => LOCAL,
            UploadSource::WriteAhead(_) => WRITE_AHEAD,
        }
    }
}

/// Checks, uploads and commits one segment: `[base_offset, end_offset)`.
struct UploadJob {
    ctx: Arc<LogContext>,
    key: PartitionKey,
    stream: Arc<str>,
    leader_epoch: i32,
    base_offset: i64,
    end_offset: i64,
    source: UploadSource,
    index_interval_bytes: u64,
    notify: mpsc::UnboundedSender<UploadDone>,
}

impl UploadJob {
    async fn run(self) {
        // At shutdown an upload is dropped: nothing is committed, so nothing depends on
        // it, and the next owner seals the stretch again.
        let cancelled = self.ctx.tasks.cancelled();
        tokio::select! {
            _ = cancelled => {}
            result = self.upload() => {
                let _ = self.notify.send(result);
            }
        }
    }

    /// The segment's bytes, in parts of whole batches.
    async fn read(&self) -> Result<Vec<Bytes>, UploadError> {
        match &self.source {
            UploadSource::Local { file, size } => {
                let (file, size) = (file.clone(), *size);
                let data =
                    tokio::task::spawn_blocking(move || super::local::read_at(&file, 0, size))
                        .await
                        .map_err(|e| UploadError::Task(e.to_string()))?
                        // A local file that cannot be read whole is as good as one with a
                        // hole: the stretch is sealed from the write-ahead objects instead.
                        .map_err(|e| UploadError::Check {
                            base: self.base_offset,
                            end: self.end_offset,
                            source_name: LOCAL,
                            error: CheckError::Read(e.to_string()),
                        })?;
                Ok(vec![data])
            }
            UploadSource::WriteAhead(ranges) => {
                use futures::{StreamExt, TryStreamExt};
                futures::stream::iter(ranges.clone())
                    .map(|range| {
                        let blocks = self.ctx.blocks.clone();
                        async move { super::read::wal_range_bytes(&blocks, &range).await }
                    })
                    .buffered(RANGE_READS_IN_FLIGHT)
                    .try_collect()
                    .await
                    .map_err(UploadError::Read)
            }
        }
    }

    /// Uploads and commits the segment. A failed attempt first asks whether the
    /// segment is already committed: a commit whose answer was lost (the metadata
    /// store timed out after applying it) leaves the owner's view with write-ahead
    /// ranges the manifest no longer holds, whose objects garbage collection may
    /// already have deleted, so a retry could neither read them nor commit again.
    async fn upload(&self) -> Result<SegmentRecord, UploadError> {
        match self.upload_once().await {
            Err(e) if !matches!(e, UploadError::Fenced) => match self.stored().await {
                Some(record) => {
                    info!(
                        base = self.base_offset,
                        end = self.end_offset,
                        "segment commit had applied; its answer was lost"
                    );
                    Ok(record)
                }
                None => Err(e),
            },
            result => result,
        }
    }

    /// This upload's segment as the metadata store holds it, if committed (by this
    /// owner: the object key names its leader epoch).
    async fn stored(&self) -> Option<SegmentRecord> {
        let key =
            tiering::keys::segment_object_key(&self.stream, self.base_offset, self.leader_epoch);
        let state = self.ctx.meta.read_partition(self.key).await.ok()?;
        state.segments.into_iter().find(|s| {
            s.base_offset == self.base_offset
                && s.end_offset == self.end_offset
                && s.object_key == key.as_ref()
        })
    }

    async fn upload_once(&self) -> Result<SegmentRecord, UploadError> {
        let _permit = self
            .ctx
            .upload_permits
            .acquire()
            .await
            .map_err(|e| UploadError::Task(e.to_string()))?;
        let parts = self.read().await?;
        // Nothing is uploaded, so nothing is committed and no write-ahead object is
        // collected, unless it holds every offset of its range intact. Checking reads
        // every byte (CRCs) and building the index walks every batch: both on the
        // blocking pool, never on the runtime's workers.
        let (base, end, index_interval) =
            (self.base_offset, self.end_offset, self.index_interval_bytes);
        let built = tokio::task::spawn_blocking(move || {
            tail::check_segment(&parts, base, end).map(|contents| {
                let (payload, index) = tiering::segment::build_segment_object(
                    parts,
                    &contents.entries,
                    index_interval,
                );
                (payload, index, contents.max_timestamp)
            })
        })
        .await
        .map_err(|e| UploadError::Task(format!("checking segment: {e}")))?;
        let (payload, index, max_timestamp) = built.map_err(|error| UploadError::Check {
            base,
            end,
            source_name: self.source.name(),
            error,
        })?;
        let object_size = payload.content_length() as u64;
        let parts: Vec<Bytes> = payload.iter().cloned().collect();
        let key =
            tiering::keys::segment_object_key(&self.stream, self.base_offset, self.leader_epoch);
        // An upload repeated after a failed commit finds its own object: `put_new`
        // recognises identical bytes; different bytes are an error.
        self.ctx
            .store
            .put_new(&key, payload, None)
            .await
            .map_err(UploadError::Store)?;
        // Just sealed, so still hot: readers slightly behind the tail hit the cache.
        self.ctx.blocks.insert_object(key.as_ref(), &parts);
        let record = SegmentRecord {
            base_offset: self.base_offset,
            end_offset: self.end_offset,
            object_key: key.to_string(),
            size_bytes: object_size,
            data_bytes: index.data_len(),
            max_timestamp,
            created_ms: now_ms(),
            compacted_ms: 0,
        };
        match self
            .ctx
            .meta
            .commit_segment(self.key, self.leader_epoch, &record)
            .await
        {
            Ok(()) => Ok(record),
            Err(MetaError::Fenced(_)) => Err(UploadError::Fenced),
            Err(e) => Err(UploadError::Meta(e)),
        }
    }
}
