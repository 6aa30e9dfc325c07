//! The crate's single error type, [`Error`].
//!
//! One enum for the whole crate keeps the broker's error handling simple: it
//! can match the few variants it reacts to (an object that already exists, one
//! that is missing, a decoder asking for more bytes) and log the rest. Messages
//! are lowercase and name the thing that failed so they read well when wrapped.

use std::path::PathBuf;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The object store URL has a scheme this build cannot open.
    #[error("unsupported object store url scheme {scheme:?} in {url:?} (supported: s3://, gs://, az://, file:///abs/path, memory://)")]
    UnsupportedUrl {
        /// The URL as given.
        url: String,
        /// Its scheme, lowercased.
        scheme: String,
    },

    /// The object store URL is malformed.
    #[error("invalid object store url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// Creating the local directory behind a `file://` store failed.
    #[error("cannot create directory {path:?}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A create-only put found an object already at the key.
    #[error("object {key} already exists")]
    AlreadyExists {
        /// The object's key.
        key: String,
    },

    /// The object does not exist.
    #[error("object {key} not found")]
    NotFound {
        /// The object's key.
        key: String,
    },

    /// A byte range whose start lies after its end.
    #[error("invalid byte range {start}..{end} for object {key}")]
    InvalidRange {
        /// The object's key.
        key: String,
        /// Requested start (inclusive).
        start: u64,
        /// Requested end (exclusive).
        end: u64,
    },

    /// The block cache failed (its disk tier, or a fetch through it).
    #[error("block cache: {0}")]
    Cache(String),

    /// A request kept timing out until its deadline.
    #[error("object store {op} of {key} timed out")]
    TimedOut {
        /// The operation: put, get, delete or list.
        op: &'static str,
        /// The key or prefix involved.
        key: String,
    },

    /// The store accepted a second create of one key; Strata needs create-only puts.
    #[error("object store {store} does not refuse a second create of one key (conditional create, If-None-Match: *); Strata cannot use it")]
    NoConditionalCreate {
        /// The store's redacted URL.
        store: String,
    },

    /// `delete_prefix` was asked to delete the whole store.
    #[error("refusing to delete by an empty prefix (it would delete the whole store)")]
    RootPrefix,

    /// Any other object store failure.
    #[error("object store error at {location}: {source}")]
    ObjectStore {
        /// The key, prefix or directory involved.
        location: String,
        /// The object store's error.
        #[source]
        source: object_store::Error,
    },

    /// A decoder was given fewer tail bytes than the structure needs. `needed`
    /// counts bytes from the end of the object: fetch that many and retry.
    #[error("{what} truncated: need the last {needed} bytes, got {available}")]
    Truncated {
        /// The structure being decoded.
        what: &'static str,
        /// How many bytes (from the object's end) the decoder needs.
        needed: u64,
        /// How many it was given.
        available: u64,
    },

    /// The structure does not end with the expected magic.
    #[error("{what} has bad magic {found:02x?}")]
    BadMagic {
        /// The structure being decoded.
        what: &'static str,
        /// The four bytes found where the magic belongs.
        found: [u8; 4],
    },

    /// The structure has a format version this build does not understand.
    #[error("{what} has unsupported format version {version}")]
    UnsupportedVersion {
        /// The structure being decoded.
        what: &'static str,
        /// The version byte found.
        version: u8,
    },

    /// The stored crc32c does not match the bytes.
    #[error("{what} checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// The structure being decoded.
        what: &'static str,
        /// The checksum stored in the object.
        stored: u32,
        /// The checksum of the bytes read.
        computed: u32,
    },

    /// The structure passed its checksum but is not well formed.
    #[error("corrupt {what}: {reason}")]
    Corrupt {
        /// The structure being decoded.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    /// Whether trying again later may succeed: the store timed out or failed in transit
    /// (5xx, throttling, a broken connection), or a fetch through the cache did. Answers
    /// about the object itself (not found, already there, damaged) and configuration
    /// errors are final: retrying them only repeats the failure.
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::TimedOut { .. } | Error::Cache(_) => true,
            Error::ObjectStore { source, .. } => crate::store::retriable(source),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_failures_are_retriable_and_answers_are_final() {
        let generic = Error::ObjectStore {
            location: "k".into(),
            source: object_store::Error::Generic {
                store: "s3",
                source: "503 slow down".into(),
            },
        };
        assert!(generic.is_retriable());
        assert!(Error::TimedOut {
            op: "put",
            key: "k".into()
        }
        .is_retriable());
        assert!(!Error::NotFound { key: "k".into() }.is_retriable());
        assert!(!Error::AlreadyExists { key: "k".into() }.is_retriable());
        let precondition = Error::ObjectStore {
            location: "k".into(),
            source: object_store::Error::Precondition {
                path: "k".into(),
                source: "412".into(),
            },
        };
        assert!(!precondition.is_retriable());
    }
}
