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

use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::{debug, info, warn};

use super::appender::Appender;
use super::batch::ValidBatch;
use super::local::LocalSegment;
use super::producer::{ProducerTable, SeqError};
use super::tail::{self, CheckError, LocalSpan, NextUpload, TailState};
use crate::clock::now_ms;
use crate::config::TopicConfig;
use crate::disk::{CacheDisk, WriteFailure};
use crate::metadata::{MetaError, MetadataStore, PartitionKey, SegmentRecord, WalRangeRecord};
use crate::wal::{FlushItem, FlushNotice};

/// Broker-wide parts every partition task uses.
#[derive(Debug)]
pub struct LogContext {
    pub store: Arc<tiering::Store>,
    pub blocks: Arc<tiering::BlockCache>,
    pub meta: Arc<dyn MetadataStore>,
    pub flusher: mpsc::Sender<FlushItem>,
    pub cache_dir: PathBuf,
    /// Whether the cache disk takes writes now.
    pub disk: Arc<CacheDisk>,
    pub upload_permits: Arc<Semaphore>,
    pub retention_check_interval: Duration,
    pub queue_length: usize,
    pub broker_id: i32,
    /// Where owner tasks and uploads are registered.
    pub tasks: Arc<crate::tasks::Tasks>,
}

/// What readers see of a partition; written only by the owner task.
#[derive(Debug)]
pub struct PartitionView {
    pub log_start_offset: i64,
    /// Sealed segments in object storage, ascending.
    pub remote: Vec<SegmentRecord>,
    /// Local segment files, ascending, each holding whole batches with no offset
    /// missing; there may be holes between them (and before the first) that only the
    /// write-ahead ranges hold. The last may be the active one; the others await upload.
    pub local: Vec<LocalSegment>,
    /// The committed write-ahead ranges after the last sealed segment object, ascending
    /// and contiguous: they hold every offset from the end of `remote` to the high
    /// watermark, whatever the local files hold.
    pub wal: Vec<WalRangeRecord>,
    /// (leader epoch, start offset), ascending.
    pub epoch_history: Vec<(i32, i64)>,
}

#[derive(Debug)]
pub struct PartitionShared {
    pub key: PartitionKey,
    pub stream: Arc<str>,
    pub leader_epoch: i32,
    /// Exclusive end of the durable log: the high watermark.
    pub hw: watch::Sender<i64>,
    pub view: RwLock<PartitionView>,
    /// Set once a newer owner fenced this one.
    pub fenced: std::sync::atomic::AtomicBool,
    /// Set when the partition is being handed off: no new writes are taken.
    pub releasing: std::sync::atomic::AtomicBool,
}

impl PartitionShared {
    pub fn high_watermark(&self) -> i64 {
        *self.hw.borrow()
    }

    /// The view, for reading (a short lock: never held across an await).
    pub fn view(&self) -> std::sync::RwLockReadGuard<'_, PartitionView> {
        self.view.read().expect("partition view lock poisoned")
    }

    /// The view, for the owner task to change.
    fn view_mut(&self) -> std::sync::RwLockWriteGuard<'_, PartitionView> {
        self.view.write().expect("partition view lock poisoned")
    }

    pub fn log_start_offset(&self) -> i64 {
        self.view.read().map(|v| v.log_start_offset).unwrap_or(0)
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether this broker still leads the partition: not fenced, not handing it off.
    pub fn is_serving(&self) -> bool {
        !self.is_fenced() && !self.releasing.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOk {
    pub base_offset: i64,
    pub log_start_offset: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
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
}

pub type AppendReply = oneshot::Sender<Result<AppendOk, AppendError>>;

/// Requests to the owner task.
#[derive(Debug)]
pub enum PartitionCmd {
    Append {
        batches: Vec<ValidBatch>,
        acks: i16,
        reply: AppendReply,
    },
    /// DeleteRecords: raise the log start offset (`-1` = the high watermark).
    DeleteRecords {
        offset: i64,
        reply: oneshot::Sender<Result<i64, DeleteRecordsError>>,
    },
    Configure(TopicConfig),
    /// Hand-off: stop taking writes and answer once every batch already taken is
    /// committed (or failed), so nothing in flight is lost or failed by the hand-off.
    Release(oneshot::Sender<()>),
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeleteRecordsError {
    #[error("offset is beyond the high watermark")]
    OffsetOutOfRange,
    #[error("metadata store unavailable")]
    Unavailable,
    #[error("this broker no longer owns the partition")]
    NotLeader,
}

/// The outcome of a segment upload, reported to the owner task (unbounded: at most one
/// upload of a partition is in flight).
type UploadDone = Result<SegmentRecord, UploadError>;

/// Why a segment upload did not commit.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
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
    /// Whether trying again may succeed. A segment that failed its check, or an upload
    /// fenced by a newer owner, will fail the same way again; so will a store's final
    /// answer (an object already there with other bytes).
    pub fn is_retriable(&self) -> bool {
        match self {
            UploadError::Check { .. } | UploadError::Fenced => false,
            UploadError::Store(e) => e.is_retriable(),
            UploadError::Meta(e) => e.is_retriable(),
            UploadError::Read(_) | UploadError::Task(_) => true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PartitionHandle {
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
pub async fn start(
    ctx: Arc<LogContext>,
    topic: Arc<str>,
    key: PartitionKey,
    config: TopicConfig,
) -> anyhow::Result<(PartitionHandle, tokio::task::JoinHandle<()>)> {
    let state = ctx.meta.claim_partition(key, ctx.broker_id).await?;
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
    // Segment objects follow each other; the write-ahead ranges start where they end.
    let sealed_end = state
        .segments
        .last()
        .map(|s| s.end_offset)
        .or_else(|| state.wal_ranges.first().map(|r| r.base_offset))
        .unwrap_or(state.high_watermark);
    let (hw, _) = watch::channel(state.high_watermark);
    let appending = local.is_some();
    let shared = Arc::new(PartitionShared {
        key,
        stream: stream.clone(),
        leader_epoch: state.leader_epoch,
        hw,
        view: RwLock::new(PartitionView {
            log_start_offset: state.log_start_offset,
            remote: state.segments,
            local: local.into_iter().collect(),
            wal: state.wal_ranges,
            epoch_history: state.epoch_history,
        }),
        fenced: std::sync::atomic::AtomicBool::new(false),
        releasing: std::sync::atomic::AtomicBool::new(false),
    });
    let (cmd_tx, cmd_rx) = mpsc::channel(ctx.queue_length);
    let (flush_tx, flush_rx) = mpsc::unbounded_channel();
    let (upload_tx, upload_rx) = mpsc::unbounded_channel();
    let producers = ProducerTable::from_records(state.producers);
    let writes = Appender::new(state.leader_epoch, state.high_watermark, producers);
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
        sealed_end,
        appending,
        wal_only_since_ms: now_ms(),
        upload: UploadState::default(),
        flush_tx,
        upload_tx,
        released: None,
    };
    let task = tasks.spawn(owner.run(cmd_rx, flush_rx, upload_rx));
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

/// Longest wait before an upload that failed is tried again.
const UPLOAD_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The segment upload of a partition: one at a time, in offset order.
#[derive(Debug, Default)]
struct UploadState {
    running: bool,
    /// Failures in a row; the wait before the next try doubles with each.
    failures: u32,
    retry_at: Option<Instant>,
}

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
    /// End of the log sealed in segment objects: the next upload starts here.
    sealed_end: i64,
    /// Whether the last local segment is the active one, taking each commit's batches.
    appending: bool,
    /// Since when commits have gone to write-ahead objects only (no local file took
    /// them), for sealing that stretch by age.
    wal_only_since_ms: i64,
    upload: UploadState,
    /// Handed to the flusher with every batch.
    flush_tx: mpsc::UnboundedSender<FlushNotice>,
    /// Handed to every upload job.
    upload_tx: mpsc::UnboundedSender<UploadDone>,
    /// A hand-off waiting for the in-flight batches to finish.
    released: Option<oneshot::Sender<()>>,
}

impl Owner {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<PartitionCmd>,
        mut flushes: mpsc::UnboundedReceiver<FlushNotice>,
        mut uploads: mpsc::UnboundedReceiver<UploadDone>,
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
                Some(notice) = flushes.recv() => self.on_flush_notice(notice),
                Some(done) = uploads.recv() => self.on_uploaded(done),
                cmd = cmds.recv() => match cmd {
                    Some(PartitionCmd::Stop) | None => break,
                    Some(cmd) => self.on_cmd(cmd).await,
                },
                _ = tick.tick() => {
                    self.maybe_seal(false);
                    self.maybe_upload();
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
                reply,
            } => self.append(batches, acks, reply).await,
            PartitionCmd::DeleteRecords { offset, reply } => {
                let result = self.delete_records(offset).await;
                let _ = reply.send(result);
            }
            PartitionCmd::Configure(config) => {
                self.config = config;
                self.maybe_seal(false);
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

    async fn append(&mut self, batches: Vec<ValidBatch>, acks: i16, reply: AppendReply) {
        if !self.shared.is_serving() {
            let _ = reply.send(Err(AppendError::NotLeader));
            return;
        }
        if acks == 1 && !self.ctx.disk.writable() {
            let _ = reply.send(Err(AppendError::DiskFull));
            return;
        }
        let appended = match self.writes.append(&batches, now_ms()) {
            Ok(a) => a,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        for b in appended.batches {
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
                notify: self.flush_tx.clone(),
            };
            if self.ctx.flusher.send(item).await.is_err() {
                let _ = reply.send(Err(AppendError::NotDurable));
                return;
            }
        }
        let ok = AppendOk {
            base_offset: appended.base_offset,
            log_start_offset: self.shared.log_start_offset(),
        };
        if acks != -1 {
            let _ = reply.send(Ok(ok));
        } else if let Some((ok, reply)) = self.writes.wait(appended.end_offset, (ok, reply)) {
            let _ = reply.send(Ok(ok));
        }
    }

    fn on_flush_notice(&mut self, notice: FlushNotice) {
        match notice {
            FlushNotice::Flushed { gen, range } => self.on_flushed(gen, range),
            FlushNotice::Failed {
                gen,
                fenced,
                uncertain,
            } => self.on_flush_failed(gen, fenced, uncertain),
        }
    }

    fn on_flushed(&mut self, gen: u64, range: WalRangeRecord) {
        let end_offset = range.end_offset;
        // `None`: a generation abandoned after a failed flush.
        let Some(durable) = self.writes.flushed(gen, end_offset) else {
            return;
        };
        {
            let shared = self.shared.clone();
            let mut view = shared.view_mut();
            // The range is recorded before the high watermark moves, so every offset
            // below it is readable from the write-ahead objects whatever the disk does.
            view.wal.push(range);
            self.store_local(&mut view, &durable.batches, durable.from);
        }
        self.shared.hw.send_replace(end_offset);
        for (ok, reply) in durable.answered {
            let _ = reply.send(Ok(ok));
        }
        self.maybe_seal(false);
        self.maybe_upload();
        self.maybe_released();
    }

    /// Appends a commit's batches (offsets from `from`) to the active local file,
    /// opening one if none is active. A local write that fails, or that a full disk
    /// rules out, stops the file where it was (whole batches, no offset missing); the
    /// batches stay readable from their write-ahead range, and sealing rebuilds the
    /// stretch from there.
    fn store_local(&mut self, view: &mut PartitionView, durable: &[Bytes], from: i64) {
        let disk = self.ctx.disk.clone();
        if !disk.writable() {
            disk.note_failure(WriteFailure::Skipped, "local append", None);
            self.stop_appending(view);
            return;
        }
        if !self.appending {
            match LocalSegment::create(&self.dir, from, now_ms()) {
                Ok(seg) => {
                    view.local.push(seg);
                    self.appending = true;
                }
                Err(e) => {
                    disk.note_error("opening a local segment", &e);
                    return;
                }
            }
        }
        let Some(active) = view.local.last_mut() else {
            self.appending = false;
            return;
        };
        if let Err(e) = active.append(durable) {
            let failure = disk.note_error("appending to a local segment", &e);
            warn!(
                topic = %self.topic, partition = self.key.partition, offset = from,
                reason = failure.label(), error = %e,
                "local segment append failed; the tail is served and sealed from write-ahead objects"
            );
            self.stop_appending(view);
        }
    }

    /// Closes the active local file: later commits go to write-ahead objects only
    /// until the disk takes writes again. An empty file is dropped.
    fn stop_appending(&mut self, view: &mut PartitionView) {
        if !self.appending {
            return;
        }
        self.appending = false;
        self.wal_only_since_ms = now_ms();
        if view.local.last().is_some_and(|s| s.size == 0) {
            if let Some(seg) = view.local.pop() {
                seg.remove_file();
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
    fn maybe_seal(&mut self, force: bool) {
        if !self.appending {
            return;
        }
        let mut view = self.shared.view_mut();
        let Some(active) = view.local.last() else {
            self.appending = false;
            return;
        };
        let age = now_ms() - active.created_ms;
        let due = active.size > 0
            && (force || active.size >= self.config.segment_bytes || age >= self.config.segment_ms);
        if !due {
            return;
        }
        let end = active.end_offset;
        let next = if self.ctx.disk.writable() {
            LocalSegment::create(&self.dir, end, now_ms())
                .map_err(|e| self.ctx.disk.note_error("opening a local segment", &e))
                .ok()
        } else {
            None
        };
        match next {
            Some(seg) => view.local.push(seg),
            None => {
                self.appending = false;
                self.wal_only_since_ms = now_ms();
            }
        }
    }

    /// Starts the next upload when one is due and none is running (see `super::tail`).
    fn maybe_upload(&mut self) {
        if self.upload.running
            || self
                .upload
                .retry_at
                .is_some_and(|t| crate::clock::instant() < t)
        {
            return;
        }
        let job = {
            let view = self.shared.view();
            // The common case, checked first on every commit: one active file that
            // starts where the sealed log ends, so nothing is due.
            let only_active = self.appending
                && view.local.len() == 1
                && view.local[0].base_offset == self.sealed_end;
            if only_active {
                return;
            }
            let last = view.local.len().saturating_sub(1);
            let spans: Vec<LocalSpan> = view
                .local
                .iter()
                .enumerate()
                .map(|(i, s)| LocalSpan {
                    base: s.base_offset,
                    end: s.end_offset,
                    active: self.appending && i == last,
                })
                .collect();
            let high_watermark = self.shared.high_watermark();
            let open_stretch_due = !self.appending && {
                let open_bytes: u64 = view
                    .wal
                    .iter()
                    .filter(|r| r.base_offset >= self.sealed_end)
                    .map(|r| r.len)
                    .sum();
                open_bytes >= self.config.segment_bytes
                    || now_ms() - self.wal_only_since_ms >= self.config.segment_ms
            };
            let next = tail::next_upload(&TailState {
                sealed_end: self.sealed_end,
                high_watermark,
                local: &spans,
                open_stretch_due,
            });
            match next {
                None => return,
                Some(NextUpload::Local { base }) => {
                    let Some(seg) = view.local.iter().find(|s| s.base_offset == base) else {
                        return;
                    };
                    self.upload_job(
                        base,
                        seg.end_offset,
                        UploadSource::Local {
                            file: seg.file.clone(),
                            size: seg.size,
                        },
                    )
                }
                Some(NextUpload::WriteAhead { base, end }) => {
                    if end == high_watermark && !self.appending {
                        // The open stretch is sealed up to here; what follows ages anew.
                        self.wal_only_since_ms = now_ms();
                    }
                    let ranges = view
                        .wal
                        .iter()
                        .filter(|r| r.base_offset >= base && r.end_offset <= end)
                        .cloned()
                        .collect();
                    self.upload_job(base, end, UploadSource::WriteAhead(ranges))
                }
            }
        };
        self.upload.running = true;
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
        self.upload.running = false;
        match result {
            Ok(record) => {
                self.upload = UploadState::default();
                self.sealed_end = self.sealed_end.max(record.end_offset);
                let mut view = self.shared.view_mut();
                self.drop_local(&mut view, record.base_offset);
                view.wal.retain(|r| r.end_offset > record.end_offset);
                info!(topic = %self.topic, partition = self.key.partition, base = record.base_offset, end = record.end_offset, bytes = record.size_bytes, "segment uploaded");
                view.remote.push(record);
            }
            Err(UploadError::Fenced) => {
                self.shared
                    .fenced
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            Err(e @ UploadError::Check { source_name, .. }) if source_name == LOCAL => {
                crate::metrics::metrics()
                    .segment_check_failures
                    .with_label_values(&[LOCAL])
                    .inc();
                warn!(topic = %self.topic, partition = self.key.partition, error = %e, "dropping the local file; its stretch is sealed from the write-ahead objects");
                let UploadError::Check { base, .. } = e else {
                    return;
                };
                let mut view = self.shared.view_mut();
                self.drop_local(&mut view, base);
            }
            Err(e) => {
                self.upload.failures += 1;
                // Transient failures back off from half a second; a final one (it would
                // fail the same way again) waits the longest at once.
                let wait = if e.is_retriable() {
                    Duration::from_millis(500)
                        .saturating_mul(1 << (self.upload.failures - 1).min(10))
                        .min(UPLOAD_BACKOFF_MAX)
                } else {
                    UPLOAD_BACKOFF_MAX
                };
                self.upload.retry_at = Some(crate::clock::instant() + wait);
                if let UploadError::Check { source_name, .. } = &e {
                    // Committed data that does not read back whole: never sealed, so
                    // its write-ahead objects are kept. Loud, and retried slowly.
                    crate::metrics::metrics()
                        .segment_check_failures
                        .with_label_values(&[source_name])
                        .inc();
                    tracing::error!(topic = %self.topic, partition = self.key.partition, error = %e, retry_in_ms = wait.as_millis() as u64, "a stretch of committed write-ahead data failed its check; it stays unsealed");
                } else if e.is_retriable() {
                    warn!(topic = %self.topic, partition = self.key.partition, error = %e, retry_in_ms = wait.as_millis() as u64, "segment upload failed; will retry");
                } else {
                    tracing::error!(topic = %self.topic, partition = self.key.partition, error = %e, retry_in_ms = wait.as_millis() as u64, "segment upload failed in a way a retry will not fix; trying again slowly");
                }
            }
        }
        self.maybe_seal(false);
        self.maybe_upload();
    }

    /// Forgets and deletes the closed local file starting at `base` (never the active one).
    fn drop_local(&self, view: &mut PartitionView, base: i64) {
        let last = view.local.len().saturating_sub(1);
        if let Some(i) = view
            .local
            .iter()
            .position(|s| s.base_offset == base)
            .filter(|&i| !(self.appending && i == last))
        {
            view.local.remove(i).remove_file();
        }
    }

    async fn apply_retention(&mut self) {
        let now = now_ms();
        let (drop, new_start) = {
            let view = self.shared.view();
            let mut total: i64 = view.remote.iter().map(|s| s.size_bytes as i64).sum();
            let mut drop = Vec::new();
            for seg in &view.remote {
                let too_old = self.config.retention_ms >= 0
                    && seg.max_timestamp < now - self.config.retention_ms;
                let too_big =
                    self.config.retention_bytes >= 0 && total > self.config.retention_bytes;
                let below_start = seg.end_offset <= view.log_start_offset;
                if !(too_old || too_big || below_start) {
                    break;
                }
                total -= seg.size_bytes as i64;
                drop.push(seg.clone());
            }
            let new_start = drop.last().map_or(view.log_start_offset, |s| {
                s.end_offset.max(view.log_start_offset)
            });
            (drop, new_start)
        };
        if drop.is_empty() {
            return;
        }
        if let Err(e) = self.trim(new_start, &drop).await {
            warn!(topic = %self.topic, partition = self.key.partition, error = %e, "retention failed; will retry");
        }
    }

    /// Raises the log start offset in the metadata store, then forgets and deletes the
    /// dropped segments.
    async fn trim(&mut self, new_start: i64, drop: &[SegmentRecord]) -> Result<(), MetaError> {
        let bases: Vec<i64> = drop.iter().map(|s| s.base_offset).collect();
        self.ctx
            .meta
            .trim_log(self.key, self.shared.leader_epoch, new_start, &bases)
            .await?;
        {
            let mut view = self.shared.view_mut();
            view.log_start_offset = view.log_start_offset.max(new_start);
            view.remote.retain(|s| !bases.contains(&s.base_offset));
        }
        for seg in drop {
            let key = object_store::path::Path::from(seg.object_key.as_str());
            self.ctx
                .blocks
                .forget_object(&seg.object_key, seg.size_bytes);
            if let Err(e) = self.ctx.store.delete(&key).await {
                warn!(object = %seg.object_key, error = %e, "could not delete a dropped segment; the orphan collector will");
            }
        }
        info!(topic = %self.topic, partition = self.key.partition, log_start_offset = new_start, dropped = drop.len(), "log trimmed");
        Ok(())
    }

    async fn delete_records(&mut self, offset: i64) -> Result<i64, DeleteRecordsError> {
        if !self.shared.is_serving() {
            return Err(DeleteRecordsError::NotLeader);
        }
        let hw = self.shared.high_watermark();
        let offset = if offset == -1 { hw } else { offset };
        if offset < 0 || offset > hw {
            return Err(DeleteRecordsError::OffsetOutOfRange);
        }
        let current = self.shared.log_start_offset();
        if offset <= current {
            return Ok(current);
        }
        let drop: Vec<SegmentRecord> = {
            let view = self.shared.view();
            view.remote
                .iter()
                .filter(|s| s.end_offset <= offset)
                .cloned()
                .collect()
        };
        match self.trim(offset, &drop).await {
            Ok(()) => Ok(offset),
            Err(MetaError::Fenced(_)) => Err(DeleteRecordsError::NotLeader),
            Err(_) => Err(DeleteRecordsError::Unavailable),
        }
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

    async fn upload(&self) -> Result<SegmentRecord, UploadError> {
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
