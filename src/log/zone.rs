//! Zone-local reads (KIP-392 follower fetching): a broker serves committed data of
//! partitions another broker owns to clients in its own zone, so consumer bytes never
//! cross zones.
//!
//! Every byte a consumer reads is already in object storage once it is committed, so
//! any broker can serve it: this one reads the partition's manifest (sealed segments,
//! then the write-ahead ranges after them, and the high watermark) from the metadata
//! store without claiming anything, and the bytes through its own block cache. The
//! owner sends clients here with Fetch's `preferred_read_replica` when their
//! `client.rack` names this broker's zone. A manifest is re-read at most every
//! `zone.reads.refresh.ms`, which bounds how far behind the owner's high watermark this
//! broker's answers can be.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tiering::BlockCache;
use tracing::debug;

use super::read::{read_remote, read_wal_range, IndexCache, ReadError, ReadResult};
use crate::metadata::{MetaError, MetadataStore, PartitionKey, PartitionState};

/// Manifests of partitions read for zone-local clients, re-read when stale.
#[derive(Debug)]
pub(crate) struct ZoneReads {
    meta: Arc<dyn MetadataStore>,
    refresh: Duration,
    manifests: Mutex<HashMap<PartitionKey, (Instant, Arc<PartitionState>)>>,
    capacity: usize,
}

/// Why a zone-local read could not be answered with data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ZoneReadError {
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The offset is committed at the owner but not yet in the manifest read here:
    /// Kafka's OFFSET_NOT_AVAILABLE, which clients retry.
    #[error("offset not yet visible to this broker")]
    NotYetVisible,
}

impl ZoneReads {
    pub(crate) fn new(
        meta: Arc<dyn MetadataStore>,
        refresh: Duration,
        capacity: usize,
    ) -> ZoneReads {
        ZoneReads {
            meta,
            refresh,
            manifests: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// Manifests kept now (at most `index.cache.entries`).
    pub(crate) fn entries(&self) -> usize {
        self.manifests.lock().expect("manifest lock poisoned").len()
    }

    pub(crate) fn refresh_interval(&self) -> Duration {
        self.refresh
    }

    /// The partition's manifest: the cached one while younger than the refresh
    /// interval, otherwise (or with `fresh`) read again.
    async fn manifest(
        &self,
        key: PartitionKey,
        fresh: bool,
    ) -> Result<Arc<PartitionState>, ReadError> {
        if !fresh {
            let cached = self
                .manifests
                .lock()
                .expect("manifest lock poisoned")
                .get(&key)
                .filter(|(at, _)| at.elapsed() < self.refresh)
                .map(|(_, s)| s.clone());
            if let Some(state) = cached {
                return Ok(state);
            }
        }
        let state = match self.meta.read_partition(key).await {
            Ok(s) => Arc::new(s),
            Err(MetaError::PartitionNotFound) => return Err(ReadError::OffsetOutOfRange),
            Err(e) => return Err(ReadError::Storage(e.to_string())),
        };
        let mut manifests = self.manifests.lock().expect("manifest lock poisoned");
        if manifests.len() >= self.capacity {
            manifests.clear();
        }
        manifests.insert(key, (crate::clock::instant(), state.clone()));
        Ok(state)
    }

    fn forget(&self, key: PartitionKey) {
        self.manifests
            .lock()
            .expect("manifest lock poisoned")
            .remove(&key);
    }

    /// Reads whole batches from `offset`, up to `max_bytes` (the first batch whole), of
    /// a partition this broker does not own, never past its committed high watermark.
    pub(crate) async fn read(
        &self,
        key: PartitionKey,
        blocks: &Arc<BlockCache>,
        indexes: &IndexCache,
        offset: i64,
        max_bytes: u64,
    ) -> Result<ReadResult, ZoneReadError> {
        let state = self.manifest(key, false).await?;
        match self
            .read_in(key, state, blocks, indexes, offset, max_bytes)
            .await
        {
            // A segment of the cached manifest that is gone: a compaction pass replaced
            // it (or retention deleted it) and the grace outlived by this manifest's age
            // has passed. The fresh manifest names what replaced it.
            Err(ZoneReadError::Read(ReadError::Storage(e))) => {
                debug!(topic_id = %key.topic_id, partition = key.partition, error = %e, "zone read failed; retrying with a fresh manifest");
                let state = self.manifest(key, true).await?;
                self.read_in(key, state, blocks, indexes, offset, max_bytes)
                    .await
            }
            other => other,
        }
    }

    /// [`ZoneReads::read`] against one manifest (re-read once if `offset` is past it).
    async fn read_in(
        &self,
        key: PartitionKey,
        mut state: Arc<PartitionState>,
        blocks: &Arc<BlockCache>,
        indexes: &IndexCache,
        offset: i64,
        max_bytes: u64,
    ) -> Result<ReadResult, ZoneReadError> {
        if offset > state.high_watermark {
            state = self.manifest(key, true).await?;
            if offset > state.high_watermark {
                return Err(ZoneReadError::NotYetVisible);
            }
        }
        if offset < state.log_start_offset {
            return Err(ReadError::OffsetOutOfRange.into());
        }
        let records = if offset == state.high_watermark {
            Bytes::new()
        } else if let Some(seg) = state
            .segments
            .iter()
            .find(|s| offset >= s.base_offset && offset < s.end_offset)
        {
            read_remote(blocks, indexes, seg, offset, max_bytes).await?
        } else if let Some(range) = state
            .wal_ranges
            .iter()
            .find(|r| offset >= r.base_offset && offset < r.end_offset)
        {
            read_wal_range(blocks, range, offset, max_bytes).await?
        } else {
            // Below the high watermark yet in neither list: a manifest caught between a
            // seal and the next read. Read it afresh next time; the client retries.
            self.forget(key);
            return Err(ZoneReadError::NotYetVisible);
        };
        // The owner's last stable offset, from the same manifest: the oldest open
        // transaction's first offset among the committed producer states.
        let first_unstable = state
            .producers
            .iter()
            .map(|p| p.txn_first_offset)
            .filter(|o| *o >= 0)
            .min();
        Ok(ReadResult {
            records,
            high_watermark: state.high_watermark,
            log_start_offset: state.log_start_offset,
            last_stable_offset: first_unstable
                .map_or(state.high_watermark, |o| o.min(state.high_watermark)),
            offset,
            aborted: Arc::new(state.aborted.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::batch::{stamp, tests::make_batch};
    use crate::metadata::sqlite::SqliteStore;
    use crate::metadata::{conformance, SegmentRecord};
    use object_store::path::Path;

    const TS: i64 = 1_700_000_000_000;

    /// Writes a segment object of one batch of `count` records at `base`.
    async fn put_segment(
        store: &tiering::Store,
        key: &str,
        base: i64,
        count: i32,
    ) -> SegmentRecord {
        let batch = stamp(&make_batch(count, -1, -1, -1, TS), base, 0);
        let data_bytes = batch.len() as u64;
        let end = base + i64::from(count);
        let contents = crate::log::tail::check_segment(std::slice::from_ref(&batch), base, end)
            .expect("a valid segment");
        let (payload, _) = tiering::build_segment_object(vec![batch], &contents.entries, 4096);
        let size_bytes = payload.content_length() as u64;
        store
            .put_new(&Path::from(key), payload, None)
            .await
            .expect("put");
        SegmentRecord {
            base_offset: base,
            end_offset: end,
            object_key: key.to_owned(),
            size_bytes,
            data_bytes,
            max_timestamp: TS,
            created_ms: TS,
            compacted_ms: 0,
        }
    }

    /// Reads from offset 0 through an empty block cache and index cache (so the read
    /// reaches the store).
    async fn read_cold(
        zone: &ZoneReads,
        objects: &Arc<tiering::Store>,
        key: PartitionKey,
    ) -> Result<ReadResult, ZoneReadError> {
        let options = tiering::CacheOptions {
            memory_bytes: 1 << 20,
            disk_bytes: 0,
            dir: std::env::temp_dir(),
            block_bytes: 64 * 1024,
            readahead_blocks: 0,
        };
        let blocks = BlockCache::open(objects.clone(), &options, None)
            .await
            .expect("cache");
        zone.read(key, &blocks, &IndexCache::new(16), 0, 1 << 20)
            .await
    }

    /// A pass replaced the segment a cached manifest names and its grace ran out: the
    /// read does not fail, it re-reads the manifest and serves the replacement.
    #[tokio::test]
    async fn a_segment_replaced_and_deleted_under_a_cached_manifest_is_read_from_its_replacement() {
        let meta = Arc::new(SqliteStore::open_in_memory().expect("metadata"));
        let topic = conformance::new_topic(&*meta, 1).await;
        let key = conformance::key(&topic, 0);
        let epoch = meta
            .claim_partition(key, 1)
            .await
            .expect("claim")
            .leader_epoch;
        conformance::commit_one(&*meta, key, epoch, 0, 5).await;
        let objects = Arc::new(
            tiering::Store::open("memory://", &tiering::StoreOptions::default()).expect("store"),
        );
        let old = put_segment(&objects, "segments/p/0-1.seg", 0, 5).await;
        meta.commit_segment(key, epoch, &old)
            .await
            .expect("segment");

        let zone = ZoneReads::new(meta.clone(), Duration::from_secs(3600), 16);
        let read = read_cold(&zone, &objects, key)
            .await
            .expect("read through a fresh manifest");
        assert!(!read.records.is_empty());

        // The owner swaps in a rewritten segment and deletes the old object; this
        // broker's manifest (cached for an hour) still names the old one.
        let new = SegmentRecord {
            compacted_ms: TS + 1,
            ..put_segment(&objects, "segments/p/0-1-c1.seg", 0, 5).await
        };
        meta.replace_segments(key, epoch, &[0], std::slice::from_ref(&new))
            .await
            .expect("swap");
        objects
            .delete(&Path::from(old.object_key.as_str()))
            .await
            .expect("delete");

        let read = read_cold(&zone, &objects, key)
            .await
            .expect("read after the swap");
        assert_eq!(read.records.len() as u64, new.data_bytes);
        assert_eq!(read.high_watermark, 5);
    }
}
