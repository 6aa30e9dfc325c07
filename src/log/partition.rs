//! The owner task of one partition: the single writer of its log.
//!
//! It checks idempotent-producer sequences, assigns offsets (stamping them into the batch
//! bytes), hands batches to the broker's write-ahead flusher, and on each commit raises
//! the high watermark, appends the now-durable batches to the local segment and answers
//! the waiting `acks=all` producers. It seals local segments by size or age and uploads
//! them, applies retention, and serves DeleteRecords. Readers never talk to the task:
//! they read the shared [`PartitionView`] under a short lock and wait on the high
//! watermark through a watch channel.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::{debug, info, warn};

use super::batch::{self, ValidBatch};
use super::local::LocalSegment;
use super::producer::{ProducerTable, SeqCheck, SeqError};
use crate::clock::now_ms;
use crate::config::TopicConfig;
use crate::metadata::{
    MetaError, MetadataStore, PartitionKey, PartitionState, ProducerStateRecord, SegmentRecord,
};
use crate::wal::FlushItem;

/// Broker-wide parts every partition task uses.
#[derive(Debug)]
pub struct LogContext {
    pub store: Arc<tiering::Store>,
    pub blocks: Arc<tiering::BlockCache>,
    pub meta: Arc<dyn MetadataStore>,
    pub flusher: mpsc::Sender<FlushItem>,
    pub cache_dir: PathBuf,
    pub upload_permits: Arc<Semaphore>,
    pub retention_check_interval: Duration,
    pub queue_length: usize,
    pub broker_id: i32,
}

/// What readers see of a partition; written only by the owner task.
#[derive(Debug)]
pub struct PartitionView {
    pub log_start_offset: i64,
    /// Sealed segments in object storage, ascending.
    pub remote: Vec<SegmentRecord>,
    /// Local segments, ascending; the last is the active one. Earlier ones await upload.
    pub local: Vec<LocalSegment>,
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

/// Reports from the flusher and background uploads to the owner task (unbounded: at
/// most one per flush or upload in flight, so the flusher never waits on a busy owner).
#[derive(Debug)]
pub enum Notice {
    Flushed { gen: u64, end_offset: i64 },
    FlushFailed { gen: u64, fenced: bool },
    Uploaded(Result<SegmentRecord, String>),
}

#[derive(Debug, Clone)]
pub struct PartitionHandle {
    pub topic: Arc<str>,
    pub partition: i32,
    pub cmd: mpsc::Sender<PartitionCmd>,
    pub shared: Arc<PartitionShared>,
}

/// Claims a partition and starts its owner task, rebuilding the local tail from the
/// write-ahead ranges in object storage.
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
    let local = rebuild_local_tail(&ctx, &state, &dir).await?;
    info!(
        topic = %topic, partition = key.partition, epoch = state.leader_epoch,
        high_watermark = state.high_watermark, segments = state.segments.len(),
        wal_ranges = state.wal_ranges.len(), "partition claimed"
    );
    let (hw, _) = watch::channel(state.high_watermark);
    let shared = Arc::new(PartitionShared {
        key,
        stream: stream.clone(),
        leader_epoch: state.leader_epoch,
        hw,
        view: RwLock::new(PartitionView {
            log_start_offset: state.log_start_offset,
            remote: state.segments.clone(),
            local: vec![local],
            epoch_history: state.epoch_history.clone(),
        }),
        fenced: std::sync::atomic::AtomicBool::new(false),
        releasing: std::sync::atomic::AtomicBool::new(false),
    });
    let (cmd_tx, cmd_rx) = mpsc::channel(ctx.queue_length);
    let (notice_tx, notice_rx) = mpsc::unbounded_channel();
    let producers = ProducerTable::from_records(state.producers.clone());
    let owner = Owner {
        ctx,
        key,
        topic: topic.clone(),
        stream,
        shared: shared.clone(),
        dir,
        next_offset: state.high_watermark,
        producers: producers.clone(),
        durable_producers: producers,
        unflushed: VecDeque::new(),
        waiters: VecDeque::new(),
        // Generations start from the leader epoch, so a later incarnation of the
        // partition on this broker (claimed again after a hand-off or step-down) never
        // looks like a generation the flusher already abandoned.
        gen: (state.leader_epoch.max(0) as u64) << 32,
        config,
        uploading: false,
        notice_tx,
        released: None,
    };
    let task = tokio::spawn(owner.run(cmd_rx, notice_rx));
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

/// Write-ahead range reads one partition's recovery keeps in flight.
const RECOVERY_READS_IN_FLIGHT: usize = 32;

/// Downloads the write-ahead ranges after the last sealed segment into a fresh local
/// segment. The local directory is always rebuilt: it may hold batches that were never
/// committed, and it may be gone entirely.
async fn rebuild_local_tail(
    ctx: &LogContext,
    state: &PartitionState,
    dir: &std::path::Path,
) -> anyhow::Result<LocalSegment> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    let base = state
        .wal_ranges
        .first()
        .map(|r| r.base_offset)
        .or_else(|| state.segments.last().map(|s| s.end_offset))
        .unwrap_or(state.log_start_offset)
        .max(state.segments.last().map_or(0, |s| s.end_offset));
    let mut seg = LocalSegment::create(dir, base, now_ms())?;
    // Several reads in flight (a busy partition has a range per flush), appended in
    // offset order. They go through the block cache: a write-ahead object holds the
    // ranges of many partitions, so when a broker takes over many partitions at once
    // each block of it is fetched once, not once per partition.
    use futures::StreamExt;
    let mut reads = futures::stream::iter(state.wal_ranges.clone())
        .map(|range| {
            let (store, blocks) = (ctx.store.clone(), ctx.blocks.clone());
            async move {
                let span = range.position..range.position + range.len;
                let data: anyhow::Result<Bytes> = if range.object_size > 0 {
                    blocks
                        .read(&range.object_key, range.object_size, span)
                        .await
                        .map_err(Into::into)
                } else {
                    let key = object_store::path::Path::from(range.object_key.as_str());
                    store
                        .get_range(&key, span, tiering::Class::Read, None)
                        .await
                        .map_err(Into::into)
                };
                (range, data)
            }
        })
        .buffered(RECOVERY_READS_IN_FLIGHT);
    while let Some((range, data)) = reads.next().await {
        let data = data?;
        let batches: Vec<Bytes> = batch::walk(&data)
            .map(|(pos, h)| data.slice(pos..pos + h.total_len))
            .collect();
        let covered: usize = batches.iter().map(Bytes::len).sum();
        if covered as u64 != range.len {
            anyhow::bail!(
                "write-ahead range {}@{} of {} is unreadable",
                range.object_key,
                range.position,
                range.base_offset
            );
        }
        seg.append(&batches)?;
    }
    if seg.end_offset != state.high_watermark && !state.wal_ranges.is_empty() {
        anyhow::bail!(
            "write-ahead ranges end at {} but the high watermark is {}",
            seg.end_offset,
            state.high_watermark
        );
    }
    Ok(seg)
}

struct Unflushed {
    bytes: Bytes,
    end_offset: i64,
    producer: Option<ProducerStateRecord>,
}

struct Waiter {
    end_offset: i64,
    ok: AppendOk,
    reply: AppendReply,
}

struct Owner {
    ctx: Arc<LogContext>,
    key: PartitionKey,
    topic: Arc<str>,
    stream: Arc<str>,
    shared: Arc<PartitionShared>,
    dir: PathBuf,
    /// Next offset to assign (log end, including not yet durable batches).
    next_offset: i64,
    /// Producer state including batches not yet durable.
    producers: ProducerTable,
    /// Producer state as committed; restored when a flush fails.
    durable_producers: ProducerTable,
    unflushed: VecDeque<Unflushed>,
    waiters: VecDeque<Waiter>,
    /// Bumped when unflushed batches are abandoned, so stale flush items are ignored.
    gen: u64,
    config: TopicConfig,
    uploading: bool,
    notice_tx: mpsc::UnboundedSender<Notice>,
    /// A hand-off waiting for the in-flight batches to finish.
    released: Option<oneshot::Sender<()>>,
}

impl Owner {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<PartitionCmd>,
        mut notices: mpsc::UnboundedReceiver<Notice>,
    ) {
        let mut tick = tokio::time::interval(
            self.ctx
                .retention_check_interval
                .min(Duration::from_secs(1)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_retention = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                Some(notice) = notices.recv() => self.on_notice(notice).await,
                cmd = cmds.recv() => match cmd {
                    Some(PartitionCmd::Stop) | None => break,
                    Some(cmd) => self.on_cmd(cmd).await,
                },
                _ = tick.tick() => {
                    self.maybe_seal(false);
                    if last_retention.elapsed() >= self.ctx.retention_check_interval {
                        last_retention = tokio::time::Instant::now();
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
        if self.unflushed.is_empty() {
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
        // Check every batch first (against a scratch copy when there are several), so a
        // request is applied whole or not at all.
        let mut decisions = Vec::with_capacity(batches.len());
        {
            let mut scratch = (batches.len() > 1).then(|| self.producers.clone());
            for b in &batches {
                let table = scratch.as_ref().unwrap_or(&self.producers);
                match table.check(&b.header) {
                    Ok(d) => {
                        if let (Some(t), SeqCheck::Append) = (scratch.as_mut(), d) {
                            t.record(&b.header, 0, 0);
                        }
                        decisions.push(d);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                        return;
                    }
                }
            }
        }
        let now = now_ms();
        let mut first_base = None;
        let mut last_end = self.next_offset;
        for (b, decision) in batches.iter().zip(decisions) {
            match decision {
                SeqCheck::Duplicate { base_offset } => {
                    first_base.get_or_insert(base_offset);
                    last_end = last_end.max(base_offset + b.header.offset_count());
                }
                SeqCheck::Append => {
                    let base = self.next_offset;
                    let stamped = batch::stamp(&b.bytes, base, self.shared.leader_epoch);
                    self.next_offset += b.header.offset_count();
                    let producer = self.producers.record(&b.header, base, now);
                    let item = FlushItem {
                        key: self.key,
                        stream: self.stream.clone(),
                        leader_epoch: self.shared.leader_epoch,
                        gen: self.gen,
                        base_offset: base,
                        end_offset: self.next_offset,
                        max_timestamp: b.header.max_timestamp,
                        batch: stamped.clone(),
                        producer: producer.clone(),
                        notify: self.notice_tx.clone(),
                    };
                    self.unflushed.push_back(Unflushed {
                        bytes: stamped,
                        end_offset: self.next_offset,
                        producer,
                    });
                    first_base.get_or_insert(base);
                    last_end = self.next_offset;
                    if self.ctx.flusher.send(item).await.is_err() {
                        let _ = reply.send(Err(AppendError::NotDurable));
                        return;
                    }
                }
            }
        }
        let ok = AppendOk {
            base_offset: first_base.unwrap_or(self.next_offset),
            log_start_offset: self.shared.log_start_offset(),
        };
        if acks != -1 || last_end <= self.shared.high_watermark() {
            let _ = reply.send(Ok(ok));
        } else {
            self.waiters.push_back(Waiter {
                end_offset: last_end,
                ok,
                reply,
            });
        }
    }

    async fn on_notice(&mut self, notice: Notice) {
        match notice {
            Notice::Flushed { gen, end_offset } if gen == self.gen => self.on_flushed(end_offset),
            Notice::FlushFailed { gen, fenced } if gen == self.gen => self.on_flush_failed(fenced),
            Notice::Flushed { .. } | Notice::FlushFailed { .. } => {}
            Notice::Uploaded(result) => self.on_uploaded(result),
        }
    }

    fn on_flushed(&mut self, end_offset: i64) {
        let mut durable = Vec::new();
        while self
            .unflushed
            .front()
            .is_some_and(|u| u.end_offset <= end_offset)
        {
            let Some(u) = self.unflushed.pop_front() else {
                break;
            };
            if let Some(p) = u.producer {
                self.durable_producers.insert(p);
            }
            durable.push(u.bytes);
        }
        {
            let mut view = self
                .shared
                .view
                .write()
                .expect("partition view lock poisoned");
            if let Some(active) = view.local.last_mut() {
                if let Err(e) = active.append(&durable) {
                    // The local copy is only a cache; reads of these offsets fall back to
                    // the write-ahead data once the segment is rebuilt.
                    warn!(topic = %self.topic, partition = self.key.partition, error = %e, "local segment append failed");
                }
            }
        }
        self.shared.hw.send_replace(end_offset);
        while self
            .waiters
            .front()
            .is_some_and(|w| w.end_offset <= end_offset)
        {
            if let Some(w) = self.waiters.pop_front() {
                let _ = w.reply.send(Ok(w.ok));
            }
        }
        self.maybe_seal(false);
        self.maybe_released();
    }

    fn on_flush_failed(&mut self, fenced: bool) {
        warn!(topic = %self.topic, partition = self.key.partition, fenced, abandoned = self.unflushed.len(), "write-ahead flush failed; abandoning unflushed batches");
        self.gen += 1;
        self.next_offset = self.shared.high_watermark();
        self.producers = self.durable_producers.clone();
        self.unflushed.clear();
        if fenced {
            self.shared
                .fenced
                .store(true, std::sync::atomic::Ordering::Release);
            self.fail_waiters(AppendError::NotLeader);
        } else {
            self.fail_waiters(AppendError::NotDurable);
        }
        self.maybe_released();
    }

    fn fail_waiters(&mut self, error: AppendError) {
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(Err(error));
        }
    }

    /// Seals the active segment when it is big or old enough and no upload is running.
    fn maybe_seal(&mut self, force: bool) {
        if self.uploading {
            return;
        }
        let mut view = self
            .shared
            .view
            .write()
            .expect("partition view lock poisoned");
        let Some(active) = view.local.last() else {
            return;
        };
        let age = now_ms() - active.created_ms;
        let due = active.size > 0
            && (force || active.size >= self.config.segment_bytes || age >= self.config.segment_ms);
        if !due {
            return;
        }
        let next = match LocalSegment::create(&self.dir, active.end_offset, now_ms()) {
            Ok(s) => s,
            Err(e) => {
                warn!(topic = %self.topic, partition = self.key.partition, error = %e, "cannot open a new local segment");
                return;
            }
        };
        view.local.push(next);
        let sealed = &view.local[view.local.len() - 2];
        let job = self.upload_job(sealed);
        self.uploading = true;
        tokio::spawn(job.run());
    }

    /// The upload of one sealed local segment.
    fn upload_job(&self, sealed: &LocalSegment) -> UploadJob {
        UploadJob {
            ctx: self.ctx.clone(),
            key: self.key,
            stream: self.stream.clone(),
            leader_epoch: self.shared.leader_epoch,
            base_offset: sealed.base_offset,
            end_offset: sealed.end_offset,
            max_timestamp: sealed.max_timestamp,
            entries: sealed.entries.clone(),
            file: sealed.file.clone(),
            size: sealed.size,
            index_interval_bytes: self.config.index_interval_bytes,
            notify: self.notice_tx.clone(),
        }
    }

    fn on_uploaded(&mut self, result: Result<SegmentRecord, String>) {
        self.uploading = false;
        match result {
            Ok(record) => {
                let mut view = self
                    .shared
                    .view
                    .write()
                    .expect("partition view lock poisoned");
                if let Some(i) = view
                    .local
                    .iter()
                    .position(|s| s.base_offset == record.base_offset)
                {
                    if i + 1 < view.local.len() {
                        let seg = view.local.remove(i);
                        seg.remove_file();
                    }
                }
                info!(topic = %self.topic, partition = self.key.partition, base = record.base_offset, end = record.end_offset, bytes = record.size_bytes, "segment uploaded");
                view.remote.push(record);
            }
            Err(e) if e == FENCED => {
                self.shared
                    .fenced
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            Err(e) => {
                warn!(topic = %self.topic, partition = self.key.partition, error = %e, "segment upload failed; will retry")
            }
        }
        // Segments sealed while the upload ran (other than the active one) go next.
        let pending = {
            let view = self
                .shared
                .view
                .read()
                .expect("partition view lock poisoned");
            view.local.len() > 1
        };
        if pending {
            self.upload_oldest_sealed();
        } else {
            self.maybe_seal(false);
        }
    }

    fn upload_oldest_sealed(&mut self) {
        let view = self
            .shared
            .view
            .read()
            .expect("partition view lock poisoned");
        let Some(sealed) = view.local.first().filter(|_| view.local.len() > 1) else {
            return;
        };
        let job = self.upload_job(sealed);
        drop(view);
        self.uploading = true;
        tokio::spawn(async move {
            // Back off a little before retrying a failed upload.
            tokio::time::sleep(Duration::from_millis(500)).await;
            job.run().await
        });
    }

    async fn apply_retention(&mut self) {
        let now = now_ms();
        let (drop, new_start) = {
            let view = self
                .shared
                .view
                .read()
                .expect("partition view lock poisoned");
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
            let mut view = self
                .shared
                .view
                .write()
                .expect("partition view lock poisoned");
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
            let view = self
                .shared
                .view
                .read()
                .expect("partition view lock poisoned");
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

const FENCED: &str = "fenced";

/// Uploads one sealed local segment and records it in the manifest.
struct UploadJob {
    ctx: Arc<LogContext>,
    key: PartitionKey,
    stream: Arc<str>,
    leader_epoch: i32,
    base_offset: i64,
    end_offset: i64,
    max_timestamp: i64,
    entries: Vec<tiering::segment::BatchEntry>,
    file: Arc<std::fs::File>,
    size: u64,
    index_interval_bytes: u64,
    notify: mpsc::UnboundedSender<Notice>,
}

impl UploadJob {
    async fn run(self) {
        let result = self.upload().await;
        let _ = self.notify.send(Notice::Uploaded(result));
    }

    async fn upload(&self) -> Result<SegmentRecord, String> {
        let _permit = self
            .ctx
            .upload_permits
            .acquire()
            .await
            .map_err(|e| e.to_string())?;
        let file = self.file.clone();
        let size = self.size;
        let data = tokio::task::spawn_blocking(move || super::local::read_at(&file, 0, size))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("reading local segment: {e}"))?;
        let (payload, index) = tiering::segment::build_segment_object(
            vec![data],
            &self.entries,
            self.index_interval_bytes,
        );
        let object_size = payload.content_length() as u64;
        let parts: Vec<Bytes> = payload.iter().cloned().collect();
        let key =
            tiering::keys::segment_object_key(&self.stream, self.base_offset, self.leader_epoch);
        match self.ctx.store.put_new(&key, payload, None).await {
            // An upload repeated after a failed commit finds its own object: `put_new`
            // recognises identical bytes; different bytes are an error.
            Ok(()) => {}
            Err(e) => return Err(format!("uploading segment: {e}")),
        }
        // Just sealed, so still hot: readers slightly behind the tail hit the cache.
        self.ctx.blocks.insert_object(key.as_ref(), &parts);
        let record = SegmentRecord {
            base_offset: self.base_offset,
            end_offset: self.end_offset,
            object_key: key.to_string(),
            size_bytes: object_size,
            data_bytes: index.data_len(),
            max_timestamp: self.max_timestamp,
            created_ms: now_ms(),
        };
        match self
            .ctx
            .meta
            .commit_segment(self.key, self.leader_epoch, &record)
            .await
        {
            Ok(()) => Ok(record),
            Err(MetaError::Fenced(_)) => Err(FENCED.to_string()),
            Err(e) => Err(format!("committing segment: {e}")),
        }
    }
}
