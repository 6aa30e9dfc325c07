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
use crate::metadata::{AbortedTxnRecord, SegmentRecord};

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
    /// The partition's aborted transactions (their data is neither mapped nor kept).
    pub aborted: Arc<Vec<AbortedTxnRecord>>,
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
            let aborted = self.aborted.clone();
            let (back, fits) = tokio::task::spawn_blocking(move || {
                let fits = map_keys(&mut map, &data, &aborted, limit);
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
        for seg in &replaced {
            let data = self.data(seg).await?;
            read_bytes += data.len() as u64;
            let (map, now_ms, delete_retention_ms, limit) = (
                map.clone(),
                self.now_ms,
                self.delete_retention_ms,
                self.batch_limit,
            );
            let name = seg.object_key.clone();
            let aborted = self.aborted.clone();
            let (kept, seg_counts) = tokio::task::spawn_blocking(move || {
                let retain = Retain {
                    map: &map,
                    aborted: &aborted,
                    now_ms,
                    delete_retention_ms,
                    limit,
                };
                filter_segment(&data, &retain)
            })
            .await
            .map_err(|e| CompactError::Task(e.to_string()))?
            .map_err(|e| CompactError::Records(name, e))?;
            counts.add(seg_counts);
            place(&mut outputs, seg, kept, self.segment_bytes);
        }
        // 3. Each output written as a new object (or kept as it was). Every input keeps
        // at least its last batch, so every output has batches and the outputs cover
        // exactly the replaced offsets.
        let mut segments = Vec::with_capacity(outputs.len());
        let mut written_bytes = 0;
        for out in outputs {
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
fn map_keys(
    map: &mut KeyMap,
    data: &Bytes,
    aborted: &[AbortedTxnRecord],
    limit: usize,
) -> Result<bool, RecordsError> {
    for (pos, header) in walk(data) {
        // An aborted record never replaces a committed one: read_committed readers
        // skip it, so the value they see is the committed one before it.
        if header.is_control() || super::filter::is_aborted(&header, aborted) {
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

/// Adds one input's surviving batches to the outputs: to the last one while it stays
/// within `segment.bytes`, else to a new one.
fn place(outputs: &mut Vec<Output>, seg: &SegmentRecord, kept: Kept, segment_bytes: u64) {
    let fits = outputs
        .last()
        .is_some_and(|o| o.bytes + kept.bytes <= segment_bytes || kept.bytes == 0);
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

/// One input segment's batches filtered. A last batch that kept nothing stays as an
/// empty batch (its offsets, no records), as Kafka's cleaner keeps some: so every
/// segment still ends with a batch at its last offset, a fetch anywhere in it finds a
/// batch to answer with, and a consumer after the last surviving record is moved to
/// the end instead of fetching nothing until the next write.
fn filter_segment(data: &Bytes, retain: &Retain<'_>) -> Result<(Kept, Counts), RecordsError> {
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
            Outcome::Dropped if Some(pos) == last => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input(base: i64, end: i64) -> SegmentRecord {
        SegmentRecord {
            base_offset: base,
            end_offset: end,
            object_key: format!("s/{base}"),
            size_bytes: 0,
            data_bytes: 0,
            max_timestamp: 0,
            created_ms: 0,
            compacted_ms: 0,
        }
    }

    fn kept(base: i64, end: i64, sizes: &[u32], unchanged: bool) -> Kept {
        // One batch per size, spread over the segment's offsets; the last ends at `end`.
        let n = sizes.len() as i64;
        let batches: Vec<(Bytes, BatchEntry)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let i = i as i64;
                let first = base + (end - base) * i / n;
                let last = base + (end - base) * (i + 1) / n - 1;
                let entry = BatchEntry {
                    base_offset: first,
                    last_offset: last.max(first),
                    max_timestamp: 0,
                    position: 0,
                    len,
                };
                (Bytes::from(vec![0u8; len as usize]), entry)
            })
            .collect();
        Kept {
            bytes: sizes.iter().map(|&s| s as u64).sum(),
            batches,
            unchanged,
        }
    }

    proptest! {
        /// Outputs cover exactly the inputs' offsets, in order, with no gap or overlap;
        /// each holds every batch of its inputs at consecutive positions; one exceeds
        /// `segment.bytes` only when it holds a single input; and only a single
        /// unchanged input is kept as it was.
        #[test]
        fn outputs_cover_the_inputs_and_respect_the_size(
            inputs in proptest::collection::vec(
                (1i64..50, proptest::collection::vec(1u32..400, 1..4), any::<bool>()),
                1..12,
            ),
            segment_bytes in 100u64..1500,
        ) {
            let mut outputs = Vec::new();
            let mut base = 10;
            let mut total_batches = 0;
            for (len, sizes, unchanged) in &inputs {
                let seg = input(base, base + len);
                total_batches += sizes.len();
                place(&mut outputs, &seg, kept(base, base + len, sizes, *unchanged), segment_bytes);
                base += len;
            }
            prop_assert_eq!(outputs.first().map(|o| o.base_offset), Some(10));
            prop_assert_eq!(outputs.last().map(|o| o.end_offset), Some(base));
            for pair in outputs.windows(2) {
                prop_assert_eq!(pair[0].end_offset, pair[1].base_offset);
            }
            prop_assert_eq!(outputs.iter().map(|o| o.entries.len()).sum::<usize>(), total_batches);
            for o in &outputs {
                prop_assert!(!o.data.is_empty());
                prop_assert!(o.bytes <= segment_bytes || o.inputs == 1);
                let mut at = 0;
                for (e, d) in o.entries.iter().zip(&o.data) {
                    prop_assert_eq!(e.position, at);
                    at += d.len() as u64;
                }
                prop_assert_eq!(at, o.bytes);
                prop_assert!(o.unchanged.is_none() || o.inputs == 1);
                prop_assert_eq!(o.entries.last().map(|e| e.last_offset + 1), Some(o.end_offset));
            }
        }
    }
}
