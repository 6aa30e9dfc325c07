//! The write-ahead flusher: one per broker, the only writer of write-ahead objects.
//!
//! Partition owner tasks hand it stamped batches. Every `wal.flush.interval.ms` (or once
//! `wal.flush.bytes` are pending) it writes ONE object holding the new batches of every
//! partition, then commits all their offset ranges in ONE metadata transaction, and only
//! then tells each partition how far it is durable. Flushes start at most once per
//! interval (measured from the previous flush's start), so a lone batch after a quiet
//! spell is written at once while a busy broker still writes one object per interval.
//! Up to `wal.flush.concurrency` objects are written at once while their commits stay
//! in order. Object-store requests therefore grow with time, not with the number of
//! partitions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use indexmap::IndexMap;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::clock::now_ms;
use crate::metadata::{
    MetaError, MetadataStore, PartitionCommit, PartitionKey, ProducerStateRecord, WalCommit,
    WalRangeRecord,
};

/// What the flusher tells a partition's owner about its batches (unbounded channel: at
/// most one notice per flush in flight, so the flusher never waits on a busy owner).
#[derive(Debug)]
pub enum FlushNotice {
    /// The batches up to `range.end_offset` are committed in `range`.
    Flushed { gen: u64, range: WalRangeRecord },
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
#[derive(Debug)]
pub struct FlushItem {
    pub key: PartitionKey,
    pub stream: Arc<str>,
    pub leader_epoch: i32,
    /// The owner's generation; items of an abandoned generation are dropped.
    pub gen: u64,
    pub base_offset: i64,
    pub end_offset: i64,
    pub max_timestamp: i64,
    pub batch: Bytes,
    pub producer: Option<ProducerStateRecord>,
    pub notify: mpsc::UnboundedSender<FlushNotice>,
}

#[derive(Debug, Clone)]
pub struct FlusherConfig {
    pub broker_id: i32,
    pub session: i64,
    pub interval: Duration,
    pub max_bytes: usize,
    pub timeout: Duration,
    /// Flushes whose objects may be in flight at once (commits stay in order).
    pub concurrency: usize,
}

/// One partition's share of the buffer being filled.
struct Pending {
    stream: Arc<str>,
    leader_epoch: i32,
    gen: u64,
    base_offset: i64,
    end_offset: i64,
    max_timestamp: i64,
    data: Vec<Bytes>,
    producers: IndexMap<i64, ProducerStateRecord>,
    notify: mpsc::UnboundedSender<FlushNotice>,
}

impl Pending {
    fn new(item: &FlushItem) -> Pending {
        Pending {
            stream: item.stream.clone(),
            leader_epoch: item.leader_epoch,
            gen: item.gen,
            base_offset: item.base_offset,
            end_offset: item.base_offset,
            max_timestamp: -1,
            data: Vec::new(),
            producers: IndexMap::new(),
            notify: item.notify.clone(),
        }
    }

    fn bytes(&self) -> usize {
        self.data.iter().map(Bytes::len).sum()
    }
}

#[derive(Default)]
struct Buffer {
    partitions: IndexMap<PartitionKey, Pending>,
    bytes: usize,
    opened: Option<Instant>,
}

/// Lowest live generation per partition: a flush that failed for a partition abandons
/// that generation's batches, in the buffer and in every later flush still in flight.
type Abandoned = Arc<Mutex<HashMap<PartitionKey, u64>>>;

pub struct Flusher {
    config: FlusherConfig,
    store: Arc<tiering::Store>,
    meta: Arc<dyn MetadataStore>,
    seq: u64,
    abandoned: Abandoned,
}

impl Flusher {
    pub fn new(
        config: FlusherConfig,
        store: Arc<tiering::Store>,
        meta: Arc<dyn MetadataStore>,
    ) -> Self {
        Flusher {
            config,
            store,
            meta,
            seq: 0,
            abandoned: Arc::default(),
        }
    }

    /// Runs until every sender is dropped or `shutdown` fires, flushing what is left at
    /// the end (on shutdown the queue is closed, so what is already in it is flushed).
    ///
    /// Up to `concurrency` flushes write their objects at once; their commits run one
    /// after another in the order the flushes started (a turn passed down a chain of
    /// oneshot channels), so every partition's ranges are committed in offset order.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<FlushItem>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut closing = false;
        let mut buffer = Buffer::default();
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
        let (first_turn, mut prev_turn) = oneshot::channel::<()>();
        let _ = first_turn.send(());
        let mut open = true;
        // Flushes start at most once per interval: a batch arriving after a quiet spell
        // goes out at once, and under load each flush carries one interval's worth.
        let mut last_flush: Option<Instant> = None;
        loop {
            let deadline = buffer.opened.map(|opened| {
                last_flush.map_or(opened, |t| (t + self.config.interval).max(opened))
            });
            let idle = permits.available_permits() == self.config.concurrency;
            let can_start = permits.available_permits() > 0;
            let due =
                buffer.bytes >= self.config.max_bytes || (!open && !buffer.partitions.is_empty());
            if can_start && due {
                observe_interval(last_flush);
                last_flush = Some(Instant::now());
                prev_turn = self.start_flush(&mut buffer, &permits, prev_turn, &done_tx);
                continue;
            }
            if !open && buffer.partitions.is_empty() && idle {
                return;
            }
            tokio::select! {
                _ = &mut shutdown, if !closing => {
                    closing = true;
                    rx.close();
                }
                item = rx.recv(), if open && buffer.bytes < self.config.max_bytes => match item {
                    Some(item) => self.add(&mut buffer, item),
                    None => open = false,
                },
                _ = sleep_until(deadline), if can_start && deadline.is_some() => {
                    observe_interval(last_flush);
                    last_flush = Some(Instant::now());
                    prev_turn = self.start_flush(&mut buffer, &permits, prev_turn, &done_tx);
                }
                _ = done_rx.recv() => {}
            }
        }
    }

    fn add(&mut self, buffer: &mut Buffer, item: FlushItem) {
        let live_gen = self
            .abandoned
            .lock()
            .expect("abandoned lock poisoned")
            .get(&item.key)
            .copied();
        if live_gen.is_some_and(|g| item.gen < g) {
            return;
        }
        buffer.opened.get_or_insert_with(Instant::now);
        let p = buffer
            .partitions
            .entry(item.key)
            .or_insert_with(|| Pending::new(&item));
        if p.gen != item.gen {
            // The owner abandoned the older batches after a failed flush; start over
            // from the new generation.
            buffer.bytes -= p.bytes();
            *p = Pending::new(&item);
        }
        debug_assert_eq!(
            p.end_offset, item.base_offset,
            "batches of a partition arrive in offset order"
        );
        buffer.bytes += item.batch.len();
        p.end_offset = item.end_offset;
        p.max_timestamp = p.max_timestamp.max(item.max_timestamp);
        p.data.push(item.batch);
        if let Some(state) = item.producer {
            p.producers.insert(state.producer_id, state);
        }
    }

    /// Takes the filled buffer and flushes it in its own task; returns the turn the
    /// next flush waits for before committing.
    fn start_flush(
        &mut self,
        buffer: &mut Buffer,
        permits: &Arc<Semaphore>,
        prev_turn: oneshot::Receiver<()>,
        done: &mpsc::UnboundedSender<()>,
    ) -> oneshot::Receiver<()> {
        let taken = std::mem::take(buffer);
        if let Some(opened) = taken.opened {
            crate::metrics::metrics()
                .flush_wait_seconds
                .observe(opened.elapsed().as_secs_f64());
        }
        let (turn_tx, turn_rx) = oneshot::channel();
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Callers check for a free permit first; keep the order chain intact anyway.
            let _ = turn_tx.send(());
            return turn_rx;
        };
        let job = FlushJob {
            config: self.config.clone(),
            store: self.store.clone(),
            meta: self.meta.clone(),
            abandoned: self.abandoned.clone(),
            seq: self.seq,
        };
        self.seq += 1;
        let done = done.clone();
        tokio::spawn(async move {
            job.run(taken.partitions, prev_turn, turn_tx).await;
            drop(permit);
            let _ = done.send(());
        });
        turn_rx
    }
}

/// One flush: write the object, wait for the previous flush's commit, commit.
struct FlushJob {
    config: FlusherConfig,
    store: Arc<tiering::Store>,
    meta: Arc<dyn MetadataStore>,
    abandoned: Abandoned,
    seq: u64,
}

impl FlushJob {
    async fn run(
        self,
        mut partitions: IndexMap<PartitionKey, Pending>,
        prev_turn: oneshot::Receiver<()>,
        turn: oneshot::Sender<()>,
    ) {
        let started = Instant::now();
        let deadline = started + self.config.timeout;
        let key =
            tiering::keys::wal_object_key(self.config.broker_id, self.config.session, self.seq);
        let chunks: Vec<tiering::wal::WalChunk> = partitions
            .values()
            .map(|p| tiering::wal::WalChunk {
                stream: p.stream.to_string(),
                base_offset: p.base_offset,
                end_offset: p.end_offset,
                max_timestamp: p.max_timestamp,
                data: p.data.clone(),
            })
            .collect();
        let (payload, locations) = tiering::wal::build_wal_object(chunks);
        let object_size = payload.content_length() as u64;
        let ranges: HashMap<PartitionKey, WalRangeRecord> = partitions
            .iter()
            .zip(locations)
            .map(|((k, p), loc)| {
                let range = WalRangeRecord {
                    base_offset: p.base_offset,
                    end_offset: p.end_offset,
                    object_key: key.to_string(),
                    position: loc.position,
                    len: loc.len,
                    max_timestamp: p.max_timestamp,
                    object_size,
                };
                (*k, range)
            })
            .collect();
        let metrics = crate::metrics::metrics();
        metrics.flush_bytes.observe(payload.content_length() as f64);
        let written = !partitions.is_empty() && self.write(&key, payload, deadline).await;
        metrics
            .flush_write_seconds
            .observe(started.elapsed().as_secs_f64());
        // Commits go in flush order; a failed predecessor has marked what it abandoned.
        let _ = prev_turn.await;
        if !written {
            metrics.flushes.with_label_values(&["write_failed"]).inc();
            self.abandon(partitions.drain(..), false, false);
            let _ = turn.send(());
            return;
        }
        let stale: Vec<PartitionKey> = {
            let abandoned = self.abandoned.lock().expect("abandoned lock poisoned");
            partitions
                .iter()
                .filter(|(k, p)| abandoned.get(k).is_some_and(|&g| p.gen < g))
                .map(|(k, _)| *k)
                .collect()
        };
        for k in stale {
            // Its earlier batches were never committed: these would leave a gap.
            if let Some(p) = partitions.shift_remove(&k) {
                self.abandon([(k, p)].into_iter(), false, false);
            }
        }
        loop {
            if partitions.is_empty() {
                break;
            }
            let commit = WalCommit {
                object_key: key.to_string(),
                created_ms: now_ms(),
                partitions: partitions
                    .iter()
                    .map(|(k, p)| PartitionCommit {
                        key: *k,
                        leader_epoch: p.leader_epoch,
                        range: ranges[k].clone(),
                        producers: p.producers.values().cloned().collect(),
                    })
                    .collect(),
            };
            let commit_started = Instant::now();
            let committed = self.commit(&commit, deadline).await;
            metrics
                .flush_commit_seconds
                .observe(commit_started.elapsed().as_secs_f64());
            match committed {
                Ok(()) => {
                    metrics.flushes.with_label_values(&["committed"]).inc();
                    debug!(object = %key, partitions = partitions.len(), elapsed_ms = started.elapsed().as_millis() as u64, "write-ahead object committed");
                    for (k, p) in &partitions {
                        let _ = p.notify.send(FlushNotice::Flushed {
                            gen: p.gen,
                            range: ranges[k].clone(),
                        });
                    }
                    break;
                }
                Err(MetaError::Fenced(keys)) => {
                    // Those partitions have a newer owner: drop them and commit the rest
                    // (their bytes in this object are never referenced).
                    let fenced: Vec<_> = keys
                        .iter()
                        .filter_map(|k| partitions.shift_remove_entry(k))
                        .collect();
                    if fenced.is_empty() {
                        warn!("write-ahead commit fenced without naming a partition of this flush");
                        metrics.flushes.with_label_values(&["commit_failed"]).inc();
                        self.abandon(partitions.drain(..), false, false);
                        break;
                    }
                    self.abandon(fenced.into_iter(), true, false);
                }
                Err(e) => {
                    warn!(error = %e, object = %key, "write-ahead commit failed past the flush timeout");
                    metrics.flushes.with_label_values(&["commit_failed"]).inc();
                    // An attempt may have committed before its connection broke.
                    self.abandon(partitions.drain(..), false, true);
                    break;
                }
            }
        }
        let _ = turn.send(());
    }

    /// Writes the object, retrying until the deadline (the store recognises an earlier
    /// attempt that landed).
    async fn write(
        &self,
        key: &object_store::path::Path,
        payload: object_store::PutPayload,
        deadline: Instant,
    ) -> bool {
        match self
            .store
            .put_new(key, payload, Some(deadline.into_std()))
            .await
        {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, object = %key, "write-ahead object write failed past the flush timeout");
                false
            }
        }
    }

    /// Tells the owners their batches are abandoned and remembers the generation so
    /// later flushes and the buffer drop the rest of it.
    fn abandon(
        &self,
        parts: impl Iterator<Item = (PartitionKey, Pending)>,
        fenced: bool,
        uncertain: bool,
    ) {
        let mut abandoned = self.abandoned.lock().expect("abandoned lock poisoned");
        for (k, p) in parts {
            let live = abandoned.entry(k).or_insert(0);
            *live = (*live).max(p.gen + 1);
            let _ = p.notify.send(FlushNotice::Failed {
                gen: p.gen,
                fenced,
                uncertain,
            });
        }
    }

    /// Commits, retrying a metadata store that is unavailable until the deadline.
    async fn commit(&self, commit: &WalCommit, deadline: Instant) -> Result<(), MetaError> {
        let mut attempt = 0;
        loop {
            match self.meta.commit_wal(commit).await {
                Err(e) if e.is_retriable() && Instant::now() < deadline => {
                    attempt += 1;
                    warn!(error = %e, attempt, "write-ahead commit failed; retrying");
                    tokio::time::sleep(tiering::store::backoff(attempt)).await;
                }
                other => return other,
            }
        }
    }
}

/// Records the time since the previous flush started (none before the first).
fn observe_interval(previous: Option<Instant>) {
    if let Some(previous) = previous {
        crate::metrics::metrics()
            .flush_interval_seconds
            .observe(previous.elapsed().as_secs_f64());
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Deletes write-ahead objects that no partition range references any more.
pub async fn collect_garbage(
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
