//! The records inside a v2 batch, for the two places that must see keys: the key check
//! on compacted topics and the compactor.
//!
//! Records are split, not decoded: each keeps its bytes from the offset delta on, so a
//! kept record is written back exactly as the producer sent it, headers and all; only
//! its timestamp delta is rewritten, when the batch's base timestamp changes (the
//! delete horizon, below).
//!
//! A rewritten batch keeps what Kafka's log cleaner keeps: the base offset and the last
//! offset (so offsets never move and a batch still ends where it ended), the producer
//! id, epoch and base sequence, the leader epoch, the codec and the transactional and
//! control bits. A batch holding a tombstone gets a delete horizon: attribute bit 6 set
//! and the base timestamp replaced by the time after which the tombstones may go.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::batch::{seal, BatchHeader, ATTRIBUTES_OFFSET, HEADER_LEN};
use super::codec::{Codec, CodecError};

/// Attribute bit: the base timestamp is the batch's delete horizon.
pub(crate) const DELETE_HORIZON_FLAG: i16 = 0x40;
/// Attribute bit: the batch's timestamps are the broker's append time.
const LOG_APPEND_TIME_FLAG: i16 = 0x08;
const BASE_TIMESTAMP_AT: usize = 27;
const MAX_TIMESTAMP_AT: usize = 35;
const RECORD_COUNT_AT: usize = 57;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RecordsError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("record {index} of the batch is malformed")]
    Malformed { index: usize },
    #[error("the batch says {said} records and holds {found}")]
    Count { said: i32, found: usize },
}

/// One record of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub attributes: u8,
    pub timestamp_delta: i64,
    pub offset_delta: i32,
    /// `None`: a null key.
    pub key: Option<Bytes>,
    /// `false`: a null value (a tombstone).
    pub has_value: bool,
    /// The record's bytes from its offset delta to its end.
    rest: Bytes,
}

impl Record {
    pub(crate) fn offset(&self, header: &BatchHeader) -> i64 {
        header.base_offset + self.offset_delta as i64
    }
}

/// The records of `batch` (a whole v2 batch), decompressed up to `limit` bytes.
pub(crate) fn split(
    batch: &Bytes,
    header: &BatchHeader,
    limit: usize,
) -> Result<Vec<Record>, RecordsError> {
    let codec = Codec::of(header.attributes)?;
    let data = codec.decompress(&batch.slice(HEADER_LEN..header.total_len), limit)?;
    let mut out = Vec::with_capacity(header.record_count.clamp(0, 4096) as usize);
    let mut buf = data;
    while buf.has_remaining() {
        let index = out.len();
        let bad = || RecordsError::Malformed { index };
        let len = read_varint(&mut buf).ok_or_else(bad)?;
        let len = usize::try_from(len).map_err(|_| bad())?;
        if len > buf.len() || len == 0 {
            return Err(bad());
        }
        let mut body = buf.split_to(len);
        let attributes = body.get_u8();
        let timestamp_delta = read_varint(&mut body).ok_or_else(bad)?;
        let rest = body.clone();
        let offset_delta = read_varint(&mut body)
            .and_then(|v| i32::try_from(v).ok())
            .ok_or_else(bad)?;
        let key = read_nullable(&mut body).ok_or_else(bad)?;
        let value_len = read_varint(&mut body).ok_or_else(bad)?;
        if value_len < -1 || value_len > body.len() as i64 {
            return Err(bad());
        }
        out.push(Record {
            attributes,
            timestamp_delta,
            offset_delta,
            key,
            has_value: value_len >= 0,
            rest,
        });
    }
    if out.len() != header.record_count.max(0) as usize {
        return Err(RecordsError::Count {
            said: header.record_count,
            found: out.len(),
        });
    }
    Ok(out)
}

/// `batch` rewritten to hold only `kept` (records of it, in order; at least one), with
/// `delete_horizon` as its delete horizon if given. Everything else of the header stays.
pub(crate) fn rebuild(
    batch: &Bytes,
    header: &BatchHeader,
    kept: &[&Record],
    delete_horizon: Option<i64>,
) -> Result<Bytes, RecordsError> {
    let codec = Codec::of(header.attributes)?;
    let timestamp = |r: &Record| header.base_timestamp.wrapping_add(r.timestamp_delta);
    let base_timestamp = delete_horizon.unwrap_or(header.base_timestamp);
    let mut records = BytesMut::new();
    for r in kept {
        let delta = timestamp(r).wrapping_sub(base_timestamp);
        let mut head = BytesMut::with_capacity(11);
        head.put_u8(r.attributes);
        put_varint(&mut head, delta);
        put_varint(&mut records, (head.len() + r.rest.len()) as i64);
        records.put_slice(&head);
        records.put_slice(&r.rest);
    }
    let records = codec.compress(&records)?;
    let max_timestamp = if header.attributes & LOG_APPEND_TIME_FLAG != 0 {
        header.max_timestamp
    } else {
        kept.iter()
            .map(|r| timestamp(r))
            .max()
            .unwrap_or(header.max_timestamp)
    };
    let mut attributes = header.attributes;
    if delete_horizon.is_some() {
        attributes |= DELETE_HORIZON_FLAG;
    }
    let mut out = BytesMut::with_capacity(HEADER_LEN + records.len());
    out.put_slice(&batch[..HEADER_LEN]);
    out.put_slice(&records);
    out[ATTRIBUTES_OFFSET..ATTRIBUTES_OFFSET + 2].copy_from_slice(&attributes.to_be_bytes());
    out[BASE_TIMESTAMP_AT..BASE_TIMESTAMP_AT + 8].copy_from_slice(&base_timestamp.to_be_bytes());
    out[MAX_TIMESTAMP_AT..MAX_TIMESTAMP_AT + 8].copy_from_slice(&max_timestamp.to_be_bytes());
    out[RECORD_COUNT_AT..RECORD_COUNT_AT + 4].copy_from_slice(&(kept.len() as i32).to_be_bytes());
    seal(&mut out);
    Ok(out.freeze())
}

/// `batch` with no records: its offsets, producer fields and leader epoch, uncompressed.
/// What the compactor keeps of a last batch that kept nothing, so readers still reach
/// its last offset.
pub(crate) fn empty(batch: &Bytes, header: &BatchHeader) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN);
    out.put_slice(&batch[..HEADER_LEN]);
    let attributes = header.attributes & !0x07;
    out[ATTRIBUTES_OFFSET..ATTRIBUTES_OFFSET + 2].copy_from_slice(&attributes.to_be_bytes());
    out[RECORD_COUNT_AT..RECORD_COUNT_AT + 4].copy_from_slice(&0i32.to_be_bytes());
    seal(&mut out);
    out.freeze()
}

/// The delete horizon a batch carries, if any.
pub(crate) fn delete_horizon(header: &BatchHeader) -> Option<i64> {
    (header.attributes & DELETE_HORIZON_FLAG != 0).then_some(header.base_timestamp)
}

/// A zigzag varint (Kafka's record fields), at most 10 bytes.
fn read_varint(buf: &mut Bytes) -> Option<i64> {
    let mut z = 0u64;
    for shift in (0..70).step_by(7) {
        if !buf.has_remaining() {
            return None;
        }
        let b = buf.get_u8();
        z |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Some(((z >> 1) as i64) ^ -((z & 1) as i64));
        }
    }
    None
}

fn read_nullable(buf: &mut Bytes) -> Option<Option<Bytes>> {
    let len = read_varint(buf)?;
    match len {
        -1 => Some(None),
        n if n >= 0 && n as usize <= buf.len() => Some(Some(buf.split_to(n as usize))),
        _ => None,
    }
}

pub(crate) fn put_varint(buf: &mut BytesMut, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        buf.put_u8((z as u8) | 0x80);
        z >>= 7;
    }
    buf.put_u8(z as u8);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::log::batch::crc_matches;
    use proptest::prelude::*;

    /// (key, value, timestamp delta, header count): one record to build.
    pub(crate) type Spec = (Option<Vec<u8>>, Option<Vec<u8>>, i64, u8);

    /// A v2 batch at `base_offset` whose records are `specs`, the record at index `i`
    /// at offset delta `deltas[i]`, last offset delta `last`, compressed with `codec`.
    pub(crate) fn keyed_batch(
        base_offset: i64,
        specs: &[Spec],
        deltas: &[i32],
        last: i32,
        codec: Codec,
    ) -> Bytes {
        producer_batch(base_offset, specs, deltas, last, codec, (7, 1, 40))
    }

    /// [`keyed_batch`] from a producer: (producer id, epoch, base sequence).
    pub(crate) fn producer_batch(
        base_offset: i64,
        specs: &[Spec],
        deltas: &[i32],
        last: i32,
        codec: Codec,
        producer: (i64, i16, i32),
    ) -> Bytes {
        let mut records = BytesMut::new();
        for ((key, value, ts, headers), delta) in specs.iter().zip(deltas) {
            let mut r = BytesMut::new();
            r.put_i8(0);
            put_varint(&mut r, *ts);
            put_varint(&mut r, *delta as i64);
            for field in [key, value] {
                match field {
                    Some(b) => {
                        put_varint(&mut r, b.len() as i64);
                        r.put_slice(b);
                    }
                    None => put_varint(&mut r, -1),
                }
            }
            put_varint(&mut r, *headers as i64);
            for h in 0..*headers {
                put_varint(&mut r, 1);
                r.put_u8(b'h');
                put_varint(&mut r, 1);
                r.put_u8(h);
            }
            put_varint(&mut records, r.len() as i64);
            records.put_slice(&r);
        }
        let records = codec.compress(&records).expect("compresses");
        let mut out = BytesMut::new();
        out.put_i64(base_offset);
        out.put_i32(0);
        out.put_i32(3); // leader epoch
        out.put_i8(2);
        out.put_u32(0);
        out.put_i16(codec_bits(codec));
        out.put_i32(last);
        out.put_i64(1_000); // base timestamp
        out.put_i64(1_000 + specs.iter().map(|s| s.2).max().unwrap_or(0));
        out.put_i64(producer.0);
        out.put_i16(producer.1);
        out.put_i32(producer.2);
        out.put_i32(specs.len() as i32);
        out.put_slice(&records);
        seal(&mut out);
        out.freeze()
    }

    fn codec_bits(codec: Codec) -> i16 {
        match codec {
            Codec::None => 0,
            Codec::Gzip => 1,
            Codec::Snappy => 2,
            Codec::Lz4 => 3,
            Codec::Zstd => 4,
        }
    }

    fn codec() -> impl Strategy<Value = Codec> {
        prop_oneof![
            Just(Codec::None),
            Just(Codec::Gzip),
            Just(Codec::Snappy),
            Just(Codec::Lz4),
            Just(Codec::Zstd)
        ]
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (
            proptest::option::weighted(0.9, proptest::collection::vec(any::<u8>(), 0..8)),
            proptest::option::weighted(0.8, proptest::collection::vec(any::<u8>(), 0..40)),
            0i64..5_000,
            0u8..3,
        )
    }

    proptest! {
        /// Splitting finds every record's key, value presence, offset and timestamp;
        /// rebuilding with any subset (and any delete horizon) gives a valid batch with
        /// the same base and last offset, whose records split back to exactly the kept
        /// ones at their original offsets and timestamps.
        #[test]
        fn kept_records_keep_their_offsets_timestamps_and_bytes(
            specs in proptest::collection::vec(spec(), 1..20),
            keep in proptest::collection::vec(any::<bool>(), 20),
            horizon in proptest::option::of(0i64..10_000_000),
            codec in codec(),
            gap in 0i32..3,
        ) {
            let deltas: Vec<i32> = (0..specs.len() as i32).map(|i| i * (1 + gap)).collect();
            let last = deltas[specs.len() - 1] + gap;
            let batch = keyed_batch(100, &specs, &deltas, last, codec);
            let header = BatchHeader::parse(&batch).expect("header");
            let records = split(&batch, &header, 1 << 20).expect("splits");
            prop_assert_eq!(records.len(), specs.len());
            for ((r, s), d) in records.iter().zip(&specs).zip(&deltas) {
                prop_assert_eq!(r.key.as_deref(), s.0.as_deref());
                prop_assert_eq!(r.has_value, s.1.is_some());
                prop_assert_eq!(r.offset(&header), 100 + *d as i64);
            }
            let kept: Vec<&Record> = records.iter().zip(&keep).filter(|(_, k)| **k).map(|(r, _)| r).collect();
            prop_assume!(!kept.is_empty());
            let out = rebuild(&batch, &header, &kept, horizon).expect("rebuilds");
            prop_assert!(crc_matches(&out));
            let h = BatchHeader::parse(&out).expect("header");
            prop_assert_eq!(h.total_len, out.len());
            prop_assert_eq!(h.base_offset, header.base_offset);
            prop_assert_eq!(h.last_offset(), header.last_offset());
            prop_assert_eq!((h.producer_id, h.producer_epoch, h.base_sequence), (7, 1, 40));
            prop_assert_eq!(delete_horizon(&h), horizon);
            prop_assert_eq!(Codec::of(h.attributes), Ok(codec));
            let again = split(&out, &h, 1 << 20).expect("splits again");
            prop_assert_eq!(again.len(), kept.len());
            let ts = |hd: &BatchHeader, r: &Record| hd.base_timestamp + r.timestamp_delta;
            for (a, k) in again.iter().zip(&kept) {
                prop_assert_eq!(a.offset(&h), k.offset(&header));
                prop_assert_eq!(ts(&h, a), ts(&header, k));
                prop_assert_eq!(&a.rest, &k.rest);
            }
            prop_assert_eq!(h.max_timestamp, kept.iter().map(|k| ts(&header, k)).max().unwrap());
        }
    }

    /// An emptied batch keeps its offsets and producer fields, holds no records, and is
    /// valid (CRC, uncompressed).
    #[test]
    fn an_emptied_batch_keeps_its_offsets() {
        let spec: Spec = (Some(b"k".to_vec()), Some(b"v".to_vec()), 0, 0);
        let batch = keyed_batch(50, &[spec.clone(), spec], &[0, 3], 4, Codec::Zstd);
        let header = BatchHeader::parse(&batch).expect("header");
        let out = empty(&batch, &header);
        assert!(crc_matches(&out));
        let h = BatchHeader::parse(&out).expect("header");
        assert_eq!(
            (h.base_offset, h.last_offset(), h.record_count),
            (50, 54, 0)
        );
        assert_eq!((h.producer_id, h.base_sequence), (7, 40));
        assert_eq!(Codec::of(h.attributes), Ok(Codec::None));
        assert_eq!(split(&out, &h, 1 << 20), Ok(vec![]));
    }

    /// A record whose lengths point past the batch is refused, not read past.
    #[test]
    fn malformed_records_are_refused() {
        let spec: Spec = (Some(b"k".to_vec()), Some(b"v".to_vec()), 0, 0);
        let batch = keyed_batch(0, &[spec], &[0], 0, Codec::None);
        let mut bad = BytesMut::from(&batch[..]);
        bad[HEADER_LEN + 4] = 0x7e; // the key length: 63, far past the record
        let bad = bad.freeze();
        let header = BatchHeader::parse(&bad).expect("header");
        assert_eq!(
            split(&bad, &header, 1 << 20),
            Err(RecordsError::Malformed { index: 0 })
        );
    }
}
