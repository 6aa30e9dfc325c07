//! The write-ahead flusher: one per broker, the only writer of write-ahead objects.
//!
//! Partition owner tasks hand it stamped batches. Every `wal.flush.interval.ms` (or once
//! `wal.flush.bytes` are pending) it writes ONE object holding the new batches of every
//! partition, then commits all their offset ranges in ONE metadata transaction, and only
//! then tells each partition how far it is durable. Flushes start at most once per
//! interval (measured from the previous flush's start), so a lone batch after a quiet
//! spell is written at once while a busy broker still writes one object per interval. Object-store requests therefore grow
//! with time, not with the number of partitions. One flush is in flight at a time while
//! the next one fills, so commits reach the metadata store in offset order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use indexmap::IndexMap;
use object_store::ObjectStore;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::clock::now_ms;
use crate::log::partition::Notice;
use crate::metadata::{
    MetaError, MetadataStore, PartitionCommit, PartitionKey, ProducerStateRecord, WalCommit,
    WalRangeRecord,
};

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
    pub notify: mpsc::UnboundedSender<Notice>,
}

#[derive(Debug, Clone)]
pub struct FlusherConfig {
    pub broker_id: i32,
    pub session: i64,
    pub interval: Duration,
    pub max_bytes: usize,
    pub timeout: Duration,
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
    notify: mpsc::UnboundedSender<Notice>,
}

#[derive(Default)]
struct Buffer {
    partitions: IndexMap<PartitionKey, Pending>,
    bytes: usize,
    opened: Option<Instant>,
}

/// A flush running in its own task; yields the worker back with the partitions whose
/// batches it abandoned (and their generation).
type FlushTask = tokio::task::JoinHandle<(Flusher, Vec<(PartitionKey, u64)>)>;

pub struct Flusher {
    config: FlusherConfig,
    store: Arc<dyn ObjectStore>,
    meta: Arc<dyn MetadataStore>,
    seq: u64,
    /// Lowest live generation per partition, after a failed flush abandoned older ones.
    min_gen: HashMap<PartitionKey, u64>,
}

impl Flusher {
    pub fn new(
        config: FlusherConfig,
        store: Arc<dyn ObjectStore>,
        meta: Arc<dyn MetadataStore>,
    ) -> Self {
        Flusher {
            config,
            store,
            meta,
            seq: 0,
            min_gen: HashMap::new(),
        }
    }

    /// Runs until every sender is dropped, flushing what is left at the end.
    pub async fn run(mut self, mut rx: mpsc::Receiver<FlushItem>) {
        let mut buffer = Buffer::default();
        let mut in_flight: Option<FlushTask> = None;
        let mut open = true;
        // Flushes start at most once per interval: a batch arriving after a quiet spell
        // goes out at once, and under load each flush carries one interval's worth.
        let mut last_flush: Option<Instant> = None;
        loop {
            let deadline = buffer.opened.map(|opened| {
                last_flush.map_or(opened, |t| (t + self.config.interval).max(opened))
            });
            let due =
                buffer.bytes >= self.config.max_bytes || (!open && !buffer.partitions.is_empty());
            if in_flight.is_none() && due {
                last_flush = Some(Instant::now());
                in_flight = Some(self.spawn_flush(&mut buffer));
                continue;
            }
            if !open && buffer.partitions.is_empty() && in_flight.is_none() {
                return;
            }
            tokio::select! {
                item = rx.recv(), if open && buffer.bytes < self.config.max_bytes => match item {
                    Some(item) => self.add(&mut buffer, item),
                    None => open = false,
                },
                _ = sleep_until(deadline), if in_flight.is_none() && deadline.is_some() => {
                    last_flush = Some(Instant::now());
                    in_flight = Some(self.spawn_flush(&mut buffer));
                }
                done = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                    in_flight = None;
                    match done {
                        Ok((flusher, failed)) => {
                            self.seq = flusher.seq;
                            for (key, gen) in failed {
                                self.min_gen.insert(key, gen + 1);
                                // Items of the abandoned generation already buffered go too.
                                if buffer.partitions.get(&key).is_some_and(|p| p.gen <= gen) {
                                    if let Some(p) = buffer.partitions.shift_remove(&key) {
                                        buffer.bytes -= p.data.iter().map(Bytes::len).sum::<usize>();
                                    }
                                }
                            }
                            if buffer.partitions.is_empty() {
                                buffer.opened = None;
                            }
                        }
                        Err(e) => warn!(error = %e, "write-ahead flush task panicked"),
                    }
                }
            }
        }
    }

    fn add(&mut self, buffer: &mut Buffer, item: FlushItem) {
        if self.min_gen.get(&item.key).is_some_and(|&g| item.gen < g) {
            return;
        }
        buffer.bytes += item.batch.len();
        buffer.opened.get_or_insert_with(Instant::now);
        let p = buffer
            .partitions
            .entry(item.key)
            .or_insert_with(|| Pending {
                stream: item.stream.clone(),
                leader_epoch: item.leader_epoch,
                gen: item.gen,
                base_offset: item.base_offset,
                end_offset: item.base_offset,
                max_timestamp: -1,
                data: Vec::new(),
                producers: IndexMap::new(),
                notify: item.notify.clone(),
            });
        if p.gen != item.gen {
            // The owner abandoned the older batches (a failed flush we have not seen the
            // end of yet); start over from the new generation.
            buffer.bytes -= p.data.iter().map(Bytes::len).sum::<usize>();
            *p = Pending {
                stream: item.stream.clone(),
                leader_epoch: item.leader_epoch,
                gen: item.gen,
                base_offset: item.base_offset,
                end_offset: item.base_offset,
                max_timestamp: -1,
                data: Vec::new(),
                producers: IndexMap::new(),
                notify: item.notify.clone(),
            };
        }
        debug_assert_eq!(
            p.end_offset, item.base_offset,
            "batches of a partition arrive in offset order"
        );
        p.end_offset = item.end_offset;
        p.max_timestamp = p.max_timestamp.max(item.max_timestamp);
        p.data.push(item.batch);
        if let Some(state) = item.producer {
            p.producers.insert(state.producer_id, state);
        }
    }

    /// Takes the filled buffer and flushes it in its own task. The flusher state the task
    /// needs (object sequence) travels with it and comes back when it is done.
    fn spawn_flush(&mut self, buffer: &mut Buffer) -> FlushTask {
        let taken = std::mem::take(buffer);
        let mut worker = Flusher {
            config: self.config.clone(),
            store: self.store.clone(),
            meta: self.meta.clone(),
            seq: self.seq,
            min_gen: HashMap::new(),
        };
        self.seq += 1;
        tokio::spawn(async move {
            let failed = worker.flush(taken.partitions).await;
            (worker, failed)
        })
    }

    /// Writes and commits one write-ahead object; returns the partitions whose batches
    /// were abandoned (with their generation).
    async fn flush(
        &mut self,
        mut partitions: IndexMap<PartitionKey, Pending>,
    ) -> Vec<(PartitionKey, u64)> {
        if partitions.is_empty() {
            return Vec::new();
        }
        let started = Instant::now();
        let deadline = started + self.config.timeout;
        let mut failed = Vec::new();
        loop {
            let seq = self.seq;
            self.seq += 1;
            let key =
                tiering::keys::wal_object_key(self.config.broker_id, self.config.session, seq);
            let chunks = partitions
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
            let size = payload.content_length();
            if let Err(e) = tiering::store::put_new(self.store.as_ref(), &key, payload).await {
                if Instant::now() >= deadline {
                    warn!(error = %e, "write-ahead object write failed past the flush timeout");
                    break;
                }
                warn!(error = %e, object = %key, "write-ahead object write failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let commit = WalCommit {
                object_key: key.to_string(),
                created_ms: now_ms(),
                partitions: partitions
                    .iter()
                    .zip(&locations)
                    .map(|((k, p), loc)| PartitionCommit {
                        key: *k,
                        leader_epoch: p.leader_epoch,
                        range: WalRangeRecord {
                            base_offset: p.base_offset,
                            end_offset: p.end_offset,
                            object_key: key.to_string(),
                            position: loc.position,
                            len: loc.len,
                            max_timestamp: p.max_timestamp,
                        },
                        producers: p.producers.values().cloned().collect(),
                    })
                    .collect(),
            };
            match self.commit(&commit, deadline).await {
                Ok(()) => {
                    debug!(object = %key, bytes = size, partitions = partitions.len(), elapsed_ms = started.elapsed().as_millis() as u64, "write-ahead object committed");
                    for p in partitions.values() {
                        let _ = p.notify.send(Notice::Flushed {
                            gen: p.gen,
                            end_offset: p.end_offset,
                        });
                    }
                    return failed;
                }
                Err(MetaError::Fenced(keys)) => {
                    // Those partitions have a newer owner: drop them, write the rest again
                    // (the unreferenced object is garbage-collected later).
                    for k in keys {
                        if let Some(p) = partitions.shift_remove(&k) {
                            let _ = p.notify.send(Notice::FlushFailed {
                                gen: p.gen,
                                fenced: true,
                            });
                            failed.push((k, p.gen));
                        }
                    }
                    if partitions.is_empty() {
                        return failed;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "write-ahead commit failed past the flush timeout");
                    break;
                }
            }
        }
        for (k, p) in partitions {
            let _ = p.notify.send(Notice::FlushFailed {
                gen: p.gen,
                fenced: false,
            });
            failed.push((k, p.gen));
        }
        failed
    }

    /// Commits, retrying a metadata store that is unavailable until the deadline.
    async fn commit(&self, commit: &WalCommit, deadline: Instant) -> Result<(), MetaError> {
        loop {
            match self.meta.commit_wal(commit).await {
                Err(MetaError::Unavailable(e)) if Instant::now() < deadline => {
                    warn!(error = %e, "write-ahead commit failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
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
    store: &dyn ObjectStore,
    meta: &dyn MetadataStore,
) -> Result<usize, anyhow::Error> {
    let keys = meta.unreferenced_wal_objects().await?;
    if keys.is_empty() {
        return Ok(0);
    }
    for key in &keys {
        tiering::store::delete(store, &object_store::path::Path::from(key.as_str())).await?;
    }
    meta.forget_wal_objects(&keys).await?;
    Ok(keys.len())
}
