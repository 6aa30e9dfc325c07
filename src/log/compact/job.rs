//! One compaction pass over one partition: map the dirty segments' keys, rewrite every
//! planned segment keeping each key's newest record, write the results as new objects.
//! The swap itself is the owner task's (`Owner::on_compacted`), which checks its manifest
//! still holds what the pass read and commits in one fenced transaction.
//!
//! Memory: the key map (`log.cleaner.dedupe.buffer.size` over `log.cleaner.threads`), one
//! input segment and one output segment (each at most about `segment.bytes`). The record
//! work runs on the blocking pool.

use std::sync::Arc;

use bytes::Bytes;
use tiering::segment::BatchEntry;
use tiering::store::Class;

use super::filter::{self, Counts, Outcome, Retain};
use super::keymap::KeyMap;
use super::plan::Plan;
use super::throttle::Throttle;
use crate::log::batch::{walk, BatchHeader};
use crate::log::records::{self, RecordsError};
use crate::metadata::SegmentRecord;

/// What a pass needs besides its plan.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub store: Arc<tiering::Store>,
    pub throttle: Arc<Throttle>,
    pub stream: Arc<str>,
    pub leader_epoch: i32,
    pub plan: Plan,
    pub now_ms: i64,
    pub delete_retention_ms: i64,
    pub segment_bytes: u64,
    pub index_interval_bytes: u64,
    /// Largest batch once decompressed.
    pub batch_limit: usize,
    /// The key map's share of `log.cleaner.dedupe.buffer.size`.
    pub map_bytes: usize,
}

/// A finished pass, for the owner to commit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Compacted {
    /// The planned segments the pass rewrote, in order (a prefix of the plan's).
    pub replaced: Vec<SegmentRecord>,
    /// What takes their place, covering the same offsets.
    pub segments: Vec<SegmentRecord>,
    pub counts: Counts,
    /// Bytes read and written.
    pub read_bytes: u64,
    pub written_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CompactError {
    #[error("the key map (log.cleaner.dedupe.buffer.size) cannot hold the keys of one segment")]
    KeyMapFull,
    #[error("reading segment {0}: {1}")]
    Read(String, String),
    #[error("segment {0}: {1}")]
    Records(String, RecordsError),
    #[error("writing a compacted segment: {0}")]
    Write(String),
    #[error("compaction task failed: {0}")]
    Task(String),
}

impl CompactError {
    /// The metric label.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            CompactError::KeyMapFull => "key_map_full",
            CompactError::Read(..) => "read",
            CompactError::Records(..) => "records",
            CompactError::Write(_) => "write",
            CompactError::Task(_) => "task",
        }
    }
}

/// An output segment being filled.
#[derive(Debug, Default)]
struct Output {
    base_offset: i64,
    end_offset: i64,
    data: Vec<Bytes>,
    entries: Vec<BatchEntry>,
    bytes: u64,
    /// The one input it copies unchanged, if that is all it holds: kept as it is.
    unchanged: Option<SegmentRecord>,
    inputs: usize,
}

impl Job {
    pub(crate) async fn run(self) -> Result<Compacted, CompactError> {
        let mut read_bytes = 0u64;
        // 1. The keys of the dirty segments, up to what the map holds (whole segments).
        let mut map = KeyMap::with_budget(self.map_bytes);
        let mut mapped_end = self.plan.first_dirty;
        for seg in &self.plan.segments[self.plan.first_dirty..] {
            let data = self.data(seg).await?;
            read_bytes += data.len() as u64;
            let limit = self.batch_limit;
            let name = seg.object_key.clone();
            let (back, fits) = tokio::task::spawn_blocking(move || {
                let fits = map_keys(&mut map, &data, limit);
                (map, fits)
            })
            .await
            .map_err(|e| CompactError::Task(e.to_string()))?;
            map = back;
            if !fits.map_err(|e| CompactError::Records(name, e))? {
                break;
            }
            mapped_end += 1;
        }
        // A pass with dirty segments must map at least one (a pass over the compacted
        // part alone, for tombstones past their horizon, maps nothing).
        if mapped_end == self.plan.first_dirty && mapped_end < self.plan.segments.len() {
            return Err(CompactError::KeyMapFull);
        }
        // 2. Every segment from the log start through the last mapped one, filtered.
        let map = Arc::new(map);
        let replaced = self.plan.segments[..mapped_end].to_vec();
        let mut outputs: Vec<Output> = Vec::new();
        let mut counts = Counts::default();
        for (i, seg) in replaced.iter().enumerate() {
            let keep_end = i + 1 == replaced.len();
            let data = self.data(seg).await?;
            read_bytes += data.len() as u64;
            let (map, now_ms, delete_retention_ms, limit) = (
                map.clone(),
                self.now_ms,
                self.delete_retention_ms,
                self.batch_limit,
            );
            let name = seg.object_key.clone();
            let (kept, seg_counts) = tokio::task::spawn_blocking(move || {
                let retain = Retain {
                    map: &map,
                    now_ms,
                    delete_retention_ms,
                    limit,
                };
                filter_segment(&data, &retain, keep_end)
            })
            .await
            .map_err(|e| CompactError::Task(e.to_string()))?
            .map_err(|e| CompactError::Records(name, e))?;
            counts.add(seg_counts);
            self.place(&mut outputs, seg, kept);
        }
        // 3. Each output written as a new object (or kept as it was).
        let mut segments = Vec::with_capacity(outputs.len());
        let mut written_bytes = 0;
        // Outputs that kept nothing give their offsets to a neighbour; when nothing at
        // all survived, one empty segment keeps the offsets (the log start never moves
        // by compaction).
        let all_empty = outputs.iter().all(|o| o.data.is_empty());
        for (i, out) in outputs.into_iter().enumerate() {
            if out.data.is_empty() && !(all_empty && i == 0) {
                continue;
            }
            if let (Some(same), 1) = (&out.unchanged, out.inputs) {
                segments.push(SegmentRecord {
                    compacted_ms: self.now_ms,
                    ..same.clone()
                });
                continue;
            }
            let record = self.write(out).await?;
            written_bytes += record.size_bytes;
            segments.push(record);
        }
        // Outputs cover contiguous ranges; one left with no data gave its range to its
        // neighbours.
        cover(&mut segments, &replaced);
        Ok(Compacted {
            replaced,
            segments,
            counts,
            read_bytes,
            written_bytes,
        })
    }

    /// A segment's batches, read under the compaction class and the I/O bound (not
    /// through the block cache: a pass reads each segment once or twice, and would only
    /// push out what readers use).
    async fn data(&self, seg: &SegmentRecord) -> Result<Bytes, CompactError> {
        self.throttle.take(seg.data_bytes).await;
        let key = object_store::path::Path::from(seg.object_key.as_str());
        self.store
            .get_range(&key, 0..seg.data_bytes, Class::Compact, None)
            .await
            .map_err(|e| CompactError::Read(seg.object_key.clone(), e.to_string()))
    }

    /// Adds one input's surviving batches to the outputs: to the last one while it stays
    /// within `segment.bytes`, else to a new one.
    fn place(&self, outputs: &mut Vec<Output>, seg: &SegmentRecord, kept: Kept) {
        let fits = outputs
            .last()
            .is_some_and(|o| o.bytes + kept.bytes <= self.segment_bytes || kept.bytes == 0);
        if !fits {
            outputs.push(Output {
                base_offset: seg.base_offset,
                ..Output::default()
            });
        }
        let out = outputs.last_mut().expect("an output");
        out.end_offset = seg.end_offset;
        out.inputs += 1;
        out.unchanged = (out.inputs == 1 && kept.unchanged).then(|| seg.clone());
        for (batch, mut entry) in kept.batches {
            entry.position = out.bytes;
            out.bytes += batch.len() as u64;
            out.entries.push(entry);
            out.data.push(batch);
        }
    }

    async fn write(&self, out: Output) -> Result<SegmentRecord, CompactError> {
        let interval = self.index_interval_bytes;
        let (data, entries) = (out.data, out.entries);
        let (payload, index) = tokio::task::spawn_blocking(move || {
            tiering::segment::build_segment_object(data, &entries, interval)
        })
        .await
        .map_err(|e| CompactError::Task(e.to_string()))?;
        let key = tiering::keys::compacted_segment_object_key(
            &self.stream,
            out.base_offset,
            self.leader_epoch,
            self.now_ms,
        );
        let size_bytes = payload.content_length() as u64;
        self.throttle.take(size_bytes).await;
        self.store
            .put_new_as(&key, payload, None, Class::Compact)
            .await
            .map_err(|e| CompactError::Write(e.to_string()))?;
        Ok(SegmentRecord {
            base_offset: out.base_offset,
            end_offset: out.end_offset,
            object_key: key.to_string(),
            size_bytes,
            data_bytes: index.data_len(),
            max_timestamp: index.max_timestamp(),
            created_ms: self.now_ms,
            compacted_ms: self.now_ms,
        })
    }
}

/// One input segment's surviving batches with their index entries (positions filled in
/// when placed), and whether it survived whole.
#[derive(Debug, Default)]
struct Kept {
    batches: Vec<(Bytes, BatchEntry)>,
    bytes: u64,
    unchanged: bool,
}

/// Maps the keys of one segment's records; `false` when the map filled up before the
/// last of them (the segment is then left out of the pass).
fn map_keys(map: &mut KeyMap, data: &Bytes, limit: usize) -> Result<bool, RecordsError> {
    for (pos, header) in walk(data) {
        if header.is_control() {
            continue;
        }
        let batch = data.slice(pos..pos + header.total_len);
        for r in records::split(&batch, &header, limit)? {
            if let Some(key) = &r.key {
                if !map.insert(key, r.offset(&header)) {
                    return Ok(false);
                }
            }
        }
    }
    Ok(true)
}

/// One input segment's batches filtered. With `keep_end`, a last batch that kept
/// nothing stays as an empty batch (its offsets, no records), as Kafka's cleaner keeps
/// some: a consumer positioned after the last surviving record must still be given a
/// batch that moves it to the end, or it would fetch nothing until the next write.
fn filter_segment(
    data: &Bytes,
    retain: &Retain<'_>,
    keep_end: bool,
) -> Result<(Kept, Counts), RecordsError> {
    let mut kept = Kept {
        unchanged: true,
        ..Kept::default()
    };
    let mut counts = Counts::default();
    let last = walk(data).last().map(|(pos, _)| pos);
    for (pos, header) in walk(data) {
        let batch = data.slice(pos..pos + header.total_len);
        let (outcome, c) = filter::filter(&batch, &header, retain)?;
        counts.add(c);
        let batch = match outcome {
            Outcome::Unchanged => batch,
            Outcome::Rewritten(b) => {
                kept.unchanged = false;
                b
            }
            Outcome::Dropped if keep_end && Some(pos) == last => {
                kept.unchanged = false;
                records::empty(&batch, &header)
            }
            Outcome::Dropped => {
                kept.unchanged = false;
                continue;
            }
        };
        let h = BatchHeader::parse(&batch).map_err(|_| RecordsError::Malformed { index: 0 })?;
        kept.bytes += batch.len() as u64;
        kept.batches.push((
            batch.clone(),
            BatchEntry {
                base_offset: h.base_offset,
                last_offset: h.last_offset(),
                max_timestamp: h.max_timestamp,
                position: 0,
                len: batch.len() as u32,
            },
        ));
    }
    Ok((kept, counts))
}

/// Makes `segments` cover exactly the offsets of `replaced`: the first starts where the
/// first replaced one did, each ends where the next starts, the last ends where the last
/// replaced one did (an output that kept nothing left a hole its neighbour takes).
fn cover(segments: &mut [SegmentRecord], replaced: &[SegmentRecord]) {
    let (Some(first), Some(last)) = (replaced.first(), replaced.last()) else {
        return;
    };
    if let Some(s) = segments.first_mut() {
        s.base_offset = first.base_offset;
    }
    for i in 1..segments.len() {
        let next = segments[i].base_offset;
        segments[i - 1].end_offset = next;
    }
    if let Some(s) = segments.last_mut() {
        s.end_offset = last.end_offset;
    }
}
