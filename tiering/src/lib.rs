//! Strata's storage below the log: the byte formats and object-store plumbing
//! that the broker uses to keep partitions in object storage.
//!
//! This crate owns everything that is *persisted* as objects — the names of
//! objects ([`keys`]), the write-ahead object that one flush of many streams
//! produces ([`wal`]), the sealed per-stream segment object with its sparse
//! indexes ([`segment`]) — and the thin layer that opens and talks to an object
//! store ([`store`]). It deals only in bytes, offsets and timestamps; it knows
//! nothing about Kafka's protocol, which keeps the formats small, testable and
//! independent of the wire protocol version. Every persisted format carries a
//! magic and a version byte and is pinned by golden tests; `README.md` next to
//! this crate's `Cargo.toml` is the byte-by-byte specification.

pub mod cache;
mod codec;
pub mod error;
#[cfg(any(test, feature = "faults"))]
pub mod faults;
pub mod keys;
pub mod metrics;
pub mod segment;
pub mod store;
pub mod wal;

pub use cache::{BlockCache, CacheOptions};
pub use error::Error;
pub use keys::{segment_object_key, stream_prefix, wal_object_key};
pub use segment::{build_segment_object, BatchEntry, SegmentIndex, SEGMENT_FOOTER_LEN};
pub use store::{Class, Store, StoreOptions};
pub use wal::{build_wal_object, decode_wal_footer, WalChunk, WalChunkLocation, WAL_TRAILER_LEN};
