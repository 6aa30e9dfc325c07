//! The block cache: object-store bytes kept in memory and on the local NVMe disk, so
//! reads of data that left the broker's local segments cost no request, and replay of
//! old data costs one ranged GET per block.
//!
//! Objects are immutable and their keys are never reused (segment keys carry the
//! topic id), so a cached block never goes stale and the disk tier is kept across
//! restarts. The cache is a `foyer` hybrid cache keyed by object and block index:
//! * concurrent misses of one block share one GET (foyer's `get_or_fetch`);
//! * a read that misses starts read-ahead of the following blocks of the same object
//!   under the store's [`Class::Replay`] limit, so sequential replay keeps several
//!   ranged GETs in flight while reads of other data never queue behind it;
//! * segments are written through at upload: data that was just sealed is still hot;
//! * disk writes can be switched off ([`BlockCache::set_disk_writes`]) while the local
//!   disk is full: the disk tier then admits nothing and the cache runs from memory
//!   (and the blocks already on disk) until writes are switched back on.
//!
//! Hits, misses, bytes by source, read-ahead and evictions are metrics here; foyer's
//! own metrics join the same registry.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use foyer::{
    BlockEngineConfig, DeviceBuilder, Event, EventListener, FsDeviceBuilder, HybridCache,
    HybridCacheBuilder, HybridCachePolicy, RecoverMode, Statistics, StorageFilter,
    StorageFilterCondition, StorageFilterResult,
};
use object_store::path::Path;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::store::{Class, Store};
use crate::Error;

/// Sizes and behaviour of the cache.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Bytes of blocks kept in memory.
    pub memory_bytes: usize,
    /// Bytes of blocks kept on local disk under `dir`; 0 keeps the cache in memory only.
    pub disk_bytes: usize,
    /// Directory of the disk tier.
    pub dir: PathBuf,
    /// Size of one cached block (and of one GET on a miss).
    pub block_bytes: u64,
    /// Blocks read ahead after a miss.
    pub readahead_blocks: u64,
}

/// Object-store blocks in memory and on disk. See the module docs.
pub struct BlockCache {
    cache: HybridCache<String, Bytes>,
    store: Arc<Store>,
    block: u64,
    readahead: u64,
    metrics: CacheMetrics,
    /// Whether the disk tier may take blocks (off while the local disk is full).
    disk_writes: Arc<AtomicBool>,
}

/// The disk tier's admission rule: nothing is written while disk writes are off.
#[derive(Debug)]
struct DiskWritesGate(Arc<AtomicBool>);

impl StorageFilterCondition for DiskWritesGate {
    fn filter(&self, _: &Arc<Statistics>, _: u64, _: usize) -> StorageFilterResult {
        if self.0.load(Ordering::Acquire) {
            StorageFilterResult::Admit
        } else {
            StorageFilterResult::Reject
        }
    }
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache")
            .field("block", &self.block)
            .finish()
    }
}

#[derive(Clone)]
struct CacheMetrics {
    lookups: IntCounterVec,
    bytes: IntCounterVec,
    readahead: IntCounter,
    evictions: IntCounter,
    memory_used: IntGauge,
    memory_capacity: IntGauge,
    disk_capacity: IntGauge,
}

impl CacheMetrics {
    fn new() -> Self {
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        CacheMetrics {
            lookups: IntCounterVec::new(
                Opts::new(
                    "strata_cache_lookups_total",
                    "block cache lookups by result (hit, miss)",
                ),
                &["result"],
            )
            .expect("valid metric"),
            bytes: IntCounterVec::new(
                Opts::new(
                    "strata_cache_read_bytes_total",
                    "bytes served through the block cache by source (cache, store)",
                ),
                &["source"],
            )
            .expect("valid metric"),
            readahead: counter(
                "strata_cache_readahead_blocks_total",
                "blocks fetched ahead of sequential reads",
            ),
            evictions: counter(
                "strata_cache_evictions_total",
                "blocks evicted from the memory tier",
            ),
            memory_used: gauge("strata_cache_memory_bytes", "bytes held by the memory tier"),
            memory_capacity: gauge(
                "strata_cache_memory_capacity_bytes",
                "capacity of the memory tier",
            ),
            disk_capacity: gauge(
                "strata_cache_disk_capacity_bytes",
                "capacity of the disk tier (0: memory only)",
            ),
        }
    }

    fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        // Every label value at zero from the start, so dashboards have series at once.
        for result in ["hit", "miss"] {
            self.lookups.with_label_values(&[result]);
        }
        for source in ["cache", "store"] {
            self.bytes.with_label_values(&[source]);
        }
        registry.register(Box::new(self.lookups.clone()))?;
        registry.register(Box::new(self.bytes.clone()))?;
        registry.register(Box::new(self.readahead.clone()))?;
        registry.register(Box::new(self.evictions.clone()))?;
        registry.register(Box::new(self.memory_used.clone()))?;
        registry.register(Box::new(self.memory_capacity.clone()))?;
        registry.register(Box::new(self.disk_capacity.clone()))?;
        Ok(())
    }
}

struct Evictions(IntCounter);

impl EventListener for Evictions {
    type Key = String;
    type Value = Bytes;

    fn on_leave(&self, reason: Event, _key: &String, _value: &Bytes) {
        if matches!(reason, Event::Evict) {
            self.0.inc();
        }
    }
}

fn cache_error(e: impl std::fmt::Display) -> Error {
    Error::Cache(e.to_string())
}

impl BlockCache {
    /// Builds the cache over `store`. With a registry, the cache's metrics and foyer's
    /// own are registered in it (once per process: a second cache is not registered).
    pub async fn open(
        store: Arc<Store>,
        options: &CacheOptions,
        registry: Option<&Registry>,
    ) -> Result<Arc<BlockCache>, Error> {
        let metrics = CacheMetrics::new();
        let disk_writes = Arc::new(AtomicBool::new(true));
        let mut builder = HybridCacheBuilder::new()
            .with_name("strata-blocks")
            // Blocks reach the disk tier when the memory tier evicts them: a hit in
            // memory never rewrites its block on disk.
            .with_policy(HybridCachePolicy::WriteOnEviction)
            .with_event_listener(Arc::new(Evictions(metrics.evictions.clone())));
        if let Some(registry) = registry {
            if metrics.register(registry).is_ok() {
                builder = builder.with_metrics_registry(Box::new(
                    mixtrics::registry::prometheus_0_14::PrometheusMetricsRegistry::new(
                        registry.clone(),
                    ),
                ));
            }
        }
        let storage = builder
            .memory(options.memory_bytes.max(1))
            // Each shard evicts on its own share of the capacity: keep a shard at 16
            // blocks or more, or a small cache would hold a block per shard regardless.
            .with_shards(shards(options.memory_bytes, options.block_bytes))
            .with_weighter(|key: &String, value: &Bytes| key.len() + value.len())
            .storage();
        let cache = if options.disk_bytes > 0 {
            std::fs::create_dir_all(&options.dir).map_err(|source| Error::CreateDir {
                path: options.dir.clone(),
                source,
            })?;
            let device = FsDeviceBuilder::new(&options.dir)
                .with_capacity(options.disk_bytes)
                .build()
                .map_err(cache_error)?;
            storage
                .with_engine_config(
                    BlockEngineConfig::new(device)
                        .with_block_size(block_engine_block(options.block_bytes))
                        // Room for a burst of evictions before disk writes are dropped.
                        .with_buffer_pool_size(block_engine_block(options.block_bytes) * 4)
                        .with_admission_filter(
                            StorageFilter::new()
                                .with_condition(DiskWritesGate(disk_writes.clone())),
                        ),
                )
                .with_recover_mode(RecoverMode::Quiet)
                .build()
                .await
                .map_err(cache_error)?
        } else {
            storage.build().await.map_err(cache_error)?
        };
        metrics.memory_capacity.set(options.memory_bytes as i64);
        metrics.disk_capacity.set(options.disk_bytes as i64);
        Ok(Arc::new(BlockCache {
            cache,
            store,
            block: options.block_bytes.max(4096),
            readahead: options.readahead_blocks,
            metrics,
            disk_writes,
        }))
    }

    /// Switches writes to the disk tier on or off (off while the local disk is full).
    /// Reads of blocks already on disk go on either way.
    pub fn set_disk_writes(&self, enabled: bool) {
        self.disk_writes.store(enabled, Ordering::Release);
    }

    /// Whether the disk tier takes new blocks.
    pub fn disk_writes(&self) -> bool {
        self.disk_writes.load(Ordering::Acquire)
    }

    /// The end of the cache block holding byte `position`: reads that stop there are
    /// served as slices of one block, without copying.
    pub fn block_end(&self, position: u64) -> u64 {
        (position / self.block + 1) * self.block
    }

    fn cache_key(key: &str, block: u64) -> String {
        format!("{key}#{block}")
    }

    fn block_range(&self, size: u64, block: u64) -> Range<u64> {
        block * self.block..((block + 1) * self.block).min(size)
    }

    /// Reads `range` of the object `key`, whose whole size is `size`, through the
    /// cache. The end is clamped to the object's size.
    pub async fn read(
        self: &Arc<Self>,
        key: &str,
        size: u64,
        range: Range<u64>,
    ) -> Result<Bytes, Error> {
        let range = range.start..range.end.min(size);
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        let first = range.start / self.block;
        let last = (range.end - 1) / self.block;
        let mut missed = false;
        let blocks = futures::future::try_join_all(
            (first..=last).map(|i| self.block(key, size, i, Class::Read)),
        )
        .await?;
        for (_, miss) in &blocks {
            missed |= *miss;
        }
        // Keep the next blocks coming for a sequential reader, whether this read hit
        // (a block read ahead earlier) or missed; cached blocks cost nothing here.
        self.read_ahead(key, size, last + 1, missed);
        self.metrics
            .memory_used
            .set(self.cache.memory().usage() as i64);
        let offset = (range.start - first * self.block) as usize;
        let len = (range.end - range.start) as usize;
        if blocks.len() == 1 {
            return Ok(blocks[0].0.slice(offset..offset + len));
        }
        let mut out = BytesMut::with_capacity(len);
        let mut skip = offset;
        for (b, _) in &blocks {
            let part = &b[skip.min(b.len())..];
            skip = 0;
            let want = (len - out.len()).min(part.len());
            out.extend_from_slice(&part[..want]);
        }
        Ok(out.freeze())
    }

    /// Reads `range` of the object `key`, whose size is not known, straight from the
    /// store (one ranged GET, not cached).
    pub async fn read_uncached(&self, key: &str, range: Range<u64>) -> Result<Bytes, Error> {
        self.store
            .get_range(&Path::from(key), range, Class::Read, None)
            .await
    }

    /// One block, from the cache or the store; `true` if it came from the store.
    async fn block(
        &self,
        key: &str,
        size: u64,
        block: u64,
        class: Class,
    ) -> Result<(Bytes, bool), Error> {
        let ck = Self::cache_key(key, block);
        let range = self.block_range(size, block);
        let fetched = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let store = self.store.clone();
        let path = Path::from(key);
        let flag = fetched.clone();
        let entry = self
            .cache
            .get_or_fetch(&ck, move || async move {
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
                store
                    .get_range(&path, range, class, None)
                    .await
                    .map_err(anyhow::Error::from)
            })
            .await
            .map_err(cache_error)?;
        let value = entry.value().clone();
        let miss = fetched.load(std::sync::atomic::Ordering::Relaxed);
        let (result, source) = if miss {
            ("miss", "store")
        } else {
            ("hit", "cache")
        };
        self.metrics.lookups.with_label_values(&[result]).inc();
        self.metrics
            .bytes
            .with_label_values(&[source])
            .inc_by(value.len() as u64);
        Ok((value, miss))
    }

    /// Starts background fetches of the next blocks that are not cached yet: all of
    /// the read-ahead window after a miss, its far end after a hit (the rest was
    /// requested when the reader was further back).
    fn read_ahead(self: &Arc<Self>, key: &str, size: u64, from: u64, missed: bool) {
        let blocks = size.div_ceil(self.block);
        let start = if missed {
            from
        } else {
            from + self.readahead.saturating_sub(1)
        };
        for i in start..(from + self.readahead).min(blocks) {
            if self.cache.contains(&Self::cache_key(key, i)) {
                continue;
            }
            self.metrics.readahead.inc();
            let this = self.clone();
            let key = key.to_owned();
            tokio::spawn(async move {
                if let Err(e) = this.block(&key, size, i, Class::Replay).await {
                    tracing::debug!(%key, block = i, error = %e, "read-ahead failed");
                }
            });
        }
    }

    /// Writes an object just uploaded into the cache: `parts` are its bytes in order
    /// (whole blocks are sliced without copying; a block spanning two parts is joined).
    pub fn insert_object(&self, key: &str, parts: &[Bytes]) {
        let size: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let mut pending = BytesMut::new();
        let mut block = 0u64;
        let mut part_start = 0u64;
        for part in parts {
            let mut pos = 0usize;
            while pos < part.len() {
                let range = self.block_range(size, block);
                let want = (range.end - range.start) as usize - pending.len();
                let take = want.min(part.len() - pos);
                if pending.is_empty() && take == want {
                    self.cache
                        .insert(Self::cache_key(key, block), part.slice(pos..pos + take));
                } else {
                    pending.extend_from_slice(&part[pos..pos + take]);
                    if pending.len() as u64 == range.end - range.start {
                        self.cache
                            .insert(Self::cache_key(key, block), pending.split().freeze());
                    }
                }
                pos += take;
                if pending.is_empty() {
                    block += 1;
                }
            }
            part_start += part.len() as u64;
        }
        debug_assert_eq!(part_start, size);
    }

    /// Drops every cached block of an object (deleted by retention or with its topic).
    pub fn forget_object(&self, key: &str, size: u64) {
        for i in 0..size.div_ceil(self.block) {
            self.cache.remove(&Self::cache_key(key, i));
        }
    }

    /// Flushes the disk tier and stops its workers.
    pub async fn close(&self) {
        if let Err(e) = self.cache.close().await {
            tracing::warn!(error = %e, "closing the block cache failed");
        }
    }
}

/// Memory-tier shards: up to 16, each large enough for 16 cache blocks.
fn shards(memory_bytes: usize, block_bytes: u64) -> usize {
    (memory_bytes / (block_bytes.max(1) as usize * 16)).clamp(1, 16)
}

/// The disk engine's block (its unit of allocation) must hold at least one cache block.
fn block_engine_block(block_bytes: u64) -> usize {
    (block_bytes as usize * 4).max(16 * 1024 * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;
    use object_store::PutPayload;

    async fn setup(disk: bool) -> (Arc<BlockCache>, Arc<Store>, tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open("memory://", &StoreOptions::default()).expect("store"));
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        store
            .put_new(&Path::from("seg/a"), PutPayload::from(data.clone()), None)
            .await
            .expect("put");
        let options = CacheOptions {
            memory_bytes: 1 << 20,
            disk_bytes: if disk { 64 << 20 } else { 0 },
            dir: dir.path().join("cache"),
            block_bytes: 8192,
            readahead_blocks: 2,
        };
        let cache = BlockCache::open(store.clone(), &options, None)
            .await
            .expect("cache");
        (cache, store, dir, data)
    }

    #[tokio::test]
    async fn reads_any_range_exactly_and_hits_the_second_time() {
        for disk in [false, true] {
            let (cache, _store, _dir, data) = setup(disk).await;
            for (a, b) in [
                (0, 10),
                (8000, 8400),
                (8192, 16384),
                (5, 99_999),
                (99_990, 200_000),
            ] {
                let got = cache
                    .read("seg/a", data.len() as u64, a..b)
                    .await
                    .expect("read");
                assert_eq!(
                    &got[..],
                    &data[a as usize..(b as usize).min(data.len())],
                    "{a}..{b}"
                );
            }
            let misses = cache.metrics.lookups.with_label_values(&["miss"]).get();
            let again = cache
                .read("seg/a", data.len() as u64, 0..data.len() as u64)
                .await;
            assert_eq!(&again.expect("read")[..], &data[..]);
            // Every block was fetched by the first pass or its read-ahead: no new GET
            // beyond the ones read-ahead may still have in flight.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let hits = cache.metrics.lookups.with_label_values(&["hit"]).get();
            assert!(hits > 0, "disk={disk}");
            assert!(
                cache.metrics.lookups.with_label_values(&["miss"]).get() <= misses + 13,
                "disk={disk}"
            );
        }
    }

    /// Bytes the disk tier's files take on disk (their allocated blocks: the files are
    /// sparse until written).
    fn allocated(dir: &std::path::Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir(dir)
            .expect("cache dir")
            .filter_map(Result::ok)
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    #[tokio::test]
    async fn nothing_reaches_the_disk_while_disk_writes_are_off() {
        for writes in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let store =
                Arc::new(Store::open("memory://", &StoreOptions::default()).expect("store"));
            let options = CacheOptions {
                // One shard of a few blocks: inserting many evicts most of them.
                memory_bytes: 256 << 10,
                disk_bytes: 64 << 20,
                dir: dir.path().join("cache"),
                block_bytes: 16 << 10,
                readahead_blocks: 0,
            };
            let cache = BlockCache::open(store, &options, None)
                .await
                .expect("cache");
            let before = allocated(&options.dir);
            cache.set_disk_writes(writes);
            assert_eq!(cache.disk_writes(), writes);
            let parts: Vec<Bytes> = (0..64u8).map(|i| Bytes::from(vec![i; 16 << 10])).collect();
            cache.insert_object("seg/evicted", &parts);
            cache.close().await;
            let after = allocated(&options.dir);
            if writes {
                assert!(
                    after > before,
                    "evicted blocks reach the disk: {before} -> {after}"
                );
            } else {
                assert_eq!(
                    after, before,
                    "no block may reach the disk while writes are off"
                );
            }
        }
    }

    #[tokio::test]
    async fn written_through_objects_need_no_get() {
        let (cache, store, _dir, data) = setup(false).await;
        let parts = [
            Bytes::copy_from_slice(&data[..50_001]),
            Bytes::copy_from_slice(&data[50_001..]),
        ];
        cache.insert_object("seg/a", &parts);
        // Delete the object: every read must now come from the cache.
        store.delete(&Path::from("seg/a")).await.expect("delete");
        let got = cache
            .read("seg/a", data.len() as u64, 40_000..60_000)
            .await
            .expect("read from cache");
        assert_eq!(&got[..], &data[40_000..60_000]);
        assert_eq!(cache.metrics.lookups.with_label_values(&["miss"]).get(), 0);
        cache.forget_object("seg/a", data.len() as u64);
        assert!(cache.read("seg/a", data.len() as u64, 0..10).await.is_err());
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_get() {
        let (cache, _store, _dir, data) = setup(false).await;
        let size = data.len() as u64;
        let reads = (0..16).map(|_| cache.read("seg/a", size, 0..100));
        for r in futures::future::join_all(reads).await {
            assert_eq!(&r.expect("read")[..], &data[..100]);
        }
        assert_eq!(cache.metrics.lookups.with_label_values(&["miss"]).get(), 1);
    }
}
