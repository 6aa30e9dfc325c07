//! The flusher's decisions as a plain state machine, apart from its I/O: what goes into
//! the next write-ahead object, when a flush starts, which flush commits next, and what
//! each partition owner is told.
//!
//! The flusher task ([`super::Flusher`]) feeds it batches, the results of object writes
//! and metadata commits, and the time; it answers with flushes to start, commits to run
//! and notices to send. The simulation (`src/sim.rs`) drives the same struct against a
//! simulated store, metadata store and crashes. The rules it keeps:
//! * a flush starts when `max_bytes` are buffered, or once the oldest buffered batch has
//!   waited for the interval since the previous flush started, or at once when closing,
//!   and only while fewer than `concurrency` flushes are unfinished;
//! * objects are written concurrently, but commits run one at a time in the order their
//!   flushes started, so every partition's ranges are committed in offset order;
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
    PartitionCommit, PartitionKey, ProducerStateRecord, WalCommit, WalRangeRecord,
};

/// When flushes start and how long a flush may take.
#[derive(Debug, Clone)]
pub(crate) struct FlushRules {
    pub interval: Duration,
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
        max_bytes: usize,
        timeout: Duration,
        concurrency: usize,
    ) -> Self {
        FlushRules {
            interval,
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
    pub notify: N,
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
}

impl<N> Default for Buffer<N> {
    fn default() -> Self {
        Buffer {
            partitions: IndexMap::new(),
            bytes: 0,
            opened: None,
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
    object_key: String,
    stage: Stage,
    partitions: IndexMap<PartitionKey, Pending<N>>,
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
}

/// A flush's object as written.
#[derive(Debug)]
pub(crate) struct Written {
    pub object_key: String,
    pub object_size: u64,
    /// Where each chunk landed, in the order of [`Started::chunks`].
    pub locations: Vec<tiering::wal::WalChunkLocation>,
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

/// What became of a flush after a commit attempt, for the task's metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitEnd {
    Committed {
        partitions: usize,
    },
    /// To be tried again: at the given time, or at once (with fewer partitions).
    Retry,
    /// Abandoned for good, after a failure that may have applied (`uncertain`) or a
    /// fence naming none of its partitions.
    Abandoned,
}

/// The flusher's state. `N` is how a partition owner is told about its batches.
pub(crate) struct FlushCore<N> {
    rules: FlushRules,
    buffer: Buffer<N>,
    /// Lowest live generation per partition (see the module docs).
    abandoned: HashMap<PartitionKey, u64>,
    /// Unfinished flushes in start order.
    in_flight: VecDeque<InFlight<N>>,
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
    }

    fn slot_free(&self) -> bool {
        self.in_flight.len() < self.rules.concurrency
    }

    /// When the buffer becomes due by the interval: the later of its oldest batch's
    /// arrival and the previous flush's start plus the interval.
    fn due_at(&self) -> Option<Instant> {
        let opened = self.buffer.opened?;
        Some(
            self.last_start
                .map_or(opened, |t| (t + self.rules.interval).max(opened)),
        )
    }

    /// When the task must call again even if nothing arrives: a flush due by the
    /// interval (while a slot is free) or a commit retry.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        let due = self.due_at().filter(|_| self.slot_free());
        let retry = match self.in_flight.front().map(|f| f.stage) {
            Some(Stage::RetryAt(t)) => Some(t),
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
        let due = closing
            || self.buffer.bytes >= self.rules.max_bytes
            || self.due_at().is_some_and(|t| t <= now);
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
        })
    }

    /// The object of flush `seq` was written (`Some`) or could not be (`None`).
    pub(crate) fn written(&mut self, seq: u64, written: Option<Written>) {
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
        #[cfg(test)]
        if self.rules.ack_before_commit {
            let notices: Vec<_> = f
                .partitions
                .values()
                .filter_map(|p| {
                    let range = p.range.clone()?;
                    Some((p.notify.clone(), FlushNotice::Flushed { gen: p.gen, range }))
                })
                .collect();
            self.outbox.extend(notices);
        }
    }

    /// The next commit to run, if the oldest unfinished flush is ready for it (commits
    /// run one at a time: call again only after [`FlushCore::committed`]). Flushes
    /// whose write failed, and partitions whose generation was abandoned, are settled
    /// on the way.
    pub(crate) fn next_commit(&mut self, now: Instant, now_ms: i64) -> Option<(u64, WalCommit)> {
        loop {
            let front = self.in_flight.front_mut()?;
            match front.stage {
                Stage::Writing | Stage::Committing => return None,
                Stage::RetryAt(t) if t > now => return None,
                Stage::WriteFailed => {
                    let f = self.in_flight.pop_front()?;
                    self.abandon(f.partitions, false, false);
                    continue;
                }
                Stage::Written | Stage::RetryAt(_) => {}
            }
            // Batches whose earlier batches were never committed would leave a gap.
            let stale: Vec<PartitionKey> = front
                .partitions
                .iter()
                .filter(|(k, p)| self.abandoned.get(k).is_some_and(|&live| p.gen < live))
                .map(|(k, _)| *k)
                .collect();
            let mut dropped = IndexMap::new();
            for k in stale {
                if let Some(p) = front.partitions.shift_remove(&k) {
                    dropped.insert(k, p);
                }
            }
            if front.partitions.is_empty() {
                self.in_flight.pop_front();
                self.abandon(dropped, false, false);
                continue;
            }
            front.stage = Stage::Committing;
            let commit = WalCommit {
                object_key: front.object_key.clone(),
                created_ms: now_ms,
                partitions: front
                    .partitions
                    .iter()
                    .filter_map(|(k, p)| {
                        Some(PartitionCommit {
                            key: *k,
                            leader_epoch: p.leader_epoch,
                            range: p.range.clone()?,
                            producers: p.producers.values().cloned().collect(),
                        })
                    })
                    .collect(),
            };
            let seq = front.seq;
            self.abandon(dropped, false, false);
            return Some((seq, commit));
        }
    }

    /// When the flush whose commit runs now must be done: its start plus the timeout.
    pub(crate) fn commit_deadline(&self) -> Option<Instant> {
        self.in_flight
            .front()
            .map(|f| f.started + self.rules.timeout)
    }

    /// The commit of flush `seq` ended. `retry_wait`: how long to wait before trying a
    /// retriable failure again (the caller's backoff).
    pub(crate) fn committed(
        &mut self,
        seq: u64,
        result: CommitResult,
        now: Instant,
        retry_wait: Duration,
    ) -> CommitEnd {
        let Some(front) = self.in_flight.front_mut() else {
            return CommitEnd::Abandoned;
        };
        if front.seq != seq || front.stage != Stage::Committing {
            debug_assert!(false, "commit results come for the committing flush");
            return CommitEnd::Abandoned;
        }
        match result {
            CommitResult::Committed => {
                let Some(f) = self.in_flight.pop_front() else {
                    return CommitEnd::Abandoned;
                };
                let partitions = f.partitions.len();
                #[cfg(test)]
                if self.rules.ack_before_commit {
                    return CommitEnd::Committed { partitions };
                }
                for (_, p) in f.partitions {
                    if let Some(range) = p.range {
                        self.outbox
                            .push((p.notify, FlushNotice::Flushed { gen: p.gen, range }));
                    }
                }
                CommitEnd::Committed { partitions }
            }
            CommitResult::Fenced(keys) => {
                // Those partitions have a newer owner: drop them and commit the rest
                // (their bytes in this object are never referenced).
                let mut fenced = IndexMap::new();
                for k in keys {
                    if let Some(p) = front.partitions.shift_remove(&k) {
                        fenced.insert(k, p);
                    }
                }
                if fenced.is_empty() {
                    let f = self.in_flight.pop_front();
                    if let Some(f) = f {
                        self.abandon(f.partitions, false, false);
                    }
                    return CommitEnd::Abandoned;
                }
                front.stage = Stage::Written;
                self.abandon(fenced, true, false);
                CommitEnd::Retry
            }
            CommitResult::Failed { retriable } => {
                if retriable && now < front.started + self.rules.timeout {
                    front.stage = Stage::RetryAt(now + retry_wait);
                    return CommitEnd::Retry;
                }
                // An attempt may have committed before its connection broke.
                if let Some(f) = self.in_flight.pop_front() {
                    self.abandon(f.partitions, false, true);
                }
                CommitEnd::Abandoned
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
                    self.buffer.opened = None;
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
        /// Owner `p` hands over a batch of `n` bytes.
        Add(usize, usize),
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
            4 => (0..3usize, 1..300usize).prop_map(|(p, n)| Step::Add(p, n)),
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

    proptest! {
        /// Whatever writes, commits and failures come: owners hear `Flushed` only for
        /// committed flushes, each range starting exactly at their high watermark (no
        /// gap, no overlap); commits run one at a time in start order; once writes and
        /// commits succeed again and the flusher closes, everything settles.
        #[test]
        fn owners_hear_committed_ranges_in_order(steps in proptest::collection::vec(step(), 1..120)) {
            let rules = FlushRules::new(Duration::from_millis(10), 1000, Duration::from_millis(50), 3);
            let mut core: FlushCore<usize> = FlushCore::new(rules);
            let mut owners = vec![Owner::default(); 3];
            let base = crate::clock::instant();
            let mut now = base;
            let mut writing: Vec<(u64, Vec<tiering::wal::WalChunk>)> = Vec::new();
            let mut committing: Option<(u64, WalCommit)> = None;
            let mut committed_seqs: Vec<u64> = Vec::new();
            let mut last_commit_seq: Option<u64> = None;
            let deliver = |core: &mut FlushCore<usize>, owners: &mut Vec<Owner>, committed: &[u64]| -> Result<(), TestCaseError> {
                for (p, notice) in core.take_notices() {
                    let o = &mut owners[p];
                    match notice {
                        FlushNotice::Flushed { gen, range } if gen == o.gen => {
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
                    Step::Add(p, n) if !closing && core.accepts() => {
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
                            notify: p,
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
                            let written = ok.then(|| {
                                let (_, locations) = tiering::wal::build_wal_object(chunks);
                                Written { object_key: seq.to_string(), object_size: 1, locations }
                            });
                            core.written(seq, written);
                        }
                    }
                    Step::Commit(outcome) => {
                        if let Some((seq, commit)) = committing.take() {
                            let outcome = if closing { 0 } else { outcome };
                            let result = match outcome {
                                0 => {
                                    committed_seqs.push(seq);
                                    CommitResult::Committed
                                }
                                1 => CommitResult::Fenced(vec![commit.partitions[0].key]),
                                2 => CommitResult::Failed { retriable: true },
                                _ => CommitResult::Failed { retriable: false },
                            };
                            core.committed(seq, result, now, Duration::from_millis(5));
                        }
                    }
                }
                // The task's loop: start what is due, take the next commit.
                while let Some(started) = core.start(now, closing) {
                    writing.push((started.seq, started.chunks));
                }
                if committing.is_none() {
                    if let Some((seq, commit)) = core.next_commit(now, 0) {
                        prop_assert!(last_commit_seq.is_none_or(|l| l <= seq), "commits in start order");
                        last_commit_seq = Some(seq);
                        prop_assert!(!commit.partitions.is_empty());
                        committing = Some((seq, commit));
                    }
                }
                deliver(&mut core, &mut owners, &committed_seqs)?;
                if closing {
                    // Settle: write everything, commit everything.
                    while let Some((seq, chunks)) = writing.pop() {
                        let (_, locations) = tiering::wal::build_wal_object(chunks);
                        core.written(seq, Some(Written { object_key: seq.to_string(), object_size: 1, locations }));
                    }
                    if let Some((seq, _)) = committing.take() {
                        committed_seqs.push(seq);
                        core.committed(seq, CommitResult::Committed, now, Duration::ZERO);
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
}
