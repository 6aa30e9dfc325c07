//! A decorator that measures and bounds every metadata-store operation (latency, errors
//! and timeouts by operation), whatever the backend. `metadata::open` wraps every store
//! in it. It also notes when the store last answered ([`last_answer`]), which tells the
//! broker whether it can still reach its metadata store.
//!
//! Every operation but the write-ahead commit gets at most `metadata.request.timeout.ms`:
//! a store that stops answering (a network partition swallows packets, so the
//! connection never fails) must not hold a client request, a partition task or the
//! controller forever. A timed-out operation is `Unavailable`, so callers retry it; a
//! write cut short may still apply, which every caller already tolerates (claims are
//! re-read, offset commits are retried by clients). The write-ahead commit is bounded
//! by its caller, the flusher, with the flush deadline: a commit that may have applied
//! must end its flush as uncertain rather than be retried.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use super::{
    BrokerRecord, CommittedOffset, Fence, MetaResult, MetadataStore, PartitionKey, PartitionOwner,
    PartitionState, SegmentRecord, TopicRecord, TxnOffsetRecord, TxnRecord, WalCommit,
};

struct StoreMetrics {
    seconds: HistogramVec,
    errors: IntCounterVec,
    timeouts: IntCounterVec,
}

fn metrics() -> &'static StoreMetrics {
    static M: OnceLock<StoreMetrics> = OnceLock::new();
    M.get_or_init(|| StoreMetrics {
        seconds: HistogramVec::new(
            HistogramOpts::new(
                "strata_metadata_store_duration_seconds",
                "metadata-store operation latency",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["op"],
        )
        .expect("valid metric"),
        errors: IntCounterVec::new(
            Opts::new(
                "strata_metadata_store_errors_total",
                "failed metadata-store operations (fencing included)",
            ),
            &["op"],
        )
        .expect("valid metric"),
        timeouts: IntCounterVec::new(
            Opts::new(
                "strata_metadata_store_timeouts_total",
                "metadata-store operations abandoned after metadata.request.timeout.ms (counted among the errors too)",
            ),
            &["op"],
        )
        .expect("valid metric"),
    })
}

/// Every operation of the trait, as the metrics label it.
const OPS: [&str; 25] = [
    "create_topic",
    "delete_topic",
    "list_topics",
    "set_topic_configs",
    "set_partition_count",
    "claim_partition",
    "read_partition",
    "release_partition",
    "partition_owners",
    "commit_wal",
    "commit_segment",
    "trim_log",
    "unreferenced_wal_objects",
    "known_objects",
    "forget_wal_objects",
    "next_producer_id",
    "commit_offsets",
    "fetch_offsets",
    "delete_offsets",
    "offset_groups",
    "expire_offsets",
    "start_broker_session",
    "heartbeat_broker",
    "live_brokers",
    "deregister_broker",
];

/// Adds the metadata-store metrics to a registry (once per process).
pub(crate) fn register(registry: &Registry) -> Result<(), prometheus::Error> {
    // Errors of every operation exist from the start (at zero), so the error panels and
    // alerts have series on a fresh broker.
    for op in OPS {
        metrics().errors.with_label_values(&[op]);
        metrics().timeouts.with_label_values(&[op]);
    }
    registry.register(Box::new(metrics().seconds.clone()))?;
    registry.register(Box::new(metrics().errors.clone()))?;
    registry.register(Box::new(metrics().timeouts.clone()))?;
    Ok(())
}

#[derive(Debug)]
pub(crate) struct Instrumented {
    inner: Arc<dyn MetadataStore>,
    /// Longest an operation (the write-ahead commit aside) may take.
    timeout: Duration,
}

impl Instrumented {
    pub(crate) fn new(inner: Arc<dyn MetadataStore>, timeout: Duration) -> Self {
        Instrumented { inner, timeout }
    }

    /// Runs one operation within the timeout, measured.
    async fn timed<T>(
        &self,
        op: &str,
        f: impl std::future::Future<Output = MetaResult<T>>,
    ) -> MetaResult<T> {
        measured(op, async {
            match tokio::time::timeout(self.timeout, f).await {
                Ok(result) => result,
                Err(_) => {
                    metrics().timeouts.with_label_values(&[op]).inc();
                    Err(super::MetaError::Unavailable(format!(
                        "{op}: no answer within {} ms",
                        self.timeout.as_millis()
                    )))
                }
            }
        })
        .await
    }
}

/// The process's reference instant for [`last_answer`].
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(crate::clock::instant)
}

/// Nanoseconds after `epoch()` of the last answer; 0: none yet.
static ANSWERED_NS: AtomicU64 = AtomicU64::new(0);

/// When a metadata store last answered an operation (any answer but "unavailable":
/// a refusal such as fencing is an answer), `None` before the first.
pub(crate) fn last_answer() -> Option<Instant> {
    match ANSWERED_NS.load(Ordering::Acquire) {
        0 => None,
        ns => Some(epoch() + Duration::from_nanos(ns)),
    }
}

async fn measured<T>(
    op: &str,
    f: impl std::future::Future<Output = MetaResult<T>>,
) -> MetaResult<T> {
    let started = crate::clock::instant();
    let result = f.await;
    let m = metrics();
    m.seconds
        .with_label_values(&[op])
        .observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        m.errors.with_label_values(&[op]).inc();
    }
    if !matches!(result, Err(super::MetaError::Unavailable(_))) {
        let ns = epoch().elapsed().as_nanos().max(1) as u64;
        ANSWERED_NS.fetch_max(ns, Ordering::AcqRel);
    }
    result
}

#[async_trait]
impl MetadataStore for Instrumented {
    fn queue_depth(&self) -> Option<(usize, usize)> {
        self.inner.queue_depth()
    }
    async fn create_topic(&self, topic: &TopicRecord) -> MetaResult<()> {
        self.timed("create_topic", self.inner.create_topic(topic))
            .await
    }
    async fn delete_topic(&self, name: &str) -> MetaResult<TopicRecord> {
        self.timed("delete_topic", self.inner.delete_topic(name))
            .await
    }
    async fn list_topics(&self) -> MetaResult<Vec<TopicRecord>> {
        self.timed("list_topics", self.inner.list_topics()).await
    }
    async fn set_topic_configs(
        &self,
        name: &str,
        configs: &BTreeMap<String, String>,
    ) -> MetaResult<()> {
        self.timed(
            "set_topic_configs",
            self.inner.set_topic_configs(name, configs),
        )
        .await
    }
    async fn set_partition_count(&self, name: &str, count: i32) -> MetaResult<()> {
        self.timed(
            "set_partition_count",
            self.inner.set_partition_count(name, count),
        )
        .await
    }
    async fn claim_partition(
        &self,
        key: PartitionKey,
        broker_id: i32,
    ) -> MetaResult<PartitionState> {
        self.timed(
            "claim_partition",
            self.inner.claim_partition(key, broker_id),
        )
        .await
    }
    async fn read_partition(&self, key: PartitionKey) -> MetaResult<PartitionState> {
        self.timed("read_partition", self.inner.read_partition(key))
            .await
    }
    async fn release_partition(&self, key: PartitionKey, leader_epoch: i32) -> MetaResult<()> {
        self.timed(
            "release_partition",
            self.inner.release_partition(key, leader_epoch),
        )
        .await
    }
    async fn partition_owners(&self) -> MetaResult<Vec<PartitionOwner>> {
        self.timed("partition_owners", self.inner.partition_owners())
            .await
    }
    async fn commit_wal(&self, commits: &[WalCommit]) -> MetaResult<()> {
        // Bounded by the flusher (see the module docs), not here.
        measured("commit_wal", self.inner.commit_wal(commits)).await
    }
    async fn commit_segment(
        &self,
        key: PartitionKey,
        leader_epoch: i32,
        segment: &SegmentRecord,
    ) -> MetaResult<()> {
        self.timed(
            "commit_segment",
            self.inner.commit_segment(key, leader_epoch, segment),
        )
        .await
    }
    async fn trim_log(
        &self,
        key: PartitionKey,
        leader_epoch: i32,
        log_start_offset: i64,
        drop: &[i64],
    ) -> MetaResult<()> {
        self.timed(
            "trim_log",
            self.inner
                .trim_log(key, leader_epoch, log_start_offset, drop),
        )
        .await
    }
    async fn replace_segments(
        &self,
        key: PartitionKey,
        leader_epoch: i32,
        replaced: &[i64],
        segments: &[SegmentRecord],
    ) -> MetaResult<()> {
        self.timed(
            "replace_segments",
            self.inner
                .replace_segments(key, leader_epoch, replaced, segments),
        )
        .await
    }
    async fn unreferenced_wal_objects(&self) -> MetaResult<Vec<String>> {
        self.timed(
            "unreferenced_wal_objects",
            self.inner.unreferenced_wal_objects(),
        )
        .await
    }
    async fn known_objects(&self) -> MetaResult<Vec<String>> {
        self.timed("known_objects", self.inner.known_objects())
            .await
    }
    async fn heartbeat_broker(&self, broker: &BrokerRecord) -> MetaResult<()> {
        self.timed("heartbeat_broker", self.inner.heartbeat_broker(broker))
            .await
    }
    async fn live_brokers(&self, now_ms: i64) -> MetaResult<Vec<BrokerRecord>> {
        self.timed("live_brokers", self.inner.live_brokers(now_ms))
            .await
    }
    async fn deregister_broker(&self, broker_id: i32, session: i64) -> MetaResult<()> {
        self.timed(
            "deregister_broker",
            self.inner.deregister_broker(broker_id, session),
        )
        .await
    }
    async fn forget_wal_objects(&self, keys: &[String]) -> MetaResult<()> {
        self.timed("forget_wal_objects", self.inner.forget_wal_objects(keys))
            .await
    }
    async fn next_producer_id(&self) -> MetaResult<i64> {
        self.timed("next_producer_id", self.inner.next_producer_id())
            .await
    }
    async fn commit_offsets(
        &self,
        group: &str,
        offsets: &[CommittedOffset],
        fence: Option<Fence>,
    ) -> MetaResult<()> {
        self.timed(
            "commit_offsets",
            self.inner.commit_offsets(group, offsets, fence),
        )
        .await
    }
    async fn fetch_offsets(&self, group: &str) -> MetaResult<Vec<CommittedOffset>> {
        self.timed("fetch_offsets", self.inner.fetch_offsets(group))
            .await
    }
    async fn put_txn(&self, record: &TxnRecord, fence: Fence) -> MetaResult<()> {
        self.timed("put_txn", self.inner.put_txn(record, fence))
            .await
    }
    async fn delete_txn(&self, transactional_id: &str, fence: Fence) -> MetaResult<()> {
        self.timed("delete_txn", self.inner.delete_txn(transactional_id, fence))
            .await
    }
    async fn list_txns(&self) -> MetaResult<Vec<TxnRecord>> {
        self.timed("list_txns", self.inner.list_txns()).await
    }
    async fn commit_txn_offsets(
        &self,
        group: &str,
        offsets: &[TxnOffsetRecord],
        fence: Option<Fence>,
    ) -> MetaResult<()> {
        self.timed(
            "commit_txn_offsets",
            self.inner.commit_txn_offsets(group, offsets, fence),
        )
        .await
    }
    async fn pending_txn_offsets(&self, group: &str) -> MetaResult<Vec<TxnOffsetRecord>> {
        self.timed("pending_txn_offsets", self.inner.pending_txn_offsets(group))
            .await
    }
    async fn delete_offsets(
        &self,
        group: &str,
        partitions: Option<&[(String, i32)]>,
        fence: Option<Fence>,
    ) -> MetaResult<usize> {
        self.timed(
            "delete_offsets",
            self.inner.delete_offsets(group, partitions, fence),
        )
        .await
    }
    async fn offset_groups(&self) -> MetaResult<Vec<String>> {
        self.timed("offset_groups", self.inner.offset_groups())
            .await
    }
    async fn expire_offsets(
        &self,
        groups: &[String],
        before_ms: i64,
        fence: Option<Fence>,
    ) -> MetaResult<usize> {
        self.timed(
            "expire_offsets",
            self.inner.expire_offsets(groups, before_ms, fence),
        )
        .await
    }
    async fn start_broker_session(&self, broker_id: i32) -> MetaResult<i64> {
        self.timed(
            "start_broker_session",
            self.inner.start_broker_session(broker_id),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An operation the store never answers ends, after the timeout, as a retriable
    /// `Unavailable` error, counted as a timeout of its operation.
    #[tokio::test]
    async fn an_operation_without_answer_times_out_as_unavailable() {
        let objects = Arc::new(
            tiering::Store::open("memory://", &tiering::StoreOptions::default())
                .expect("memory store"),
        );
        let inner = Arc::new(
            super::super::bucket::BucketStore::open(objects)
                .await
                .expect("bucket store"),
        );
        let store = Instrumented::new(inner, Duration::from_millis(100));
        let before = metrics()
            .timeouts
            .with_label_values(&["offset_groups"])
            .get();
        let result: MetaResult<()> = store.timed("offset_groups", std::future::pending()).await;
        match result {
            Err(e @ super::super::MetaError::Unavailable(_)) => assert!(e.is_retriable()),
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert_eq!(
            metrics()
                .timeouts
                .with_label_values(&["offset_groups"])
                .get(),
            before + 1
        );
        // An answer within the timeout passes through.
        assert!(store.offset_groups().await.expect("answers").is_empty());
    }
}
