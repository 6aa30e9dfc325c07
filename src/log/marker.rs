//! Transaction markers: the control batches that end a producer's transaction on a
//! partition.
//!
//! A transaction coordinator decides commit or abort; each partition in the
//! transaction then gets one marker from the producer's id and epoch, which its owner
//! writes like any batch (through the write-ahead object). Readers use the marker to
//! know where the transaction ended: `read_committed` consumers skip the aborted
//! producer's batches up to an abort marker, and every consumer skips the marker
//! itself. The format is Kafka's: a v2 batch with the transactional and control bits
//! set, one record whose key is (version 0, type: 0 abort, 1 commit) and whose value is
//! (version 0, the coordinator's epoch).

use bytes::{BufMut, Bytes, BytesMut};

use super::batch::{seal, HEADER_LEN};
use super::records::put_varint;

/// Attributes of a marker batch: transactional (0x10) and control (0x20).
const MARKER_ATTRIBUTES: i16 = 0x30;
const ABORT: i16 = 0;
const COMMIT: i16 = 1;

/// What a marker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Marker {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub commit: bool,
    pub coordinator_epoch: i32,
}

impl Marker {
    /// The marker as a batch at offset 0 (the owner stamps the real one), stamped with
    /// `timestamp`.
    pub(crate) fn batch(&self, timestamp: i64) -> Bytes {
        let mut record = BytesMut::with_capacity(24);
        record.put_i8(0); // attributes
        put_varint(&mut record, 0); // timestamp delta
        put_varint(&mut record, 0); // offset delta
        put_varint(&mut record, 4);
        record.put_i16(0);
        record.put_i16(if self.commit { COMMIT } else { ABORT });
        put_varint(&mut record, 6);
        record.put_i16(0);
        record.put_i32(self.coordinator_epoch);
        put_varint(&mut record, 0); // headers
        let mut out = BytesMut::with_capacity(HEADER_LEN + record.len() + 2);
        out.put_i64(0); // base offset
        out.put_i32(0); // batch length (sealed below)
        out.put_i32(0); // partition leader epoch (stamped by the owner)
        out.put_i8(2); // magic
        out.put_u32(0); // crc (sealed below)
        out.put_i16(MARKER_ATTRIBUTES);
        out.put_i32(0); // last offset delta
        out.put_i64(timestamp);
        out.put_i64(timestamp);
        out.put_i64(self.producer_id);
        out.put_i16(self.producer_epoch);
        out.put_i32(-1); // base sequence: markers have none
        out.put_i32(1); // record count
        put_varint(&mut out, record.len() as i64);
        out.put_slice(&record);
        seal(&mut out);
        out.freeze()
    }

    /// Reads the marker a control batch holds (`None`: not a marker, or unreadable).
    #[cfg(test)]
    pub(crate) fn parse(batch: &[u8]) -> Option<Marker> {
        let header = super::batch::BatchHeader::parse(batch).ok()?;
        if !header.is_control() || header.record_count != 1 {
            return None;
        }
        let mut rest = batch.get(HEADER_LEN..header.total_len)?;
        let _len = take_varint(&mut rest)?;
        let _attributes = take(&mut rest, 1)?;
        let _timestamp_delta = take_varint(&mut rest)?;
        let _offset_delta = take_varint(&mut rest)?;
        if take_varint(&mut rest)? < 4 {
            return None;
        }
        let key = take(&mut rest, 4)?;
        let kind = i16::from_be_bytes([key[2], key[3]]);
        let value_len = take_varint(&mut rest)?;
        let coordinator_epoch = if value_len >= 6 {
            let value = take(&mut rest, 6)?;
            i32::from_be_bytes([value[2], value[3], value[4], value[5]])
        } else {
            -1
        };
        Some(Marker {
            producer_id: header.producer_id,
            producer_epoch: header.producer_epoch,
            commit: match kind {
                COMMIT => true,
                ABORT => false,
                _ => return None,
            },
            coordinator_epoch,
        })
    }
}

#[cfg(test)]
fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Some(head)
}

/// A zigzag varint, at most 10 bytes.
#[cfg(test)]
fn take_varint(buf: &mut &[u8]) -> Option<i64> {
    let mut z = 0u64;
    for shift in (0..70).step_by(7) {
        let b = *take(buf, 1)?.first()?;
        z |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Some(((z >> 1) as i64) ^ -((z & 1) as i64));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::batch::{crc_matches, validate_record_set};

    /// A marker is a valid control batch of one record that reads back as written.
    #[test]
    fn markers_are_valid_control_batches_and_read_back() {
        for commit in [true, false] {
            let m = Marker {
                producer_id: 4242,
                producer_epoch: 7,
                commit,
                coordinator_epoch: 31,
            };
            let bytes = m.batch(1_700_000_000_000);
            assert!(crc_matches(&bytes));
            let batches = validate_record_set(&bytes, 1 << 20).expect("valid");
            assert_eq!(batches.len(), 1);
            let h = batches[0].header;
            assert!(h.is_control() && h.is_transactional());
            assert_eq!((h.producer_id, h.producer_epoch), (4242, 7));
            assert_eq!((h.record_count, h.offset_count()), (1, 1));
            assert_eq!(Marker::parse(&bytes), Some(m));
        }
        let data = crate::log::batch::tests::make_batch(1, 1, 0, 0, 0);
        assert_eq!(Marker::parse(&data), None, "a data batch is no marker");
    }
}
