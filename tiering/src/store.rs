//! The broker's one door to object storage: [`Store`] opens a store from a URL and
//! wraps every request in the policy a remote store needs.
//!
//! Requests cost money, take tens of milliseconds, fail and time out, so each call
//! here gets:
//! * a per-attempt timeout ([`StoreOptions::request_timeout`]) and retries with
//!   exponential backoff and full jitter on retriable errors, until a total deadline
//!   (the caller's, or [`StoreOptions::retry_timeout`]);
//! * a concurrency limit per [`Class`], so replay reads of old data queue behind each
//!   other and never in front of writes or tail reads;
//! * instrumentation: requests, bytes, latency, retries and in-flight requests by
//!   operation and outcome (`crate::metrics`, the cost meter).
//!
//! Everything Strata persists is written once and never overwritten, so writes go
//! through [`Store::put_new`], a create-only put (`PutMode::Create`): a second writer
//! of the same key fails with [`Error::AlreadyExists`] instead of silently replacing
//! data. A write whose attempt timed out may still have landed; when its retry finds
//! the key taken, the object is read back and compared, so the write is recognised as
//! ours (no duplicate, no false failure) or reported as a conflict. Deletes are
//! idempotent because garbage collection may be retried. The object store's own
//! client retries are switched off: one policy, in one place, with its own metrics.

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};
use tokio::sync::Semaphore;

use crate::metrics::{self, Outcome};
use crate::Error;

/// Why a request is made; each class has its own concurrency limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Writes and deletes: write-ahead objects, segment uploads, garbage collection.
    Write,
    /// Reads someone is waiting on now: fetches, recovery, indexes, metadata.
    Read,
    /// Read-ahead of sequential replay; bounded separately so it never delays the rest.
    Replay,
    /// Compaction's reads and writes of segment objects; bounded separately so it never
    /// delays produce or tail reads.
    Compact,
}

impl Class {
    /// The metric label of this class.
    pub fn label(self) -> &'static str {
        match self {
            Class::Write => "write",
            Class::Read => "read",
            Class::Replay => "replay",
            Class::Compact => "compact",
        }
    }
}

/// How a store is opened beyond its URL.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// `file://` stores: fsync every object (and its directory) before a write returns,
    /// so acknowledged data also survives a machine crash, not only a process crash.
    pub fsync: bool,
    /// Longest one attempt of one request may take before it is abandoned and retried.
    pub request_timeout: Duration,
    /// Longest a request keeps retrying when its caller gives no deadline.
    pub retry_timeout: Duration,
    /// Requests of [`Class::Write`] in flight at once.
    pub write_concurrency: usize,
    /// Requests of [`Class::Read`] in flight at once.
    pub read_concurrency: usize,
    /// Requests of [`Class::Replay`] in flight at once.
    pub replay_concurrency: usize,
    /// Requests of [`Class::Compact`] in flight at once.
    pub compact_concurrency: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            fsync: false,
            request_timeout: Duration::from_secs(10),
            retry_timeout: Duration::from_secs(30),
            write_concurrency: 64,
            read_concurrency: 64,
            replay_concurrency: 16,
            compact_concurrency: 4,
        }
    }
}

/// An object store with Strata's request policy around it. Cheap to share behind an
/// `Arc`; every method may be called concurrently.
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    name: String,
    options: StoreOptions,
    writes: Semaphore,
    reads: Semaphore,
    replay: Semaphore,
    compact: Semaphore,
    /// When the store last answered (any answer about an object, including "not found"
    /// and "already exists"), as nanoseconds since `opened`; 0: never.
    answered_ns: AtomicU64,
    opened: Instant,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("name", &self.name).finish()
    }
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// One failed attempt: the store's error, or our own timeout.
enum Failure {
    Store(object_store::Error),
    TimedOut,
}

/// Errors worth another attempt: transport failures, 5xx and throttling (all of which
/// object_store reports as `Generic`). Answers about the object itself are final.
pub(crate) fn retriable(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}

/// Full-jitter exponential backoff: a random wait up to 50 ms × 2^attempt, capped at 2 s.
/// Every retry loop of the broker (object store and metadata store) uses it.
pub fn backoff(attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let cap = 50u64.saturating_mul(1 << attempt.min(6)).min(2_000);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(attempt);
    Duration::from_millis(1 + h.finish() % cap)
}

impl Store {
    /// Opens the object store named by `url`:
    ///
    /// * `s3://bucket[/prefix][?key=value&...]` — Amazon S3 or any S3-compatible
    ///   store. Credentials, region and endpoint come from the standard `AWS_*`
    ///   environment (and the instance/container credential chain); query pairs are
    ///   object_store's S3 options (`endpoint`, `region`, `allow_http`,
    ///   `virtual_hosted_style_request`, ...) and override the environment.
    /// * `gs://bucket[/prefix][?...]` — Google Cloud Storage (`GOOGLE_*` environment).
    /// * `az://container[/prefix][?...]` — Azure Blob Storage (`AZURE_*` environment).
    /// * `file:///abs/path` — objects are files under `/abs/path`, created if
    ///   missing, taken literally (no percent-decoding). Writes are fsynced (file and
    ///   directory) when [`StoreOptions::fsync`] is set; directories left empty by
    ///   deletes are removed.
    /// * `memory://` — a fresh, empty in-process store.
    ///
    /// Any other scheme is [`Error::UnsupportedUrl`].
    pub fn open(url: &str, options: &StoreOptions) -> Result<Store, Error> {
        let invalid = |reason| Error::InvalidUrl {
            url: redact(url),
            reason,
        };
        let (scheme, rest) = url
            .split_once("://")
            .filter(|(s, _)| !s.is_empty())
            .ok_or_else(|| {
                invalid("missing scheme (expected s3://, gs://, az://, file:// or memory://)")
            })?;
        let scheme = scheme.to_ascii_lowercase();
        let store: Arc<dyn ObjectStore> = match scheme.as_str() {
            "memory" => {
                if !rest.is_empty() && rest != "/" {
                    return Err(invalid("memory:// takes no host or path"));
                }
                Arc::new(InMemory::new())
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
                Arc::new(store)
            }
            "s3" | "gs" | "az" => {
                let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
                let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
                if bucket.is_empty() {
                    return Err(invalid("the url names no bucket"));
                }
                let pairs = query_pairs(query).map_err(invalid)?;
                let base = format!("{scheme}://{bucket}");
                let configure = |e: object_store::Error| Error::ObjectStore {
                    location: redact(url),
                    source: e,
                };
                let cloud = cloud_store(&scheme, &base, &pairs, options).map_err(configure)?;
                let prefix = prefix.trim_matches('/');
                if prefix.is_empty() {
                    cloud
                } else {
                    Arc::new(PrefixStore::new(cloud, prefix))
                }
            }
            other => {
                return Err(Error::UnsupportedUrl {
                    url: redact(url),
                    scheme: other.to_owned(),
                })
            }
        };
        Ok(Store::new(store, redact(url), options))
    }

    /// Wraps an already built object store (tests and fault injection use this).
    pub fn new(inner: Arc<dyn ObjectStore>, name: String, options: &StoreOptions) -> Store {
        for (class, limit) in [
            (Class::Write, options.write_concurrency),
            (Class::Read, options.read_concurrency),
            (Class::Replay, options.replay_concurrency),
            (Class::Compact, options.compact_concurrency),
        ] {
            metrics::set_limit(class, limit);
        }
        Store {
            inner,
            name,
            options: *options,
            writes: Semaphore::new(options.write_concurrency.max(1)),
            reads: Semaphore::new(options.read_concurrency.max(1)),
            replay: Semaphore::new(options.replay_concurrency.max(1)),
            compact: Semaphore::new(options.compact_concurrency.max(1)),
            answered_ns: AtomicU64::new(0),
            opened: Instant::now(),
        }
    }

    /// When the store last answered a request (`None`: never). A store that keeps
    /// failing or timing out stops moving this, which is how the broker tells that it
    /// is cut off from the store.
    pub fn last_answer(&self) -> Option<Instant> {
        match self.answered_ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(self.opened + Duration::from_nanos(ns)),
        }
    }

    fn note_answer(&self) {
        let ns = self.opened.elapsed().as_nanos().max(1) as u64;
        self.answered_ns.fetch_max(ns, Ordering::AcqRel);
    }

    /// Asks the store about a key that never exists, retrying until `timeout`: `true`
    /// when it answered. Used to tell whether an idle broker can still reach its store.
    pub async fn probe(&self, timeout: Duration) -> bool {
        let key = Path::from("health/probe");
        let answer = self
            .run(
                "head",
                Class::Read,
                Instant::now() + timeout,
                |_| 0,
                || self.inner.head(&key),
            )
            .await;
        matches!(
            answer,
            Ok(_) | Err((Failure::Store(object_store::Error::NotFound { .. }), _))
        )
    }

    /// The store's URL without its query (which may hold credentials).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The default deadline of a request that starts now.
    fn default_deadline(&self) -> Instant {
        Instant::now() + self.options.retry_timeout
    }

    fn limit(&self, class: Class) -> &Semaphore {
        match class {
            Class::Write => &self.writes,
            Class::Read => &self.reads,
            Class::Replay => &self.replay,
            Class::Compact => &self.compact,
        }
    }

    /// Runs `f` under the class's concurrency limit and the per-attempt timeout,
    /// retrying retriable failures with backoff until `deadline`. Each attempt is
    /// recorded; `bytes` measures a successful result for the byte counters.
    async fn run<T, F, Fut>(
        &self,
        op: &'static str,
        class: Class,
        deadline: Instant,
        bytes: impl Fn(&T) -> u64,
        mut f: F,
    ) -> Result<T, (Failure, u32)>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        let mut attempt = 0u32;
        loop {
            let result = {
                let _permit = self
                    .limit(class)
                    .acquire()
                    .await
                    .expect("store semaphores are never closed");
                let _inflight = metrics::InFlight::new(class);
                let started = Instant::now();
                let budget = self
                    .options
                    .request_timeout
                    .min(deadline.saturating_duration_since(started))
                    .max(Duration::from_millis(1));
                match tokio::time::timeout(budget, f()).await {
                    Ok(Ok(v)) => {
                        metrics::record(op, started, Outcome::Ok, bytes(&v));
                        self.note_answer();
                        Ok(v)
                    }
                    Ok(Err(e)) => {
                        let outcome = match e {
                            object_store::Error::NotFound { .. } => Outcome::NotFound,
                            object_store::Error::AlreadyExists { .. }
                            | object_store::Error::Precondition { .. } => Outcome::Conflict,
                            _ => Outcome::Error,
                        };
                        if !matches!(outcome, Outcome::Error) {
                            self.note_answer();
                        }
                        metrics::record(op, started, outcome, 0);
                        Err(Failure::Store(e))
                    }
                    Err(_) => {
                        metrics::record(op, started, Outcome::Timeout, 0);
                        Err(Failure::TimedOut)
                    }
                }
            };
            match result {
                Ok(v) => return Ok(v),
                Err(failure) => {
                    let again = match &failure {
                        Failure::Store(e) => retriable(e),
                        Failure::TimedOut => true,
                    };
                    let wait = backoff(attempt);
                    if !again || Instant::now() + wait >= deadline {
                        return Err((failure, attempt));
                    }
                    attempt += 1;
                    metrics::retried(op);
                    tracing::debug!(op, attempt, store = %self.name, "object-store request failed; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn error(&self, op: &'static str, key: &Path, failure: Failure) -> Error {
        match failure {
            Failure::Store(object_store::Error::NotFound { .. }) => Error::NotFound {
                key: key.to_string(),
            },
            Failure::Store(object_store::Error::AlreadyExists { .. }) => Error::AlreadyExists {
                key: key.to_string(),
            },
            Failure::Store(source) => Error::ObjectStore {
                location: key.to_string(),
                source,
            },
            Failure::TimedOut => Error::TimedOut {
                op,
                key: key.to_string(),
            },
        }
    }

    /// Writes `payload` to `key` only if no object exists there yet, retrying until
    /// `deadline` (the default deadline if `None`). Writing is idempotent: an object
    /// found at the key is read back, and if it holds exactly `payload` (an earlier
    /// attempt of this call, or of the caller's own retry, landed) this is a success.
    /// Only different bytes at the key are [`Error::AlreadyExists`]; the existing
    /// object is left untouched.
    pub async fn put_new(
        &self,
        key: &Path,
        payload: PutPayload,
        deadline: Option<Instant>,
    ) -> Result<(), Error> {
        self.put_new_as(key, payload, deadline, Class::Write).await
    }

    /// [`put_new`](Self::put_new) under `class`'s concurrency limit.
    pub async fn put_new_as(
        &self,
        key: &Path,
        payload: PutPayload,
        deadline: Option<Instant>,
        class: Class,
    ) -> Result<(), Error> {
        let deadline = deadline.unwrap_or_else(|| self.default_deadline());
        let len = payload.content_length() as u64;
        let result = self
            .run(
                "put",
                class,
                deadline,
                |_| len,
                || {
                    let options = PutOptions {
                        mode: PutMode::Create,
                        ..Default::default()
                    };
                    self.inner.put_opts(key, payload.clone(), options)
                },
            )
            .await;
        match result {
            Ok(_) => Ok(()),
            Err((Failure::Store(object_store::Error::AlreadyExists { .. }), _)) => {
                self.recognise(key, &payload, deadline).await
            }
            Err((failure, _)) => Err(self.error("put", key, failure)),
        }
    }

    /// After a create found `key` taken: ours if it holds exactly `payload`.
    async fn recognise(
        &self,
        key: &Path,
        payload: &PutPayload,
        deadline: Instant,
    ) -> Result<(), Error> {
        let len = payload.content_length() as u64;
        let stored = self
            .get_range(key, 0..len + 1, Class::Write, Some(deadline))
            .await?;
        let mut rest = &stored[..];
        let same = stored.len() as u64 == len
            && payload
                .iter()
                .all(|chunk| match rest.split_at_checked(chunk.len()) {
                    Some((head, tail)) if head == &chunk[..] => {
                        rest = tail;
                        true
                    }
                    _ => false,
                });
        if same {
            tracing::info!(%key, store = %self.name, "the object was already written with these bytes");
            metrics::recognised();
            Ok(())
        } else {
            Err(Error::AlreadyExists {
                key: key.to_string(),
            })
        }
    }

    /// Reads bytes `range` of the object at `key`.
    ///
    /// As with object stores generally, an end beyond the object's size is clamped
    /// (fewer bytes come back) while a start at or beyond it is an error. An empty
    /// range returns no bytes without touching the store; a start after the end is
    /// [`Error::InvalidRange`]; a missing object is [`Error::NotFound`].
    pub async fn get_range(
        &self,
        key: &Path,
        range: Range<u64>,
        class: Class,
        deadline: Option<Instant>,
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
        let deadline = deadline.unwrap_or_else(|| self.default_deadline());
        self.run(
            "get",
            class,
            deadline,
            |b: &Bytes| b.len() as u64,
            || self.inner.get_range(key, range.clone()),
        )
        .await
        .map_err(|(failure, _)| self.error("get", key, failure))
    }

    /// Reads a whole object; `None` if it does not exist.
    pub async fn get(&self, key: &Path) -> Result<Option<Bytes>, Error> {
        let result = self
            .run(
                "get",
                Class::Read,
                self.default_deadline(),
                |b: &Bytes| b.len() as u64,
                || async { self.inner.get(key).await?.bytes().await },
            )
            .await;
        match result {
            Ok(v) => Ok(Some(v)),
            Err((Failure::Store(object_store::Error::NotFound { .. }), _)) => Ok(None),
            Err((failure, _)) => Err(self.error("get", key, failure)),
        }
    }

    /// The size and version of the object at `key`; [`Error::NotFound`] if missing.
    pub async fn head(&self, key: &Path) -> Result<ObjectMeta, Error> {
        self.run(
            "head",
            Class::Read,
            self.default_deadline(),
            |_| 0,
            || self.inner.head(key),
        )
        .await
        .map_err(|(failure, _)| self.error("head", key, failure))
    }

    /// Deletes the object at `key`; deleting a missing object succeeds.
    pub async fn delete(&self, key: &Path) -> Result<(), Error> {
        let result = self
            .run(
                "delete",
                Class::Write,
                self.default_deadline(),
                |_| 0,
                || self.inner.delete(key),
            )
            .await;
        match result {
            Ok(()) | Err((Failure::Store(object_store::Error::NotFound { .. }), _)) => Ok(()),
            Err((failure, _)) => Err(self.error("delete", key, failure)),
        }
    }

    /// Every object under `prefix` (matched by whole path parts), with its size and
    /// last-modified time. One attempt per page is retried as a whole listing.
    pub async fn list(&self, prefix: &Path) -> Result<Vec<ObjectMeta>, Error> {
        let prefix = (!prefix.as_ref().is_empty()).then_some(prefix);
        self.run(
            "list",
            Class::Read,
            self.default_deadline(),
            |_| 0,
            || self.inner.list(prefix).try_collect::<Vec<_>>(),
        )
        .await
        .map_err(|(failure, _)| self.error("list", prefix.unwrap_or(&Path::ROOT), failure))
    }

    /// Deletes every object under `prefix` (matched by whole path parts, so
    /// `segments/a` does not cover `segments/ab`) and returns how many objects this
    /// call deleted. Objects that vanish concurrently are not errors. The empty (root)
    /// prefix is refused with [`Error::RootPrefix`].
    pub async fn delete_prefix(&self, prefix: &Path) -> Result<usize, Error> {
        if prefix.as_ref().is_empty() {
            return Err(Error::RootPrefix);
        }
        let keys = self.list(prefix).await?;
        let mut deletes = futures::stream::iter(keys)
            .map(|meta| async move { self.delete(&meta.location).await })
            .buffer_unordered(16);
        let mut deleted = 0;
        while let Some(result) = deletes.next().await {
            result?;
            deleted += 1;
        }
        tracing::debug!(%prefix, deleted, "deleted objects by prefix");
        Ok(deleted)
    }

    /// Checks that the store refuses a second create of one key, which every write
    /// of Strata relies on, by creating a probe object twice and deleting it.
    pub async fn check_conditional_create(&self) -> Result<(), Error> {
        use std::hash::{BuildHasher, Hasher};
        let nonce = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let key = Path::from(format!("probe/{nonce:016x}"));
        self.put_new(&key, PutPayload::from_static(b"probe"), None)
            .await?;
        let second = self
            .put_new(&key, PutPayload::from_static(b"again"), None)
            .await;
        self.delete(&key).await?;
        match second {
            Err(Error::AlreadyExists { .. }) => Ok(()),
            Ok(()) => Err(Error::NoConditionalCreate {
                store: self.name.clone(),
            }),
            Err(e) => Err(e),
        }
    }
}

/// The store of an `s3://`, `gs://` or `az://` URL, from the environment plus `pairs`,
/// with object_store's own retries off (ours apply) and its timeouts set from ours
/// (the URL's options may still override them).
fn cloud_store(
    scheme: &str,
    base: &str,
    pairs: &[(String, String)],
    options: &StoreOptions,
) -> object_store::Result<Arc<dyn ObjectStore>> {
    let retry = RetryConfig {
        max_retries: 0,
        ..Default::default()
    };
    let timeouts = [
        (
            "timeout".to_owned(),
            format!("{}ms", options.request_timeout.as_millis()),
        ),
        (
            "connect_timeout".to_owned(),
            format!(
                "{}ms",
                options
                    .request_timeout
                    .min(Duration::from_secs(5))
                    .as_millis()
            ),
        ),
    ];
    let all = timeouts.iter().chain(pairs);
    Ok(match scheme {
        "s3" => {
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(base);
            for (k, v) in all {
                b = b.with_config(k.parse()?, v);
            }
            Arc::new(b.with_retry(retry).build()?)
        }
        "gs" => {
            let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(base);
            for (k, v) in all {
                b = b.with_config(k.parse()?, v);
            }
            Arc::new(b.with_retry(retry).build()?)
        }
        _ => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::from_env().with_url(base);
            for (k, v) in all {
                b = b.with_config(k.parse()?, v);
            }
            Arc::new(b.with_retry(retry).build()?)
        }
    })
}

/// `key=value&key=value` (no percent-decoding; values may contain `:` and `/`).
fn query_pairs(query: &str) -> Result<Vec<(String, String)>, &'static str> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or("a url option is not key=value")
        })
        .collect()
}

/// The URL without its query string, which may carry secrets.
pub fn redact(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both store kinds; the temp dir must outlive the file store.
    fn open_object_store(url: &str) -> Result<Store, Error> {
        Store::open(url, &StoreOptions::default())
    }

    fn stores() -> Vec<(Store, Option<tempfile::TempDir>)> {
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
            store
                .put_new(&key, multi_part(&[b"hello ", b"world"]), None)
                .await
                .expect("first put");
            let err = store
                .put_new(&key, multi_part(&[b"other"]), None)
                .await
                .expect_err("second put must fail");
            assert!(
                matches!(err, Error::AlreadyExists { ref key } if key == "wal/1/a.wal"),
                "{store}: {err}"
            );
            let all = store
                .get_range(&key, 0..11, Class::Read, None)
                .await
                .expect("read");
            assert_eq!(&all[..], b"hello world", "{store}");
            // The same bytes again (a caller's own repeated write) are recognised.
            store
                .put_new(&key, multi_part(&[b"hello", b" world"]), None)
                .await
                .expect("identical bytes are idempotent");
        }
    }

    #[tokio::test]
    async fn ranged_reads() {
        for (store, _dir) in stores() {
            let key = Path::from("segments/s/1/x.seg");
            store
                .put_new(&key, multi_part(&[b"0123", b"456789"]), None)
                .await
                .expect("put");
            let read = |r: Range<u64>| store.get_range(&key, r, Class::Read, None);
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
            let missing = store
                .get_range(&Path::from("nope"), 0..1, Class::Read, None)
                .await;
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
            store.delete(&key).await.expect("delete missing");
            store
                .put_new(&key, multi_part(&[b"x"]), None)
                .await
                .expect("put");
            store.delete(&key).await.expect("delete");
            store.delete(&key).await.expect("delete again");
            let gone = store.get_range(&key, 0..1, Class::Read, None).await;
            assert!(matches!(gone, Err(Error::NotFound { .. })), "{store}");
            // The key is free again.
            store
                .put_new(&key, multi_part(&[b"y"]), None)
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
                store
                    .put_new(&Path::from(key), multi_part(&[b"z"]), None)
                    .await
                    .expect("put");
            }
            let prefix = Path::from("segments/t/1");
            assert_eq!(
                store.delete_prefix(&prefix).await.expect("delete"),
                3,
                "{store}"
            );
            assert_eq!(
                store.delete_prefix(&prefix).await.expect("again"),
                0,
                "{store}"
            );
            let left: Vec<String> = store
                .list(&Path::from("segments"))
                .await
                .expect("list")
                .into_iter()
                .map(|m| m.location.to_string())
                .collect();
            let mut left = left;
            left.sort();
            assert_eq!(
                left,
                ["segments/t/10/a.seg", "segments/t/2/a.seg"],
                "{store}"
            );
            assert_eq!(
                store
                    .delete_prefix(&Path::from("never/was"))
                    .await
                    .expect("missing"),
                0
            );
            assert!(matches!(
                store.delete_prefix(&Path::ROOT).await,
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

        // Cloud URLs parse without network access; options come from the query.
        let s3 = open_object_store(
            "s3://bucket/some/prefix?endpoint=http://127.0.0.1:1&region=us-east-1&allow_http=true&access_key_id=a&secret_access_key=b",
        )
        .expect("s3 url");
        assert_eq!(s3.name(), "s3://bucket/some/prefix?…", "query redacted");
        let err = open_object_store("s3://bucket?no_such_option=1").err();
        assert!(matches!(err, Some(Error::ObjectStore { .. })), "{err:?}");
        assert!(matches!(
            open_object_store("s3:///prefix"),
            Err(Error::InvalidUrl { .. })
        ));
        assert!(matches!(
            open_object_store("s3://bucket?novalue"),
            Err(Error::InvalidUrl { .. })
        ));
        let err = open_object_store("ftp://host/x").err();
        assert!(
            matches!(&err, Some(Error::UnsupportedUrl { scheme, .. }) if scheme == "ftp"),
            "{err:?}"
        );
        for bad in ["/tmp/x", "file://relative/x", "memory://x", "://x", ""] {
            assert!(
                matches!(open_object_store(bad), Err(Error::InvalidUrl { .. })),
                "{bad}"
            );
        }
    }

    fn flaky(faults: usize, land_then_fail: bool, stall: bool) -> Store {
        let options = StoreOptions {
            request_timeout: Duration::from_millis(200),
            retry_timeout: Duration::from_secs(5),
            ..StoreOptions::default()
        };
        // The first `faults` puts fail or stall (optionally after storing the object, as
        // a server that accepted a write whose reply was lost).
        let fault = match (stall, land_then_fail) {
            (true, land) => crate::faults::PutFault::Stall { land },
            (false, true) => crate::faults::PutFault::LandThenFail { retriable: true },
            (false, false) => crate::faults::PutFault::Fail { retriable: true },
        };
        let inner = crate::faults::FaultyStore::new();
        if faults == usize::MAX {
            inner.fail_always(Some(fault));
        } else {
            inner.fail_next(std::iter::repeat_n(fault, faults));
        }
        Store::new(Arc::new(inner), "flaky://".into(), &options)
    }

    #[tokio::test]
    async fn retriable_failures_are_retried_until_success() {
        let store = flaky(3, false, false);
        let key = Path::from("wal/x");
        store
            .put_new(&key, multi_part(&[b"data"]), None)
            .await
            .expect("put succeeds after three 503s");
        let read = store.get_range(&key, 0..4, Class::Read, None).await;
        assert_eq!(&read.expect("read")[..], b"data");
    }

    #[tokio::test]
    async fn a_write_that_landed_before_failing_is_recognised() {
        // The server stored the object but the reply was lost (error, then a stall
        // past the request timeout): the retry finds the key taken, reads the object
        // back and recognises it instead of failing or writing twice.
        for stall in [false, true] {
            let store = flaky(1, true, stall);
            let key = Path::from("wal/y");
            store
                .put_new(&key, multi_part(&[b"same ", b"bytes"]), None)
                .await
                .expect("recognised as ours");
            let read = store.get_range(&key, 0..100, Class::Read, None).await;
            assert_eq!(&read.expect("read")[..], b"same bytes");
        }
    }

    #[tokio::test]
    async fn a_taken_key_with_other_bytes_is_a_conflict_even_after_a_retry() {
        // Two faults: the seeding write absorbs one, the second write is retried once
        // and then finds the key holding someone else's bytes.
        let store = flaky(2, false, false);
        let key = Path::from("wal/z");
        store
            .put_new(&key, multi_part(&[b"someone else"]), None)
            .await
            .expect("seed");
        let err = store
            .put_new(&key, multi_part(&[b"mine"]), None)
            .await
            .expect_err("conflict");
        assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
        let read = store.get_range(&key, 0..100, Class::Read, None).await;
        assert_eq!(&read.expect("read")[..], b"someone else", "left untouched");
    }

    #[tokio::test]
    async fn failures_past_the_deadline_are_reported() {
        let store = flaky(usize::MAX, false, true);
        let deadline = Instant::now() + Duration::from_millis(700);
        let err = store
            .put_new(&Path::from("wal/w"), multi_part(&[b"x"]), Some(deadline))
            .await
            .expect_err("stalls until the deadline");
        assert!(matches!(err, Error::TimedOut { op: "put", .. }), "{err}");
        assert!(Instant::now() < deadline + Duration::from_millis(500));
    }

    #[tokio::test]
    async fn whole_objects_and_the_conditional_create_probe() {
        for (store, _dir) in stores() {
            store.check_conditional_create().await.expect("probe");
            let key = Path::from("meta/state");
            store
                .put_new(&key, multi_part(&[b"one"]), None)
                .await
                .expect("put");
            let bytes = store.get(&key).await.expect("get").expect("exists");
            assert_eq!(&bytes[..], b"one");
            assert_eq!(store.head(&key).await.expect("head").size, 3);
            assert!(store
                .get(&Path::from("meta/none"))
                .await
                .expect("get")
                .is_none());
            assert!(matches!(
                store.head(&Path::from("meta/none")).await,
                Err(Error::NotFound { .. })
            ));
        }
    }
}
