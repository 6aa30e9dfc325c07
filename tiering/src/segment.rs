//! The segment object: a sealed run of one stream's record batches with its
//! sparse indexes, in a single object.
//!
//! This is Kafka's segment layout idea (log file, `.index`, `.timeindex`) put
//! into one object so that a segment is written and deleted atomically and a
//! reader needs only the object's tail to know where to start reading:
//!
//! ```text
//! data           the record batches, as they are        (data_len bytes)
//! offset index   (offset i64, position u64) * n        (16 B per entry)
//! time index     (timestamp i64, offset i64, position u64) * m   (24 B)
//! footer 52 B    version | reserved | base_offset | end_offset |
//!                max_timestamp | data_len | n u32 | m u32 | crc32c | "STSG"
//! ```
//!
//! All integers are big-endian; positions are byte positions within the data
//! part (which starts at byte 0 of the object). See `README.md` for the spec.
//!
//! Both indexes are sparse: the first batch is always indexed and after that a
//! batch is indexed once at least `index_interval_bytes` of data have passed
//! since the previous index entry. At each indexed batch the time index gets
//! an entry `(max timestamp of all batches up to and including this one,
//! base offset, position)` if that running maximum is strictly greater than
//! the previous time-index entry's timestamp, as in Kafka. Lookups return a
//! position to start scanning from; the caller scans batches forward.

use bytes::{BufMut, Bytes, BytesMut};
use object_store::PutPayload;

use crate::codec::Reader;
use crate::Error;

/// Magic at the very end of every segment object.
pub const SEGMENT_MAGIC: [u8; 4] = *b"STSG";
/// The format version this build writes and reads.
pub const SEGMENT_VERSION: u8 = 1;
/// Length of the fixed footer at the end of a segment object.
pub const SEGMENT_FOOTER_LEN: usize = 52;

const OFFSET_ENTRY_LEN: u64 = 16;
const TIME_ENTRY_LEN: u64 = 24;
const WHAT: &str = "segment index";

/// One record batch of a segment, as the caller describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchEntry {
    /// Offset of the batch's first record.
    pub base_offset: i64,
    /// Offset of the batch's last record (inclusive).
    pub last_offset: i64,
    /// Largest record timestamp in the batch.
    pub max_timestamp: i64,
    /// Byte position of the batch within the data part.
    pub position: u64,
    /// Byte length of the batch.
    pub len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OffsetEntry {
    offset: i64,
    position: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TimeEntry {
    timestamp: i64,
    offset: i64,
    position: u64,
}

/// The sparse offset and time indexes of a segment plus its summary
/// (base and end offset, maximum timestamp, data length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentIndex {
    base_offset: i64,
    end_offset: i64,
    max_timestamp: i64,
    data_len: u64,
    offsets: Vec<OffsetEntry>,
    times: Vec<TimeEntry>,
}

impl SegmentIndex {
    /// Builds the indexes for `entries`, which must be in offset order with
    /// ascending positions.
    ///
    /// The first batch is always indexed, later ones whenever at least
    /// `index_interval_bytes` of data passed since the last indexed batch (0
    /// indexes every batch). The base offset is the first batch's, the end
    /// offset one past the last batch's last offset, and the data length the
    /// end of the last batch. With no entries everything is zero and the
    /// maximum timestamp is `i64::MIN`.
    pub fn build(entries: &[BatchEntry], index_interval_bytes: u64) -> SegmentIndex {
        let mut index = SegmentIndex {
            base_offset: entries.first().map_or(0, |e| e.base_offset),
            end_offset: entries
                .last()
                .map_or(0, |e| e.last_offset.saturating_add(1)),
            max_timestamp: i64::MIN,
            data_len: 0,
            offsets: Vec::new(),
            times: Vec::new(),
        };
        let mut since_last_entry = 0u64;
        let mut previous: Option<&BatchEntry> = None;
        for entry in entries {
            debug_assert!(
                entry.base_offset <= entry.last_offset,
                "batch ends before it starts"
            );
            debug_assert!(
                previous.is_none_or(|p| p.last_offset < entry.base_offset
                    && p.position.saturating_add(u64::from(p.len)) <= entry.position),
                "batches out of order"
            );
            previous = Some(entry);
            index.max_timestamp = index.max_timestamp.max(entry.max_timestamp);
            if index.offsets.is_empty() || since_last_entry >= index_interval_bytes {
                index.offsets.push(OffsetEntry {
                    offset: entry.base_offset,
                    position: entry.position,
                });
                if index
                    .times
                    .last()
                    .is_none_or(|t| index.max_timestamp > t.timestamp)
                {
                    index.times.push(TimeEntry {
                        timestamp: index.max_timestamp,
                        offset: entry.base_offset,
                        position: entry.position,
                    });
                }
                since_last_entry = 0;
            }
            since_last_entry = since_last_entry.saturating_add(u64::from(entry.len));
            index.data_len = index
                .data_len
                .max(entry.position.saturating_add(u64::from(entry.len)));
        }
        index
    }

    /// Offset of the segment's first record.
    pub fn base_offset(&self) -> i64 {
        self.base_offset
    }

    /// Offset after the segment's last record (exclusive).
    pub fn end_offset(&self) -> i64 {
        self.end_offset
    }

    /// Largest record timestamp in the segment (`i64::MIN` when empty).
    pub fn max_timestamp(&self) -> i64 {
        self.max_timestamp
    }

    /// Length of the data part, which starts at byte 0 of the object; the
    /// index begins right after it.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// Length of [`encode`](Self::encode)'s output: the object's size is
    /// `data_len() + encoded_len()`.
    pub fn encoded_len(&self) -> u64 {
        self.offsets.len() as u64 * OFFSET_ENTRY_LEN
            + self.times.len() as u64 * TIME_ENTRY_LEN
            + SEGMENT_FOOTER_LEN as u64
    }

    /// Position of the last indexed batch whose base offset is at or before
    /// `offset` (the first indexed batch if `offset` precedes it; 0 for an
    /// empty segment). Scan forward from there to find the batch holding
    /// `offset`.
    pub fn position_for_offset(&self, offset: i64) -> u64 {
        let after = self.offsets.partition_point(|e| e.offset <= offset);
        let entry = after.checked_sub(1).and_then(|i| self.offsets.get(i));
        entry.or(self.offsets.first()).map_or(0, |e| e.position)
    }

    /// Position of a batch at or before the first batch whose max timestamp
    /// is `>= ts`, or `None` if no batch has a max timestamp `>= ts`. Scan
    /// forward from there to find the first batch with max timestamp `>= ts`.
    pub fn position_for_timestamp(&self, ts: i64) -> Option<u64> {
        let first = self.offsets.first()?;
        if self.max_timestamp < ts {
            return None;
        }
        let k = self.times.partition_point(|t| t.timestamp < ts);
        let Some(hit) = self.times.get(k) else {
            // Every indexed prefix stays below `ts`: the batch sits after the
            // last indexed one.
            return self.offsets.last().map(|e| e.position);
        };
        // `hit` is the first index point where the running maximum reaches
        // `ts`; at the index point just before it the running maximum was
        // still below `ts`, so no earlier batch qualifies.
        let at = self.offsets.partition_point(|e| e.offset < hit.offset);
        let before = at.checked_sub(1).and_then(|i| self.offsets.get(i));
        Some(before.unwrap_or(first).position)
    }

    /// Encodes the offset index, the time index and the footer.
    ///
    /// # Panics
    ///
    /// If either index has more than `u32::MAX` entries.
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(usize::try_from(self.encoded_len()).unwrap_or(0));
        for e in &self.offsets {
            buf.put_i64(e.offset);
            buf.put_u64(e.position);
        }
        for e in &self.times {
            buf.put_i64(e.timestamp);
            buf.put_i64(e.offset);
            buf.put_u64(e.position);
        }
        buf.put_u8(SEGMENT_VERSION);
        buf.put_bytes(0, 3);
        buf.put_i64(self.base_offset);
        buf.put_i64(self.end_offset);
        buf.put_i64(self.max_timestamp);
        buf.put_u64(self.data_len);
        buf.put_u32(u32::try_from(self.offsets.len()).expect("offset index too large"));
        buf.put_u32(u32::try_from(self.times.len()).expect("time index too large"));
        let crc = crc32c::crc32c(&buf);
        buf.put_u32(crc);
        buf.put_slice(&SEGMENT_MAGIC);
        buf.freeze()
    }

    /// Decodes the indexes and footer from the tail of a segment object.
    ///
    /// `index_and_footer` must be the last bytes of the object, holding at
    /// least the two indexes and the footer; extra leading bytes are ignored.
    /// If it is too short the error is [`Error::Truncated`] whose `needed` is
    /// how many bytes from the end of the object to fetch (fetching
    /// [`SEGMENT_FOOTER_LEN`] first always yields either the index or the
    /// exact size needed).
    pub fn decode(index_and_footer: &[u8]) -> Result<SegmentIndex, Error> {
        let buf = index_and_footer;
        let available = buf.len() as u64;
        let Some(footer_start) = buf.len().checked_sub(SEGMENT_FOOTER_LEN) else {
            return Err(Error::Truncated {
                what: WHAT,
                needed: SEGMENT_FOOTER_LEN as u64,
                available,
            });
        };
        let mut f = Reader::new(&buf[footer_start..], WHAT);
        let version = f.u8()?;
        let reserved = f.take(3)?;
        let base_offset = f.i64()?;
        let end_offset = f.i64()?;
        let max_timestamp = f.i64()?;
        let data_len = f.u64()?;
        let offset_count = f.u32()?;
        let time_count = f.u32()?;
        let stored = f.u32()?;
        let found = f.magic()?;
        if found != SEGMENT_MAGIC {
            return Err(Error::BadMagic { what: WHAT, found });
        }
        if version != SEGMENT_VERSION {
            return Err(Error::UnsupportedVersion {
                what: WHAT,
                version,
            });
        }
        let index_len =
            u64::from(offset_count) * OFFSET_ENTRY_LEN + u64::from(time_count) * TIME_ENTRY_LEN;
        let needed = index_len + SEGMENT_FOOTER_LEN as u64;
        let index_start = usize::try_from(index_len)
            .ok()
            .and_then(|len| footer_start.checked_sub(len));
        let Some(index_start) = index_start else {
            return Err(Error::Truncated {
                what: WHAT,
                needed,
                available,
            });
        };
        let checked = &buf[index_start..buf.len() - 8];
        let computed = crc32c::crc32c(checked);
        if computed != stored {
            return Err(Error::ChecksumMismatch {
                what: WHAT,
                stored,
                computed,
            });
        }
        if reserved != [0, 0, 0] {
            return Err(f.corrupt("reserved footer bytes are not zero"));
        }

        let mut r = Reader::new(&buf[index_start..footer_start], WHAT);
        let mut offsets = Vec::with_capacity(offset_count as usize);
        for _ in 0..offset_count {
            offsets.push(OffsetEntry {
                offset: r.i64()?,
                position: r.u64()?,
            });
        }
        let mut times = Vec::with_capacity(time_count as usize);
        for _ in 0..time_count {
            times.push(TimeEntry {
                timestamp: r.i64()?,
                offset: r.i64()?,
                position: r.u64()?,
            });
        }
        let index = SegmentIndex {
            base_offset,
            end_offset,
            max_timestamp,
            data_len,
            offsets,
            times,
        };
        index.validate().map_err(|reason| r.corrupt(reason))?;
        Ok(index)
    }

    /// The invariants [`build`](Self::build) establishes for well-ordered
    /// batches; a decoded index must satisfy them too.
    fn validate(&self) -> Result<(), String> {
        if self.end_offset < self.base_offset {
            return Err(format!(
                "end offset {} before base offset {}",
                self.end_offset, self.base_offset
            ));
        }
        if self.offsets.is_empty() != self.times.is_empty() {
            return Err("exactly one of the two indexes is empty".into());
        }
        if let Some(first) = self.offsets.first() {
            if first.offset != self.base_offset {
                return Err(format!(
                    "first index entry at offset {}, segment base offset {}",
                    first.offset, self.base_offset
                ));
            }
        }
        let in_segment = |offset: i64, position: u64| {
            (self.base_offset..self.end_offset).contains(&offset) && position <= self.data_len
        };
        let mut previous: Option<OffsetEntry> = None;
        for e in &self.offsets {
            if !in_segment(e.offset, e.position) {
                return Err(format!("offset index entry {e:?} outside the segment"));
            }
            if previous.is_some_and(|p| p.offset > e.offset || p.position > e.position) {
                return Err(format!("offset index entry {e:?} out of order"));
            }
            previous = Some(*e);
        }
        let mut previous: Option<TimeEntry> = None;
        for e in &self.times {
            if !in_segment(e.offset, e.position) || e.timestamp > self.max_timestamp {
                return Err(format!("time index entry {e:?} outside the segment"));
            }
            if previous.is_some_and(|p| {
                p.timestamp >= e.timestamp || p.offset > e.offset || p.position > e.position
            }) {
                return Err(format!("time index entry {e:?} out of order"));
            }
            previous = Some(*e);
        }
        Ok(())
    }
}

/// Lays out a segment object: the `data` parts exactly as given (no copy),
/// then the encoded index of `entries`. The index's data length is the total
/// length of `data`, which must cover every batch in `entries`.
pub fn build_segment_object(
    data: Vec<Bytes>,
    entries: &[BatchEntry],
    index_interval_bytes: u64,
) -> (PutPayload, SegmentIndex) {
    let mut index = SegmentIndex::build(entries, index_interval_bytes);
    let data_len: u64 = data.iter().map(|b| b.len() as u64).sum();
    debug_assert!(index.data_len <= data_len, "batches extend past the data");
    index.data_len = data_len;
    let mut parts: Vec<Bytes> = Vec::with_capacity(data.len() + 1);
    parts.extend(data.into_iter().filter(|b| !b.is_empty()));
    parts.push(index.encode());
    (parts.into_iter().collect(), index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn batch(base: i64, last: i64, ts: i64, position: u64, len: u32) -> BatchEntry {
        BatchEntry {
            base_offset: base,
            last_offset: last,
            max_timestamp: ts,
            position,
            len,
        }
    }

    /// Batches of 100 bytes: offsets 10..=12, 13..=14, 15, 16..=19, 20.
    fn sample() -> Vec<BatchEntry> {
        vec![
            batch(10, 12, 1000, 0, 100),
            batch(13, 14, 900, 100, 100),
            batch(15, 15, 3000, 200, 100),
            batch(16, 19, 2000, 300, 100),
            batch(20, 20, 4000, 400, 100),
        ]
    }

    /// Pins the encoding byte for byte. If this fails, the format changed:
    /// bump the version instead of editing the expectation.
    #[test]
    fn golden_segment_index() {
        let index = SegmentIndex::build(&sample()[..4], 200);
        let expected = concat!(
            // offset index: (10, 0), (15, 200)
            "000000000000000a",
            "0000000000000000",
            "000000000000000f",
            "00000000000000c8",
            // time index: (1000, 10, 0), (3000, 15, 200)
            "00000000000003e8",
            "000000000000000a",
            "0000000000000000",
            "0000000000000bb8",
            "000000000000000f",
            "00000000000000c8",
            // footer: version 1, reserved
            "01",
            "000000",
            // base 10, end 20, max ts 3000, data_len 400
            "000000000000000a",
            "0000000000000014",
            "0000000000000bb8",
            "0000000000000190",
            // 2 offset entries, 2 time entries, crc32c, "STSG"
            "00000002",
            "00000002",
            "3d221396",
            "53545347",
        );
        let encoded = index.encode();
        assert_eq!(hex(&encoded), expected);
        assert_eq!(encoded.len() as u64, index.encoded_len());
        assert_eq!(SegmentIndex::decode(&encoded).ok(), Some(index));
    }

    #[test]
    fn sparse_entries_follow_the_interval() {
        let index = SegmentIndex::build(&sample(), 200);
        assert_eq!(
            index.offsets,
            vec![
                OffsetEntry {
                    offset: 10,
                    position: 0
                },
                OffsetEntry {
                    offset: 15,
                    position: 200
                },
                OffsetEntry {
                    offset: 20,
                    position: 400
                },
            ]
        );
        assert_eq!(
            index.times,
            vec![
                TimeEntry {
                    timestamp: 1000,
                    offset: 10,
                    position: 0
                },
                TimeEntry {
                    timestamp: 3000,
                    offset: 15,
                    position: 200
                },
                TimeEntry {
                    timestamp: 4000,
                    offset: 20,
                    position: 400
                },
            ]
        );
        assert_eq!((index.base_offset(), index.end_offset()), (10, 21));
        assert_eq!((index.data_len(), index.max_timestamp()), (500, 4000));

        let dense = SegmentIndex::build(&sample(), 0);
        assert_eq!(dense.offsets.len(), 5);
        // 900 and 2000 do not raise the running maximum.
        assert_eq!(
            dense.times.iter().map(|t| t.timestamp).collect::<Vec<_>>(),
            vec![1000, 3000, 4000]
        );
        assert_eq!(SegmentIndex::build(&sample(), 1 << 40).offsets.len(), 1);
    }

    #[test]
    fn lookups() {
        let index = SegmentIndex::build(&sample(), 200);
        assert_eq!(index.position_for_offset(0), 0);
        assert_eq!(index.position_for_offset(14), 0);
        assert_eq!(index.position_for_offset(15), 200);
        assert_eq!(index.position_for_offset(19), 200);
        assert_eq!(index.position_for_offset(99), 400);

        assert_eq!(index.position_for_timestamp(i64::MIN), Some(0));
        assert_eq!(index.position_for_timestamp(1000), Some(0));
        assert_eq!(index.position_for_timestamp(2500), Some(0));
        assert_eq!(index.position_for_timestamp(3500), Some(200));
        assert_eq!(index.position_for_timestamp(4000), Some(200));
        assert_eq!(index.position_for_timestamp(4001), None);

        let dense = SegmentIndex::build(&sample(), 0);
        assert_eq!(dense.position_for_offset(17), 300);
        assert_eq!(dense.position_for_timestamp(1000), Some(0));
        assert_eq!(dense.position_for_timestamp(1001), Some(100));
        assert_eq!(dense.position_for_timestamp(3500), Some(300));

        // The maximum sits after the last index point.
        let tail = SegmentIndex::build(&sample(), 1 << 40);
        assert_eq!(tail.position_for_timestamp(4000), Some(0));
        assert_eq!(tail.position_for_timestamp(4001), None);
    }

    #[test]
    fn empty_segment() {
        let index = SegmentIndex::build(&[], 4096);
        assert_eq!(
            (index.base_offset(), index.end_offset(), index.data_len()),
            (0, 0, 0)
        );
        assert_eq!(index.position_for_offset(5), 0);
        assert_eq!(index.position_for_timestamp(i64::MIN), None);
        assert_eq!(SegmentIndex::decode(&index.encode()).ok(), Some(index));
    }

    #[test]
    fn truncated_tail_says_how_much_is_needed() {
        let encoded = SegmentIndex::build(&sample(), 0).encode();
        let footer = &encoded[encoded.len() - SEGMENT_FOOTER_LEN..];
        match SegmentIndex::decode(footer) {
            Err(Error::Truncated { needed, .. }) => assert_eq!(needed, encoded.len() as u64),
            other => panic!("expected truncated, got {other:?}"),
        }
        match SegmentIndex::decode(&footer[1..]) {
            Err(Error::Truncated { needed, .. }) => assert_eq!(needed, SEGMENT_FOOTER_LEN as u64),
            other => panic!("expected truncated, got {other:?}"),
        }
    }

    #[test]
    fn detects_corruption() {
        let mut encoded = SegmentIndex::build(&sample(), 0).encode().to_vec();
        encoded[3] ^= 0x10;
        assert!(matches!(
            SegmentIndex::decode(&encoded),
            Err(Error::ChecksumMismatch { .. })
        ));
        encoded[3] ^= 0x10;
        let n = encoded.len();
        encoded[n - 1] = 0;
        assert!(matches!(
            SegmentIndex::decode(&encoded),
            Err(Error::BadMagic { .. })
        ));
        encoded[n - 1] = b'G';
        encoded[n - SEGMENT_FOOTER_LEN] = 9;
        assert!(matches!(
            SegmentIndex::decode(&encoded),
            Err(Error::UnsupportedVersion { version: 9, .. })
        ));
    }

    /// Sorted, contiguous batches with arbitrary gaps between offsets.
    fn arb_batches() -> impl Strategy<Value = Vec<BatchEntry>> {
        (
            0i64..1 << 40,
            proptest::collection::vec((0i64..3, 0i64..5, 1u32..300, -10i64..10_000), 0..40),
        )
            .prop_map(|(mut next, specs)| {
                let mut position = 0;
                specs
                    .into_iter()
                    .map(|(gap, extra, len, ts)| {
                        let base = next + gap;
                        next = base + extra + 1;
                        let e = batch(base, base + extra, ts, position, len);
                        position += u64::from(len);
                        e
                    })
                    .collect()
            })
    }

    fn checksummed(mut index_and_footer: Vec<u8>) -> Vec<u8> {
        let n = index_and_footer.len();
        let crc = crc32c::crc32c(&index_and_footer[..n - 8]);
        index_and_footer[n - 8..n - 4].copy_from_slice(&crc.to_be_bytes());
        index_and_footer[n - 4..].copy_from_slice(&SEGMENT_MAGIC);
        index_and_footer
    }

    proptest! {
        #[test]
        fn round_trip(batches in arb_batches(), interval in 0u64..2000, extra in 0usize..64) {
            let data: Vec<Bytes> = batches
                .iter()
                .map(|b| Bytes::from(vec![(b.base_offset % 251) as u8; b.len as usize]))
                .collect();
            let (payload, index) = build_segment_object(data.clone(), &batches, interval);
            let object: Vec<u8> = payload.iter().flat_map(|b| b.iter().copied()).collect();
            prop_assert_eq!(object.len() as u64, index.data_len() + index.encoded_len());
            let all: Vec<u8> = data.iter().flat_map(|b| b.iter().copied()).collect();
            prop_assert_eq!(&object[..index.data_len() as usize], &all[..]);
            let tail = index.encoded_len() as usize;
            let start = object.len() - (tail + extra).min(object.len());
            prop_assert_eq!(SegmentIndex::decode(&object[object.len() - tail..]).ok(), Some(index.clone()));
            prop_assert_eq!(SegmentIndex::decode(&object[start..]).ok(), Some(index));
        }

        #[test]
        fn offset_lookup_never_skips_the_batch(batches in arb_batches(), interval in 0u64..2000, probe in any::<u16>()) {
            let index = SegmentIndex::build(&batches, interval);
            let dense = SegmentIndex::build(&batches, 0);
            let Some(last) = batches.last() else { return Ok(()) };
            let first = batches[0].base_offset;
            let offset = first - 2 + i64::from(probe) % (last.last_offset - first + 4);
            let position = index.position_for_offset(offset);
            prop_assert!(batches.iter().any(|b| b.position == position));
            // The batch holding `offset` (or the next one) is at or after it.
            if let Some(target) = batches.iter().find(|b| b.last_offset >= offset) {
                prop_assert!(position <= target.position);
            }
            // No indexed batch between the result and `offset` was skipped.
            prop_assert!(!batches.iter().any(|b| b.position > position
                && b.base_offset <= offset
                && index.offsets.iter().any(|e| e.position == b.position)));
            // Dense: the last batch starting at or before `offset`.
            let want = batches.iter().rev().find(|b| b.base_offset <= offset).unwrap_or(&batches[0]);
            prop_assert_eq!(dense.position_for_offset(offset), want.position);
        }

        #[test]
        fn time_lookup_never_skips_the_batch(batches in arb_batches(), interval in 0u64..2000, ts in -20i64..10_020) {
            let index = SegmentIndex::build(&batches, interval);
            let dense = SegmentIndex::build(&batches, 0);
            let target = batches.iter().position(|b| b.max_timestamp >= ts);
            match target {
                None => {
                    prop_assert_eq!(index.position_for_timestamp(ts), None);
                    prop_assert_eq!(dense.position_for_timestamp(ts), None);
                }
                Some(t) => {
                    let position = index.position_for_timestamp(ts);
                    prop_assert!(position.is_some_and(|p| p <= batches[t].position));
                    prop_assert!(batches.iter().any(|b| Some(b.position) == position));
                    // Dense: the batch right before the first match, or the match itself.
                    let want = batches[t.saturating_sub(1)].position;
                    prop_assert_eq!(dense.position_for_timestamp(ts), Some(want));
                }
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = SegmentIndex::decode(&bytes);
        }

        /// Random indexes with a valid magic and checksum, so decoding gets
        /// past the crc into the structural checks; small counts make the
        /// lengths line up often.
        #[test]
        fn decode_checksummed_garbage_never_panics(
            mut bytes in proptest::collection::vec(any::<u8>(), SEGMENT_FOOTER_LEN..400),
            offsets in 0u32..4,
            times in 0u32..4,
            ts in any::<i64>(),
        ) {
            let n = bytes.len();
            let footer = n - SEGMENT_FOOTER_LEN;
            bytes[footer] = SEGMENT_VERSION;
            bytes[footer + 1..footer + 4].fill(0);
            bytes[footer + 36..footer + 40].copy_from_slice(&offsets.to_be_bytes());
            bytes[footer + 40..footer + 44].copy_from_slice(&times.to_be_bytes());
            let bytes = checksummed(bytes);
            if let Ok(index) = SegmentIndex::decode(&bytes) {
                let _ = index.position_for_offset(ts);
                let _ = index.position_for_timestamp(ts);
                prop_assert_eq!(SegmentIndex::decode(&index.encode()).ok(), Some(index));
            }
        }

        #[test]
        fn any_bit_flip_is_detected(batches in arb_batches(), pick in any::<usize>(), bit in 0u8..8) {
            let mut encoded = SegmentIndex::build(&batches, 100).encode().to_vec();
            let i = pick % encoded.len();
            encoded[i] ^= 1 << bit;
            prop_assert!(SegmentIndex::decode(&encoded).is_err());
        }
    }
}
