//! The flusher's decisions as a plain state machine, apart from its I/O: what goes into
//! the next write-ahead object, when a flush starts, which flushes commit next, and what
//! each partition owner is told.
//!
//! The flusher task ([`super::Flusher`]) feeds it batches, the results of object writes
//! and metadata commits, and the time; it answers with flushes to start, commits to run
//! and notices to send. The simulation (`src/sim.rs`) drives the same struct against a
//! simulated store, metadata store and crashes. The rules it keeps:
//! * group commit: a flush starts as soon as a slot is free (fewer than `concurrency`
//!   flushes unfinished) and a batch someone waits on (`acks=all`) is buffered; other
//!   batches wait at most the interval, and a full buffer (`max_bytes`) is due at once.
//!   Flushes start at least `min_gap` apart (the flush-rate bound: object-store PUTs are
//!   billed), and at once when closing;
//! * objects are written concurrently, but commits run one at a time in the order their
//!   flushes started, so every partition's ranges are committed in offset order; the
//!   flushes whose objects are written when a commit can start commit together, in ONE
//!   metadata transaction (at most [`MAX_OBJECTS_PER_COMMIT`]);
//! * an owner hears `Flushed` only after the commit that holds its range succeeded;
//! * a flush that failed for a partition abandons that partition's generation: its
//!   batches still buffered or in later flushes are dropped (committing them would leave
//!   a gap), and the owner hears `Failed` once.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use indexmap::IndexMap;

use super::FlushNotice;
use crate::metadata::{
    AbortedTxnRecord, PartitionCommit, PartitionKey, ProducerStateRecord, WalCommit, WalRangeRecord,
};

/// Most write-ahead objects one metadata transaction commits.
pub(crate) const MAX_OBJECTS_PER_COMMIT: usize = 16;

/// When flushes start and how long a flush may take.
#[derive(Debug, Clone)]
pub(crate) struct FlushRules {
    /// Longest a batch nobody waits on stays buffered.
    pub interval: Duration,
    /// Shortest time between two flush starts (zero: no bound).
    pub min_gap: Duration,
    pub max_bytes: usize,
    /// From a flush's start to its last commit attempt.
    pub timeout: Duration,
    /// Flushes unfinished at once (written or writing, not yet committed).
    pub concurrency: usize,
    /// A planted bug for the simulation to find: owners hear `Flushed` as soon as the
    /// object is written, before its commit.
    #[cfg(test)]
    pub ack_before_commit: bool,
}

impl FlushRules {
    pub(crate) fn new(
        interval: Duration,
        min_gap: Duration,
        max_bytes: usize,
        timeout: Duration,
        concurrency: usize,
    ) -> Self {
        FlushRules {
            interval,
            min_gap,
            max_bytes,
            timeout,
            concurrency: concurrency.max(1),
            #[cfg(test)]
            ack_before_commit: false,
        }
    }
}

/// One stamped batch on its way to the next write-ahead object; `N` is how its owner
/// is told about it.
#[derive(Debug)]
pub(crate) struct FlushItem<N> {
    pub key: PartitionKey,
    pub stream: std::sync::Arc<str>,
    pub leader_epoch: i32,
    /// The owner's generation; items of an abandoned generation are dropped.
    pub gen: u64,
    pub base_offset: i64,
    pub end_offset: i64,
    pub max_timestamp: i64,
    pub batch: Bytes,
    pub producer: Option<ProducerStateRecord>,
    /// The transaction an abort marker in `batch` ends.
    pub aborted: Option<AbortedTxnRecord>,
    pub notify: N,
    /// A producer waits for its commit (`acks=all`): its flush starts as soon as a slot
    /// is free.
    pub urgent: bool,
    /// When the request that carried it reached the broker.
    pub arrived: Instant,
}

/// One partition's share of a flush.
struct Pending<N> {
    stream: std::sync::Arc<str>,
    leader_epoch: i32,
    gen: u64,
    base_offset: i64,
    end_offset: i64,
    max_timestamp: i64,
    data: Vec<Bytes>,
    producers: IndexMap<i64, ProducerStateRecord>,
    aborted: Vec<AbortedTxnRecord>,
    notify: N,
    /// Where the write put it (once written).
    range: Option<WalRangeRecord>,
}

impl<N: Clone> Pending<N> {
    fn new(item: &FlushItem<N>) -> Self {
        Pending {
            stream: item.stream.clone(),
            leader_epoch: item.leader_epoch,
            gen: item.gen,
            base_offset: item.base_offset,
            end_offset: item.base_offset,
            max_timestamp: -1,
            data: Vec::new(),
            producers: IndexMap::new(),
            aborted: Vec::new(),
            notify: item.notify.clone(),
            range: None,
        }
    }

    fn bytes(&self) -> usize {
        self.data.iter().map(Bytes::len).sum()
    }
}

struct Buffer<N> {
    partitions: IndexMap<PartitionKey, Pending<N>>,
    bytes: usize,
    opened: Option<Instant>,
    /// When the first batch someone waits on arrived.
    urgent_since: Option<Instant>,
    /// Per batch: from its request's arrival to its arrival here, and when that was.
    arrivals: Vec<(Duration, Instant)>,
}

impl<N> Default for Buffer<N> {
    fn default() -> Self {
        Buffer {
            partitions: IndexMap::new(),
            bytes: 0,
            opened: None,
            urgent_since: None,
            arrivals: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Writing,
    WriteFailed,
    Written,
    Committing,
    /// A retriable commit failure: try again at this time.
    RetryAt(Instant),
}

struct InFlight<N> {
    seq: u64,
    started: Instant,
    written_at: Instant,
    object_key: String,
    stage: Stage,
    partitions: IndexMap<PartitionKey, Pending<N>>,
}

/// How long one batch waited before its flush started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchWait {
    /// From its request's arrival to reaching the flusher.
    pub queued: Duration,
    /// In the flusher's buffer.
    pub buffered: Duration,
}

/// A flush that started: the object to write (the chunks in partition order).
#[derive(Debug)]
pub(crate) struct Started {
    pub seq: u64,
    pub chunks: Vec<tiering::wal::WalChunk>,
    /// How long its oldest batch waited in the buffer.
    pub waited: Duration,
    /// Since the previous flush started (none before the first).
    pub since_previous: Option<Duration>,
    /// Each batch's wait, for the ack-path breakdown.
    pub batches: Vec<BatchWait>,
}

/// A flush's object as written.
#[derive(Debug)]
pub(crate) struct Written {
    pub object_key: String,
    pub object_size: u64,
    /// Where each chunk landed, in the order of [`Started::chunks`].
    pub locations: Vec<tiering::wal::WalChunkLocation>,
}

/// A commit to run: the written objects of one or more flushes, in start order.
#[derive(Debug)]
pub(crate) struct NextCommit {
    /// The first flush's sequence number; the commit's result is reported under it.
    pub seq: u64,
    pub commits: Vec<WalCommit>,
    /// Per object: how long it waited, written, for this commit to start.
    pub waited: Vec<Duration>,
}

/// How a commit attempt ended, as the flusher task saw it.
#[derive(Debug)]
pub(crate) enum CommitResult {
    Committed,
    /// These partitions have a newer owner; nothing was applied.
    Fenced(Vec<PartitionKey>),
    /// Failed; `retriable` if trying again may succeed (the store was unavailable).
    Failed {
        retriable: bool,
    },
}

/// What became of a commit attempt, for the task's metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitEnd {
    Committed {
        objects: usize,
        partitions: usize,
    },
    /// To be tried again: at the given time, or at once (with fewer partitions).
    Retry,
    /// Abandoned for good, after a failure that may have applied (`uncertain`) or a
    /// fence naming none of its partitions.
    Abandoned {
        objects: usize,
    },
}

/// The flusher's state. `N` is how a partition owner is told about its batches.
pub(crate) struct FlushCore<N> {
    rules: FlushRules,
    buffer: Buffer<N>,
    /// Lowest live generation per partition (see the module docs).
    abandoned: HashMap<PartitionKey, u64>,
    /// Unfinished flushes in start order.
    in_flight: VecDeque<InFlight<N>>,
    /// How many flushes at the front of `in_flight` are being committed (0: none).
    committing: usize,
    last_start: Option<Instant>,
    next_seq: u64,
    /// Notices to send, in order.
    outbox: Vec<(N, FlushNotice)>,
}

impl<N: Clone> FlushCore<N> {
    pub(crate) fn new(rules: FlushRules) -> Self {
        FlushCore {
            rules,
            buffer: Buffer::default(),
            abandoned: HashMap::new(),
            in_flight: VecDeque::new(),
            committing: 0,
            last_start: None,
            next_seq: 0,
            outbox: Vec::new(),
        }
    }

    /// Whether the buffer takes more batches (below `max_bytes`).
    pub(crate) fn accepts(&self) -> bool {
        self.buffer.bytes < self.rules.max_bytes
    }

    /// Nothing buffered and no flush unfinished.
    pub(crate) fn is_idle(&self) -> bool {
        self.buffer.partitions.is_empty() && self.in_flight.is_empty()
    }

    /// The notices produced since the last call, to send in this order.
    pub(crate) fn take_notices(&mut self) -> Vec<(N, FlushNotice)> {
        std::mem::take(&mut self.outbox)
    }

    pub(crate) fn add(&mut self, item: FlushItem<N>, now: Instant) {
        if self
            .abandoned
            .get(&item.key)
            .is_some_and(|&live| item.gen < live)
        {
            return;
        }
        self.buffer.opened.get_or_insert(now);
        if item.urgent {
            self.buffer.urgent_since.get_or_insert(now);
        }
        self.buffer
            .arrivals
            .push((now.saturating_duration_since(item.arrived), now));
        let p = self
            .buffer
            .partitions
            .entry(item.key)
            .or_insert_with(|| Pending::new(&item));
        if p.gen != item.gen {
            // The owner abandoned the older batches after a failed flush; start over
            // from the new generation.
            self.buffer.bytes -= p.bytes();
            *p = Pending::new(&item);
        }
        debug_assert_eq!(
            p.end_offset, item.base_offset,
            "batches of a partition arrive in offset order"
        );
        self.buffer.bytes += item.batch.len();
        p.end_offset = item.end_offset;
        p.max_timestamp = p.max_timestamp.max(item.max_timestamp);
        p.data.push(item.batch);
        if let Some(state) = item.producer {
            p.producers.insert(state.producer_id, state);
        }
        p.aborted.extend(item.aborted);
    }

    fn slot_free(&self) -> bool {
        self.in_flight.len() < self.rules.concurrency
    }

    /// When the buffer becomes due: at once when full, when a batch someone waits on
    /// arrived, or once the oldest batch has waited the interval; never sooner than
    /// `min_gap` after the previous flush started.
    fn due_at(&self) -> Option<Instant> {
        let opened = self.buffer.opened?;
        let wanted = if self.buffer.bytes >= self.rules.max_bytes {
            opened
        } else {
            let by_interval = opened + self.rules.interval;
            self.buffer
                .urgent_since
                .map_or(by_interval, |u| u.min(by_interval))
        };
        Some(
            self.last_start
                .map_or(wanted, |t| (t + self.rules.min_gap).max(wanted)),
        )
    }

    /// When the task must call again even if nothing arrives: a flush that becomes due
    /// (while a slot is free) or a commit retry.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        let due = self.due_at().filter(|_| self.slot_free());
        let retry = match self.in_flight.front().map(|f| f.stage) {
            Some(Stage::RetryAt(t)) if self.committing == 0 => Some(t),
            _ => None,
        };
        match (due, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Starts a flush if one is due (`closing`: no more batches will come, so whatever
    /// is buffered is due).
    pub(crate) fn start(&mut self, now: Instant, closing: bool) -> Option<Started> {
        if self.buffer.partitions.is_empty() || !self.slot_free() {
            return None;
        }
        let due = closing || self.due_at().is_some_and(|t| t <= now);
        if !due {
            return None;
        }
        let taken = std::mem::take(&mut self.buffer);
        let since_previous = self.last_start.map(|t| now.saturating_duration_since(t));
        self.last_start = Some(now);
        let seq = self.next_seq;
        self.next_seq += 1;
        let chunks = taken
            .partitions
            .values()
            .map(|p| tiering::wal::WalChunk {
                stream: p.stream.to_string(),
                base_offset: p.base_offset,
                end_offset: p.end_offset,
                max_timestamp: p.max_timestamp,
                data: p.data.clone(),
            })
            .collect();
        self.in_flight.push_back(InFlight {
            seq,
            started: now,
            written_at: now,
            object_key: String::new(),
            stage: Stage::Writing,
            partitions: taken.partitions,
        });
        Some(Started {
            seq,
            chunks,
            waited: taken
                .opened
                .map_or(Duration::ZERO, |o| now.saturating_duration_since(o)),
            since_previous,
            batches: taken
                .arrivals
                .iter()
                .map(|&(queued, added)| BatchWait {
                    queued,
                    buffered: now.saturating_duration_since(added),
                })
                .collect(),
        })
    }

    /// The object of flush `seq` was written (`Some`) or could not be (`None`).
    pub(crate) fn written(&mut self, seq: u64, written: Option<Written>, now: Instant) {
        let Some(f) = self.in_flight.iter_mut().find(|f| f.seq == seq) else {
            return;
        };
        let Some(w) = written else {
            f.stage = Stage::WriteFailed;
            return;
        };
        for (p, loc) in f.partitions.values_mut().zip(w.locations) {
            p.range = Some(WalRangeRecord {
                base_offset: p.base_offset,
                end_offset: p.end_offset,
                object_key: w.object_key.clone(),
                position: loc.position,
                len: loc.len,
                max_timestamp: p.max_timestamp,
                object_size: w.object_size,
            });
        }
        f.object_key = w.object_key;
        f.stage = Stage::Written;
        f.written_at = now;
        #[cfg(test)]
        if self.rules.ack_before_commit {
            let notices: Vec<_> = f
                .partitions
                .values()
                .filter_map(|p| {
                    let range = p.range.clone()?;
                    Some((
                        p.notify.clone(),
                        FlushNotice::Flushed {
                            gen: p.gen,
                            range,
                            committed_at: now,
                        },
                    ))
                })
                .collect();
            self.outbox.extend(notices);
        }
    }

    /// The next commit to run, if the oldest unfinished flush is ready for it: it and
    /// the flushes after it that are written too (commits run one at a time: call again
    /// only after [`FlushCore::committed`]). Flushes whose write failed, and partitions
    /// whose generation was abandoned, are settled on the way.
    pub(crate) fn next_commit(&mut self, now: Instant, now_ms: i64) -> Option<NextCommit> {
        if self.committing > 0 {
            return None;
        }
        let mut dropped = IndexMap::new();
        let mut group = 0;
        while group < self.in_flight.len() && group < MAX_OBJECTS_PER_COMMIT {
            let f = &mut self.in_flight[group];
            match f.stage {
                Stage::Written => {}
                Stage::RetryAt(t) if t <= now => {}
                // A failed write settles once it is the oldest, so the flushes before it
                // commit first.
                Stage::WriteFailed if group == 0 => {
                    let f = self.in_flight.pop_front()?;
                    self.abandon(f.partitions, false, false);
                    continue;
                }
                _ => break,
            }
            // Batches whose earlier batches were never committed would leave a gap.
            let stale: Vec<PartitionKey> = f
                .partitions
                .iter()
                .filter(|(k, p)| self.abandoned.get(k).is_some_and(|&live| p.gen < live))
                .map(|(k, _)| *k)
                .collect();
            for k in stale {
                if let Some(p) = f.partitions.shift_remove(&k) {
                    dropped.insert(k, p);
                }
            }
            if f.partitions.is_empty() {
                self.in_flight.remove(group);
                continue;
            }
            group += 1;
        }
        self.abandon(dropped, false, false);
        if group == 0 {
            return None;
        }
        self.committing = group;
        let mut commits = Vec::with_capacity(group);
        let mut waited = Vec::with_capacity(group);
        for f in self.in_flight.iter_mut().take(group) {
            f.stage = Stage::Committing;
            waited.push(now.saturating_duration_since(f.written_at));
            commits.push(WalCommit {
                object_key: f.object_key.clone(),
                created_ms: now_ms,
                partitions: f
                    .partitions
                    .iter()
                    .filter_map(|(k, p)| {
                        Some(PartitionCommit {
                            key: *k,
                            leader_epoch: p.leader_epoch,
                            range: p.range.clone()?,
                            producers: p.producers.values().cloned().collect(),
                            aborted: p.aborted.clone(),
                        })
                    })
                    .collect(),
            });
        }
        Some(NextCommit {
            seq: self.in_flight[0].seq,
            commits,
            waited,
        })
    }

    /// When the commit that runs now must be done: its oldest flush's start plus the
    /// timeout.
    pub(crate) fn commit_deadline(&self) -> Option<Instant> {
        self.in_flight
            .front()
            .map(|f| f.started + self.rules.timeout)
    }

    /// The commit reported under `seq` ended. `retry_wait`: how long to wait before
    /// trying a retriable failure again (the caller's backoff).
    pub(crate) fn committed(
        &mut self,
        seq: u64,
        result: CommitResult,
        now: Instant,
        retry_wait: Duration,
    ) -> CommitEnd {
        let group = std::mem::take(&mut self.committing);
        if group == 0 || self.in_flight.front().map(|f| f.seq) != Some(seq) {
            debug_assert!(false, "commit results come for the committing flushes");
            return CommitEnd::Abandoned { objects: 0 };
        }
        match result {
            CommitResult::Committed => {
                let mut partitions = 0;
                for f in self.in_flight.drain(..group).collect::<Vec<_>>() {
                    partitions += f.partitions.len();
                    #[cfg(test)]
                    if self.rules.ack_before_commit {
                        continue;
                    }
                    for (_, p) in f.partitions {
                        if let Some(range) = p.range {
                            self.outbox.push((
                                p.notify,
                                FlushNotice::Flushed {
                                    gen: p.gen,
                                    range,
                                    committed_at: now,
                                },
                            ));
                        }
                    }
                }
                CommitEnd::Committed {
                    objects: group,
                    partitions,
                }
            }
            CommitResult::Fenced(keys) => {
                // Those partitions have a newer owner: drop them and commit the rest
                // (their bytes in these objects are never referenced).
                let mut fenced = Vec::new();
                for f in self.in_flight.iter_mut().take(group) {
                    f.stage = Stage::Written;
                    let mut mine = IndexMap::new();
                    for k in &keys {
                        if let Some(p) = f.partitions.shift_remove(k) {
                            mine.insert(*k, p);
                        }
                    }
                    fenced.push(mine);
                }
                if fenced.iter().all(IndexMap::is_empty) {
                    for f in self.in_flight.drain(..group).collect::<Vec<_>>() {
                        self.abandon(f.partitions, false, false);
                    }
                    return CommitEnd::Abandoned { objects: group };
                }
                for mine in fenced {
                    self.abandon(mine, true, false);
                }
                CommitEnd::Retry
            }
            CommitResult::Failed { retriable } => {
                let started = self.in_flight[0].started;
                if retriable && now < started + self.rules.timeout {
                    for f in self.in_flight.iter_mut().take(group) {
                        f.stage = Stage::RetryAt(now + retry_wait);
                    }
                    return CommitEnd::Retry;
                }
                // An attempt may have committed before its connection broke.
                for f in self.in_flight.drain(..group).collect::<Vec<_>>() {
                    self.abandon(f.partitions, false, true);
                }
                CommitEnd::Abandoned { objects: group }
            }
        }
    }

    /// Tells the owners their batches are abandoned and remembers the generation, so
    /// later flushes and the buffer drop the rest of it.
    fn abandon(
        &mut self,
        parts: IndexMap<PartitionKey, Pending<N>>,
        fenced: bool,
        uncertain: bool,
    ) {
        for (k, p) in parts {
            let live = self.abandoned.entry(k).or_insert(0);
            *live = (*live).max(p.gen + 1);
            if self
                .buffer
                .partitions
                .get(&k)
                .is_some_and(|b| b.gen < *live)
            {
                if let Some(b) = self.buffer.partitions.shift_remove(&k) {
                    self.buffer.bytes -= b.bytes();
                }
                if self.buffer.partitions.is_empty() {
                    self.buffer = Buffer::default();
                }
            }
            self.outbox.push((
                p.notify,
                FlushNotice::Failed {
                    gen: p.gen,
                    fenced,
                    uncertain,
                },
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A partition owner as the flusher sees it: offsets from its high watermark, a
    /// generation that moves on when it hears `Failed`.
    #[derive(Debug, Default, Clone)]
    struct Owner {
        gen: u64,
        next: i64,
        hw: i64,
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Owner `p` hands over a batch of `n` bytes; `urgent` if a producer waits on it.
        Add(usize, usize, bool),
        /// Time passes (ms).
        Wait(u64),
        /// The oldest (or newest) unwritten flush's write ends: true = written.
        Write(bool, bool),
        /// The running commit ends: 0 committed, 1 fenced (first partition), 2 retriable
        /// failure, 3 final failure.
        Commit(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0..3usize, 1..300usize, any::<bool>()).prop_map(|(p, n, u)| Step::Add(p, n, u)),
            2 => (0..30u64).prop_map(Step::Wait),
            3 => (any::<bool>(), proptest::bool::weighted(0.85)).prop_map(|(o, ok)| Step::Write(o, ok)),
            3 => prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)].prop_map(Step::Commit),
        ]
    }

    fn key(p: usize) -> PartitionKey {
        PartitionKey {
            topic_id: uuid::Uuid::nil(),
            partition: p as i32,
        }
    }

    fn written(seq: u64, chunks: Vec<tiering::wal::WalChunk>) -> Written {
        let (_, locations) = tiering::wal::build_wal_object(chunks);
        Written {
            object_key: seq.to_string(),
            object_size: 1,
            locations,
        }
    }

    proptest! {
        /// Whatever writes, commits and failures come: owners hear `Flushed` only for
        /// committed flushes, each range starting exactly at their high watermark (no
        /// gap, no overlap); commits run one at a time, each taking the oldest written
        /// flushes in start order; flushes start at least `min_gap` apart, and a batch a
        /// producer waits on never waits while a slot is free and the gap has passed;
        /// once writes and commits succeed again and the flusher closes, everything
        /// settles.
        #[test]
        fn owners_hear_committed_ranges_in_order(
            steps in proptest::collection::vec(step(), 1..120),
            gap_ms in prop_oneof![Just(0u64), 1..15u64],
        ) {
            let min_gap = Duration::from_millis(gap_ms);
            let rules = FlushRules::new(Duration::from_millis(10), min_gap, 1000, Duration::from_millis(50), 3);
            let mut core: FlushCore<usize> = FlushCore::new(rules);
            let mut owners = vec![Owner::default(); 3];
            let base = crate::clock::instant();
            let mut now = base;
            let mut writing: Vec<(u64, Vec<tiering::wal::WalChunk>)> = Vec::new();
            let mut committing: Option<NextCommit> = None;
            let mut committed_seqs: Vec<u64> = Vec::new();
            let mut next_to_commit = 0u64;
            let mut last_start: Option<Instant> = None;
            let deliver = |core: &mut FlushCore<usize>, owners: &mut Vec<Owner>, committed: &[u64]| -> Result<(), TestCaseError> {
                for (p, notice) in core.take_notices() {
                    let o = &mut owners[p];
                    match notice {
                        FlushNotice::Flushed { gen, range, .. } if gen == o.gen => {
                            let seq: u64 = range.object_key.parse().expect("seq key");
                            prop_assert!(committed.contains(&seq), "flushed before its commit");
                            prop_assert_eq!(range.base_offset, o.hw, "gap or overlap");
                            o.hw = range.end_offset;
                        }
                        FlushNotice::Failed { gen, .. } if gen == o.gen => {
                            o.gen += 1;
                            o.next = o.hw;
                        }
                        _ => {}
                    }
                }
                Ok(())
            };
            let finish = steps.len();
            for (i, s) in steps.into_iter().chain(std::iter::repeat_n(Step::Wait(20), 200)).enumerate() {
                let closing = i >= finish;
                match s {
                    Step::Add(p, n, urgent) if !closing && core.accepts() => {
                        let o = &mut owners[p];
                        let item = FlushItem {
                            key: key(p),
                            stream: std::sync::Arc::from(format!("s{p}")),
                            leader_epoch: 1,
                            gen: o.gen,
                            base_offset: o.next,
                            end_offset: o.next + 1,
                            max_timestamp: 0,
                            batch: Bytes::from(vec![0u8; n]),
                            producer: None,
                            aborted: None,
                            notify: p,
                            urgent,
                            arrived: now,
                        };
                        o.next += 1;
                        core.add(item, now);
                    }
                    Step::Add(..) => {}
                    Step::Wait(ms) => now += Duration::from_millis(ms),
                    Step::Write(oldest, ok) => {
                        if !writing.is_empty() {
                            let (seq, chunks) = if oldest { writing.remove(0) } else { writing.pop().expect("one") };
                            let ok = ok || closing;
                            core.written(seq, ok.then(|| written(seq, chunks)), now);
                        }
                    }
                    Step::Commit(outcome) => {
                        if let Some(next) = committing.take() {
                            let outcome = if closing { 0 } else { outcome };
                            let result = match outcome {
                                0 => {
                                    committed_seqs.extend(next.commits.iter().map(|c| c.object_key.parse::<u64>().expect("seq key")));
                                    CommitResult::Committed
                                }
                                1 => CommitResult::Fenced(vec![next.commits[0].partitions[0].key]),
                                2 => CommitResult::Failed { retriable: true },
                                _ => CommitResult::Failed { retriable: false },
                            };
                            core.committed(next.seq, result, now, Duration::from_millis(5));
                        }
                    }
                }
                // The task's loop: start what is due, take the next commit.
                while let Some(started) = core.start(now, closing) {
                    if let (Some(t), false) = (last_start, closing) {
                        prop_assert!(now >= t + min_gap, "flushes start at least min_gap apart");
                    }
                    last_start = Some(now);
                    writing.push((started.seq, started.chunks));
                }
                if !closing && core.slot_free() && core.buffer.urgent_since.is_some() {
                    prop_assert!(
                        last_start.is_some_and(|t| now < t + min_gap),
                        "a waited-on batch waits only for a slot or the gap"
                    );
                }
                if committing.is_none() {
                    if let Some(next) = core.next_commit(now, 0) {
                        let seqs: Vec<u64> = next.commits.iter().map(|c| c.object_key.parse().expect("seq key")).collect();
                        prop_assert_eq!(seqs[0], next.seq);
                        prop_assert!(seqs[0] >= next_to_commit, "commits in start order");
                        prop_assert!(seqs.windows(2).all(|w| w[0] < w[1]), "one commit's objects in start order");
                        prop_assert!(next.commits.iter().all(|c| !c.partitions.is_empty()));
                        prop_assert!(seqs.len() <= MAX_OBJECTS_PER_COMMIT);
                        next_to_commit = seqs[0];
                        committing = Some(next);
                    }
                }
                deliver(&mut core, &mut owners, &committed_seqs)?;
                if closing {
                    // Settle: write everything, commit everything.
                    while let Some((seq, chunks)) = writing.pop() {
                        core.written(seq, Some(written(seq, chunks)), now);
                    }
                    if let Some(next) = committing.take() {
                        committed_seqs.extend(next.commits.iter().map(|c| c.object_key.parse::<u64>().expect("seq key")));
                        core.committed(next.seq, CommitResult::Committed, now, Duration::ZERO);
                    }
                }
            }
            deliver(&mut core, &mut owners, &committed_seqs)?;
            prop_assert!(core.is_idle(), "everything settles once the stores answer");
            for o in &owners {
                prop_assert_eq!(o.hw, o.next, "every batch of the live generation committed");
            }
        }
    }

    fn item(p: usize, offset: i64, urgent: bool, now: Instant) -> FlushItem<usize> {
        FlushItem {
            key: key(p),
            stream: std::sync::Arc::from(format!("s{p}")),
            leader_epoch: 1,
            gen: 0,
            base_offset: offset,
            end_offset: offset + 1,
            max_timestamp: 0,
            batch: Bytes::from_static(b"x"),
            producer: None,
            aborted: None,
            notify: p,
            urgent,
            arrived: now,
        }
    }

    /// A 25 ms interval, no rate bound, four slots.
    fn unbounded_core() -> FlushCore<usize> {
        FlushCore::new(FlushRules::new(
            Duration::from_millis(25),
            Duration::ZERO,
            1 << 20,
            Duration::from_secs(1),
            4,
        ))
    }

    /// Group commit: a batch a producer waits on starts a flush at once; one nobody
    /// waits on waits for the interval.
    #[test]
    fn waited_on_batches_flush_at_once_others_wait_the_interval() {
        let mut core = unbounded_core();
        let t0 = crate::clock::instant();
        core.add(item(0, 0, false, t0), t0);
        assert!(core.start(t0, false).is_none(), "acks=1 batch waits");
        assert_eq!(core.wake_at(), Some(t0 + Duration::from_millis(25)));
        core.add(item(1, 0, true, t0), t0);
        let started = core
            .start(t0, false)
            .expect("acks=all batch flushes at once");
        assert_eq!(started.chunks.len(), 2, "and takes the waiting batch along");
        core.add(item(1, 1, true, t0), t0);
        assert!(core.start(t0, false).is_some(), "the next slot starts too");
    }

    /// The flush-rate bound holds even for batches someone waits on.
    #[test]
    fn the_rate_bound_spaces_flush_starts() {
        let gap = Duration::from_millis(25);
        let rules = FlushRules::new(gap, gap, 1 << 20, Duration::from_secs(1), 4);
        let mut core: FlushCore<usize> = FlushCore::new(rules);
        let t0 = crate::clock::instant();
        core.add(item(0, 0, true, t0), t0);
        assert!(core.start(t0, false).is_some());
        core.add(item(0, 1, true, t0), t0);
        assert!(core.start(t0 + Duration::from_millis(5), false).is_none());
        assert_eq!(core.wake_at(), Some(t0 + gap));
        assert!(core.start(t0 + gap, false).is_some());
    }

    /// Flushes written while a commit runs commit together in the next one.
    #[test]
    fn written_flushes_commit_together() {
        let mut core = unbounded_core();
        let t0 = crate::clock::instant();
        let mut started = Vec::new();
        for i in 0..3 {
            core.add(item(0, i, true, t0), t0);
            started.push(core.start(t0, false).expect("a slot is free"));
        }
        let mut it = started.into_iter();
        let first = it.next().expect("three");
        core.written(first.seq, Some(written(first.seq, first.chunks)), t0);
        let one = core.next_commit(t0, 0).expect("the first is written");
        assert_eq!(one.commits.len(), 1);
        for s in it {
            core.written(s.seq, Some(written(s.seq, s.chunks)), t0);
        }
        assert!(core.next_commit(t0, 0).is_none(), "one commit at a time");
        core.committed(one.seq, CommitResult::Committed, t0, Duration::ZERO);
        let two = core.next_commit(t0, 0).expect("the other two");
        assert_eq!(two.commits.len(), 2);
        assert_eq!(two.seq, 1);
        let end = core.committed(two.seq, CommitResult::Committed, t0, Duration::ZERO);
        assert_eq!(
            end,
            CommitEnd::Committed {
                objects: 2,
                partitions: 2
            }
        );
        let ranges: Vec<(i64, i64)> = core
            .take_notices()
            .into_iter()
            .filter_map(|(_, n)| match n {
                FlushNotice::Flushed { range, .. } => Some((range.base_offset, range.end_offset)),
                FlushNotice::Failed { .. } => None,
            })
            .collect();
        assert_eq!(ranges, vec![(0, 1), (1, 2), (2, 3)]);
    }
}
