//! The write-ahead flusher: one per broker, the only writer of write-ahead objects.
//!
//! Partition owner tasks hand it stamped batches. A flush writes ONE object holding the
//! new batches of every partition, then commits all their offset ranges in ONE metadata
//! transaction, and only then tells each partition how far it is durable.
//!
//! Group commit: a flush starts as soon as one of `wal.flush.concurrency` slots is free
//! and a batch someone waits on (`acks=all`) is buffered, so the ack latency is the
//! write plus the commit, not a timer; batches nobody waits on wait at most
//! `wal.flush.interval.ms`. `wal.flush.max.per.second` spaces flush starts (object-store
//! PUTs are billed: by default one per interval on remote stores, unbounded on local
//! files). Objects are written concurrently while their commits stay in order, and the
//! objects written while a commit runs commit together in the next one. Object-store
//! requests therefore grow with time (bounded by the rate), never with the number of
//! partitions.

pub(crate) mod core;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use self::core::{CommitEnd, CommitResult, FlushCore};
use crate::clock;
use crate::metadata::{MetaError, MetadataStore, WalCommit, WalRangeRecord};
use crate::metrics::{metrics, stage};

/// What the flusher tells a partition's owner about its batches (unbounded channel: at
/// most one notice per flush in flight, so the flusher never waits on a busy owner).
#[derive(Debug)]
pub(crate) enum FlushNotice {
    /// The batches up to `range.end_offset` are committed in `range`.
    Flushed {
        gen: u64,
        range: WalRangeRecord,
        /// When the commit succeeded (for the ack-path breakdown).
        committed_at: std::time::Instant,
    },
    /// The batches of generation `gen` were abandoned. `fenced`: a newer owner holds the
    /// partition. `uncertain`: the commit failed in a way that may have applied it (the
    /// connection broke mid-commit), so the owner cannot know its own high watermark.
    Failed {
        gen: u64,
        fenced: bool,
        uncertain: bool,
    },
}

/// One stamped batch on its way to the next write-ahead object.
pub(crate) type FlushItem = core::FlushItem<mpsc::UnboundedSender<FlushNotice>>;

/// A share of the flusher queue's byte budget, held from before a batch is handed to its
/// partition's owner until the flusher takes the batch into its (bounded) buffer.
pub(crate) type QueueBytes = tokio::sync::OwnedSemaphorePermit;

/// A batch in the flusher's queue, with the bytes it holds of the queue's budget (the
/// last batch of an append holds the whole append's; `None` for none).
pub(crate) struct Queued {
    item: FlushItem,
    _bytes: Option<QueueBytes>,
}

/// Why no room was reserved in the flusher's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReserveError {
    /// The partition stopped being served while its batches waited for room.
    NotServing,
    /// The flusher has stopped.
    Closed,
}

/// The way to the flusher: at most `wal.flush.queue.length` batches and
/// `wal.flush.queue.bytes` bytes queued. Batches vary from bytes to a megabyte, and an
/// `acks=1` producer faster than the store is answered as soon as its batch is queued,
/// so without the byte bound the queue alone could hold gigabytes.
///
/// The bytes are reserved by the produce handler before it hands the batches to the
/// partition's owner (`reserve`), never by the owner: an owner waiting for room could
/// not take the hand-off or stop that frees it. A handler waiting for room holds back its
/// connection's later produce requests, and past `queued.max.request.bytes` the broker
/// stops reading requests at all: the excess waits in the clients.
#[derive(Debug, Clone)]
pub(crate) struct FlushQueue {
    tx: mpsc::Sender<Queued>,
    bytes: Arc<tokio::sync::Semaphore>,
    max_bytes: usize,
}

impl FlushQueue {
    pub(crate) fn new(length: usize, max_bytes: usize) -> (FlushQueue, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(length.max(1));
        let max_bytes = max_bytes.clamp(
            1,
            tokio::sync::Semaphore::MAX_PERMITS.min(u32::MAX as usize),
        );
        let queue = FlushQueue {
            tx,
            bytes: Arc::new(tokio::sync::Semaphore::new(max_bytes)),
            max_bytes,
        };
        (queue, rx)
    }

    /// Waits for room for `bytes` (an append larger than the whole budget takes all of
    /// it), giving up once `serving` says the partition is no longer served here. The
    /// wait keeps its place in line.
    pub(crate) async fn reserve(
        &self,
        bytes: usize,
        serving: impl Fn() -> bool,
    ) -> Result<QueueBytes, ReserveError> {
        let want = bytes.clamp(1, self.max_bytes) as u32;
        let acquire = self.bytes.clone().acquire_many_owned(want);
        tokio::pin!(acquire);
        let mut check = clock::interval(SERVING_CHECK);
        loop {
            tokio::select! {
                permit = &mut acquire => return permit.map_err(|_| ReserveError::Closed),
                _ = check.tick() => if !serving() {
                    return Err(ReserveError::NotServing);
                },
            }
        }
    }

    /// Queues a batch (waiting only for a free slot of `wal.flush.queue.length`);
    /// `Err` once the flusher has stopped.
    pub(crate) async fn send(&self, item: FlushItem, bytes: Option<QueueBytes>) -> Result<(), ()> {
        self.tx
            .send(Queued {
                item,
                _bytes: bytes,
            })
            .await
            .map_err(|_| ())
    }

    /// (batches queued, their capacity) and (bytes reserved, their capacity).
    pub(crate) fn depth(&self) -> ((usize, usize), (usize, usize)) {
        let batches = (
            self.tx.max_capacity() - self.tx.capacity(),
            self.tx.max_capacity(),
        );
        let bytes = (
            self.max_bytes - self.bytes.available_permits(),
            self.max_bytes,
        );
        (batches, bytes)
    }
}

/// How often a produce waiting for room in the flusher's queue checks that its
/// partition is still served here.
const SERVING_CHECK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub(crate) struct FlusherConfig {
    pub broker_id: i32,
    pub session: i64,
    pub interval: Duration,
    /// Shortest time between flush starts (zero: no bound).
    pub min_gap: Duration,
    pub max_bytes: usize,
    pub timeout: Duration,
    /// Flushes whose objects may be in flight at once (commits stay in order).
    pub concurrency: usize,
}

type Notify = mpsc::UnboundedSender<FlushNotice>;
type Write = BoxFuture<'static, (u64, Option<core::Written>)>;
type Commit = BoxFuture<'static, (u64, Result<(), MetaError>, Duration)>;

/// The flusher task: the I/O around [`core::FlushCore`], which decides everything.
pub(crate) struct Flusher {
    config: FlusherConfig,
    store: Arc<tiering::Store>,
    meta: Arc<dyn MetadataStore>,
}

impl Flusher {
    pub(crate) fn new(
        config: FlusherConfig,
        store: Arc<tiering::Store>,
        meta: Arc<dyn MetadataStore>,
    ) -> Self {
        Flusher {
            config,
            store,
            meta,
        }
    }

    /// Runs until every sender is dropped or `shutdown` fires, flushing what is left at
    /// the end (on shutdown the queue is closed, so what is already in it is flushed).
    /// Objects are written concurrently (up to `concurrency` unfinished flushes); the
    /// core hands out one commit at a time, in flush order.
    pub(crate) async fn run(
        self,
        mut rx: mpsc::Receiver<Queued>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let c = &self.config;
        let mut core: FlushCore<Notify> = FlushCore::new(core::FlushRules::new(
            c.interval,
            c.min_gap,
            c.max_bytes,
            c.timeout,
            c.concurrency,
        ));
        let mut shutdown = std::pin::pin!(shutdown);
        let mut closing = false;
        let mut open = true;
        let mut writes: FuturesUnordered<Write> = FuturesUnordered::new();
        let mut commit: Option<Commit> = None;
        let mut commit_attempts = 0u32;
        loop {
            let now = clock::instant();
            while let Some(started) = core.start(now, !open) {
                self.observe_start(&started);
                writes.push(self.write(started));
            }
            if commit.is_none() {
                if let Some(next) = core.next_commit(now, clock::now_ms()) {
                    let stages = &metrics().produce_stage_seconds;
                    for waited in &next.waited {
                        stages
                            .with_label_values(&[stage::COMMIT_WAIT])
                            .observe(waited.as_secs_f64());
                    }
                    metrics()
                        .flush_commit_objects
                        .observe(next.commits.len() as f64);
                    let deadline = core.commit_deadline().unwrap_or(now);
                    commit = Some(self.commit(next.seq, next.commits, deadline));
                }
            }
            for (notify, notice) in core.take_notices() {
                let _ = notify.send(notice);
            }
            if !open && core.is_idle() && commit.is_none() {
                return;
            }
            let wake = core.wake_at();
            tokio::select! {
                _ = &mut shutdown, if !closing => {
                    closing = true;
                    rx.close();
                }
                item = rx.recv(), if open && core.accepts() => match item {
                    // The batch leaves the queue's byte budget for the buffer's.
                    Some(queued) => core.add(queued.item, clock::instant()),
                    None => open = false,
                },
                _ = clock::sleep_until(wake), if wake.is_some() => {}
                Some((seq, written)) = writes.next(), if !writes.is_empty() => {
                    if written.is_none() {
                        metrics().flushes.with_label_values(&["write_failed"]).inc();
                    }
                    core.written(seq, written, clock::instant());
                }
                (seq, result, took) = async { commit.as_mut().expect("guarded").await }, if commit.is_some() => {
                    commit = None;
                    metrics().flush_commit_seconds.observe(took.as_secs_f64());
                    metrics()
                        .produce_stage_seconds
                        .with_label_values(&[stage::COMMIT])
                        .observe(took.as_secs_f64());
                    let result = match result {
                        Ok(()) => CommitResult::Committed,
                        Err(MetaError::Fenced(keys)) => CommitResult::Fenced(keys),
                        Err(e) => {
                            warn!(error = %e, attempt = commit_attempts, "write-ahead commit failed");
                            CommitResult::Failed { retriable: e.is_retriable() }
                        }
                    };
                    commit_attempts += 1;
                    let wait = tiering::store::backoff(commit_attempts);
                    match core.committed(seq, result, clock::instant(), wait) {
                        CommitEnd::Committed { objects, partitions } => {
                            commit_attempts = 0;
                            metrics().flushes.with_label_values(&["committed"]).inc_by(objects as u64);
                            debug!(seq, objects, partitions, "write-ahead objects committed");
                        }
                        CommitEnd::Retry => {}
                        CommitEnd::Abandoned { objects } => {
                            commit_attempts = 0;
                            metrics().flushes.with_label_values(&["commit_failed"]).inc_by(objects as u64);
                            warn!(seq, objects, "write-ahead commit abandoned; its partitions' owners are told");
                        }
                    }
                }
            }
        }
    }

    fn observe_start(&self, started: &core::Started) {
        let m = metrics();
        m.flush_wait_seconds.observe(started.waited.as_secs_f64());
        if let Some(since) = started.since_previous {
            m.flush_interval_seconds.observe(since.as_secs_f64());
        }
        let queue = m.produce_stage_seconds.with_label_values(&[stage::QUEUE]);
        let buffer = m.produce_stage_seconds.with_label_values(&[stage::BUFFER]);
        for b in &started.batches {
            queue.observe(b.queued.as_secs_f64());
            buffer.observe(b.buffered.as_secs_f64());
        }
    }

    /// Writes a flush's object, retrying until the flush deadline (the store recognises
    /// an earlier attempt that landed).
    fn write(&self, started: core::Started) -> Write {
        let store = self.store.clone();
        let key =
            tiering::keys::wal_object_key(self.config.broker_id, self.config.session, started.seq);
        let deadline = clock::instant() + self.config.timeout;
        Box::pin(async move {
            let begun = clock::instant();
            let (payload, locations) = tiering::wal::build_wal_object(started.chunks);
            let size = payload.content_length() as u64;
            metrics().flush_bytes.observe(size as f64);
            let written = match store.put_new(&key, payload, Some(deadline)).await {
                Ok(()) => Some(core::Written {
                    object_key: key.to_string(),
                    object_size: size,
                    locations,
                }),
                Err(e) => {
                    warn!(error = %e, object = %key, "write-ahead object write failed past the flush timeout");
                    None
                }
            };
            let took = begun.elapsed().as_secs_f64();
            metrics().flush_write_seconds.observe(took);
            metrics()
                .produce_stage_seconds
                .with_label_values(&[stage::WRITE])
                .observe(took);
            (started.seq, written)
        })
    }

    /// One commit attempt, bounded by the flush deadline (at least a second): a
    /// metadata store that does not answer fails the flush instead of holding it, and
    /// the partitions behind it, forever. A commit cut short this way may still apply,
    /// so the core treats it as uncertain once the deadline has passed.
    fn commit(&self, seq: u64, commits: Vec<WalCommit>, deadline: std::time::Instant) -> Commit {
        let meta = self.meta.clone();
        Box::pin(async move {
            let begun = clock::instant();
            let budget = deadline
                .saturating_duration_since(begun)
                .max(Duration::from_secs(1));
            let result = match tokio::time::timeout(budget, meta.commit_wal(&commits)).await {
                Ok(result) => result,
                Err(_) => Err(MetaError::Unavailable(format!(
                    "no answer within {} ms",
                    budget.as_millis()
                ))),
            };
            (seq, result, begun.elapsed())
        })
    }
}

/// Deletes write-ahead objects that no partition range references any more.
pub(crate) async fn collect_garbage(
    store: &tiering::Store,
    meta: &dyn MetadataStore,
) -> Result<usize, anyhow::Error> {
    let keys = meta.unreferenced_wal_objects().await?;
    if keys.is_empty() {
        return Ok(0);
    }
    for key in &keys {
        store
            .delete(&object_store::path::Path::from(key.as_str()))
            .await?;
    }
    meta.forget_wal_objects(&keys).await?;
    Ok(keys.len())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    fn item() -> FlushItem {
        FlushItem {
            key: crate::metadata::PartitionKey {
                topic_id: uuid::Uuid::nil(),
                partition: 0,
            },
            stream: Arc::from("s"),
            leader_epoch: 1,
            gen: 0,
            base_offset: 0,
            end_offset: 1,
            max_timestamp: 0,
            batch: bytes::Bytes::from_static(b"x"),
            producer: None,
            aborted: None,
            notify: mpsc::unbounded_channel().0,
            urgent: true,
            arrived: clock::instant(),
        }
    }

    /// The queue holds at most its byte budget: a reservation that does not fit waits
    /// until the flusher takes a batch out, and gives up once its partition is no longer
    /// served; an append larger than the budget takes all of it.
    #[tokio::test]
    async fn the_flush_queue_is_bounded_in_bytes() {
        let (queue, mut rx) = FlushQueue::new(100, 10);
        let serving = AtomicBool::new(true);
        let first = queue.reserve(6, || true).await.expect("fits");
        queue.send(item(), Some(first)).await.expect("queued");
        assert_eq!(queue.depth().1, (6, 10));

        let waiting = tokio::time::timeout(
            Duration::from_millis(300),
            queue.reserve(6, || serving.load(Ordering::Relaxed)),
        )
        .await;
        assert!(waiting.is_err(), "a second append over the budget waits");
        let gives_up = queue.reserve(6, || serving.load(Ordering::Relaxed));
        serving.store(false, Ordering::Relaxed);
        assert_eq!(gives_up.await.err(), Some(ReserveError::NotServing));

        drop(rx.recv().await.expect("the first batch"));
        assert_eq!(queue.depth().1, (0, 10), "taking it out frees its bytes");
        let huge = queue
            .reserve(25, || true)
            .await
            .expect("takes the whole budget");
        assert_eq!(queue.depth().1, (10, 10));
        drop(huge);
        assert_eq!(
            queue.depth().1,
            (0, 10),
            "an append refused by its owner frees its room"
        );
    }
}
