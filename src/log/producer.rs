//! Idempotent producer state of one partition: the sequence rules of Kafka's
//! `ProducerStateManager`, as a pure structure the partition owner task drives.
//!
//! Per producer id it remembers the epoch and the last five batches (sequence range and
//! assigned offsets), so a retried batch is answered with its original offsets and a gap
//! is refused with OUT_OF_ORDER_SEQUENCE_NUMBER. The state is committed with every
//! write-ahead flush, so it survives the broker and its disk.

use std::collections::HashMap;

use super::batch::{increment_sequence, BatchHeader};
use crate::metadata::{ProducerBatch, ProducerStateRecord};

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
            .or_insert_with(|| ProducerStateRecord {
                producer_id: h.producer_id,
                epoch: h.producer_epoch,
                batches: Vec::new(),
                last_update_ms: now_ms,
            });
        if entry.epoch != h.producer_epoch {
            entry.epoch = h.producer_epoch;
            entry.batches.clear();
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

    #[test]
    fn non_idempotent_batches_pass() {
        let mut t = ProducerTable::default();
        assert_eq!(t.check(&header(-1, -1, -1, 5)), Ok(SeqCheck::Append));
        assert!(t.record(&header(-1, -1, -1, 5), 0, 0).is_none());
    }
}
