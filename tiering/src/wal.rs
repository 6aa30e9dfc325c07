//! The write-ahead (WAL) object: the new record batches of many streams,
//! collected by one flush and written as a single object.
//!
//! One object per flush keeps the number of object-store PUTs independent of
//! the number of partitions; a footer at the end of the object tells readers
//! where each stream's bytes are, so a fetch reads one range of one object.
//! The batch bytes are stored as the broker received them and are never copied
//! while building the payload. Layout (see `README.md` for the full spec):
//!
//! ```text
//! header  8 B   "STWL" | version=1 | 0 0 0
//! data          chunk 0 bytes | chunk 1 bytes | ...      (back to back)
//! footer        version=1 | chunk count u32 | chunk entries
//! trailer 12 B  footer length u32 | crc32c(footer) u32 | "STWL"
//! ```
//!
//! All integers are big-endian. A reader fetches the tail of the object, calls
//! [`decode_wal_footer`] (which says how many bytes it needs if the tail was
//! too short) and then reads the ranges it wants.

use bytes::{BufMut, Bytes, BytesMut};
use object_store::PutPayload;

use crate::codec::Reader;
use crate::Error;

/// Magic at the start and at the very end of every WAL object.
pub const WAL_MAGIC: [u8; 4] = *b"STWL";
/// The format version this build writes and reads.
pub const WAL_VERSION: u8 = 1;
/// Length of the fixed header at the start of the object.
pub const WAL_HEADER_LEN: usize = 8;
/// Length of the fixed trailer at the end of the object: footer length u32,
/// crc32c u32, magic.
pub const WAL_TRAILER_LEN: usize = 12;

const HEADER: [u8; WAL_HEADER_LEN] = [b'S', b'T', b'W', b'L', WAL_VERSION, 0, 0, 0];
/// Fixed part of one footer entry: stream id length u32, base offset,
/// end offset, max timestamp, position, length (8 bytes each).
const ENTRY_FIXED_LEN: usize = 4 + 5 * 8;
const FOOTER_WHAT: &str = "wal footer";

/// New data of one stream, to be written into a WAL object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalChunk {
    /// Opaque stream id.
    pub stream: String,
    /// Offset of the first record in `data`.
    pub base_offset: i64,
    /// Offset after the last record in `data` (exclusive).
    pub end_offset: i64,
    /// Largest record timestamp in `data`.
    pub max_timestamp: i64,
    /// The record batches, stored as they are, back to back.
    pub data: Vec<Bytes>,
}

/// Where a stream's chunk lives inside a WAL object.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WalChunkLocation {
    /// Opaque stream id.
    pub stream: String,
    /// Offset of the first record in the chunk.
    pub base_offset: i64,
    /// Offset after the last record in the chunk (exclusive).
    pub end_offset: i64,
    /// Largest record timestamp in the chunk.
    pub max_timestamp: i64,
    /// Byte position of the chunk within the object.
    pub position: u64,
    /// Byte length of the chunk.
    pub len: u64,
}

impl WalChunkLocation {
    /// The chunk's byte range within the object, ready for a ranged read.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.position..self.position.saturating_add(self.len)
    }
}

/// Lays out a WAL object holding `chunks` in the given order.
///
/// The payload is the header, every chunk's `Bytes` exactly as given (no copy)
/// and the footer plus trailer. The returned locations are the ones written to
/// the footer.
///
/// # Panics
///
/// If the footer would exceed 4 GiB (more than ~97 million chunks, or a
/// stream id longer than 4 GiB), which the format cannot describe.
pub fn build_wal_object(chunks: Vec<WalChunk>) -> (PutPayload, Vec<WalChunkLocation>) {
    let data_parts: usize = chunks.iter().map(|c| c.data.len()).sum();
    let mut parts = Vec::with_capacity(data_parts + 2);
    parts.push(Bytes::from_static(&HEADER));
    let mut locations = Vec::with_capacity(chunks.len());
    let mut position = WAL_HEADER_LEN as u64;
    for chunk in chunks {
        debug_assert!(
            chunk.base_offset <= chunk.end_offset,
            "wal chunk of {} ends before it starts",
            chunk.stream
        );
        let len: u64 = chunk.data.iter().map(|b| b.len() as u64).sum();
        locations.push(WalChunkLocation {
            stream: chunk.stream,
            base_offset: chunk.base_offset,
            end_offset: chunk.end_offset,
            max_timestamp: chunk.max_timestamp,
            position,
            len,
        });
        position += len;
        parts.extend(chunk.data.into_iter().filter(|b| !b.is_empty()));
    }
    parts.push(encode_footer(&locations));
    (parts.into_iter().collect(), locations)
}

fn encode_footer(locations: &[WalChunkLocation]) -> Bytes {
    let footer_len = 1
        + 4
        + locations
            .iter()
            .map(|l| ENTRY_FIXED_LEN + l.stream.len())
            .sum::<usize>();
    let mut buf = BytesMut::with_capacity(footer_len + WAL_TRAILER_LEN);
    buf.put_u8(WAL_VERSION);
    buf.put_u32(u32::try_from(locations.len()).expect("wal object has too many chunks"));
    for l in locations {
        buf.put_u32(u32::try_from(l.stream.len()).expect("wal stream id longer than 4 GiB"));
        buf.put_slice(l.stream.as_bytes());
        buf.put_i64(l.base_offset);
        buf.put_i64(l.end_offset);
        buf.put_i64(l.max_timestamp);
        buf.put_u64(l.position);
        buf.put_u64(l.len);
    }
    debug_assert_eq!(buf.len(), footer_len);
    let crc = crc32c::crc32c(&buf);
    buf.put_u32(u32::try_from(footer_len).expect("wal footer larger than 4 GiB"));
    buf.put_u32(crc);
    buf.put_slice(&WAL_MAGIC);
    buf.freeze()
}

/// Checks the 8-byte header at the start of a WAL object (extra trailing
/// bytes are ignored).
pub fn check_wal_header(header: &[u8]) -> Result<(), Error> {
    const WHAT: &str = "wal header";
    let mut r = Reader::new(header, WHAT);
    if header.len() < WAL_HEADER_LEN {
        return Err(r.corrupt(format!("{} bytes, need {WAL_HEADER_LEN}", header.len())));
    }
    let found = r.magic()?;
    if found != WAL_MAGIC {
        return Err(Error::BadMagic { what: WHAT, found });
    }
    let version = r.u8()?;
    if version != WAL_VERSION {
        return Err(Error::UnsupportedVersion {
            what: WHAT,
            version,
        });
    }
    if r.take(3)? != [0, 0, 0] {
        return Err(r.corrupt("reserved header bytes are not zero"));
    }
    Ok(())
}

/// Decodes the chunk locations from the tail of a WAL object.
///
/// `footer_and_trailer` must be the last bytes of the object and hold at least
/// the footer and the trailer; extra leading bytes are ignored. If it is too
/// short the error is [`Error::Truncated`] whose `needed` is how many bytes
/// from the end of the object to fetch. The footer's crc32c is verified and
/// the chunks must tile the data region from the end of the header onwards.
pub fn decode_wal_footer(footer_and_trailer: &[u8]) -> Result<Vec<WalChunkLocation>, Error> {
    let buf = footer_and_trailer;
    let available = buf.len() as u64;
    let Some(body_len) = buf.len().checked_sub(WAL_TRAILER_LEN) else {
        return Err(Error::Truncated {
            what: FOOTER_WHAT,
            needed: WAL_TRAILER_LEN as u64,
            available,
        });
    };
    let (body, trailer) = buf.split_at(body_len);
    let mut t = Reader::new(trailer, FOOTER_WHAT);
    let footer_len = t.u32()?;
    let stored = t.u32()?;
    let found = t.magic()?;
    if found != WAL_MAGIC {
        return Err(Error::BadMagic {
            what: FOOTER_WHAT,
            found,
        });
    }
    let footer_start = usize::try_from(footer_len)
        .ok()
        .and_then(|len| body.len().checked_sub(len));
    let Some(footer_start) = footer_start else {
        return Err(Error::Truncated {
            what: FOOTER_WHAT,
            needed: u64::from(footer_len) + WAL_TRAILER_LEN as u64,
            available,
        });
    };
    let footer = &body[footer_start..];
    let computed = crc32c::crc32c(footer);
    if computed != stored {
        return Err(Error::ChecksumMismatch {
            what: FOOTER_WHAT,
            stored,
            computed,
        });
    }

    let mut r = Reader::new(footer, FOOTER_WHAT);
    let version = r.u8()?;
    if version != WAL_VERSION {
        return Err(Error::UnsupportedVersion {
            what: FOOTER_WHAT,
            version,
        });
    }
    let count = r.u32()? as usize;
    if count > r.remaining() / ENTRY_FIXED_LEN {
        return Err(r.corrupt(format!(
            "{count} chunks cannot fit in {} footer bytes",
            r.remaining()
        )));
    }
    let mut locations = Vec::with_capacity(count);
    let mut expected_position = WAL_HEADER_LEN as u64;
    for i in 0..count {
        let stream_len = r.u32()? as usize;
        let stream = std::str::from_utf8(r.take(stream_len)?)
            .map_err(|_| r.corrupt(format!("chunk {i} stream id is not utf-8")))?
            .to_owned();
        let location = WalChunkLocation {
            stream,
            base_offset: r.i64()?,
            end_offset: r.i64()?,
            max_timestamp: r.i64()?,
            position: r.u64()?,
            len: r.u64()?,
        };
        if location.end_offset < location.base_offset {
            return Err(r.corrupt(format!(
                "chunk {i} ends at offset {} before its base offset {}",
                location.end_offset, location.base_offset
            )));
        }
        if location.position != expected_position {
            return Err(r.corrupt(format!(
                "chunk {i} at position {}, expected {expected_position}",
                location.position
            )));
        }
        expected_position = location
            .position
            .checked_add(location.len)
            .ok_or_else(|| r.corrupt(format!("chunk {i} length overflows")))?;
        locations.push(location);
    }
    if r.remaining() != 0 {
        return Err(r.corrupt(format!("{} trailing footer bytes", r.remaining())));
    }
    Ok(locations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flatten(payload: &PutPayload) -> Vec<u8> {
        payload.iter().flat_map(|b| b.iter().copied()).collect()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn sample() -> Vec<WalChunk> {
        vec![
            WalChunk {
                stream: "t/0".into(),
                base_offset: 5,
                end_offset: 7,
                max_timestamp: 1000,
                data: vec![Bytes::from_static(b"ab"), Bytes::from_static(b"c")],
            },
            WalChunk {
                stream: "u/1".into(),
                base_offset: 0,
                end_offset: 1,
                max_timestamp: -1,
                data: vec![Bytes::from_static(b"xy")],
            },
        ]
    }

    /// Pins the whole object byte for byte. If this fails, the format changed:
    /// bump the version instead of editing the expectation.
    #[test]
    fn golden_wal_object() {
        let (payload, locations) = build_wal_object(sample());
        let expected = concat!(
            // header: "STWL", version 1, reserved
            "5354574c",
            "01",
            "000000",
            // data: chunk 0 "abc" at 8, chunk 1 "xy" at 11
            "616263",
            "7879",
            // footer: version 1, 2 chunks
            "01",
            "00000002",
            // chunk 0: stream "t/0", base 5, end 7, max ts 1000, position 8, len 3
            "00000003",
            "742f30",
            "0000000000000005",
            "0000000000000007",
            "00000000000003e8",
            "0000000000000008",
            "0000000000000003",
            // chunk 1: stream "u/1", base 0, end 1, max ts -1, position 11, len 2
            "00000003",
            "752f31",
            "0000000000000000",
            "0000000000000001",
            "ffffffffffffffff",
            "000000000000000b",
            "0000000000000002",
            // trailer: footer length 99, crc32c(footer), "STWL"
            "00000063",
            "cac8be21",
            "5354574c",
        );
        assert_eq!(hex(&flatten(&payload)), expected);
        assert_eq!(locations[0].range(), 8..11);
        assert_eq!(locations[1].range(), 11..13);
        let bytes = flatten(&payload);
        assert_eq!(decode_wal_footer(&bytes).ok(), Some(locations));
        assert!(check_wal_header(&bytes).is_ok());
    }

    #[test]
    fn empty_object() {
        let (payload, locations) = build_wal_object(Vec::new());
        assert!(locations.is_empty());
        let bytes = flatten(&payload);
        assert_eq!(bytes.len(), WAL_HEADER_LEN + 5 + WAL_TRAILER_LEN);
        assert_eq!(decode_wal_footer(&bytes).ok(), Some(Vec::new()));
    }

    #[test]
    fn payload_reuses_chunk_bytes() {
        let chunks = sample();
        let pointers: Vec<*const u8> = chunks
            .iter()
            .flat_map(|c| c.data.iter().map(|b| b.as_ptr()))
            .collect();
        let (payload, _) = build_wal_object(chunks);
        let parts: Vec<&Bytes> = payload.iter().collect();
        assert_eq!(parts.len(), pointers.len() + 2);
        for (part, ptr) in parts[1..parts.len() - 1].iter().zip(pointers) {
            assert_eq!(part.as_ptr(), ptr);
        }
    }

    #[test]
    fn truncated_tail_says_how_much_is_needed() {
        let (payload, _) = build_wal_object(sample());
        let bytes = flatten(&payload);
        let total = (bytes.len() - 13) as u64; // everything but header and data
        match decode_wal_footer(&bytes[bytes.len() - 20..]) {
            Err(Error::Truncated {
                needed, available, ..
            }) => {
                assert_eq!((needed, available), (total, 20));
            }
            other => panic!("expected truncated, got {other:?}"),
        }
        match decode_wal_footer(&bytes[bytes.len() - 3..]) {
            Err(Error::Truncated { needed, .. }) => assert_eq!(needed, WAL_TRAILER_LEN as u64),
            other => panic!("expected truncated, got {other:?}"),
        }
        let exact = &bytes[bytes.len() - total as usize..];
        assert!(decode_wal_footer(exact).is_ok());
    }

    #[test]
    fn detects_corruption() {
        let (payload, _) = build_wal_object(sample());
        let mut bytes = flatten(&payload);
        let n = bytes.len();
        bytes[n - 20] ^= 1;
        assert!(matches!(
            decode_wal_footer(&bytes),
            Err(Error::ChecksumMismatch { .. })
        ));
        bytes[n - 20] ^= 1;
        bytes[n - 1] = b'X';
        assert!(matches!(
            decode_wal_footer(&bytes),
            Err(Error::BadMagic { .. })
        ));
        assert!(matches!(
            check_wal_header(b"STWL\x02\0\0\0"),
            Err(Error::UnsupportedVersion { version: 2, .. })
        ));
        assert!(check_wal_header(b"STW").is_err());
        assert!(check_wal_header(b"STWL\x01\0\0\x01").is_err());
    }

    /// A footer that passes its checksum but claims another version.
    #[test]
    fn rejects_unknown_version() {
        let footer = [2u8, 0, 0, 0, 0];
        let mut bytes = footer.to_vec();
        bytes.extend_from_slice(&5u32.to_be_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&footer).to_be_bytes());
        bytes.extend_from_slice(&WAL_MAGIC);
        assert!(matches!(
            decode_wal_footer(&bytes),
            Err(Error::UnsupportedVersion { version: 2, .. })
        ));
    }

    fn arb_chunk() -> impl Strategy<Value = WalChunk> {
        (
            "\\PC{1,12}",
            any::<i64>(),
            0i64..1_000_000,
            any::<i64>(),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..4),
        )
            .prop_map(|(stream, base, count, max_timestamp, data)| {
                let base = base.min(i64::MAX - count);
                WalChunk {
                    stream,
                    base_offset: base,
                    end_offset: base + count,
                    max_timestamp,
                    data: data.into_iter().map(Bytes::from).collect(),
                }
            })
    }

    proptest! {
        #[test]
        fn round_trip(chunks in proptest::collection::vec(arb_chunk(), 0..8), extra in 0usize..64) {
            let (payload, locations) = build_wal_object(chunks.clone());
            let bytes = flatten(&payload);
            prop_assert_eq!(bytes.len(), payload.content_length());
            prop_assert!(check_wal_header(&bytes).is_ok());
            prop_assert_eq!(locations.len(), chunks.len());
            for (chunk, loc) in chunks.iter().zip(&locations) {
                prop_assert_eq!(&loc.stream, &chunk.stream);
                prop_assert_eq!(loc.base_offset, chunk.base_offset);
                prop_assert_eq!(loc.end_offset, chunk.end_offset);
                prop_assert_eq!(loc.max_timestamp, chunk.max_timestamp);
                let want: Vec<u8> = chunk.data.iter().flat_map(|b| b.iter().copied()).collect();
                let range = loc.position as usize..(loc.position + loc.len) as usize;
                prop_assert_eq!(&bytes[range], &want[..]);
            }
            // The exact tail, and a tail with extra leading bytes, both decode.
            let data_end = locations.last().map_or(WAL_HEADER_LEN as u64, |l| l.position + l.len);
            let tail_len = bytes.len() - data_end as usize;
            let start = bytes.len() - (tail_len + extra).min(bytes.len());
            prop_assert_eq!(decode_wal_footer(&bytes[bytes.len() - tail_len..]).ok(), Some(locations.clone()));
            prop_assert_eq!(decode_wal_footer(&bytes[start..]).ok(), Some(locations));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_wal_footer(&bytes);
            let _ = check_wal_header(&bytes);
        }

        /// Random footers with a valid trailer and checksum exercise the
        /// structural checks past the crc.
        #[test]
        fn decode_checksummed_garbage_never_panics(
            footer in proptest::collection::vec(any::<u8>(), 0..300),
            small_count in any::<bool>(),
        ) {
            let mut footer = footer;
            if small_count && footer.len() >= 5 {
                footer[0] = WAL_VERSION;
                let count = u32::from(footer[4] % 4);
                footer[1..5].copy_from_slice(&count.to_be_bytes());
            }
            let mut bytes = footer.clone();
            bytes.extend_from_slice(&(footer.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&crc32c::crc32c(&footer).to_be_bytes());
            bytes.extend_from_slice(&WAL_MAGIC);
            let _ = decode_wal_footer(&bytes);
        }

        #[test]
        fn any_footer_bit_flip_is_detected(chunks in proptest::collection::vec(arb_chunk(), 1..4), pick in any::<usize>(), bit in 0u8..8) {
            let (payload, locations) = build_wal_object(chunks);
            let mut bytes = flatten(&payload);
            let data_end = locations.last().map_or(0, |l| l.position + l.len) as usize;
            // Flip a bit in the footer or in the crc/magic of the trailer.
            let footer_len = bytes.len() - WAL_TRAILER_LEN - data_end;
            let mut i = data_end + pick % (footer_len + 8);
            if i >= data_end + footer_len {
                i += 4; // skip the length field
            }
            bytes[i] ^= 1 << bit;
            prop_assert!(decode_wal_footer(&bytes).is_err());
        }
    }
}
