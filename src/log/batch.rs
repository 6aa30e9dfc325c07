//! Record batch v2 headers, read in place.
//!
//! The broker never decodes records: it reads the 61-byte batch header, checks the
//! CRC-32C over the rest, and rewrites the base offset and leader epoch (which the CRC
//! does not cover). Compressed, transactional and control batches all pass through as
//! the producer sent them, so the transactional and control bits survive for later use.

use bytes::{Buf, Bytes, BytesMut};

/// Size of the fixed v2 batch header.
pub(crate) const HEADER_LEN: usize = 61;
/// Bytes before the `batch_length` field's coverage starts (base offset + length).
pub(crate) const LOG_OVERHEAD: usize = 12;
const MAGIC_OFFSET: usize = 16;
const CRC_OFFSET: usize = 17;
pub(crate) const ATTRIBUTES_OFFSET: usize = 21;
const LEADER_EPOCH_OFFSET: usize = 12;

/// Why a batch was refused; each maps to one Kafka error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BatchError {
    #[error("record batch is truncated or its length is inconsistent")]
    Corrupt,
    #[error("record batch crc does not match its contents")]
    CrcMismatch,
    #[error("record batch magic {0} is not supported (only v2)")]
    UnsupportedMagic(i8),
    #[error("record batch of {0} bytes exceeds max.message.bytes")]
    TooLarge(usize),
    #[error("empty record set")]
    Empty,
}

/// The fields of a v2 batch header the broker acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchHeader {
    pub base_offset: i64,
    /// Whole batch size, including the 12-byte offset/length prefix.
    pub total_len: usize,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: i32,
}

impl BatchHeader {
    /// Reads the header at the start of `buf` without checking the CRC.
    pub(crate) fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        if buf.len() < HEADER_LEN {
            return Err(BatchError::Corrupt);
        }
        let mut b = buf;
        let base_offset = b.get_i64();
        let batch_length = b.get_i32();
        if batch_length < (HEADER_LEN - LOG_OVERHEAD) as i32 {
            return Err(BatchError::Corrupt);
        }
        let _leader_epoch = b.get_i32();
        let magic = b.get_i8();
        if magic != 2 {
            return Err(BatchError::UnsupportedMagic(magic));
        }
        let _crc = b.get_u32();
        let attributes = b.get_i16();
        let last_offset_delta = b.get_i32();
        let base_timestamp = b.get_i64();
        let max_timestamp = b.get_i64();
        let producer_id = b.get_i64();
        let producer_epoch = b.get_i16();
        let base_sequence = b.get_i32();
        let record_count = b.get_i32();
        if last_offset_delta < 0 || record_count < 0 {
            return Err(BatchError::Corrupt);
        }
        Ok(BatchHeader {
            base_offset,
            total_len: batch_length as usize + LOG_OVERHEAD,
            attributes,
            last_offset_delta,
            base_timestamp,
            max_timestamp,
            producer_id,
            producer_epoch,
            base_sequence,
            record_count,
        })
    }

    pub(crate) fn last_offset(&self) -> i64 {
        self.base_offset + self.last_offset_delta as i64
    }

    /// Number of offsets the batch occupies.
    pub(crate) fn offset_count(&self) -> i64 {
        self.last_offset_delta as i64 + 1
    }

    pub(crate) fn is_transactional(&self) -> bool {
        self.attributes & 0x10 != 0
    }

    pub(crate) fn is_control(&self) -> bool {
        self.attributes & 0x20 != 0
    }

    pub(crate) fn has_producer_id(&self) -> bool {
        self.producer_id >= 0
    }

    /// Sequence of the batch's last record (sequences wrap at i32::MAX).
    pub(crate) fn last_sequence(&self) -> i32 {
        increment_sequence(self.base_sequence, self.last_offset_delta)
    }
}

/// Sequence arithmetic as Kafka defines it: wraps from i32::MAX to 0.
pub(crate) fn increment_sequence(seq: i32, by: i32) -> i32 {
    if seq > i32::MAX - by {
        by - (i32::MAX - seq) - 1
    } else {
        seq + by
    }
}

/// One validated batch inside a produce request's record set.
#[derive(Debug, Clone)]
pub(crate) struct ValidBatch {
    pub header: BatchHeader,
    pub bytes: Bytes,
}

/// Splits a produce record set into batches, checking each header and CRC.
/// All-or-nothing: any bad batch rejects the whole set, as Kafka does.
pub(crate) fn validate_record_set(
    records: &Bytes,
    max_batch_bytes: usize,
) -> Result<Vec<ValidBatch>, BatchError> {
    let mut out = Vec::with_capacity(1);
    let mut pos = 0;
    while pos < records.len() {
        let rest = &records[pos..];
        let header = BatchHeader::parse(rest)?;
        if header.total_len > rest.len() {
            return Err(BatchError::Corrupt);
        }
        if header.total_len > max_batch_bytes {
            return Err(BatchError::TooLarge(header.total_len));
        }
        if !crc_matches(&rest[..header.total_len]) {
            return Err(BatchError::CrcMismatch);
        }
        out.push(ValidBatch {
            header,
            bytes: records.slice(pos..pos + header.total_len),
        });
        pos += header.total_len;
    }
    if out.is_empty() {
        return Err(BatchError::Empty);
    }
    Ok(out)
}

/// Whether a whole batch's CRC-32C (over everything from the attributes on) matches
/// the one in its header. `batch` must hold at least a header.
pub(crate) fn crc_matches(batch: &[u8]) -> bool {
    let Some(stored) = batch.get(CRC_OFFSET..CRC_OFFSET + 4) else {
        return false;
    };
    let stored = u32::from_be_bytes([stored[0], stored[1], stored[2], stored[3]]);
    batch
        .get(ATTRIBUTES_OFFSET..)
        .is_some_and(|covered| crc32c::crc32c(covered) == stored)
}

/// Finishes a batch built or rewritten in place: its `batch_length` from its size and
/// its CRC-32C over everything from the attributes on.
pub(crate) fn seal(batch: &mut [u8]) {
    let batch_length = (batch.len() - LOG_OVERHEAD) as i32;
    batch[8..12].copy_from_slice(&batch_length.to_be_bytes());
    let crc = crc32c::crc32c(&batch[ATTRIBUTES_OFFSET..]);
    batch[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
}

/// Copies a batch with its base offset and partition leader epoch set (neither is
/// covered by the CRC). This is the one copy the produce path makes of record bytes.
pub(crate) fn stamp(batch: &[u8], base_offset: i64, leader_epoch: i32) -> Bytes {
    let mut out = BytesMut::with_capacity(batch.len());
    out.extend_from_slice(batch);
    out[0..8].copy_from_slice(&base_offset.to_be_bytes());
    out[LEADER_EPOCH_OFFSET..LEADER_EPOCH_OFFSET + 4].copy_from_slice(&leader_epoch.to_be_bytes());
    debug_assert_eq!(out[MAGIC_OFFSET], 2);
    out.freeze()
}

/// Walks stored batches (already validated once) and yields their headers and positions.
/// Stops at the first incomplete or unreadable batch.
pub(crate) fn walk(buf: &[u8]) -> impl Iterator<Item = (usize, BatchHeader)> + '_ {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        let header = BatchHeader::parse(buf.get(pos..)?).ok()?;
        if pos + header.total_len > buf.len() {
            return None;
        }
        let at = pos;
        pos += header.total_len;
        Some((at, header))
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::log::records::put_varint;
    use bytes::BufMut;

    /// Builds a valid uncompressed v2 batch with `count` empty-value records.
    pub(crate) fn make_batch(
        count: i32,
        producer_id: i64,
        epoch: i16,
        base_seq: i32,
        ts: i64,
    ) -> Bytes {
        let mut records = BytesMut::new();
        for i in 0..count {
            // record: length varint, attributes, ts delta, offset delta, key len -1, value len 1, 'x', headers 0
            let mut r = BytesMut::new();
            r.put_i8(0);
            put_varint(&mut r, 0);
            put_varint(&mut r, i as i64);
            put_varint(&mut r, -1);
            put_varint(&mut r, 1);
            r.put_u8(b'x');
            put_varint(&mut r, 0);
            put_varint(&mut records, r.len() as i64);
            records.extend_from_slice(&r);
        }
        let mut body = BytesMut::new();
        body.put_i16(0); // attributes
        body.put_i32(count - 1);
        body.put_i64(ts);
        body.put_i64(ts);
        body.put_i64(producer_id);
        body.put_i16(epoch);
        body.put_i32(base_seq);
        body.put_i32(count);
        body.extend_from_slice(&records);
        let mut out = BytesMut::new();
        out.put_i64(0);
        out.put_i32((4 + 1 + 4 + body.len()) as i32);
        out.put_i32(-1);
        out.put_i8(2);
        out.put_u32(crc32c::crc32c(&body));
        out.extend_from_slice(&body);
        out.freeze()
    }

    #[test]
    fn valid_batch_round_trip_and_stamp() {
        let b = make_batch(3, 7, 1, 10, 1000);
        let v = validate_record_set(&b, 1 << 20).expect("valid");
        assert_eq!(v.len(), 1);
        let h = v[0].header;
        assert_eq!(
            (
                h.record_count,
                h.last_offset_delta,
                h.producer_id,
                h.base_sequence
            ),
            (3, 2, 7, 10)
        );
        assert_eq!(h.last_sequence(), 12);
        let stamped = stamp(&b, 42, 5);
        let again = validate_record_set(&stamped, 1 << 20).expect("stamp keeps crc valid");
        assert_eq!(again[0].header.base_offset, 42);
        assert_eq!(again[0].header.last_offset(), 44);
    }

    #[test]
    fn corrupt_inputs_are_rejected() {
        let b = make_batch(2, -1, -1, -1, 0);
        let mut flipped = BytesMut::from(&b[..]);
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        assert_eq!(
            validate_record_set(&flipped.freeze(), 1 << 20).unwrap_err(),
            BatchError::CrcMismatch
        );
        assert_eq!(
            validate_record_set(&b.slice(..b.len() - 1), 1 << 20).unwrap_err(),
            BatchError::Corrupt
        );
        assert_eq!(
            validate_record_set(&Bytes::new(), 1 << 20).unwrap_err(),
            BatchError::Empty
        );
        assert_eq!(
            validate_record_set(&b, 10).unwrap_err(),
            BatchError::TooLarge(b.len())
        );
        let mut magic = BytesMut::from(&b[..]);
        magic[16] = 1;
        assert_eq!(
            validate_record_set(&magic.freeze(), 1 << 20).unwrap_err(),
            BatchError::UnsupportedMagic(1)
        );
    }

    #[test]
    fn sequences_wrap() {
        assert_eq!(increment_sequence(i32::MAX, 1), 0);
        assert_eq!(increment_sequence(i32::MAX - 1, 3), 1);
        assert_eq!(increment_sequence(5, 2), 7);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let b = Bytes::from(data);
            let _ = validate_record_set(&b, 1 << 20);
            let _ = walk(&b).count();
        }
    }
}
