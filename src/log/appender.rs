//! The write side of one partition as a plain state machine: which offsets a produce
//! gets, which producer sequences it may write, and when each waiting `acks=all`
//! producer may be answered.
//!
//! The partition owner task drives it (append, then the flusher's notices) and does the
//! I/O around it; the simulation (`src/sim.rs`) drives the same struct against a
//! simulated flusher, store and crashes. The rules it keeps:
//! * offsets are handed out contiguously from the high watermark, batches stamped with
//!   them and the leader epoch;
//! * a producer is answered only once a commit covers its batches (the high watermark
//!   passed their end);
//! * a failed flush abandons every batch not yet committed: the generation moves on (so
//!   the flusher drops what it still holds of the old one), offsets continue from the
//!   high watermark again and the producer state goes back to the committed one;
//! * a transaction marker is a batch like any other, checked against the producer's
//!   state; the transaction it ends counts as open (holding the last stable offset)
//!   until the marker is committed, and an abort's range is published only then.

use std::collections::VecDeque;

use bytes::Bytes;

use super::batch::{self, ValidBatch};
use super::marker::Marker;
use super::producer::{MarkerError, ProducerTable, SeqCheck, SeqError};
use crate::metadata::{AbortedTxnRecord, ProducerStateRecord};

/// A batch given offsets: to hand to the flusher.
#[derive(Debug, Clone)]
pub(crate) struct Stamped {
    pub base_offset: i64,
    pub end_offset: i64,
    pub max_timestamp: i64,
    pub bytes: Bytes,
    /// The producer's state after this batch, committed with it.
    pub producer: Option<ProducerStateRecord>,
    /// The transaction an abort marker ends, committed with it.
    pub aborted: Option<AbortedTxnRecord>,
}

/// What one produce request became.
#[derive(Debug)]
pub(crate) struct Appended {
    /// Offset of the request's first batch (a duplicate's original one).
    pub base_offset: i64,
    /// The offset after the request's last batch: the high watermark that makes it durable.
    pub end_offset: i64,
    /// The batches to write, in offset order (none when every batch was a duplicate).
    pub batches: Vec<Stamped>,
}

/// A commit reached the owner: what became durable and who may now be answered.
#[derive(Debug)]
pub(crate) struct Durable<R> {
    /// The high watermark before the commit: the offset of `batches[0]`.
    pub from: i64,
    /// The committed batches (stamped bytes), in offset order.
    pub batches: Vec<Bytes>,
    /// Replies now due, in the order their requests came.
    pub answered: Vec<R>,
    /// Transactions whose abort marker was among the batches.
    pub aborted: Vec<AbortedTxnRecord>,
}

struct Unflushed {
    bytes: Bytes,
    end_offset: i64,
    producer: Option<ProducerStateRecord>,
    aborted: Option<AbortedTxnRecord>,
}

struct Waiter<R> {
    end_offset: i64,
    reply: R,
}

/// The partition's write state. `R` is what a waiting producer is answered through.
pub(crate) struct Appender<R> {
    leader_epoch: i32,
    /// Next offset to assign (log end, including batches not yet durable).
    next_offset: i64,
    high_watermark: i64,
    /// Producer state including batches not yet durable.
    producers: ProducerTable,
    /// Producer state as committed; restored when a flush fails.
    durable_producers: ProducerTable,
    unflushed: VecDeque<Unflushed>,
    waiters: VecDeque<Waiter<R>>,
    /// Moves on when unflushed batches are abandoned, so the flusher drops what it
    /// holds of the old generation and notices about it are ignored.
    gen: u64,
}

impl<R> Appender<R> {
    /// The state a claim recovered. Generations start from the leader epoch, so a later
    /// incarnation of the partition on this broker never reuses one the flusher already
    /// abandoned.
    pub(crate) fn new(leader_epoch: i32, high_watermark: i64, producers: ProducerTable) -> Self {
        Appender {
            leader_epoch,
            next_offset: high_watermark,
            high_watermark,
            durable_producers: producers.clone(),
            producers,
            unflushed: VecDeque::new(),
            waiters: VecDeque::new(),
            gen: (leader_epoch.max(0) as u64) << 32,
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.gen
    }

    /// The producers whose batches are committed (DescribeProducers).
    pub(crate) fn durable_producers(&self) -> Vec<crate::metadata::ProducerStateRecord> {
        self.durable_producers.records()
    }

    #[cfg(test)]
    pub(crate) fn high_watermark(&self) -> i64 {
        self.high_watermark
    }

    /// Whether every batch taken has been committed or abandoned.
    pub(crate) fn all_settled(&self) -> bool {
        self.unflushed.is_empty()
    }

    /// Checks every batch of a request first (so it applies whole or not at all), then
    /// assigns offsets to the new ones; duplicates of batches already written are
    /// answered with their original offsets.
    pub(crate) fn append(
        &mut self,
        batches: &[ValidBatch],
        now_ms: i64,
    ) -> Result<Appended, SeqError> {
        let mut decisions = Vec::with_capacity(batches.len());
        {
            // Several batches are checked against a scratch copy, each after the others.
            let mut scratch = (batches.len() > 1).then(|| self.producers.clone());
            for b in batches {
                let table = scratch.as_ref().unwrap_or(&self.producers);
                let d = table.check(&b.header)?;
                if let (Some(t), SeqCheck::Append) = (scratch.as_mut(), d) {
                    t.record(&b.header, 0, 0);
                }
                decisions.push(d);
            }
        }
        let mut first_base = None;
        let mut end_offset = self.next_offset;
        let mut stamped = Vec::new();
        for (b, decision) in batches.iter().zip(decisions) {
            match decision {
                SeqCheck::Duplicate { base_offset } => {
                    first_base.get_or_insert(base_offset);
                    end_offset = end_offset.max(base_offset + b.header.offset_count());
                }
                SeqCheck::Append => {
                    let base = self.next_offset;
                    let bytes = batch::stamp(&b.bytes, base, self.leader_epoch);
                    self.next_offset += b.header.offset_count();
                    let producer = self.producers.record(&b.header, base, now_ms);
                    stamped.push(self.take(base, bytes, b.header.max_timestamp, producer, None));
                    first_base.get_or_insert(base);
                    end_offset = self.next_offset;
                }
            }
        }
        Ok(Appended {
            base_offset: first_base.unwrap_or(self.next_offset),
            end_offset,
            batches: stamped,
        })
    }

    /// Takes a stamped batch at `base_offset` (its offsets already counted in
    /// `next_offset`) for the flusher.
    fn take(
        &mut self,
        base_offset: i64,
        bytes: Bytes,
        max_timestamp: i64,
        producer: Option<ProducerStateRecord>,
        aborted: Option<AbortedTxnRecord>,
    ) -> Stamped {
        let end_offset = self.next_offset;
        self.unflushed.push_back(Unflushed {
            bytes: bytes.clone(),
            end_offset,
            producer: producer.clone(),
            aborted,
        });
        Stamped {
            base_offset,
            end_offset,
            max_timestamp,
            bytes,
            producer,
            aborted,
        }
    }

    /// Appends a transaction marker: the producer's transaction on this partition ends
    /// (durably once the marker commits).
    pub(crate) fn append_marker(
        &mut self,
        m: &Marker,
        now_ms: i64,
    ) -> Result<Appended, MarkerError> {
        self.producers.check_marker(m)?;
        let base = self.next_offset;
        let bytes = batch::stamp(&m.batch(now_ms), base, self.leader_epoch);
        self.next_offset += 1;
        let (producer, aborted) = self.producers.end_txn(m, base, now_ms);
        let stamped = self.take(base, bytes, now_ms, Some(producer), aborted);
        Ok(Appended {
            base_offset: base,
            end_offset: self.next_offset,
            batches: vec![stamped],
        })
    }

    /// Whether the producer's transaction is open here (batches taken, committed or
    /// not, and no marker yet).
    pub(crate) fn txn_open(&self, producer_id: i64) -> bool {
        self.producers.txn_open(producer_id)
    }

    /// The producers with a transaction open here.
    pub(crate) fn open_txn_producers(&self) -> std::collections::HashSet<i64> {
        self.producers.open_txn_producers()
    }

    /// Where `read_committed` consumers stop: the first offset of the oldest
    /// transaction not yet ended by a committed marker, or the high watermark.
    pub(crate) fn last_stable_offset(&self) -> i64 {
        self.durable_producers
            .first_unstable_offset()
            .map_or(self.high_watermark, |o| o.min(self.high_watermark))
    }

    /// Answers `reply` once the high watermark reaches `end_offset`: at once (returned
    /// back) if it already has.
    pub(crate) fn wait(&mut self, end_offset: i64, reply: R) -> Option<R> {
        if end_offset <= self.high_watermark {
            return Some(reply);
        }
        self.waiters.push_back(Waiter { end_offset, reply });
        None
    }

    /// The flusher committed this partition's batches up to `end_offset` in generation
    /// `gen`; `None` for a notice about an abandoned generation.
    pub(crate) fn flushed(&mut self, gen: u64, end_offset: i64) -> Option<Durable<R>> {
        if gen != self.gen || end_offset <= self.high_watermark {
            return None;
        }
        let from = self.high_watermark;
        let mut batches = Vec::new();
        let mut aborted = Vec::new();
        while let Some(u) = self.unflushed.pop_front() {
            if u.end_offset > end_offset {
                self.unflushed.push_front(u);
                break;
            }
            if let Some(p) = u.producer {
                self.durable_producers.insert(p);
            }
            aborted.extend(u.aborted);
            batches.push(u.bytes);
        }
        self.high_watermark = end_offset;
        let mut answered = Vec::new();
        while let Some(w) = self.waiters.pop_front() {
            if w.end_offset > end_offset {
                self.waiters.push_front(w);
                break;
            }
            answered.push(w.reply);
        }
        Some(Durable {
            from,
            batches,
            answered,
            aborted,
        })
    }

    /// A flush of generation `gen` failed: every batch not yet committed is abandoned
    /// and offsets continue from the high watermark. Returns the waiting producers, to
    /// be told their writes failed; `None` for a notice about an abandoned generation.
    pub(crate) fn failed(&mut self, gen: u64) -> Option<Vec<R>> {
        if gen != self.gen {
            return None;
        }
        self.gen += 1;
        self.next_offset = self.high_watermark;
        self.producers = self.durable_producers.clone();
        self.unflushed.clear();
        Some(self.take_waiters())
    }

    /// Every producer still waiting (the owner stops).
    pub(crate) fn take_waiters(&mut self) -> Vec<R> {
        self.waiters.drain(..).map(|w| w.reply).collect()
    }

    /// Batches taken and not yet committed or abandoned.
    pub(crate) fn unflushed_len(&self) -> usize {
        self.unflushed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::batch::BatchHeader;
    use proptest::prelude::*;

    /// A valid one-batch record set of `count` records from producer `pid` at `seq`.
    pub(crate) fn batch(pid: i64, seq: i32, count: i32) -> ValidBatch {
        let bytes = crate::log::batch::tests::make_batch(count, pid, 0, seq, 0);
        ValidBatch {
            header: BatchHeader::parse(&bytes).expect("header"),
            bytes,
        }
    }

    #[test]
    fn producers_are_answered_only_once_their_batches_commit() {
        let mut a: Appender<u32> = Appender::new(3, 10, ProducerTable::default());
        let first = a.append(&[batch(7, 0, 2)], 0).expect("append");
        assert_eq!((first.base_offset, first.end_offset), (10, 12));
        assert_eq!(a.wait(first.end_offset, 1), None);
        let second = a.append(&[batch(7, 2, 3)], 0).expect("append");
        assert_eq!((second.base_offset, second.end_offset), (12, 15));
        assert_eq!(a.wait(second.end_offset, 2), None);
        let durable = a.flushed(a.generation(), 12).expect("current generation");
        assert_eq!((durable.from, durable.batches.len()), (10, 1));
        assert_eq!(durable.answered, vec![1]);
        let durable = a.flushed(a.generation(), 15).expect("current generation");
        assert_eq!(durable.answered, vec![2]);
        // A retry of a written batch is a duplicate, answered at once.
        let retry = a.append(&[batch(7, 2, 3)], 0).expect("duplicate");
        assert!(retry.batches.is_empty());
        assert_eq!(retry.base_offset, 12);
        assert_eq!(a.wait(retry.end_offset, 3), Some(3));
    }

    #[test]
    fn a_failed_flush_abandons_the_uncommitted_batches() {
        let mut a: Appender<u32> = Appender::new(1, 0, ProducerTable::default());
        let x = a.append(&[batch(7, 0, 1)], 0).expect("append");
        a.wait(x.end_offset, 1);
        let gen = a.generation();
        assert_eq!(a.failed(gen), Some(vec![1]));
        // The old generation's notices are ignored from now on.
        assert!(a.flushed(gen, 1).is_none());
        // The producer's retry is not a duplicate any more: it gets offset 0 again.
        let again = a.append(&[batch(7, 0, 1)], 0).expect("append");
        assert_eq!(again.batches[0].base_offset, 0);
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// A request of batches of (count) records from one producer.
        Produce(Vec<i32>),
        /// The flusher commits up to the end of the n-th oldest unflushed batch.
        Commit(usize),
        Fail,
        /// The producer resends its oldest unanswered request.
        Retry,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => proptest::collection::vec(1..4i32, 1..3).prop_map(Step::Produce),
            2 => (0..4usize).prop_map(Step::Commit),
            1 => Just(Step::Fail),
            1 => Just(Step::Retry),
        ]
    }

    /// A request the test sent: its first sequence, batch sizes, and whether answered.
    #[derive(Debug, Clone)]
    struct Request {
        seq: i32,
        counts: Vec<i32>,
        answered: bool,
    }

    proptest! {
        /// Whatever commits and failures come: offsets are contiguous, every producer
        /// answered has its batches below the high watermark, nothing is answered twice,
        /// and a retried request lands exactly once.
        #[test]
        fn offsets_and_answers_follow_commits(steps in proptest::collection::vec(step(), 1..60)) {
            let mut a: Appender<usize> = Appender::new(1, 0, ProducerTable::default());
            let pid = 42;
            let mut next_seq = 0i32;
            let mut requests: Vec<Request> = Vec::new();
            // Waiting requests: (end offset, request index).
            let mut ends: Vec<(i64, usize)> = Vec::new();
            // Batches taken and not yet committed, and those committed: (base, end, the
            // sequence after the batch).
            let mut unflushed: VecDeque<(i64, i64, i32)> = VecDeque::new();
            let mut log: Vec<(i64, i64, i32)> = Vec::new();
            for s in steps {
                match s {
                    Step::Produce(counts) => {
                        let first = next_seq;
                        let mut seq_ends = Vec::new();
                        let batches: Vec<ValidBatch> = counts.iter().map(|&c| {
                            let b = batch(pid, next_seq, c);
                            next_seq += c;
                            seq_ends.push(next_seq);
                            b
                        }).collect();
                        let r = a.append(&batches, 0).expect("in sequence");
                        for (st, seq_end) in r.batches.iter().zip(seq_ends) {
                            let expected = unflushed.back().map_or(a.high_watermark(), |u| u.1);
                            prop_assert_eq!(st.base_offset, expected);
                            unflushed.push_back((st.base_offset, st.end_offset, seq_end));
                        }
                        requests.push(Request { seq: first, counts, answered: false });
                        let id = requests.len() - 1;
                        if let Some(id) = a.wait(r.end_offset, id) {
                            requests[id].answered = true;
                        } else {
                            ends.push((r.end_offset, id));
                        }
                    }
                    Step::Commit(n) => {
                        if let Some(&(_, end, _)) = unflushed.get(n) {
                            let d = a.flushed(a.generation(), end).expect("current");
                            prop_assert_eq!(d.from, log.last().map_or(0, |l| l.1));
                            for _ in 0..d.batches.len() {
                                log.push(unflushed.pop_front().expect("batch"));
                            }
                            prop_assert_eq!(a.high_watermark(), end);
                            for id in d.answered {
                                prop_assert!(!requests[id].answered, "answered twice");
                                let end = ends.iter().find(|e| e.1 == id).expect("waiting").0;
                                prop_assert!(end <= a.high_watermark());
                                requests[id].answered = true;
                            }
                        }
                    }
                    Step::Fail => {
                        let failed = a.failed(a.generation()).expect("current");
                        unflushed.clear();
                        for id in failed {
                            prop_assert!(!requests[id].answered);
                        }
                        ends.clear();
                        // Sequences continue from what was committed.
                        requests.retain(|r| r.answered);
                        next_seq = log.last().map_or(0, |l| l.2);
                    }
                    Step::Retry => {
                        // The newest answered one-batch request again: a duplicate,
                        // answered at once with no new offsets.
                        if let Some(r) = requests.last().filter(|r| r.answered && r.counts.len() == 1) {
                            let again = a.append(&[batch(pid, r.seq, r.counts[0])], 0).expect("duplicate");
                            prop_assert!(again.batches.is_empty());
                            prop_assert!(again.end_offset <= a.high_watermark());
                        }
                    }
                }
            }
            for w in log.windows(2) {
                prop_assert_eq!(w[0].1, w[1].0, "committed batches are contiguous");
            }
        }
    }
}
