//! An in-memory object store that fails writes on demand, for tests and the broker's
//! simulation (the one kind of mock the tests use: fault injection). Only PUTs fail;
//! everything else goes straight to the in-memory store.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, PutOptions, PutPayload, PutResult};

/// What a failing PUT does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutFault {
    /// Refused; nothing stored. `retriable`: a 503 the client retries itself; otherwise
    /// an error it gives up on at once.
    Fail { retriable: bool },
    /// Stored, but the answer is lost: the caller sees the error.
    LandThenFail { retriable: bool },
    /// Never answers (after storing the object if `land`).
    Stall { land: bool },
}

/// The in-memory store with a queue of faults for the next PUTs.
#[derive(Debug, Default)]
pub struct FaultyStore {
    inner: InMemory,
    next: Mutex<VecDeque<PutFault>>,
    /// Applied to every PUT once the queue is empty.
    always: Mutex<Option<PutFault>>,
    /// PUTs stalled right now (waiting forever, not yet dropped by their caller).
    stalled: AtomicUsize,
}

/// Counts one stalled PUT for as long as its future lives.
struct StallGuard<'a>(&'a AtomicUsize);

impl Drop for StallGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl FaultyStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next PUTs fail as listed, one fault each.
    pub fn fail_next(&self, faults: impl IntoIterator<Item = PutFault>) {
        self.next.lock().expect("fault queue").extend(faults);
    }

    /// Every PUT after the queued faults fails this way (`None`: none does).
    pub fn fail_always(&self, fault: Option<PutFault>) {
        *self.always.lock().expect("fault setting") = fault;
    }

    /// PUTs that are stalled right now: their callers wait and have not given up.
    pub fn stalled(&self) -> usize {
        self.stalled.load(Ordering::Acquire)
    }

    /// Forgets the queued faults.
    pub fn clear(&self) {
        self.next.lock().expect("fault queue").clear();
    }

    fn take(&self) -> Option<PutFault> {
        let queued = self.next.lock().expect("fault queue").pop_front();
        queued.or(*self.always.lock().expect("fault setting"))
    }
}

impl std::fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("faulty in-memory store")
    }
}

fn error(retriable: bool) -> object_store::Error {
    if retriable {
        object_store::Error::Generic {
            store: "faulty",
            source: "503 Slow Down".into(),
        }
    } else {
        object_store::Error::PermissionDenied {
            path: "faulty".into(),
            source: "injected fault".into(),
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        match self.take() {
            None => self.inner.put_opts(location, payload, opts).await,
            Some(PutFault::Fail { retriable }) => Err(error(retriable)),
            Some(PutFault::LandThenFail { retriable }) => {
                self.inner.put_opts(location, payload, opts).await?;
                Err(error(retriable))
            }
            Some(PutFault::Stall { land }) => {
                if land {
                    self.inner.put_opts(location, payload, opts).await?;
                }
                self.stalled.fetch_add(1, Ordering::AcqRel);
                let _guard = StallGuard(&self.stalled);
                std::future::pending().await
            }
        }
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
