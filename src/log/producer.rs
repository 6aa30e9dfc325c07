//! Idempotent and transactional producer state of one partition: the rules of Kafka's
//! `ProducerStateManager`, as a pure structure the partition owner task drives.
//!
//! Per producer id it remembers the epoch and the last five batches (sequence range and
//! assigned offsets), so a retried batch is answered with its original offsets and a gap
//! is refused with OUT_OF_ORDER_SEQUENCE_NUMBER. A transactional batch opens the
//! producer's transaction on the partition at its offset, and the transaction's marker
//! closes it (an abort marker yields the aborted range readers skip); the lowest open
//! transaction's first offset is where the last stable offset stops. The state is
//! committed with every write-ahead flush, so it survives the broker and its disk.

use std::collections::HashMap;

use super::batch::{increment_sequence, BatchHeader};
use super::marker::Marker;
use crate::metadata::{AbortedTxnRecord, ProducerBatch, ProducerStateRecord};

/// Batches remembered per producer (Kafka keeps five, the in-flight maximum).
pub(crate) const CACHED_BATCHES: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SeqCheck {
    /// Not idempotent or the next in sequence: assign offsets.
    Append,
    /// Already written: answer with the original offsets, write nothing.
    Duplicate { base_offset: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SeqError {
    #[error("producer epoch is older than the current one")]
    InvalidEpoch,
    #[error("sequence number out of order")]
    OutOfOrder,
    /// A non-transactional batch while the producer's transaction is open here.
    #[error("the producer has a transaction open on this partition")]
    InvalidTxnState,
}

/// Why a transaction marker was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MarkerError {
    #[error("the marker's producer epoch is older than the producer's")]
    InvalidEpoch,
    #[error("the marker comes from an older transaction coordinator")]
    CoordinatorFenced,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ProducerTable {
    entries: HashMap<i64, ProducerStateRecord>,
}

impl ProducerTable {
    pub(crate) fn from_records(records: impl IntoIterator<Item = ProducerStateRecord>) -> Self {
        ProducerTable {
            entries: records.into_iter().map(|r| (r.producer_id, r)).collect(),
        }
    }

    #[cfg(test)]
    pub(crate) fn get(&self, producer_id: i64) -> Option<&ProducerStateRecord> {
        self.entries.get(&producer_id)
    }

    /// Every producer's state, by producer id.
    pub(crate) fn records(&self) -> Vec<ProducerStateRecord> {
        let mut all: Vec<ProducerStateRecord> = self.entries.values().cloned().collect();
        all.sort_by_key(|r| r.producer_id);
        all
    }

    pub(crate) fn insert(&mut self, record: ProducerStateRecord) {
        self.entries.insert(record.producer_id, record);
    }

    /// Decides what to do with a batch, without changing anything.
    pub(crate) fn check(&self, h: &BatchHeader) -> Result<SeqCheck, SeqError> {
        if !h.has_producer_id() || h.base_sequence < 0 {
            return Ok(SeqCheck::Append);
        }
        let Some(entry) = self.entries.get(&h.producer_id) else {
            // No state (new producer, or its state expired): accept from any sequence.
            return Ok(SeqCheck::Append);
        };
        if h.producer_epoch < entry.epoch {
            return Err(SeqError::InvalidEpoch);
        }
        if h.producer_epoch > entry.epoch {
            // A bumped epoch restarts sequences at zero.
            return if h.base_sequence == 0 {
                Ok(SeqCheck::Append)
            } else {
                Err(SeqError::OutOfOrder)
            };
        }
        if !h.is_transactional() && entry.txn_first_offset >= 0 {
            return Err(SeqError::InvalidTxnState);
        }
        let last_seq = h.last_sequence();
        if let Some(dup) = entry
            .batches
            .iter()
            .find(|b| b.first_seq == h.base_sequence && b.last_seq == last_seq)
        {
            return Ok(SeqCheck::Duplicate {
                base_offset: dup.base_offset,
            });
        }
        match entry.batches.last() {
            Some(last) if increment_sequence(last.last_seq, 1) != h.base_sequence => {
                Err(SeqError::OutOfOrder)
            }
            _ => Ok(SeqCheck::Append),
        }
    }

    /// Records an appended batch; returns the producer's new state to persist.
    pub(crate) fn record(
        &mut self,
        h: &BatchHeader,
        base_offset: i64,
        now_ms: i64,
    ) -> Option<ProducerStateRecord> {
        if !h.has_producer_id() || h.base_sequence < 0 {
            return None;
        }
        let entry = self
            .entries
            .entry(h.producer_id)
            .or_insert_with(|| new_state(h.producer_id, h.producer_epoch, now_ms));
        if entry.epoch != h.producer_epoch {
            entry.epoch = h.producer_epoch;
            entry.batches.clear();
        }
        if h.is_transactional() && entry.txn_first_offset < 0 {
            entry.txn_first_offset = base_offset;
        }
        entry.batches.push(ProducerBatch {
            first_seq: h.base_sequence,
            last_seq: h.last_sequence(),
            base_offset,
            last_offset: base_offset + h.last_offset_delta as i64,
            timestamp: h.max_timestamp,
        });
        if entry.batches.len() > CACHED_BATCHES {
            let extra = entry.batches.len() - CACHED_BATCHES;
            entry.batches.drain(..extra);
        }
        entry.last_update_ms = now_ms;
        Some(entry.clone())
    }

    /// Whether a marker may be written: not from an older producer epoch, nor from an
    /// older coordinator than the producer's last marker here.
    pub(crate) fn check_marker(&self, m: &Marker) -> Result<(), MarkerError> {
        let Some(entry) = self.entries.get(&m.producer_id) else {
            return Ok(());
        };
        if m.producer_epoch < entry.epoch {
            return Err(MarkerError::InvalidEpoch);
        }
        if m.coordinator_epoch < entry.coordinator_epoch {
            return Err(MarkerError::CoordinatorFenced);
        }
        Ok(())
    }

    /// Records a marker written at `offset` (checked by [`check_marker`]): the
    /// producer's transaction here ends. Returns the producer's new state and, for an
    /// abort that ended an open transaction, the aborted range.
    pub(crate) fn end_txn(
        &mut self,
        m: &Marker,
        offset: i64,
        now_ms: i64,
    ) -> (ProducerStateRecord, Option<AbortedTxnRecord>) {
        let entry = self
            .entries
            .entry(m.producer_id)
            .or_insert_with(|| new_state(m.producer_id, m.producer_epoch, now_ms));
        if m.producer_epoch > entry.epoch {
            entry.epoch = m.producer_epoch;
            entry.batches.clear();
        }
        let aborted = (!m.commit && entry.txn_first_offset >= 0).then_some(AbortedTxnRecord {
            producer_id: m.producer_id,
            first_offset: entry.txn_first_offset,
            last_offset: offset,
        });
        entry.txn_first_offset = -1;
        entry.coordinator_epoch = m.coordinator_epoch;
        entry.last_update_ms = now_ms;
        (entry.clone(), aborted)
    }

    /// Whether the producer's transaction is open here.
    pub(crate) fn txn_open(&self, producer_id: i64) -> bool {
        self.entries
            .get(&producer_id)
            .is_some_and(|e| e.txn_first_offset >= 0)
    }

    /// The producers with a transaction open here.
    pub(crate) fn open_txn_producers(&self) -> std::collections::HashSet<i64> {
        self.entries
            .values()
            .filter(|e| e.txn_first_offset >= 0)
            .map(|e| e.producer_id)
            .collect()
    }

    /// The first offset of the oldest transaction open here, if any.
    pub(crate) fn first_unstable_offset(&self) -> Option<i64> {
        self.entries
            .values()
            .map(|e| e.txn_first_offset)
            .filter(|o| *o >= 0)
            .min()
    }
}

fn new_state(producer_id: i64, epoch: i16, now_ms: i64) -> ProducerStateRecord {
    ProducerStateRecord {
        producer_id,
        epoch,
        batches: Vec::new(),
        last_update_ms: now_ms,
        txn_first_offset: -1,
        coordinator_epoch: -1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(pid: i64, epoch: i16, seq: i32, count: i32) -> BatchHeader {
        BatchHeader {
            base_offset: 0,
            total_len: 100,
            attributes: 0,
            last_offset_delta: count - 1,
            base_timestamp: 0,
            max_timestamp: 0,
            producer_id: pid,
            producer_epoch: epoch,
            base_sequence: seq,
            record_count: count,
        }
    }

    #[test]
    fn in_order_duplicates_and_gaps() {
        let mut t = ProducerTable::default();
        let b0 = header(1, 0, 0, 3);
        assert_eq!(t.check(&b0), Ok(SeqCheck::Append));
        t.record(&b0, 100, 0);
        let b1 = header(1, 0, 3, 2);
        assert_eq!(t.check(&b1), Ok(SeqCheck::Append));
        t.record(&b1, 103, 0);
        assert_eq!(t.check(&b0), Ok(SeqCheck::Duplicate { base_offset: 100 }));
        assert_eq!(t.check(&b1), Ok(SeqCheck::Duplicate { base_offset: 103 }));
        assert_eq!(t.check(&header(1, 0, 6, 1)), Err(SeqError::OutOfOrder));
        assert_eq!(t.check(&header(1, 0, 5, 1)), Ok(SeqCheck::Append));
    }

    #[test]
    fn epochs_fence_and_reset() {
        let mut t = ProducerTable::default();
        t.record(&header(1, 3, 0, 1), 0, 0);
        assert_eq!(t.check(&header(1, 2, 1, 1)), Err(SeqError::InvalidEpoch));
        assert_eq!(t.check(&header(1, 4, 5, 1)), Err(SeqError::OutOfOrder));
        assert_eq!(t.check(&header(1, 4, 0, 1)), Ok(SeqCheck::Append));
        t.record(&header(1, 4, 0, 1), 1, 0);
        assert_eq!(t.get(1).map(|e| (e.epoch, e.batches.len())), Some((4, 1)));
    }

    #[test]
    fn only_five_batches_are_remembered() {
        let mut t = ProducerTable::default();
        for i in 0..7 {
            t.record(&header(9, 0, i, 1), i as i64, 0);
        }
        let e = t.get(9).expect("state");
        assert_eq!(e.batches.len(), CACHED_BATCHES);
        assert_eq!(e.batches[0].first_seq, 2);
        // The oldest forgotten batch is no longer recognised as a duplicate.
        assert_eq!(t.check(&header(9, 0, 0, 1)), Err(SeqError::OutOfOrder));
    }

    fn txn_header(pid: i64, epoch: i16, seq: i32, count: i32) -> BatchHeader {
        BatchHeader {
            attributes: 0x10,
            ..header(pid, epoch, seq, count)
        }
    }

    fn marker(pid: i64, epoch: i16, commit: bool, coordinator_epoch: i32) -> Marker {
        Marker {
            producer_id: pid,
            producer_epoch: epoch,
            commit,
            coordinator_epoch,
        }
    }

    /// A transactional batch opens the producer's transaction at its offset; the marker
    /// closes it, an abort yielding the aborted range; plain batches are refused while
    /// it is open; the oldest open transaction is the first unstable offset.
    #[test]
    fn transactions_open_at_their_first_batch_and_end_at_their_marker() {
        let mut t = ProducerTable::default();
        t.record(&header(2, 0, 0, 1), 0, 0);
        assert_eq!(t.first_unstable_offset(), None);
        t.record(&txn_header(1, 0, 0, 2), 10, 0);
        t.record(&txn_header(1, 0, 2, 2), 14, 0);
        t.record(&txn_header(2, 0, 1, 1), 12, 0);
        assert_eq!(t.first_unstable_offset(), Some(10));
        assert_eq!(t.check(&header(1, 0, 4, 1)), Err(SeqError::InvalidTxnState));
        assert_eq!(t.check(&txn_header(1, 0, 4, 1)), Ok(SeqCheck::Append));

        let commit = marker(1, 0, true, 3);
        assert_eq!(t.check_marker(&commit), Ok(()));
        let (state, aborted) = t.end_txn(&commit, 16, 0);
        assert_eq!((state.txn_first_offset, aborted), (-1, None));
        assert_eq!(t.first_unstable_offset(), Some(12));
        assert_eq!(t.check(&header(1, 0, 4, 1)), Ok(SeqCheck::Append));

        let abort = marker(2, 0, false, 3);
        let (_, aborted) = t.end_txn(&abort, 17, 0);
        assert_eq!(
            aborted,
            Some(AbortedTxnRecord {
                producer_id: 2,
                first_offset: 12,
                last_offset: 17
            })
        );
        assert_eq!(t.first_unstable_offset(), None);
        let (_, again) = t.end_txn(&abort, 18, 0);
        assert_eq!(again, None, "a marker with nothing open aborts nothing");

        assert_eq!(
            t.check_marker(&marker(2, 0, true, 2)),
            Err(MarkerError::CoordinatorFenced)
        );
        t.end_txn(&marker(2, 5, false, 3), 19, 0);
        assert_eq!(
            t.check_marker(&marker(2, 4, false, 3)),
            Err(MarkerError::InvalidEpoch)
        );
        assert_eq!(
            t.get(2).map(|e| e.epoch),
            Some(5),
            "a marker bumps the epoch"
        );
        assert_eq!(t.check_marker(&marker(9, 0, true, 0)), Ok(()));
    }

    #[test]
    fn non_idempotent_batches_pass() {
        let mut t = ProducerTable::default();
        assert_eq!(t.check(&header(-1, -1, -1, 5)), Ok(SeqCheck::Append));
        assert!(t.record(&header(-1, -1, -1, 5), 0, 0).is_none());
    }
}
