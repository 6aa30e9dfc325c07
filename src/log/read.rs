//! Reads of any retained offset: the hot tail from local segment files, older data from
//! sealed segment objects through their indexes, and what no local file holds (a tail
//! just taken over, a stretch the full disk could not take) from the write-ahead
//! objects through the block cache. Bytes go out exactly as stored, whole batches only,
//! never past the high watermark.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tiering::segment::SegmentIndex;
use tiering::BlockCache;

use super::batch::{self, BatchHeader};
use super::local::read_at;
use super::partition::PartitionShared;
use crate::metadata::{AbortedTxnRecord, SegmentRecord, WalRangeRecord};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("offset is outside the retained log")]
    OffsetOutOfRange,
    #[error("reading stored data failed: {0}")]
    Storage(String),
}

#[derive(Debug, Clone)]
pub(crate) struct ReadResult {
    pub records: Bytes,
    pub high_watermark: i64,
    pub log_start_offset: i64,
    /// Where `read_committed` consumers stop (at most the high watermark).
    pub last_stable_offset: i64,
    /// The offset the read asked for.
    pub offset: i64,
    /// The partition's aborted transactions, shared with its view: only a
    /// `read_committed` fetch looks at them ([`ReadResult::committed_only`]).
    pub aborted: Arc<Vec<AbortedTxnRecord>>,
}

impl ReadResult {
    /// What a `read_committed` consumer gets of the read: the whole batches below the
    /// last stable offset, and the aborted transactions among them (Kafka's
    /// `aborted_transactions`: those whose range meets the batches returned), so the
    /// client skips the aborted producers' batches up to each marker: those whose
    /// marker is at or after the offset asked for and whose first offset is before the
    /// end of what is returned.
    pub(crate) fn committed_only(mut self) -> (ReadResult, Vec<AbortedTxnRecord>) {
        let lso = self.last_stable_offset;
        let mut keep = 0;
        let mut upper = None;
        for (at, h) in batch::walk(&self.records) {
            if h.last_offset() >= lso {
                break;
            }
            keep = at + h.total_len;
            upper = Some(h.last_offset() + 1);
        }
        self.records.truncate(keep);
        let aborted = match upper {
            None => Vec::new(),
            Some(upper) => self
                .aborted
                .iter()
                .filter(|a| a.last_offset >= self.offset && a.first_offset < upper)
                .copied()
                .collect(),
        };
        (self, aborted)
    }
}

/// Decoded segment indexes by object key, so a segment's index is fetched once.
#[derive(Debug)]
pub(crate) struct IndexCache {
    entries: Mutex<HashMap<String, Arc<SegmentIndex>>>,
    capacity: usize,
}

impl IndexCache {
    pub(crate) fn new(capacity: usize) -> Self {
        IndexCache {
            entries: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// Indexes kept now (at most `index.cache.entries`).
    pub(crate) fn entries(&self) -> usize {
        self.entries
            .lock()
            .expect("index cache lock poisoned")
            .len()
    }

    async fn get(
        &self,
        blocks: &Arc<BlockCache>,
        seg: &SegmentRecord,
    ) -> Result<Arc<SegmentIndex>, ReadError> {
        if let Some(i) = self
            .entries
            .lock()
            .expect("index cache lock poisoned")
            .get(&seg.object_key)
        {
            return Ok(i.clone());
        }
        let bytes = blocks
            .read(
                &seg.object_key,
                seg.size_bytes,
                seg.data_bytes..seg.size_bytes,
            )
            .await
            .map_err(|e| ReadError::Storage(e.to_string()))?;
        let index =
            Arc::new(SegmentIndex::decode(&bytes).map_err(|e| ReadError::Storage(e.to_string()))?);
        let mut entries = self.entries.lock().expect("index cache lock poisoned");
        if entries.len() >= self.capacity {
            // Indexes are small and cheap to refetch: dropping all keeps this bounded simply.
            entries.clear();
        }
        entries.insert(seg.object_key.clone(), index.clone());
        Ok(index)
    }
}

enum Plan {
    Empty,
    Local {
        file: Arc<std::fs::File>,
        pos: u64,
        len: u64,
    },
    Remote(SegmentRecord),
    WriteAhead(WalRangeRecord),
}

/// Reads whole batches starting with the one holding `offset`, up to `max_bytes` (the
/// first batch is returned whole even when larger, as Kafka does).
pub(crate) async fn read(
    part: &PartitionShared,
    blocks: &Arc<BlockCache>,
    indexes: &IndexCache,
    offset: i64,
    max_bytes: u64,
) -> Result<ReadResult, ReadError> {
    let hw = part.high_watermark();
    let (log_start, lso, aborted, plan) = {
        let view = part.view();
        if offset < view.segments.log_start_offset() || offset > hw {
            return Err(ReadError::OffsetOutOfRange);
        }
        let plan = if offset == hw {
            Plan::Empty
        } else if let Some(seg) = view
            .segments
            .local()
            .iter()
            .find(|s| offset >= s.base_offset && offset < s.end_offset)
        {
            match seg.range_for(offset, max_bytes) {
                Some((pos, len)) => Plan::Local {
                    file: seg.file.clone(),
                    pos,
                    len,
                },
                None => Plan::Empty,
            }
        } else if let Some(seg) = view
            .segments
            .remote()
            .iter()
            .find(|s| offset >= s.base_offset && offset < s.end_offset)
        {
            Plan::Remote(seg.clone())
        } else if let Some(range) = view
            .segments
            .wal()
            .iter()
            .find(|r| offset >= r.base_offset && offset < r.end_offset)
        {
            Plan::WriteAhead(range.clone())
        } else {
            return Err(ReadError::OffsetOutOfRange);
        };
        (
            view.segments.log_start_offset(),
            view.last_stable_offset.min(hw),
            view.aborted.clone(),
            plan,
        )
    };
    let records = match plan {
        Plan::Empty => Bytes::new(),
        Plan::Local { file, pos, len } => {
            tokio::task::spawn_blocking(move || read_at(&file, pos, len))
                .await
                .map_err(|e| ReadError::Storage(e.to_string()))?
                .map_err(|e| ReadError::Storage(e.to_string()))?
        }
        Plan::Remote(seg) => read_remote(blocks, indexes, &seg, offset, max_bytes).await?,
        Plan::WriteAhead(range) => read_wal_range(blocks, &range, offset, max_bytes).await?,
    };
    Ok(ReadResult {
        records,
        high_watermark: hw,
        log_start_offset: log_start,
        last_stable_offset: lso,
        offset,
        aborted,
    })
}

pub(crate) async fn read_remote(
    blocks: &Arc<BlockCache>,
    indexes: &IndexCache,
    seg: &SegmentRecord,
    offset: i64,
    max_bytes: u64,
) -> Result<Bytes, ReadError> {
    let index = indexes.get(blocks, seg).await?;
    let get = |from: u64, len: u64| async move {
        blocks
            .read(&seg.object_key, seg.size_bytes, from..from + len)
            .await
            .map_err(|e| ReadError::Storage(e.to_string()))
    };
    let mut start = index.position_for_offset(offset);
    while start < seg.data_bytes {
        // A window past the requested size: batches before `offset` within one index
        // interval are skipped, and the last batch may need completing. It stops at the
        // end of the cache block it starts in (but holds at least a batch header), so
        // the answer is a slice of one cached block, not a copy; later batches come
        // with the next fetch.
        let room = seg.data_bytes - start;
        let window = (max_bytes.max(64 * 1024) + 64 * 1024)
            .min(blocks.block_end(start) - start)
            .max(batch::HEADER_LEN as u64)
            .min(room);
        let data = get(start, window).await?;
        let mut first: Option<usize> = None;
        let mut end = 0usize;
        let mut pos = 0usize;
        while pos < data.len() {
            let Some(header) = data.get(pos..).and_then(|b| BatchHeader::parse(b).ok()) else {
                break;
            };
            let complete = pos + header.total_len <= data.len();
            if header.last_offset() < offset {
                pos += header.total_len;
                continue;
            }
            match first {
                None if complete => {
                    first = Some(pos);
                    end = pos + header.total_len;
                }
                None => {
                    // The first wanted batch is larger than the window: fetch it whole.
                    return get(start + pos as u64, header.total_len as u64).await;
                }
                Some(f) if complete && (pos + header.total_len - f) as u64 <= max_bytes => {
                    end = pos + header.total_len
                }
                Some(_) => break,
            }
            pos += header.total_len;
        }
        match first {
            Some(f) => return Ok(data.slice(f..end)),
            // The window held only batches before `offset`, or ended inside one or
            // inside a header: go on from the next batch boundary.
            None if pos > 0 => start += pos as u64,
            // No batch header where the index points: nothing readable here.
            None => break,
        }
    }
    Ok(Bytes::new())
}

/// The bytes of one write-ahead range, through the block cache (a write-ahead object
/// holds many partitions' ranges, so its blocks serve them all with one GET). Ranges
/// from before object sizes were recorded are read with one ranged GET.
pub(crate) async fn wal_range_bytes(
    blocks: &Arc<BlockCache>,
    range: &WalRangeRecord,
) -> Result<Bytes, ReadError> {
    let span = range.position..range.position + range.len;
    let data = if range.object_size > 0 {
        blocks
            .read(&range.object_key, range.object_size, span)
            .await
    } else {
        blocks.read_uncached(&range.object_key, span).await
    };
    data.map_err(|e| ReadError::Storage(e.to_string()))
}

/// Whole batches of one write-ahead range from the one holding `offset`, at most
/// `max_bytes` (the first batch whole).
pub(crate) async fn read_wal_range(
    blocks: &Arc<BlockCache>,
    range: &WalRangeRecord,
    offset: i64,
    max_bytes: u64,
) -> Result<Bytes, ReadError> {
    let data = wal_range_bytes(blocks, range).await?;
    let mut first: Option<usize> = None;
    let mut end = 0usize;
    for (pos, header) in batch::walk(&data) {
        if header.last_offset() < offset {
            continue;
        }
        match first {
            None => {
                first = Some(pos);
                end = pos + header.total_len;
            }
            Some(f) if (pos + header.total_len - f) as u64 <= max_bytes => {
                end = pos + header.total_len
            }
            Some(_) => break,
        }
    }
    Ok(first.map_or_else(Bytes::new, |f| data.slice(f..end)))
}

/// The first record at or after `ts`: (offset, timestamp). `None` if there is none.
pub(crate) async fn offset_for_timestamp(
    part: &PartitionShared,
    blocks: &Arc<BlockCache>,
    indexes: &IndexCache,
    ts: i64,
) -> Result<Option<(i64, i64)>, ReadError> {
    let (remote, local_batch, wal) = {
        let view = part.view();
        let remote = view
            .segments
            .remote()
            .iter()
            .find(|s| s.end_offset > view.segments.log_start_offset() && s.max_timestamp >= ts)
            .cloned();
        // The write-ahead ranges hold the whole unsealed tail; a local file answers
        // instead when it holds the first range that reaches `ts`.
        let wal = view
            .segments
            .wal()
            .iter()
            .find(|r| r.end_offset > view.segments.log_start_offset() && r.max_timestamp >= ts)
            .cloned();
        let local = view
            .segments
            .local()
            .iter()
            .filter(|s| {
                wal.as_ref()
                    .is_none_or(|r| r.base_offset >= s.base_offset && r.base_offset < s.end_offset)
            })
            .find_map(|s| {
                s.offset_for_timestamp(ts)
                    .filter(|e| e.last_offset >= view.segments.log_start_offset())
                    .map(|e| (s.file.clone(), e.position, e.len as u64))
            });
        (remote, local, wal)
    };
    let batch_bytes = if let Some(seg) = remote {
        let index = indexes.get(blocks, &seg).await?;
        let Some(pos) = index.position_for_timestamp(ts) else {
            return Ok(None);
        };
        let data = blocks
            .read(
                &seg.object_key,
                seg.size_bytes,
                pos..seg.data_bytes.min(pos + 256 * 1024),
            )
            .await
            .map_err(|e| ReadError::Storage(e.to_string()))?;
        match first_batch_reaching(&data, ts) {
            Some(b) => b,
            None => return Ok(None),
        }
    } else if let Some((file, pos, len)) = local_batch {
        tokio::task::spawn_blocking(move || read_at(&file, pos, len))
            .await
            .map_err(|e| ReadError::Storage(e.to_string()))?
            .map_err(|e| ReadError::Storage(e.to_string()))?
    } else if let Some(range) = wal {
        match first_batch_reaching(&wal_range_bytes(blocks, &range).await?, ts) {
            Some(b) => b,
            None => return Ok(None),
        }
    } else {
        return Ok(None);
    };
    first_record_at_or_after(&batch_bytes, ts)
}

/// The first whole batch in `data` whose max timestamp reaches `ts`.
fn first_batch_reaching(data: &Bytes, ts: i64) -> Option<Bytes> {
    batch::walk(data)
        .find(|(_, h)| h.max_timestamp >= ts)
        .map(|(p, h)| data.slice(p..p + h.total_len))
}

/// The record with the largest timestamp (the earliest one on ties): (offset, timestamp).
pub(crate) async fn max_timestamp(
    part: &PartitionShared,
    blocks: &Arc<BlockCache>,
    indexes: &IndexCache,
) -> Result<Option<(i64, i64)>, ReadError> {
    let max = {
        let view = part.view();
        let remote = view
            .segments
            .remote()
            .iter()
            .filter(|s| s.end_offset > view.segments.log_start_offset())
            .map(|s| s.max_timestamp);
        let local = view
            .segments
            .local()
            .iter()
            .flat_map(|s| s.entries.iter())
            .filter(|e| e.last_offset >= view.segments.log_start_offset())
            .map(|e| e.max_timestamp);
        let wal = view
            .segments
            .wal()
            .iter()
            .filter(|r| r.end_offset > view.segments.log_start_offset())
            .map(|r| r.max_timestamp);
        remote.chain(local).chain(wal).max()
    };
    let Some(max) = max else { return Ok(None) };
    // The first batch whose max timestamp reaches the maximum holds the record.
    let found = offset_for_timestamp(part, blocks, indexes, max).await?;
    Ok(found.filter(|(_, t)| *t == max))
}

/// Decodes one batch's records (decompressing if needed) to find the first record with
/// a timestamp at or after `ts`. Only ListOffsets by timestamp pays this cost.
fn first_record_at_or_after(batch_bytes: &Bytes, ts: i64) -> Result<Option<(i64, i64)>, ReadError> {
    let mut buf = BytesMut::from(&batch_bytes[..]);
    let set = kafka_protocol::records::RecordBatchDecoder::decode(&mut buf)
        .map_err(|e| ReadError::Storage(format!("decoding a stored batch: {e}")))?;
    Ok(set
        .records
        .iter()
        .find(|r| r.timestamp >= ts)
        .map(|r| (r.offset, r.timestamp)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::batch::{stamp, tests::make_batch};

    /// A read_committed answer: whole batches below the last stable offset, and only
    /// the aborted transactions that end at or after the offset asked for and begin
    /// before the end of what is returned.
    #[test]
    fn committed_only_cuts_at_the_last_stable_offset_and_picks_the_aborts_that_matter() {
        let mut records = BytesMut::new();
        records.extend_from_slice(&stamp(&make_batch(2, 7, 0, 0, 0), 0, 1));
        records.extend_from_slice(&stamp(&make_batch(2, 7, 0, 2, 0), 2, 1));
        let abort = |producer_id, first_offset, last_offset| AbortedTxnRecord {
            producer_id,
            first_offset,
            last_offset,
        };
        let r = ReadResult {
            records: records.freeze(),
            high_watermark: 4,
            log_start_offset: 0,
            last_stable_offset: 2,
            offset: 1,
            aborted: Arc::new(vec![abort(3, 0, 0), abort(1, 0, 1), abort(2, 3, 5)]),
        };
        let (cut, aborted) = r.committed_only();
        let batches: Vec<i64> = batch::walk(&cut.records)
            .map(|(_, h)| h.base_offset)
            .collect();
        assert_eq!(
            batches,
            vec![0],
            "the batch reaching the last stable offset waits"
        );
        assert_eq!(aborted, vec![abort(1, 0, 1)]);
    }
}
