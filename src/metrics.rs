//! Metrics: one `prometheus` registry for the broker, rendered at `/metrics`, in base
//! units. Requests per API, bytes and records per topic (also under the names popular
//! Kafka dashboards query), the write-ahead flush, the object store (from `tiering`),
//! connections and request bytes against their limits.
//!
//! Consumer-group lag is computed at scrape time (on the HTTP side) from the
//! committed offsets and the partitions' high watermarks, under the names of the widely used lag exporter
//! (`kafka_consumergroup_lag`, `..._lag_sum`, `..._current_offset`, `..._members`), plus
//! lag in seconds: the age of the first unconsumed batch. Group-level labels only:
//! partition labels appear only on the per-partition lag series.

use std::sync::OnceLock;
use std::time::Instant;

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

pub(crate) struct Metrics {
    pub registry: Registry,
    pub started: Instant,
    pub uptime_seconds: IntGauge,
    pub group_lag: IntGaugeVec,
    pub group_lag_sum: IntGaugeVec,
    pub group_current_offset: IntGaugeVec,
    pub group_current_offset_sum: IntGaugeVec,
    pub group_members: IntGaugeVec,
    pub group_lag_seconds: GaugeVec,
    /// Per compacted partition this broker owns: dirty share, uncompacted age, its bound.
    pub compaction_dirty_ratio: GaugeVec,
    pub compaction_lag_seconds: GaugeVec,
    pub compaction_max_lag_seconds: GaugeVec,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub partition_errors: IntCounterVec,
    pub bytes_in: IntCounterVec,
    pub bytes_out: IntCounterVec,
    pub messages_in: IntCounterVec,
    pub flushes: IntCounterVec,
    pub flush_bytes: Histogram,
    pub flush_write_seconds: Histogram,
    pub flush_commit_seconds: Histogram,
    pub flush_wait_seconds: Histogram,
    pub flush_interval_seconds: Histogram,
    /// Write-ahead objects per metadata commit (group commit).
    pub flush_commit_objects: Histogram,
    /// The `acks=all` path, stage by stage (see [`stage`]).
    pub produce_stage_seconds: HistogramVec,
    pub orphans_deleted: IntCounterVec,
    pub compaction_passes: IntCounterVec,
    pub txn_outcomes: IntCounterVec,
    pub txn_open: IntGauge,
    pub txn_oldest_open_seconds: IntGauge,
    pub lso_lag: IntGaugeVec,
    pub compaction_bytes: IntCounterVec,
    pub compaction_records: IntCounterVec,
    pub compaction_objects: IntCounterVec,
    pub group_rebalances: IntCounterVec,
    pub connections: IntGauge,
    pub connections_max: IntGauge,
    pub request_bytes_in_flight: IntGauge,
    pub request_bytes_max: IntGauge,
    pub partitions: IntGauge,
    pub coordinator_slots: IntGauge,
    pub ownership_changes: IntCounterVec,
    pub zone_fetch_bytes: IntCounterVec,
    pub preferred_replica_redirects: IntCounterVec,
    pub groups: IntGauge,
    /// 1 while the local cache disk is full (local writes stopped).
    pub cache_disk_full: IntGauge,
    pub cache_disk_free_bytes: IntGauge,
    /// Local writes (tails, segment files) that failed or were skipped, by reason.
    pub local_write_failures: IntCounterVec,
    /// Segments refused before upload because they did not hold every offset of their
    /// range intact, by where their bytes came from (`local`, `write_ahead`).
    pub segment_check_failures: IntCounterVec,
    /// 1 while this broker reaches the store (`object`, `metadata`) within the deadline.
    pub store_reachable: IntGaugeVec,
    /// 1 while this broker has stepped down from its partitions for lack of a store.
    pub stepped_down: IntGauge,
    /// Items waiting in each queue (per-partition and per-group queues: the fullest),
    /// and each queue's capacity, refreshed at scrape time.
    pub queue_depth: IntGaugeVec,
    pub queue_capacity: IntGaugeVec,
    /// Entries of the in-memory caches (`segment_index`, `zone_manifest`).
    pub cache_entries: IntGaugeVec,
    /// Per-partition byte counters, registered only with `metrics.partition.labels`
    /// (cardinality is a cost).
    pub partition_bytes_in: IntCounterVec,
    pub partition_bytes_out: IntCounterVec,
    partition_labels: std::sync::atomic::AtomicBool,
}

impl Metrics {
    /// Turns on the per-partition series (once; later calls do nothing).
    pub(crate) fn enable_partition_labels(&self) {
        if self
            .partition_labels
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        for c in [&self.partition_bytes_in, &self.partition_bytes_out] {
            self.registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
        }
    }

    pub(crate) fn partition_labels(&self) -> bool {
        self.partition_labels
            .load(std::sync::atomic::Ordering::Acquire)
    }
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

/// A counter family with its finite label values exported at zero from the start, so
/// dashboards and alerts have series on a fresh broker.
fn zeroed(c: IntCounterVec, values: &[&str]) -> IntCounterVec {
    for v in values {
        c.with_label_values(&[v]);
    }
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("metric definition is valid");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn seconds_histogram(r: &Registry, name: &str, help: &str) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
        .expect("valid");
    r.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

/// Seconds, from 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

pub(crate) fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let registry = Registry::new();
        let build = IntGaugeVec::new(Opts::new("strata_build_info", "build information (always 1)"), &["version"])
            .expect("metric definition is valid");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build)).expect("metric registered once");
        let uptime_seconds = IntGauge::new("strata_uptime_seconds", "seconds since the broker started").expect("valid");
        registry.register(Box::new(uptime_seconds.clone())).expect("metric registered once");
        let partition = ["consumergroup", "topic", "partition"];
        let topic = ["consumergroup", "topic"];
        let lag_seconds = GaugeVec::new(
            Opts::new(
                "strata_consumergroup_lag_seconds",
                "age in seconds of the first unconsumed batch of a group's partition (0 when caught up)",
            ),
            &partition,
        )
        .expect("valid");
        registry.register(Box::new(lag_seconds.clone())).expect("metric registered once");
        let compaction_gauge = |name: &str, help: &str| {
            let g = GaugeVec::new(Opts::new(name, help), &["topic", "partition"]).expect("valid");
            registry.register(Box::new(g.clone())).expect("metric registered once");
            g
        };
        let compaction_dirty_ratio = compaction_gauge(
            "strata_compaction_dirty_ratio",
            "uncompacted share of a compacted partition's sealed bytes (compared with min.cleanable.dirty.ratio)",
        );
        let compaction_lag_seconds = compaction_gauge(
            "strata_compaction_lag_seconds",
            "age of the newest record of a compacted partition's oldest uncompacted segment (0 when all is compacted)",
        );
        let compaction_max_lag_seconds = compaction_gauge(
            "strata_compaction_max_lag_seconds",
            "the partition's max.compaction.lag.ms in seconds, for the alert on compaction_lag_seconds",
        );
        tiering::metrics::register(&registry).expect("object-store metrics registered once");
        crate::metadata::instrumented::register(&registry).expect("metadata-store metrics registered once");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new("strata_request_duration_seconds", "time from a request's arrival to its response, per Kafka API")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["api"],
        )
        .expect("valid");
        registry.register(Box::new(request_seconds.clone())).expect("metric registered once");
        let flush_bytes = Histogram::with_opts(
            HistogramOpts::new("strata_wal_flush_bytes", "bytes of record batches in one write-ahead object")
                .buckets(prometheus::exponential_buckets(1024.0, 4.0, 10).expect("valid buckets")),
        )
        .expect("valid");
        registry.register(Box::new(flush_bytes.clone())).expect("metric registered once");
        let flush_commit_objects = Histogram::with_opts(
            HistogramOpts::new("strata_wal_commit_objects", "write-ahead objects committed together in one metadata transaction")
                .buckets(vec![1.0, 2.0, 3.0, 4.0, 8.0, 16.0]),
        )
        .expect("valid");
        registry.register(Box::new(flush_commit_objects.clone())).expect("metric registered once");
        let produce_stage_seconds = HistogramVec::new(
            HistogramOpts::new(
                "strata_produce_stage_seconds",
                "the acks=all path by stage: queue (arrival to the flusher), buffer (until the flush starts), write (the object, with its fsyncs), commit_wait (written, waiting for the commit before), commit (the metadata transaction), response (commit to response)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["stage"],
        )
        .expect("valid");
        for stage in stage::ALL {
            produce_stage_seconds.with_label_values(&[stage]);
        }
        registry.register(Box::new(produce_stage_seconds.clone())).expect("metric registered once");
        Metrics {
            requests: counter_vec(&registry, "strata_requests_total", "requests handled, per Kafka API", &["api"]),
            request_seconds,
            partition_errors: counter_vec(
                &registry,
                "strata_partition_errors_total",
                "per-partition errors answered, per Kafka API and error",
                &["api", "error"],
            ),
            bytes_in: counter_vec(&registry, "kafka_server_brokertopicmetrics_bytesin_total", "record bytes produced, per topic", &["topic"]),
            bytes_out: counter_vec(&registry, "kafka_server_brokertopicmetrics_bytesout_total", "record bytes fetched, per topic", &["topic"]),
            messages_in: counter_vec(&registry, "kafka_server_brokertopicmetrics_messagesin_total", "records produced, per topic", &["topic"]),
            flushes: counter_vec(&registry, "strata_wal_flushes_total", "write-ahead flushes by outcome: committed, write_failed, commit_failed", &["outcome"]),
            flush_bytes,
            flush_write_seconds: seconds_histogram(&registry, "strata_wal_flush_write_seconds", "time to write one write-ahead object"),
            flush_commit_seconds: seconds_histogram(
                &registry,
                "strata_wal_flush_commit_seconds",
                "time to commit one write-ahead object's ranges to the metadata store",
            ),
            flush_wait_seconds: seconds_histogram(
                &registry,
                "strata_wal_flush_wait_seconds",
                "time the oldest batch of a write-ahead object waited in the buffer before its flush started",
            ),
            flush_interval_seconds: seconds_histogram(
                &registry,
                "strata_wal_flush_interval_seconds",
                "time between the starts of two consecutive write-ahead flushes",
            ),
            flush_commit_objects,
            produce_stage_seconds,
            group_rebalances: counter_vec(
                &registry,
                "strata_group_rebalances_total",
                "rebalances completed per consumer group (new classic generations and consumer-protocol group epochs)",
                &["consumergroup"],
            ),
            txn_outcomes: zeroed(
                counter_vec(
                    &registry,
                    "strata_transactions_total",
                    "transactions this broker's coordinator ended, by outcome: committed, aborted (by the producer), timed_out (aborted by the coordinator, its producer fenced)",
                    &["outcome"],
                ),
                &["committed", "aborted", "timed_out"],
            ),
            txn_open: gauge(
                &registry,
                "strata_transactions_open",
                "transactions open on this broker's coordinator (refreshed at scrape time)",
            ),
            txn_oldest_open_seconds: gauge(
                &registry,
                "strata_transaction_oldest_open_seconds",
                "age of the oldest transaction open on this broker's coordinator (0: none; refreshed at scrape time)",
            ),
            lso_lag: gauge_vec(
                &registry,
                "strata_last_stable_offset_lag",
                "offsets between a partition's last stable offset and its high watermark, for the partitions this broker owns that an open transaction holds up (refreshed at scrape time; no series for the others)",
                &["topic", "partition"],
            ),
            compaction_passes: zeroed(
                counter_vec(
                    &registry,
                    "strata_compaction_passes_total",
                    "compaction passes by outcome: committed, not_committed (the manifest changed or the swap failed), or why it failed (key_map_full, read, records, write, task)",
                    &["outcome"],
                ),
                &["committed", "not_committed", "key_map_full", "read", "records", "write", "task"],
            ),
            compaction_bytes: zeroed(
                counter_vec(
                    &registry,
                    "strata_compaction_bytes_total",
                    "segment bytes compaction read and wrote",
                    &["direction"],
                ),
                &["read", "written"],
            ),
            compaction_records: zeroed(
                counter_vec(
                    &registry,
                    "strata_compaction_records_total",
                    "records compaction read, by whether they were kept or removed",
                    &["outcome"],
                ),
                &["kept", "removed"],
            ),
            compaction_objects: zeroed(
                counter_vec(
                    &registry,
                    "strata_compaction_objects_written_total",
                    "segment objects written by committed compaction passes",
                    &["store"],
                ),
                &["segments"],
            ),
            orphans_deleted: zeroed(
                counter_vec(
                    &registry,
                    "strata_orphans_deleted_total",
                    "objects deleted by the orphan collector, by prefix (segments, wal)",
                    &["prefix"],
                ),
                &["segments", "wal"],
            ),
            connections: gauge(&registry, "strata_connections", "open client connections"),
            connections_max: gauge(&registry, "strata_connections_max", "max.connections"),
            request_bytes_in_flight: gauge(&registry, "strata_request_bytes_in_flight", "request bytes being handled"),
            request_bytes_max: gauge(&registry, "strata_request_bytes_max", "queued.max.request.bytes"),
            partitions: gauge(&registry, "strata_partitions", "partitions this broker owns"),
            coordinator_slots: gauge(&registry, "strata_coordinator_slots", "group coordinator slots this broker holds"),
            ownership_changes: counter_vec(
                &registry,
                "strata_ownership_changes_total",
                "partitions and coordinator slots this broker claimed, released (handed off) or stepped down from (fenced by a newer owner)",
                &["change"],
            ),
            zone_fetch_bytes: counter_vec(
                &registry,
                "strata_zone_fetch_bytes_total",
                "bytes this broker served to clients in its zone from partitions other brokers own (KIP-392 follower fetching)",
                &["topic"],
            ),
            preferred_replica_redirects: counter_vec(
                &registry,
                "strata_preferred_replica_redirects_total",
                "fetches this partition owner answered with a preferred read replica in the client's zone instead of records",
                &["topic"],
            ),
            groups: gauge(&registry, "strata_groups", "consumer groups with a coordinator task on this broker"),
            cache_disk_full: gauge(&registry, "strata_cache_disk_full", "1 while the local cache disk is full: local writes stop and acks=1 produces are refused"),
            cache_disk_free_bytes: gauge(&registry, "strata_cache_disk_free_bytes", "free bytes of the local cache disk at the last check"),
            local_write_failures: zeroed(
                counter_vec(
                    &registry,
                    "strata_local_write_failures_total",
                    "local cache writes that failed (no_space, io) or were not attempted because the disk is full (skipped)",
                    &["reason"],
                ),
                &["no_space", "io", "skipped"],
            ),
            segment_check_failures: zeroed(
                counter_vec(
                    &registry,
                    "strata_segment_check_failures_total",
                    "segments refused before upload for a missing, reordered or corrupt batch, by the source of their bytes",
                    &["source"],
                ),
                &["local", "write_ahead"],
            ),
            store_reachable: {
                let g = gauge_vec(&registry, "strata_store_reachable", "1 while this broker reaches the store (object, metadata) within store.unreachable.timeout.ms", &["store"]);
                for s in ["object", "metadata"] {
                    g.with_label_values(&[s]).set(1);
                }
                g
            },
            queue_depth: gauge_vec(&registry, "strata_queue_depth", "items waiting in a queue (wal_flush; partition and group: the fullest of them)", &["queue"]),
            queue_capacity: gauge_vec(&registry, "strata_queue_capacity", "capacity of a queue (its setting)", &["queue"]),
            cache_entries: gauge_vec(&registry, "strata_memory_cache_entries", "entries of an in-memory cache (segment_index, zone_manifest), at most index.cache.entries", &["cache"]),
            stepped_down: gauge(&registry, "strata_broker_stepped_down", "1 while this broker has stepped down from its partitions and coordinator slots because it cannot reach a store"),
            partition_bytes_in: IntCounterVec::new(
                Opts::new("strata_partition_bytes_in_total", "record bytes produced, per partition"),
                &["topic", "partition"],
            )
            .expect("valid"),
            partition_bytes_out: IntCounterVec::new(
                Opts::new("strata_partition_bytes_out_total", "record bytes fetched, per partition"),
                &["topic", "partition"],
            )
            .expect("valid"),
            partition_labels: std::sync::atomic::AtomicBool::new(false),
            started: crate::clock::instant(),
            uptime_seconds,
            group_lag: gauge_vec(&registry, "kafka_consumergroup_lag", "log end offset minus committed offset", &partition),
            group_lag_sum: gauge_vec(&registry, "kafka_consumergroup_lag_sum", "lag summed over a topic's partitions", &topic),
            group_current_offset: gauge_vec(&registry, "kafka_consumergroup_current_offset", "committed offset", &partition),
            group_current_offset_sum: gauge_vec(
                &registry,
                "kafka_consumergroup_current_offset_sum",
                "committed offsets summed over a topic's partitions",
                &topic,
            ),
            group_members: gauge_vec(&registry, "kafka_consumergroup_members", "members of a consumer group", &["consumergroup"]),
            group_lag_seconds: lag_seconds,
            compaction_dirty_ratio,
            compaction_lag_seconds,
            compaction_max_lag_seconds,
            registry,
        }
    })
}

/// The stages of the `acks=all` path, as `strata_produce_stage_seconds{stage}` labels.
pub(crate) mod stage {
    /// From a request's arrival to its batch reaching the flusher.
    pub(crate) const QUEUE: &str = "queue";
    /// In the flusher's buffer, until its flush starts.
    pub(crate) const BUFFER: &str = "buffer";
    /// Writing the object (on `file://` stores, with its fsyncs).
    pub(crate) const WRITE: &str = "write";
    /// Written, waiting for the commit before it to end.
    pub(crate) const COMMIT_WAIT: &str = "commit_wait";
    /// The metadata transaction.
    pub(crate) const COMMIT: &str = "commit";
    /// From the commit to the response leaving the handler.
    pub(crate) const RESPONSE: &str = "response";
    pub(crate) const ALL: [&str; 6] = [QUEUE, BUFFER, WRITE, COMMIT_WAIT, COMMIT, RESPONSE];
}
