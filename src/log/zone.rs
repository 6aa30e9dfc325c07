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
        let mut state = self.manifest(key, false).await?;
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
        Ok(ReadResult {
            records,
            high_watermark: state.high_watermark,
            log_start_offset: state.log_start_offset,
        })
    }
}
