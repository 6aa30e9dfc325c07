//! Which records of a batch survive compaction, as Kafka's log cleaner decides:
//! a record stays when it is its key's newest in the mapped range (or its key is not in
//! the map at all), has a key, and, for a tombstone, its delete horizon has not passed.
//! A batch whose survivors are all its records (and that needs no new delete horizon) is
//! kept byte for byte; one with none is dropped; otherwise it is rewritten.

use bytes::Bytes;

use super::keymap::KeyMap;
use crate::log::batch::BatchHeader;
use crate::log::records::{self, Record, RecordsError};
use crate::metadata::AbortedTxnRecord;

/// Whether a batch belongs to an aborted transaction: a transactional data batch of a
/// producer whose aborted range (first offset to abort marker) holds it.
pub(crate) fn is_aborted(header: &BatchHeader, aborted: &[AbortedTxnRecord]) -> bool {
    header.is_transactional()
        && !header.is_control()
        && aborted.iter().any(|a| {
            a.producer_id == header.producer_id
                && a.first_offset <= header.base_offset
                && header.base_offset < a.last_offset
        })
}

/// What a pass knows when it filters.
#[derive(Debug)]
pub(crate) struct Retain<'a> {
    pub map: &'a KeyMap,
    /// The partition's aborted transactions: their batches are dropped (and were
    /// never mapped), as Kafka's cleaner removes aborted data.
    pub aborted: &'a [AbortedTxnRecord],
    pub now_ms: i64,
    /// `delete.retention.ms`: a tombstone first kept now may go this much later.
    pub delete_retention_ms: i64,
    /// Largest batch once decompressed (`batch.decompressed.max.bytes`).
    pub limit: usize,
}

/// What became of one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Unchanged,
    Rewritten(Bytes),
    Dropped,
}

/// Records read and kept, for the metrics; and the earliest delete horizon of the
/// tombstones kept, when the next pass could remove some.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub read: u64,
    pub kept: u64,
    pub next_horizon: Option<i64>,
}

impl Counts {
    pub(crate) fn add(&mut self, other: Counts) {
        self.read += other.read;
        self.kept += other.kept;
        self.next_horizon = match (self.next_horizon, other.next_horizon) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

pub(crate) fn filter(
    batch: &Bytes,
    header: &BatchHeader,
    retain: &Retain<'_>,
) -> Result<(Outcome, Counts), RecordsError> {
    // Transaction markers are kept (a reader past them still needs to see where each
    // transaction ended); aborted data goes whole.
    let n = header.record_count.max(0) as u64;
    if header.is_control() {
        let counts = Counts {
            read: n,
            kept: n,
            next_horizon: None,
        };
        return Ok((Outcome::Unchanged, counts));
    }
    if is_aborted(header, retain.aborted) {
        let counts = Counts {
            read: n,
            kept: 0,
            next_horizon: None,
        };
        return Ok((Outcome::Dropped, counts));
    }
    let all = records::split(batch, header, retain.limit)?;
    let horizon = records::delete_horizon(header);
    let expired = horizon.is_some_and(|h| retain.now_ms >= h);
    let survives = |r: &Record| match &r.key {
        None => false,
        Some(key) => {
            let newest = retain
                .map
                .latest(key)
                .is_none_or(|at| at <= r.offset(header));
            newest && (r.has_value || !expired)
        }
    };
    let kept: Vec<&Record> = all.iter().filter(|r| survives(r)).collect();
    let tombstones = kept.iter().any(|r| !r.has_value);
    // The horizon the kept tombstones carry from now on.
    let stamped = match horizon {
        Some(h) => Some(h),
        None if tombstones => Some(retain.now_ms.saturating_add(retain.delete_retention_ms)),
        None => None,
    };
    let counts = Counts {
        read: all.len() as u64,
        kept: kept.len() as u64,
        next_horizon: stamped.filter(|_| tombstones),
    };
    let outcome = if kept.is_empty() {
        Outcome::Dropped
    } else if kept.len() == all.len() && (horizon.is_some() || !tombstones) {
        Outcome::Unchanged
    } else {
        Outcome::Rewritten(records::rebuild(batch, header, &kept, stamped)?)
    };
    Ok((outcome, counts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::codec::Codec;
    use crate::log::records::tests::{keyed_batch, Spec};

    fn rec(key: &str, value: Option<&str>) -> Spec {
        (
            Some(key.as_bytes().to_vec()),
            value.map(|v| v.as_bytes().to_vec()),
            0,
            0,
        )
    }

    fn keys_of(b: &Bytes) -> Vec<(i64, String, bool)> {
        let h = BatchHeader::parse(b).expect("header");
        records::split(b, &h, 1 << 20)
            .expect("splits")
            .iter()
            .map(|r| {
                let key = String::from_utf8(r.key.clone().expect("key").to_vec()).expect("utf8");
                (r.offset(&h), key, r.has_value)
            })
            .collect()
    }

    /// Superseded records and keyless ones go; a batch that keeps everything is kept as
    /// is; a tombstone first kept gets a delete horizon and goes once it has passed.
    #[test]
    fn the_cleaners_rules() {
        let mut map = KeyMap::with_budget(1 << 10);
        map.insert(b"a", 12);
        map.insert(b"b", 11);
        map.insert(b"t", 13);
        let retain = |now_ms| Retain {
            map: &map,
            aborted: &[],
            now_ms,
            delete_retention_ms: 100,
            limit: 1 << 20,
        };
        let old = keyed_batch(
            10,
            &[
                rec("a", Some("1")),
                rec("b", Some("2")),
                (None, Some(b"x".to_vec()), 0, 0),
                rec("t", None),
                rec("z", Some("3")),
            ],
            &[0, 1, 2, 3, 4],
            4,
            Codec::Lz4,
        );
        let h = BatchHeader::parse(&old).expect("header");
        let (outcome, counts) = filter(&old, &h, &retain(1_000)).expect("filters");
        assert_eq!((counts.read, counts.kept), (5, 3));
        assert_eq!(counts.next_horizon, Some(1_100));
        let Outcome::Rewritten(out) = outcome else {
            panic!("rewritten: {outcome:?}")
        };
        assert_eq!(
            keys_of(&out),
            vec![
                (11, "b".into(), true),
                (13, "t".into(), false),
                (14, "z".into(), true)
            ]
        );
        let oh = BatchHeader::parse(&out).expect("header");
        assert_eq!(records::delete_horizon(&oh), Some(1_100));
        assert_eq!(oh.last_offset(), 14);

        // Again before the horizon: nothing changes, not even the bytes.
        let (again, _) = filter(&out, &oh, &retain(1_050)).expect("filters");
        assert_eq!(again, Outcome::Unchanged);
        // After it, the tombstone goes.
        let (after, counts) = filter(&out, &oh, &retain(1_100)).expect("filters");
        assert_eq!((counts.read, counts.kept), (3, 2));
        assert_eq!(counts.next_horizon, None, "no tombstone left");
        let Outcome::Rewritten(last) = after else {
            panic!("rewritten: {after:?}")
        };
        assert_eq!(
            keys_of(&last),
            vec![(11, "b".into(), true), (14, "z".into(), true)]
        );

        // A batch of an aborted transaction goes whole, whatever its keys; the same
        // producer's batch after the abort marker, or another producer's, stays.
        let txn = |base: i64, producer: i64| {
            let b = crate::log::records::tests::producer_batch(
                base,
                &[rec("new", Some("v"))],
                &[0],
                0,
                Codec::None,
                (producer, 0, 0),
            );
            let mut b = bytes::BytesMut::from(&b[..]);
            b[crate::log::batch::ATTRIBUTES_OFFSET + 1] |= 0x10;
            crate::log::batch::seal(&mut b);
            b.freeze()
        };
        let aborted = [AbortedTxnRecord {
            producer_id: 5,
            first_offset: 20,
            last_offset: 30,
        }];
        let with_aborts = Retain {
            aborted: &aborted,
            ..retain(0)
        };
        for (base, producer, gone) in [(25, 5, true), (20, 5, true), (30, 5, false), (25, 6, false)]
        {
            let b = txn(base, producer);
            let h = BatchHeader::parse(&b).expect("header");
            assert!(h.is_transactional());
            assert_eq!(
                is_aborted(&h, &aborted),
                gone,
                "batch at {base} of {producer}"
            );
            let (outcome, counts) = filter(&b, &h, &with_aborts).expect("filters");
            assert_eq!(outcome == Outcome::Dropped, gone);
            assert_eq!(counts.kept, u64::from(!gone));
        }

        // A batch whose records are all superseded is dropped.
        let stale = keyed_batch(0, &[rec("a", Some("0"))], &[0], 0, Codec::None);
        let sh = BatchHeader::parse(&stale).expect("header");
        assert_eq!(
            filter(&stale, &sh, &retain(0)).expect("filters").0,
            Outcome::Dropped
        );
    }
}
