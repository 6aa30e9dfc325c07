//! The broker's background tasks, all registered in one place so that shutdown can
//! cancel them and wait for them, instead of sleeping and hoping.
//!
//! Every long-lived task (the flusher, the heartbeat, the periodic loops, partition
//! owners, group coordinators, segment uploads) is spawned through [`Tasks`]: it is
//! tracked, and it watches one cancellation token. Shutdown cancels the token; loops end
//! at their next wait, the flusher writes what it still holds and ends, and
//! [`Tasks::shutdown`] returns once every task has (or when its deadline passes, naming
//! how many did not). Tasks of the metadata store's own (a bucket log writer, database
//! connections) belong to the store and end when it is dropped.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

#[derive(Debug, Default)]
pub(crate) struct Tasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Tasks {
    pub(crate) fn new() -> Tasks {
        Tasks::default()
    }

    /// Spawns a tracked task.
    pub(crate) fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Resolves once shutdown has begun.
    pub(crate) fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.cancel.clone().cancelled_owned()
    }

    /// Runs `job` every `every` until shutdown (or until `job` returns `false`).
    pub(crate) fn spawn_every<F, Fut>(&self, every: Duration, mut job: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = bool> + Send,
    {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = crate::clock::sleep(every) => {}
                }
                if !job().await {
                    return;
                }
            }
        });
    }

    /// Cancels every task and waits for them to end, at most `deadline`. Returns how
    /// many were still running then.
    pub(crate) async fn shutdown(&self, deadline: Duration) -> usize {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            let left = self.tracker.len();
            warn!(
                tasks = left,
                deadline_ms = deadline.as_millis() as u64,
                "background tasks still running at the end of shutdown"
            );
            return left;
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn shutdown_cancels_loops_and_waits_for_tasks() {
        let tasks = Tasks::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        tasks.spawn_every(Duration::from_millis(5), move || {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::Relaxed);
                true
            }
        });
        // A task that finishes its work after the cancellation, as the flusher does.
        let finished = Arc::new(AtomicUsize::new(0));
        let done = finished.clone();
        let cancelled = tasks.cancelled();
        tasks.spawn(async move {
            cancelled.await;
            crate::clock::sleep(Duration::from_millis(20)).await;
            done.store(1, Ordering::Release);
        });
        crate::clock::sleep(Duration::from_millis(30)).await;
        assert!(runs.load(Ordering::Relaxed) > 0);
        assert_eq!(tasks.shutdown(Duration::from_secs(5)).await, 0);
        assert_eq!(
            finished.load(Ordering::Acquire),
            1,
            "shutdown waited for it"
        );
        let after = runs.load(Ordering::Relaxed);
        crate::clock::sleep(Duration::from_millis(30)).await;
        assert_eq!(runs.load(Ordering::Relaxed), after, "the loop stopped");
    }

    #[tokio::test]
    async fn a_task_that_does_not_end_is_reported() {
        let tasks = Tasks::new();
        tasks.spawn(std::future::pending::<()>());
        assert_eq!(tasks.shutdown(Duration::from_millis(20)).await, 1);
    }
}
