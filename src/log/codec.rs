//! The record-batch compression codecs, for the few places that look inside a batch:
//! the key check on compacted topics and the compactor. Everything else passes batches
//! through as bytes.
//!
//! Decompression is bounded (`batch.decompressed.max.bytes`): a small compressed batch
//! can expand to gigabytes, and the broker must never let a client choose how much
//! memory it allocates.

use std::io::Read;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::compression::{Compressor, Gzip, Lz4, Snappy, Zstd};

/// The codec bits (0-2) of a batch's attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codec {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CodecError {
    #[error("unknown compression codec {0}")]
    Unknown(i16),
    #[error("record data decompresses to more than {0} bytes (batch.decompressed.max.bytes)")]
    TooLarge(usize),
    #[error("record data does not decompress: {0}")]
    Corrupt(String),
}

/// xerial framing, which Java clients put around snappy data: magic, version,
/// compatible version, then blocks of (u32 length, raw snappy).
const XERIAL_MAGIC: &[u8] = b"\x82SNAPPY\x00";
const XERIAL_HEADER_LEN: usize = 16;

impl Codec {
    pub(crate) fn of(attributes: i16) -> Result<Codec, CodecError> {
        match attributes & 0x07 {
            0 => Ok(Codec::None),
            1 => Ok(Codec::Gzip),
            2 => Ok(Codec::Snappy),
            3 => Ok(Codec::Lz4),
            4 => Ok(Codec::Zstd),
            other => Err(CodecError::Unknown(other)),
        }
    }

    /// `data` decompressed, refused once it passes `limit` bytes.
    pub(crate) fn decompress(self, data: &Bytes, limit: usize) -> Result<Bytes, CodecError> {
        let corrupt = |e: std::io::Error| CodecError::Corrupt(e.to_string());
        match self {
            Codec::None if data.len() > limit => Err(CodecError::TooLarge(limit)),
            Codec::None => Ok(data.clone()),
            Codec::Gzip => read_bounded(flate2::read::GzDecoder::new(&data[..]), limit),
            Codec::Lz4 => read_bounded(lz4::Decoder::new(&data[..]).map_err(corrupt)?, limit),
            Codec::Zstd => read_bounded(
                zstd::stream::read::Decoder::new(&data[..]).map_err(corrupt)?,
                limit,
            ),
            Codec::Snappy => snappy_decompress(data, limit),
        }
    }

    /// `data` compressed as a producer using this codec would have.
    pub(crate) fn compress(self, data: &[u8]) -> Result<Bytes, CodecError> {
        let mut out = BytesMut::with_capacity(data.len() / 2 + 64);
        let fill = |buf: &mut BytesMut| -> anyhow::Result<()> {
            buf.put_slice(data);
            Ok(())
        };
        let done = match self {
            Codec::None => {
                out.put_slice(data);
                Ok(())
            }
            Codec::Gzip => Gzip::compress(&mut out, fill),
            Codec::Snappy => Snappy::compress(&mut out, fill),
            Codec::Lz4 => Lz4::compress(&mut out, fill),
            Codec::Zstd => Zstd::compress(&mut out, fill),
        };
        done.map_err(|e| CodecError::Corrupt(format!("{e:#}")))?;
        Ok(out.freeze())
    }
}

fn read_bounded(reader: impl Read, limit: usize) -> Result<Bytes, CodecError> {
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| CodecError::Corrupt(e.to_string()))?;
    if out.len() > limit {
        return Err(CodecError::TooLarge(limit));
    }
    Ok(out.into())
}

fn snappy_decompress(data: &[u8], limit: usize) -> Result<Bytes, CodecError> {
    let mut out = Vec::new();
    let block = |raw: &[u8], out: &mut Vec<u8>| -> Result<(), CodecError> {
        let len = snap::raw::decompress_len(raw).map_err(|e| CodecError::Corrupt(e.to_string()))?;
        if out.len() + len > limit {
            return Err(CodecError::TooLarge(limit));
        }
        let start = out.len();
        out.resize(start + len, 0);
        snap::raw::Decoder::new()
            .decompress(raw, &mut out[start..])
            .map_err(|e| CodecError::Corrupt(e.to_string()))?;
        Ok(())
    };
    if !data.starts_with(XERIAL_MAGIC) {
        block(data, &mut out)?;
        return Ok(out.into());
    }
    let mut rest = data
        .get(XERIAL_HEADER_LEN..)
        .ok_or_else(|| CodecError::Corrupt("truncated xerial header".into()))?;
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| CodecError::Corrupt("truncated xerial block length".into()))?;
        let len = u32::from_be_bytes(*len) as usize;
        let raw = tail
            .get(..len)
            .ok_or_else(|| CodecError::Corrupt("truncated xerial block".into()))?;
        block(raw, &mut out)?;
        rest = &tail[len..];
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every codec round-trips, and decompression stops at the limit instead of
    /// allocating whatever the data expands to.
    #[test]
    fn codecs_round_trip_and_decompression_is_bounded() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_be_bytes())
            .collect();
        for codec in [
            Codec::None,
            Codec::Gzip,
            Codec::Snappy,
            Codec::Lz4,
            Codec::Zstd,
        ] {
            let packed = codec.compress(&data).expect("compresses");
            let back = codec.decompress(&packed, data.len()).expect("decompresses");
            assert_eq!(&back[..], &data[..], "{codec:?}");
            assert_eq!(
                codec.decompress(&packed, data.len() - 1),
                Err(CodecError::TooLarge(data.len() - 1)),
                "{codec:?}"
            );
        }
        assert!(matches!(
            Codec::Lz4.decompress(&Bytes::from_static(b"not lz4 at all"), 1 << 20),
            Err(CodecError::Corrupt(_))
        ));
        assert_eq!(Codec::of(5), Err(CodecError::Unknown(5)));
    }
}
