//! Opening an object store from a URL and the handful of operations the
//! broker performs on it, with errors mapped to [`Error`].
//!
//! Everything Strata persists is written once and never overwritten, so
//! writes go through [`put_new`], a create-only put: a second writer of the
//! same key fails with [`Error::AlreadyExists`] instead of silently replacing
//! data. Deletes are idempotent because garbage collection may be retried.
//! Supported stores today: `file:///abs/path` (a local directory, for
//! development and single-node setups) and `memory://` (tests); S3 comes
//! later behind the same functions.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::Error;

/// Opens the object store named by `url`.
///
/// * `file:///abs/path` — objects are files under `/abs/path`, which is
///   created if missing. The path is taken literally (no percent-decoding).
///   Writes are fsynced (file and directory) before they return when
///   [`StoreOptions::fsync`] is set; directories left empty by deletes are
///   removed.
/// * `memory://` — a fresh, empty in-process store.
///
/// Any other scheme is [`Error::UnsupportedUrl`].
pub fn open_object_store(url: &str) -> Result<Arc<dyn ObjectStore>, Error> {
    open_object_store_with(url, &StoreOptions::default())
}

/// How a store is opened beyond its URL.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreOptions {
    /// `file://` stores: fsync every object (and its directory) before a write returns,
    /// so acknowledged data also survives a machine crash, not only a process crash.
    pub fsync: bool,
}

/// [`open_object_store`] with options.
pub fn open_object_store_with(
    url: &str,
    options: &StoreOptions,
) -> Result<Arc<dyn ObjectStore>, Error> {
    let invalid = |reason| Error::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| invalid("missing scheme (expected file:///abs/path or memory://)"))?;
    if scheme.is_empty() {
        return Err(invalid(
            "missing scheme (expected file:///abs/path or memory://)",
        ));
    }
    match scheme.to_ascii_lowercase().as_str() {
        "memory" => {
            if !rest.is_empty() && rest != "/" {
                return Err(invalid("memory:// takes no host or path"));
            }
            Ok(Arc::new(InMemory::new()))
        }
        "file" => {
            if !rest.starts_with('/') {
                return Err(invalid(
                    "file urls need an absolute path and no host: file:///abs/path",
                ));
            }
            let dir = std::path::Path::new(rest);
            std::fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
            let store = LocalFileSystem::new_with_prefix(dir)
                .map_err(|source| Error::ObjectStore {
                    location: rest.to_owned(),
                    source,
                })?
                .with_fsync(options.fsync)
                .with_automatic_cleanup(true);
            Ok(Arc::new(store))
        }
        other => Err(Error::UnsupportedUrl {
            url: url.to_owned(),
            scheme: other.to_owned(),
        }),
    }
}

/// Writes `payload` to `key` only if no object exists there yet
/// ([`PutMode::Create`]); an existing object is [`Error::AlreadyExists`]
/// and is left untouched.
pub async fn put_new(
    store: &dyn ObjectStore,
    key: &Path,
    payload: PutPayload,
) -> Result<(), Error> {
    let options = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let len = payload.content_length() as u64;
    let result = store.put_opts(key, payload, options).await;
    crate::metrics::record(
        "put",
        started,
        result.is_ok(),
        if result.is_ok() { len } else { 0 },
    );
    match result {
        Ok(_) => Ok(()),
        Err(object_store::Error::AlreadyExists { .. }) => Err(Error::AlreadyExists {
            key: key.to_string(),
        }),
        Err(source) => Err(Error::ObjectStore {
            location: key.to_string(),
            source,
        }),
    }
}

/// Reads bytes `range` of the object at `key`.
///
/// As with object stores generally, an end beyond the object's size is
/// clamped (fewer bytes come back) while a start at or beyond it is an
/// error. An empty range returns no bytes without touching the store; a start
/// after the end is [`Error::InvalidRange`]; a missing object is
/// [`Error::NotFound`].
pub async fn get_range(
    store: &dyn ObjectStore,
    key: &Path,
    range: Range<u64>,
) -> Result<Bytes, Error> {
    if range.start > range.end {
        return Err(Error::InvalidRange {
            key: key.to_string(),
            start: range.start,
            end: range.end,
        });
    }
    if range.is_empty() {
        return Ok(Bytes::new());
    }
    let started = std::time::Instant::now();
    let result = store.get_range(key, range).await;
    crate::metrics::record(
        "get",
        started,
        result.is_ok(),
        result.as_ref().map_or(0, |b| b.len() as u64),
    );
    result.map_err(|source| match source {
        object_store::Error::NotFound { .. } => Error::NotFound {
            key: key.to_string(),
        },
        source => Error::ObjectStore {
            location: key.to_string(),
            source,
        },
    })
}

/// Deletes the object at `key`; deleting a missing object succeeds.
pub async fn delete(store: &dyn ObjectStore, key: &Path) -> Result<(), Error> {
    let started = std::time::Instant::now();
    let result = store.delete(key).await;
    crate::metrics::record(
        "delete",
        started,
        matches!(result, Ok(()) | Err(object_store::Error::NotFound { .. })),
        0,
    );
    match result {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(source) => Err(Error::ObjectStore {
            location: key.to_string(),
            source,
        }),
    }
}

/// Deletes every object under `prefix` (matched by whole path parts, so
/// `segments/a` does not cover `segments/ab`) and returns how many objects
/// this call deleted. Objects that vanish concurrently are not errors. The
/// empty (root) prefix is refused with [`Error::RootPrefix`].
pub async fn delete_prefix(store: &dyn ObjectStore, prefix: &Path) -> Result<usize, Error> {
    if prefix.as_ref().is_empty() {
        return Err(Error::RootPrefix);
    }
    let store_error = |source| Error::ObjectStore {
        location: prefix.to_string(),
        source,
    };
    let keys: Vec<Path> = store
        .list(Some(prefix))
        .map_ok(|meta| meta.location)
        .try_collect()
        .await
        .map_err(store_error)?;
    let mut results = store.delete_stream(futures::stream::iter(keys.into_iter().map(Ok)).boxed());
    let mut deleted = 0;
    while let Some(result) = results.next().await {
        match result {
            Ok(_) => deleted += 1,
            Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => return Err(store_error(source)),
        }
    }
    tracing::debug!(%prefix, deleted, "deleted objects by prefix");
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both store kinds; the temp dir must outlive the file store.
    fn stores() -> Vec<(Arc<dyn ObjectStore>, Option<tempfile::TempDir>)> {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}/store", dir.path().display());
        let file = open_object_store(&url).expect("file store");
        let memory = open_object_store("memory://").expect("memory store");
        vec![(file, Some(dir)), (memory, None)]
    }

    fn multi_part(parts: &[&'static [u8]]) -> PutPayload {
        parts.iter().map(|p| Bytes::from_static(p)).collect()
    }

    #[tokio::test]
    async fn put_new_refuses_to_overwrite() {
        for (store, _dir) in stores() {
            let key = Path::from("wal/1/a.wal");
            put_new(store.as_ref(), &key, multi_part(&[b"hello ", b"world"]))
                .await
                .expect("first put");
            let err = put_new(store.as_ref(), &key, multi_part(&[b"other"]))
                .await
                .expect_err("second put must fail");
            assert!(
                matches!(err, Error::AlreadyExists { ref key } if key == "wal/1/a.wal"),
                "{store}: {err}"
            );
            let all = get_range(store.as_ref(), &key, 0..11).await.expect("read");
            assert_eq!(&all[..], b"hello world", "{store}");
        }
    }

    #[tokio::test]
    async fn ranged_reads() {
        for (store, _dir) in stores() {
            let key = Path::from("segments/s/1/x.seg");
            put_new(store.as_ref(), &key, multi_part(&[b"0123", b"456789"]))
                .await
                .expect("put");
            let read = |r: Range<u64>| get_range(store.as_ref(), &key, r);
            assert_eq!(&read(2..7).await.expect("middle")[..], b"23456");
            assert_eq!(&read(0..1).await.expect("first")[..], b"0");
            assert_eq!(&read(9..10).await.expect("last")[..], b"9");
            assert_eq!(&read(6..100).await.expect("clamped")[..], b"6789");
            assert!(read(5..5).await.expect("empty").is_empty());
            assert!(matches!(
                read(Range { start: 5, end: 4 }).await,
                Err(Error::InvalidRange {
                    start: 5,
                    end: 4,
                    ..
                })
            ));
            assert!(read(10..12).await.is_err(), "{store}: start past the end");
            let missing = get_range(store.as_ref(), &Path::from("nope"), 0..1).await;
            assert!(
                matches!(missing, Err(Error::NotFound { .. })),
                "{store}: {missing:?}"
            );
        }
    }

    #[tokio::test]
    async fn delete_is_idempotent() {
        for (store, _dir) in stores() {
            let key = Path::from("wal/1/b.wal");
            delete(store.as_ref(), &key).await.expect("delete missing");
            put_new(store.as_ref(), &key, multi_part(&[b"x"]))
                .await
                .expect("put");
            delete(store.as_ref(), &key).await.expect("delete");
            delete(store.as_ref(), &key).await.expect("delete again");
            let gone = get_range(store.as_ref(), &key, 0..1).await;
            assert!(matches!(gone, Err(Error::NotFound { .. })), "{store}");
            // The key is free again.
            put_new(store.as_ref(), &key, multi_part(&[b"y"]))
                .await
                .expect("put again");
        }
    }

    #[tokio::test]
    async fn delete_prefix_deletes_exactly_the_prefix() {
        for (store, _dir) in stores() {
            for key in [
                "segments/t/1/a.seg",
                "segments/t/1/b.seg",
                "segments/t/1/x/c.seg",
                "segments/t/10/a.seg",
                "segments/t/2/a.seg",
            ] {
                put_new(store.as_ref(), &Path::from(key), multi_part(&[b"z"]))
                    .await
                    .expect("put");
            }
            let prefix = Path::from("segments/t/1");
            assert_eq!(
                delete_prefix(store.as_ref(), &prefix)
                    .await
                    .expect("delete"),
                3,
                "{store}"
            );
            assert_eq!(
                delete_prefix(store.as_ref(), &prefix).await.expect("again"),
                0,
                "{store}"
            );
            let left: Vec<String> = store
                .list(Some(&Path::from("segments")))
                .map_ok(|m| m.location.to_string())
                .try_collect()
                .await
                .expect("list");
            let mut left = left;
            left.sort();
            assert_eq!(
                left,
                ["segments/t/10/a.seg", "segments/t/2/a.seg"],
                "{store}"
            );
            assert_eq!(
                delete_prefix(store.as_ref(), &Path::from("never/was"))
                    .await
                    .expect("missing"),
                0
            );
            assert!(matches!(
                delete_prefix(store.as_ref(), &Path::ROOT).await,
                Err(Error::RootPrefix)
            ));
        }
    }

    #[test]
    fn open_urls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nested = dir.path().join("a/b/c");
        assert!(open_object_store(&format!("file://{}", nested.display())).is_ok());
        assert!(nested.is_dir());
        // Reopening an existing directory is fine.
        assert!(open_object_store(&format!("FILE://{}", nested.display())).is_ok());
        assert!(open_object_store("memory://").is_ok());
        assert!(open_object_store("memory:///").is_ok());

        let err = open_object_store("s3://bucket/prefix").err();
        assert!(
            matches!(&err, Some(Error::UnsupportedUrl { scheme, .. }) if scheme == "s3"),
            "{err:?}"
        );
        assert!(err.is_some_and(|e| e.to_string().contains("\"s3\"")));
        for bad in ["/tmp/x", "file://relative/x", "memory://x", "://x", ""] {
            assert!(
                matches!(open_object_store(bad), Err(Error::InvalidUrl { .. })),
                "{bad}"
            );
        }
    }
}
