//! The segments of one partition as a plain state machine: the log start offset, the
//! sealed segment objects, the committed write-ahead ranges after them, and the local
//! files caching the tail; and every decision about them: when the active local file is
//! sealed, which stretch is uploaded next, what the manifest becomes when an upload
//! commits, how long a failed upload waits, and which segments retention or
//! DeleteRecords drop.
//!
//! The partition owner task (`super::partition`) keeps it in the view readers share,
//! feeds it commits, upload outcomes, trims and the time, and does the I/O it decides
//! (local files, segment uploads, metadata commits, deletes); the simulation
//! (`src/sim.rs`) drives the same struct against a simulated disk, store and crashes.
//! The rules it keeps:
//! * the manifest is contiguous: segment objects follow each other, the write-ahead
//!   ranges start where they end and run to the high watermark, and the first of them
//!   starts at or below the log start offset;
//! * one upload at a time, always of the stretch starting where the sealed log ends
//!   (`super::tail`), so segments commit in offset order; a committed segment replaces
//!   the write-ahead ranges it covers and the local file it was read from;
//! * an upload fenced by a newer owner, or a trim the metadata store refused, changes
//!   nothing;
//! * retention drops whole segments from the oldest, so never anything above the high
//!   watermark, and the log start offset only rises.

use std::time::{Duration, Instant};

use super::tail::{self, LocalSpan, NextUpload, TailState};
use crate::config::TopicConfig;
use crate::metadata::{PartitionState, SegmentRecord, WalRangeRecord};

/// Longest wait before an upload that failed is tried again.
pub(crate) const UPLOAD_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A local segment file as these decisions see it: the owner's files, plain spans in
/// tests and the simulation.
pub(crate) trait LocalFile {
    fn base_offset(&self) -> i64;
    /// Exclusive.
    fn end_offset(&self) -> i64;
    fn size(&self) -> u64;
    fn created_ms(&self) -> i64;
}

impl LocalFile for super::local::LocalSegment {
    fn base_offset(&self) -> i64 {
        self.base_offset
    }
    fn end_offset(&self) -> i64 {
        self.end_offset
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn created_ms(&self) -> i64 {
        self.created_ms
    }
}

/// The topic settings these decisions follow (Kafka's names; `-1` = no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentRules {
    /// `segment.bytes`: a local file (or a stretch no local file holds) this big is sealed.
    pub segment_bytes: u64,
    /// `segment.ms`: ... or once this old.
    pub segment_ms: i64,
    /// `retention.ms`: segments whose newest record is older are dropped.
    pub retention_ms: i64,
    /// `retention.bytes`: the oldest segments are dropped while the sealed log is bigger.
    pub retention_bytes: i64,
    /// A planted bug for the simulation to find: an upload from the write-ahead objects
    /// skips the first range of its stretch (a gap the commit then hides).
    #[cfg(test)]
    pub skip_a_range: bool,
}

impl SegmentRules {
    pub(crate) fn new(
        segment_bytes: u64,
        segment_ms: i64,
        retention_ms: i64,
        retention_bytes: i64,
    ) -> Self {
        SegmentRules {
            segment_bytes,
            segment_ms,
            retention_ms,
            retention_bytes,
            #[cfg(test)]
            skip_a_range: false,
        }
    }

    /// Retention applies only under `cleanup.policy=delete` (alone or with `compact`);
    /// a compacted topic's segments are sealed at most `max.compaction.lag.ms` after
    /// their first record, so the tail becomes compactable in time.
    pub(crate) fn from_config(c: &TopicConfig) -> Self {
        let (retention_ms, retention_bytes) = if c.cleanup.delete {
            (c.retention_ms, c.retention_bytes)
        } else {
            (-1, -1)
        };
        let segment_ms = if c.cleanup.compact {
            c.segment_ms.min(c.max_compaction_lag_ms)
        } else {
            c.segment_ms
        };
        Self::new(c.segment_bytes, segment_ms, retention_ms, retention_bytes)
    }

    /// The planted bug: the stretch loses its first range (when it has two or more).
    #[cfg(test)]
    fn planted_skip(
        &self,
        base: i64,
        mut ranges: Vec<WalRangeRecord>,
    ) -> (i64, Vec<WalRangeRecord>) {
        if !self.skip_a_range || ranges.len() < 2 {
            return (base, ranges);
        }
        ranges.remove(0);
        (ranges[0].base_offset, ranges)
    }
}

/// The manifest a claim read from the metadata store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub log_start_offset: i64,
    pub high_watermark: i64,
    /// Ascending.
    pub segments: Vec<SegmentRecord>,
    /// Ascending, from the end of the last segment.
    pub wal_ranges: Vec<WalRangeRecord>,
}

impl Manifest {
    /// Moves the manifest out of a claimed partition's state (its segments and ranges
    /// are left empty).
    pub(crate) fn take_from(state: &mut PartitionState) -> Manifest {
        Manifest {
            log_start_offset: state.log_start_offset,
            high_watermark: state.high_watermark,
            segments: std::mem::take(&mut state.segments),
            wal_ranges: std::mem::take(&mut state.wal_ranges),
        }
    }
}

/// A local file as plain data, for tests and the simulation: its span and what it
/// holds.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PlainFile<T> {
    pub(crate) base: i64,
    pub(crate) end: i64,
    pub(crate) size: u64,
    pub(crate) created_ms: i64,
    pub(crate) data: T,
}

#[cfg(test)]
impl<T: Default> PlainFile<T> {
    /// An empty file starting at `base`.
    pub(crate) fn new(base: i64, created_ms: i64) -> Self {
        PlainFile {
            base,
            end: base,
            size: 0,
            created_ms,
            data: T::default(),
        }
    }
}

#[cfg(test)]
impl<T> LocalFile for PlainFile<T> {
    fn base_offset(&self) -> i64 {
        self.base
    }
    fn end_offset(&self) -> i64 {
        self.end
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn created_ms(&self) -> i64 {
        self.created_ms
    }
}

/// The next segment to upload: `[base_offset, end_offset)`.
#[derive(Debug)]
pub(crate) struct Upload<'a, L> {
    pub base_offset: i64,
    pub end_offset: i64,
    pub from: UploadFrom<'a, L>,
}

/// Where an upload's bytes come from.
#[derive(Debug)]
pub(crate) enum UploadFrom<'a, L> {
    /// A closed local file holding exactly the segment.
    Local(&'a L),
    /// The committed write-ahead ranges of a stretch no local file holds, ascending.
    WriteAhead(Vec<WalRangeRecord>),
}

/// How an upload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UploadOutcome {
    /// The object is written and the metadata store committed this record.
    Committed(SegmentRecord),
    /// A newer owner holds the partition: nothing was committed.
    Fenced,
    /// The local file starting at `base_offset` failed its check (or could not be read
    /// whole): never uploaded; its stretch is sealed from the write-ahead objects.
    LocalRefused { base_offset: i64 },
    /// Anything else; `retriable`: trying again may succeed.
    Failed { retriable: bool },
}

/// What the owner does after an upload ended.
#[derive(Debug)]
pub(crate) enum AfterUpload<L> {
    /// The segment is in the manifest; `dropped` is the local file it replaced, to delete.
    Committed { dropped: Option<L> },
    /// Stop serving: a newer owner holds the partition.
    Fenced,
    /// The refused local file, forgotten, to delete.
    LocalDropped(Option<L>),
    /// The upload is tried again after this wait.
    RetryIn(Duration),
}

/// Raise the log start offset to `log_start_offset` and drop these segments (oldest
/// first): in the metadata store first, then here ([`Segments::trimmed`]), then the
/// objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Trim {
    pub log_start_offset: i64,
    pub drop: Vec<SegmentRecord>,
}

/// What DeleteRecords does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeleteTo {
    /// The log already starts at or above the offset: answer this log start offset.
    Already(i64),
    Trim(Trim),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("offset is beyond the high watermark")]
pub(crate) struct BeyondHighWatermark;

/// The segment upload: one at a time, in offset order.
#[derive(Debug, Default)]
struct UploadState {
    running: bool,
    /// Failures in a row; the wait before the next try doubles with each.
    failures: u32,
    retry_at: Option<Instant>,
}

/// The partition's segments and the decisions about them (see the module docs). `L` is
/// a local segment file.
#[derive(Debug)]
pub(crate) struct Segments<L> {
    rules: SegmentRules,
    log_start_offset: i64,
    high_watermark: i64,
    /// Sealed segment objects, ascending.
    remote: Vec<SegmentRecord>,
    /// The committed write-ahead ranges after the last segment, ascending and
    /// contiguous: every offset from the end of `remote` to the high watermark.
    wal: Vec<WalRangeRecord>,
    /// Local segment files, ascending, each holding whole batches with no offset
    /// missing; there may be holes between them (and before the first) that only the
    /// write-ahead ranges hold. The last is the active one while `appending`.
    local: Vec<L>,
    /// Whether the last local file is the active one, taking each commit's batches.
    appending: bool,
    /// End of the log sealed in segment objects: the next upload starts here.
    sealed_end: i64,
    /// Since when commits have gone to write-ahead objects only (no local file took
    /// them), for sealing that stretch by age.
    wal_only_since_ms: i64,
    upload: UploadState,
}

impl<L: LocalFile> Segments<L> {
    /// The segments a claim found, with the fresh local file it opened at the high
    /// watermark (`None` when the cache disk could not take one).
    pub(crate) fn new(
        rules: SegmentRules,
        claimed: Manifest,
        local: Option<L>,
        now_ms: i64,
    ) -> Self {
        // Segment objects follow each other; the write-ahead ranges start where they end.
        let sealed_end = claimed
            .segments
            .last()
            .map(|s| s.end_offset)
            .or_else(|| claimed.wal_ranges.first().map(|r| r.base_offset))
            .unwrap_or(claimed.high_watermark);
        Segments {
            rules,
            log_start_offset: claimed.log_start_offset,
            high_watermark: claimed.high_watermark,
            remote: claimed.segments,
            wal: claimed.wal_ranges,
            appending: local.is_some(),
            local: local.into_iter().collect(),
            sealed_end,
            wal_only_since_ms: now_ms,
            upload: UploadState::default(),
        }
    }

    pub(crate) fn configure(&mut self, rules: SegmentRules) {
        self.rules = rules;
    }

    pub(crate) fn log_start_offset(&self) -> i64 {
        self.log_start_offset
    }

    #[cfg(test)]
    pub(crate) fn high_watermark(&self) -> i64 {
        self.high_watermark
    }

    /// Sealed segment objects, ascending.
    pub(crate) fn remote(&self) -> &[SegmentRecord] {
        &self.remote
    }

    /// The committed write-ahead ranges after the last segment, ascending and contiguous.
    pub(crate) fn wal(&self) -> &[WalRangeRecord] {
        &self.wal
    }

    /// Local segment files, ascending (possibly with holes between them).
    pub(crate) fn local(&self) -> &[L] {
        &self.local
    }

    #[cfg(test)]
    /// End of the log sealed in segment objects.
    pub(crate) fn sealed_end(&self) -> i64 {
        self.sealed_end
    }

    pub(crate) fn appending(&self) -> bool {
        self.appending
    }

    /// A write-ahead commit made `range` durable: it joins the manifest and the high
    /// watermark moves to its end. The owner then appends its batches to the active
    /// local file ([`Self::active_mut`]), opening one first if none is active.
    pub(crate) fn committed(&mut self, range: WalRangeRecord) {
        self.high_watermark = self.high_watermark.max(range.end_offset);
        self.wal.push(range);
    }

    /// The active local file, to append a commit's batches to.
    pub(crate) fn active_mut(&mut self) -> Option<&mut L> {
        if !self.appending {
            return None;
        }
        self.local.last_mut()
    }

    /// A fresh local file (starting at the end of what the others hold) becomes the
    /// active one.
    pub(crate) fn start_appending(&mut self, file: L) {
        self.local.push(file);
        self.appending = true;
    }

    /// Closes the active local file (a write failed, or the disk is full): later
    /// commits go to write-ahead objects only until the disk takes writes again.
    /// Returns the file to delete when it was empty.
    pub(crate) fn stop_appending(&mut self, now_ms: i64) -> Option<L> {
        if !self.appending {
            return None;
        }
        self.appending = false;
        self.wal_only_since_ms = now_ms;
        if self.local.last().is_some_and(|s| s.size() == 0) {
            return self.local.pop();
        }
        None
    }

    /// Whether the active local file is big or old enough to seal: the offset the next
    /// file starts at.
    pub(crate) fn seal_due(&self, now_ms: i64) -> Option<i64> {
        let active = self.local.last().filter(|_| self.appending)?;
        let age = now_ms - active.created_ms();
        let due = active.size() > 0
            && (active.size() >= self.rules.segment_bytes || age >= self.rules.segment_ms);
        due.then(|| active.end_offset())
    }

    /// The active file is sealed (it now waits for upload); `next` is the fresh file
    /// that takes the following commits, `None` when the disk could not give one.
    pub(crate) fn sealed(&mut self, next: Option<L>, now_ms: i64) {
        match next {
            Some(file) => self.local.push(file),
            None => {
                self.appending = false;
                self.wal_only_since_ms = now_ms;
            }
        }
    }

    /// The next upload, when one is due and none is running (or waiting to be retried):
    /// it starts where the sealed log ends (see `super::tail`). From here until
    /// [`Self::uploaded`] the upload counts as running.
    pub(crate) fn next_upload(&mut self, now: Instant, now_ms: i64) -> Option<Upload<'_, L>> {
        if self.upload.running || self.upload.retry_at.is_some_and(|t| now < t) {
            return None;
        }
        // The common case, checked first on every commit: one active file that starts
        // where the sealed log ends, so nothing is due.
        let only_active = self.appending
            && self.local.len() == 1
            && self.local[0].base_offset() == self.sealed_end;
        if only_active {
            return None;
        }
        let last = self.local.len().saturating_sub(1);
        let spans: Vec<LocalSpan> = self
            .local
            .iter()
            .enumerate()
            .map(|(i, s)| LocalSpan {
                base: s.base_offset(),
                end: s.end_offset(),
                active: self.appending && i == last,
            })
            .collect();
        let open_stretch_due = !self.appending && {
            let open_bytes: u64 = self
                .wal
                .iter()
                .filter(|r| r.base_offset >= self.sealed_end)
                .map(|r| r.len)
                .sum();
            open_bytes >= self.rules.segment_bytes
                || now_ms - self.wal_only_since_ms >= self.rules.segment_ms
        };
        let next = tail::next_upload(&TailState {
            sealed_end: self.sealed_end,
            high_watermark: self.high_watermark,
            local: &spans,
            open_stretch_due,
        })?;
        match next {
            NextUpload::Local { base } => {
                let i = self.local.iter().position(|s| s.base_offset() == base)?;
                self.upload.running = true;
                let file = &self.local[i];
                Some(Upload {
                    base_offset: base,
                    end_offset: file.end_offset(),
                    from: UploadFrom::Local(file),
                })
            }
            NextUpload::WriteAhead { base, end } => {
                if end == self.high_watermark && !self.appending {
                    // The open stretch is sealed up to here; what follows ages anew.
                    self.wal_only_since_ms = now_ms;
                }
                let ranges: Vec<WalRangeRecord> = self
                    .wal
                    .iter()
                    .filter(|r| r.base_offset >= base && r.end_offset <= end)
                    .cloned()
                    .collect();
                #[cfg(test)]
                let (base, ranges) = self.rules.planted_skip(base, ranges);
                self.upload.running = true;
                Some(Upload {
                    base_offset: base,
                    end_offset: end,
                    from: UploadFrom::WriteAhead(ranges),
                })
            }
        }
    }

    /// The running upload ended. A committed segment joins the manifest and replaces
    /// the write-ahead ranges it covers (as the metadata store's commit did) and its
    /// local file; a failure waits before the next try, longer with each.
    pub(crate) fn uploaded(&mut self, outcome: UploadOutcome, now: Instant) -> AfterUpload<L> {
        self.upload.running = false;
        match outcome {
            UploadOutcome::Committed(record) => {
                self.upload = UploadState::default();
                self.sealed_end = self.sealed_end.max(record.end_offset);
                let dropped = self.drop_local(record.base_offset);
                self.wal.retain(|r| r.end_offset > record.end_offset);
                self.remote.push(record);
                AfterUpload::Committed { dropped }
            }
            UploadOutcome::Fenced => AfterUpload::Fenced,
            UploadOutcome::LocalRefused { base_offset } => {
                AfterUpload::LocalDropped(self.drop_local(base_offset))
            }
            UploadOutcome::Failed { retriable } => {
                self.upload.failures += 1;
                // Transient failures back off from half a second; a final one (it would
                // fail the same way again) waits the longest at once.
                let wait = if retriable {
                    Duration::from_millis(500)
                        .saturating_mul(1 << (self.upload.failures - 1).min(10))
                        .min(UPLOAD_BACKOFF_MAX)
                } else {
                    UPLOAD_BACKOFF_MAX
                };
                self.upload.retry_at = Some(now + wait);
                AfterUpload::RetryIn(wait)
            }
        }
    }

    /// Forgets the closed local file starting at `base` (never the active one).
    fn drop_local(&mut self, base: i64) -> Option<L> {
        let last = self.local.len().saturating_sub(1);
        let i = self
            .local
            .iter()
            .position(|s| s.base_offset() == base)
            .filter(|&i| !(self.appending && i == last))?;
        Some(self.local.remove(i))
    }

    /// What retention drops now: the oldest segments while they are older than
    /// `retention.ms`, the sealed log is bigger than `retention.bytes`, or they end at
    /// or below the log start offset.
    pub(crate) fn retention(&self, now_ms: i64) -> Option<Trim> {
        let mut total: i64 = self.remote.iter().map(|s| s.size_bytes as i64).sum();
        let mut drop = Vec::new();
        for seg in &self.remote {
            let too_old = self.rules.retention_ms >= 0
                && seg.max_timestamp < now_ms - self.rules.retention_ms;
            let too_big = self.rules.retention_bytes >= 0 && total > self.rules.retention_bytes;
            let below_start = seg.end_offset <= self.log_start_offset;
            if !(too_old || too_big || below_start) {
                break;
            }
            total -= seg.size_bytes as i64;
            drop.push(seg.clone());
        }
        let last = drop.last()?;
        Some(Trim {
            log_start_offset: last.end_offset.max(self.log_start_offset),
            drop,
        })
    }

    /// DeleteRecords up to `offset` (`-1`: the high watermark): the segments wholly
    /// below it go.
    pub(crate) fn delete_records(&self, offset: i64) -> Result<DeleteTo, BeyondHighWatermark> {
        let offset = if offset == -1 {
            self.high_watermark
        } else {
            offset
        };
        if offset < 0 || offset > self.high_watermark {
            return Err(BeyondHighWatermark);
        }
        if offset <= self.log_start_offset {
            return Ok(DeleteTo::Already(self.log_start_offset));
        }
        Ok(DeleteTo::Trim(Trim {
            log_start_offset: offset,
            drop: self
                .remote
                .iter()
                .filter(|s| s.end_offset <= offset)
                .cloned()
                .collect(),
        }))
    }

    /// The metadata store applied `trim`: the log start offset rises (never falls) and
    /// the dropped segments are forgotten.
    /// Whether the manifest starts with exactly `replaced` (by object), as a compaction
    /// pass read it.
    pub(crate) fn starts_with(&self, replaced: &[SegmentRecord]) -> bool {
        self.remote.len() >= replaced.len()
            && self
                .remote
                .iter()
                .zip(replaced)
                .all(|(have, read)| have.object_key == read.object_key)
    }

    /// A compaction pass committed: the first `replaced` segments gave way to
    /// `segments`, which cover the same offsets.
    pub(crate) fn compacted(&mut self, replaced: usize, segments: Vec<SegmentRecord>) {
        debug_assert!(
            segments.first().map(|s| s.base_offset) == self.remote.first().map(|s| s.base_offset)
                && segments.last().map(|s| s.end_offset)
                    == self
                        .remote
                        .get(replaced.saturating_sub(1))
                        .map(|s| s.end_offset),
            "a compacted run covers the offsets it replaces"
        );
        self.remote.splice(..replaced, segments);
    }

    pub(crate) fn trimmed(&mut self, trim: &Trim) {
        self.log_start_offset = self.log_start_offset.max(trim.log_start_offset);
        self.remote
            .retain(|s| !trim.drop.iter().any(|d| d.base_offset == s.base_offset));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A local file as the tests see it: 100 bytes per offset.
    type Span = PlainFile<()>;

    fn span(base: i64, now_ms: i64) -> Span {
        PlainFile::new(base, now_ms)
    }

    fn range(base: i64, end: i64) -> WalRangeRecord {
        WalRangeRecord {
            base_offset: base,
            end_offset: end,
            object_key: format!("wal/{base}"),
            position: 0,
            len: (end - base) as u64 * 100,
            max_timestamp: base,
            object_size: 0,
        }
    }

    fn manifest(s: &Segments<Span>) -> (i64, i64, Vec<SegmentRecord>, Vec<WalRangeRecord>) {
        (
            s.log_start_offset(),
            s.high_watermark(),
            s.remote().to_vec(),
            s.wal().to_vec(),
        )
    }

    /// Segments, then write-ahead ranges, with no gap or overlap, from at or below the
    /// log start offset to the high watermark; local files in order, within the log.
    fn check_contiguous(s: &Segments<Span>) -> Result<(), TestCaseError> {
        let pieces: Vec<(i64, i64)> = s
            .remote()
            .iter()
            .map(|r| (r.base_offset, r.end_offset))
            .chain(s.wal().iter().map(|r| (r.base_offset, r.end_offset)))
            .collect();
        for w in pieces.windows(2) {
            prop_assert_eq!(w[0].1, w[1].0, "gap or overlap in {:?}", pieces);
        }
        let first = pieces.first().map_or(s.high_watermark(), |p| p.0);
        let end = pieces.last().map_or(s.high_watermark(), |p| p.1);
        prop_assert_eq!(end, s.high_watermark(), "manifest {:?}", pieces);
        prop_assert!(
            first <= s.log_start_offset(),
            "log start {} below {:?}",
            s.log_start_offset(),
            pieces
        );
        prop_assert!(s.log_start_offset() <= s.high_watermark());
        prop_assert_eq!(
            s.remote().last().map_or(first, |r| r.end_offset),
            s.sealed_end()
        );
        for w in s.local().windows(2) {
            prop_assert!(w[0].end <= w[1].base, "local files overlap");
        }
        for f in s.local() {
            prop_assert!(f.base >= s.sealed_end() || f.end <= s.sealed_end());
            prop_assert!(f.end <= s.high_watermark());
        }
        Ok(())
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// A write-ahead commit of this many offsets.
        Commit(i64),
        /// Time passes (ms); then the owner's seal check.
        Tick(i64),
        /// The cache disk fills up or takes writes again.
        Disk(bool),
        /// The owner starts the next upload if one is due.
        Upload,
        /// The running upload ends: 0 committed, 1 fenced, 2 failed, 3 failed for
        /// good, 4 the local file refused.
        Finish(u8),
        /// Retention with this `retention.bytes`; the trim is refused when `fenced`.
        Retention { bytes: i64, fenced: bool },
        /// DeleteRecords at this share (percent) of the high watermark; 101: beyond it.
        DeleteRecords { percent: i64, fenced: bool },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (1..5i64).prop_map(Step::Commit),
            3 => prop_oneof![0..50i64, Just(40_000)].prop_map(Step::Tick),
            1 => any::<bool>().prop_map(Step::Disk),
            4 => Just(Step::Upload),
            4 => (0..5u8).prop_map(Step::Finish),
            1 => (prop_oneof![Just(-1i64), 0..3000i64], any::<bool>())
                .prop_map(|(bytes, fenced)| Step::Retention { bytes, fenced }),
            1 => (0..102i64, any::<bool>())
                .prop_map(|(percent, fenced)| Step::DeleteRecords { percent, fenced }),
        ]
    }

    /// An upload the test is running.
    struct Running {
        base: i64,
        end: i64,
        local: bool,
    }

    proptest! {
        /// Whatever commits, seals, upload outcomes and trims come: uploads commit in
        /// offset order, each starting where the sealed log ends; the manifest stays
        /// contiguous from the log start to the high watermark; the active file is
        /// never uploaded; retention never drops past the high watermark nor lowers the
        /// log start; a fenced upload or a refused trim changes nothing.
        #[test]
        fn the_manifest_stays_contiguous_and_uploads_go_in_order(
            claimed_ranges in 0..4i64,
            local_at_claim in any::<bool>(),
            steps in proptest::collection::vec(step(), 1..120),
        ) {
            let t0 = crate::clock::instant();
            let mut now_ms = 1_000_000i64;
            let at = |ms: i64| t0 + Duration::from_millis((ms - 1_000_000) as u64);
            // A claimed partition: write-ahead ranges [0, 2), [2, 4), ... not sealed yet.
            let wal_ranges: Vec<WalRangeRecord> =
                (0..claimed_ranges).map(|i| range(2 * i, 2 * i + 2)).collect();
            let hw = 2 * claimed_ranges;
            let rules = SegmentRules::new(600, 100, -1, -1);
            let mut s = Segments::new(
                rules,
                Manifest { log_start_offset: 0, high_watermark: hw, segments: vec![], wal_ranges },
                local_at_claim.then(|| span(hw, now_ms)),
                now_ms,
            );
            let mut disk = true;
            let mut running: Option<Running> = None;
            check_contiguous(&s)?;
            for st in steps {
                match st {
                    Step::Commit(n) => {
                        let from = s.high_watermark();
                        s.committed(range(from, from + n));
                        // What the owner does with the batches.
                        if !disk {
                            s.stop_appending(now_ms);
                        } else {
                            if !s.appending() {
                                s.start_appending(span(from, now_ms));
                            }
                            let active = s.active_mut().expect("an active file");
                            prop_assert_eq!(active.end, from);
                            active.end += n;
                            active.size += n as u64 * 100;
                        }
                    }
                    Step::Tick(ms) => {
                        now_ms += ms;
                        if let Some(end) = s.seal_due(now_ms) {
                            prop_assert_eq!(Some(end), s.local().last().map(|f| f.end));
                            s.sealed(disk.then(|| span(end, now_ms)), now_ms);
                        }
                    }
                    Step::Disk(writable) => disk = writable,
                    Step::Upload => {
                        let sealed_end = s.sealed_end();
                        let hw = s.high_watermark();
                        let active = s.appending().then(|| s.local().last().map(|f| f.base)).flatten();
                        if let Some(u) = s.next_upload(at(now_ms), now_ms) {
                            prop_assert!(running.is_none(), "two uploads at once");
                            prop_assert_eq!(u.base_offset, sealed_end, "an upload must start where the sealed log ends");
                            prop_assert!(u.end_offset > u.base_offset && u.end_offset <= hw);
                            let local = match &u.from {
                                UploadFrom::Local(f) => {
                                    prop_assert_eq!((f.base, f.end), (u.base_offset, u.end_offset));
                                    prop_assert_ne!(Some(f.base), active, "the active file is never uploaded");
                                    true
                                }
                                UploadFrom::WriteAhead(ranges) => {
                                    prop_assert_eq!(ranges.first().map(|r| r.base_offset), Some(u.base_offset));
                                    prop_assert_eq!(ranges.last().map(|r| r.end_offset), Some(u.end_offset));
                                    for w in ranges.windows(2) {
                                        prop_assert_eq!(w[0].end_offset, w[1].base_offset);
                                    }
                                    false
                                }
                            };
                            running = Some(Running { base: u.base_offset, end: u.end_offset, local });
                        }
                    }
                    Step::Finish(kind) => {
                        let Some(r) = running.take() else { continue };
                        let before = manifest(&s);
                        let outcome = match kind {
                            0 => UploadOutcome::Committed(SegmentRecord {
                                base_offset: r.base,
                                end_offset: r.end,
                                object_key: format!("seg/{}", r.base),
                                size_bytes: (r.end - r.base) as u64 * 100 + 50,
                                data_bytes: (r.end - r.base) as u64 * 100,
                                max_timestamp: r.end,
                                created_ms: now_ms,
                                compacted_ms: 0,
                            }),
                            1 => UploadOutcome::Fenced,
                            2 | 3 => UploadOutcome::Failed { retriable: kind == 2 },
                            _ if r.local => UploadOutcome::LocalRefused { base_offset: r.base },
                            _ => UploadOutcome::Failed { retriable: true },
                        };
                        match s.uploaded(outcome, at(now_ms)) {
                            AfterUpload::Committed { dropped } => {
                                prop_assert_eq!(s.remote().last().map(|x| x.base_offset), Some(r.base));
                                prop_assert_eq!(s.sealed_end(), r.end);
                                prop_assert_eq!(dropped.is_some(), r.local);
                            }
                            AfterUpload::Fenced => prop_assert_eq!(manifest(&s), before, "a fenced upload changed the manifest"),
                            AfterUpload::LocalDropped(dropped) => {
                                prop_assert_eq!(dropped.map(|f| f.base), Some(r.base));
                                prop_assert_eq!(manifest(&s), before);
                            }
                            AfterUpload::RetryIn(wait) => {
                                prop_assert!(wait <= UPLOAD_BACKOFF_MAX);
                                prop_assert_eq!(manifest(&s), before);
                                prop_assert!(s.next_upload(at(now_ms), now_ms).is_none(), "retried before its wait");
                            }
                        }
                    }
                    Step::Retention { bytes, fenced } => {
                        s.configure(SegmentRules::new(600, 100, -1, bytes));
                        let before = manifest(&s);
                        if let Some(trim) = s.retention(now_ms) {
                            prop_assert!(!trim.drop.is_empty());
                            prop_assert_eq!(&trim.drop[..], &s.remote()[..trim.drop.len()], "drops the oldest first");
                            prop_assert!(trim.drop.iter().all(|d| d.end_offset <= s.high_watermark()));
                            prop_assert!(trim.log_start_offset <= s.high_watermark());
                            prop_assert!(trim.log_start_offset >= s.log_start_offset());
                            if fenced {
                                prop_assert_eq!(manifest(&s), before);
                            } else {
                                s.trimmed(&trim);
                                prop_assert_eq!(s.log_start_offset(), trim.log_start_offset);
                            }
                        }
                        s.configure(rules);
                    }
                    Step::DeleteRecords { percent, fenced } => {
                        let hw = s.high_watermark();
                        let offset = if percent > 100 { hw + 1 } else { hw * percent / 100 };
                        match s.delete_records(offset) {
                            Err(BeyondHighWatermark) => prop_assert!(offset > hw),
                            Ok(DeleteTo::Already(start)) => {
                                prop_assert!(offset <= start);
                                prop_assert_eq!(start, s.log_start_offset());
                            }
                            Ok(DeleteTo::Trim(trim)) => {
                                prop_assert_eq!(trim.log_start_offset, offset);
                                prop_assert!(trim.drop.iter().all(|d| d.end_offset <= offset));
                                if !fenced {
                                    s.trimmed(&trim);
                                }
                            }
                        }
                    }
                }
                check_contiguous(&s)?;
            }
            // Liveness: with the disk back and no failures, everything but the active
            // file gets sealed.
            if let Some(r) = running.take() {
                s.uploaded(UploadOutcome::Failed { retriable: true }, at(now_ms));
                prop_assert!(r.end > r.base);
            }
            now_ms += 40_000;
            if let Some(end) = s.seal_due(now_ms) {
                s.sealed(Some(span(end, now_ms)), now_ms);
            }
            for _ in 0..64 {
                let Some(u) = s.next_upload(at(now_ms), now_ms) else { break };
                let (base, end) = (u.base_offset, u.end_offset);
                s.uploaded(UploadOutcome::Committed(SegmentRecord {
                    base_offset: base,
                    end_offset: end,
                    object_key: format!("seg/{base}"),
                    size_bytes: 1,
                    data_bytes: 1,
                    max_timestamp: end,
                    created_ms: now_ms,
                    compacted_ms: 0,
                }), at(now_ms));
                check_contiguous(&s)?;
            }
            let unsealed_from = if s.appending() { s.local().last().map_or(s.high_watermark(), |f| f.base) } else { s.high_watermark() };
            prop_assert_eq!(s.sealed_end(), unsealed_from, "the tail was left unsealed");
        }
    }

    #[test]
    fn a_failed_upload_backs_off_doubling_up_to_the_maximum() {
        let t0 = crate::clock::instant();
        let rules = SegmentRules::new(1, 0, -1, -1);
        let claimed = Manifest {
            log_start_offset: 0,
            high_watermark: 4,
            segments: vec![],
            wal_ranges: vec![range(0, 2), range(2, 4)],
        };
        let mut s: Segments<Span> = Segments::new(rules, claimed, None, 0);
        let mut waits = Vec::new();
        let mut now = t0;
        for _ in 0..8 {
            assert!(s.next_upload(now, 0).is_some());
            match s.uploaded(UploadOutcome::Failed { retriable: true }, now) {
                AfterUpload::RetryIn(w) => waits.push(w.as_millis()),
                other => panic!("{other:?}"),
            }
            now += UPLOAD_BACKOFF_MAX;
        }
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        assert!(s.next_upload(now, 0).is_some());
        match s.uploaded(UploadOutcome::Failed { retriable: false }, now) {
            AfterUpload::RetryIn(w) => assert_eq!(w, UPLOAD_BACKOFF_MAX),
            other => panic!("{other:?}"),
        }
    }
}
