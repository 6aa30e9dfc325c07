//! Broker settings: one table of every setting, read from defaults, a TOML file,
//! `STRATA_*` environment variables and command-line flags, in that order.
//!
//! The table is the single source of truth: `strata serve --help`, the environment
//! names, the TOML keys and the configuration reference all come from it, so they cannot
//! drift apart. Topic-level settings use Kafka's names and are the broker-wide defaults
//! that a topic's own overrides (CreateTopics, AlterConfigs) replace.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

/// Upper bound on partitions per topic (each is a task, a file and metadata rows).
pub(crate) const MAX_PARTITIONS: i32 = 10_000;

/// Host and port of a `HOST:PORT` address (`[v6]:PORT` too); port 9092 when missing.
pub(crate) fn host_port(addr: &str) -> (String, i32) {
    match addr.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_matches(['[', ']']).to_string(),
            p.parse().unwrap_or(9092),
        ),
        None => (addr.to_string(), 9092),
    }
}

/// One setting: its Kafka-style name, default and meaning.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SettingDef {
    /// Name in TOML files and DescribeConfigs (`wal.flush.interval.ms`).
    pub name: &'static str,
    /// Default value as text; empty means "derived" (see the doc).
    pub default: &'static str,
    pub doc: &'static str,
    /// Whether it is a per-topic setting (Kafka topic config) as well.
    pub topic: bool,
}

impl SettingDef {
    /// `--wal-flush-interval-ms`
    pub(crate) fn flag(&self) -> String {
        self.name.replace('.', "-")
    }

    /// `STRATA_WAL_FLUSH_INTERVAL_MS`
    pub(crate) fn env(&self) -> String {
        format!(
            "STRATA_{}",
            self.name.replace(['.', '-'], "_").to_uppercase()
        )
    }
}

const fn def(name: &'static str, default: &'static str, doc: &'static str) -> SettingDef {
    SettingDef {
        name,
        default,
        doc,
        topic: false,
    }
}

const fn topic(name: &'static str, default: &'static str, doc: &'static str) -> SettingDef {
    SettingDef {
        name,
        default,
        doc,
        topic: true,
    }
}

/// Every setting the broker knows. Names are a stable interface.
pub(crate) const SETTINGS: &[SettingDef] = &[
    def("listen", "127.0.0.1:9092", "Kafka listener address (HOST:PORT)"),
    def(
        "advertise",
        "",
        "address clients are told to connect to (HOST:PORT); defaults to --listen",
    ),
    def("http", "127.0.0.1:9644", "operator HTTP address (HOST:PORT): /healthz, /readyz and /metrics"),
    def(
        "data-dir",
        "./data",
        "local cache directory and, by default, the home of the object store and metadata",
    ),
    def(
        "object-store",
        "",
        "object store URL: s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX (credentials and endpoint from the standard environment, options as ?key=value), file:///path or memory://; defaults to file://DATA_DIR/objects",
    ),
    def(
        "object-store.fsync",
        "true",
        "file:// object stores only: fsync every object so acknowledged data survives a machine crash, not just a broker crash",
    ),
    def(
        "object-store.request.timeout.ms",
        "10000",
        "longest one object-store request attempt may take before it is abandoned and retried",
    ),
    def(
        "object-store.retry.timeout.ms",
        "30000",
        "longest an object-store request keeps retrying (writes of the write-ahead log use wal.flush.timeout.ms)",
    ),
    def(
        "object-store.write.concurrency",
        "64",
        "object-store writes and deletes in flight at once",
    ),
    def(
        "object-store.read.concurrency",
        "64",
        "object-store reads for fetches, recovery and indexes in flight at once",
    ),
    def(
        "object-store.replay.concurrency",
        "16",
        "object-store read-ahead requests of sequential replay in flight at once (kept apart so replay never delays tail reads)",
    ),
    def(
        "object-store.compaction.concurrency",
        "4",
        "object-store requests of compaction in flight at once (kept apart so compaction never delays produce or tail reads)",
    ),
    def(
        "cache.memory.bytes",
        "268435456",
        "memory the block cache of object-store data may use",
    ),
    def(
        "cache.disk.bytes",
        "1073741824",
        "local disk (NVMe) the block cache may use under DATA_DIR/cache/blocks; 0 keeps the cache in memory only",
    ),
    def(
        "cache.block.bytes",
        "4194304",
        "size of one cached block, and of one object-store GET on a cache miss",
    ),
    def(
        "cache.readahead.blocks",
        "4",
        "blocks fetched ahead after a cache miss, so sequential replay keeps several GETs in flight",
    ),
    def(
        "cache.disk.min.free.bytes",
        "268435456",
        "the cache disk counts as full below this many free bytes (or after a write failed for lack of space): local writes stop, partitions serve their tails from write-ahead objects, acks=1 produces are refused, /readyz reports it; writes resume at twice this",
    ),
    def(
        "cache.disk.check.interval.ms",
        "1000",
        "how often the cache disk's free space is checked",
    ),
    def(
        "metadata",
        "",
        "metadata store URL: sqlite://PATH, postgres://USER@HOST:PORT/DB, or bucket:// (in the object store itself); defaults to bucket:// when the object store is s3://, gs:// or az://, else sqlite://DATA_DIR/metadata.db",
    ),
    def(
        "metadata.request.timeout.ms",
        "10000",
        "longest one metadata-store operation may take before the caller gets a retriable error (a write cut short may still have applied; the write-ahead commit is bounded by wal.flush.timeout.ms instead)",
    ),
    def(
        "metadata.bucket.queue.length",
        "4096",
        "bucket:// metadata only: operations waiting for the store's single writer at most (callers beyond it wait for room)",
    ),
    def("broker-id", "0", "this broker's id (node id in Kafka metadata)"),
    def("zone", "", "availability zone (rack) of this broker"),
    def(
        "broker.lease.ms",
        "10000",
        "how long a broker stays listed as live after its last heartbeat (it heartbeats every third of this)",
    ),
    def(
        "ownership.check.interval.ms",
        "1000",
        "how often a broker re-reads live brokers and owners and claims, hands off or gives up partitions and coordinator slots",
    ),
    def(
        "store.unreachable.timeout.ms",
        "10000",
        "a broker that has had no answer from the object store or the metadata store for this long steps down from its partitions and coordinator slots (when another broker serves), so brokers that reach both take over",
    ),
    def(
        "ownership.hold.down.ms",
        "30000",
        "a broker that stepped down takes partitions again only after reaching both stores for this long, so partitions do not move back and forth with a flapping link",
    ),
    def(
        "zone.reads.refresh.ms",
        "250",
        "how often a broker re-reads the manifest of a partition it serves to clients in its zone for another broker (how far behind the owner those reads may be)",
    ),
    def(
        "offsets.topic.num.partitions",
        "50",
        "coordinator slots (partitions of the internal __consumer_offsets topic); fixed when the cluster is first started",
    ),
    def(
        "cluster-id",
        "strata-cluster",
        "cluster id reported to clients in Metadata and DescribeCluster",
    ),
    def("log-format", "text", "log line format: text or json"),
    def(
        "metrics.partition.labels",
        "false",
        "also export per-partition byte counters (series grow with partitions)",
    ),
    def(
        "wal.flush.interval.ms",
        "25",
        "longest time a produced batch waits before its write-ahead object is written",
    ),
    def(
        "wal.flush.max.per.second",
        "",
        "most write-ahead flushes started per second (each writes one object: a billed PUT on cloud stores); empty: one per wal.flush.interval.ms on s3://, gs:// and az://, no bound on file:// and memory://; 0: no bound",
    ),
    def(
        "wal.flush.bytes",
        "8388608",
        "flush the write-ahead object early once this many bytes are pending",
    ),
    def(
        "wal.flush.timeout.ms",
        "30000",
        "how long one flush keeps retrying the object store and metadata store before failing its batches",
    ),
    def(
        "wal.flush.concurrency",
        "4",
        "write-ahead objects being written at once (their commits stay in order)",
    ),
    def(
        "wal.gc.interval.ms",
        "30000",
        "how often write-ahead objects fully covered by segments are deleted",
    ),
    def(
        "orphan.check.interval.ms",
        "3600000",
        "how often objects that no manifest references are looked for (crashed uploads, cut-short topic deletions)",
    ),
    def(
        "orphan.grace.ms",
        "3600000",
        "an unreferenced object is deleted only once it is this old, so objects written and not yet committed are never taken",
    ),
    def(
        "log.retention.check.interval.ms",
        "30000",
        "how often retention is applied to each partition",
    ),
    def(
        "log.cleaner.threads",
        "1",
        "compaction passes running at once on this broker",
    ),
    def(
        "log.cleaner.dedupe.buffer.size",
        "134217728",
        "memory for the compaction key maps, shared by log.cleaner.threads passes (32 bytes a key); a pass maps as many whole dirty segments as its share holds",
    ),
    def(
        "log.cleaner.backoff.ms",
        "15000",
        "how often each compacted partition checks whether a compaction pass is due",
    ),
    def(
        "log.cleaner.io.max.bytes.per.second",
        "0",
        "segment bytes compaction reads and writes per second on this broker, all passes together; 0: no bound",
    ),
    def(
        "file.delete.delay.ms",
        "60000",
        "how long segment objects a compaction pass replaced stay readable (for readers of the previous manifest) before they are deleted; keep it well under orphan.grace.ms",
    ),
    def(
        "segment.upload.concurrency",
        "2",
        "segment uploads in flight per broker (each holds one segment in memory)",
    ),
    def(
        "socket.request.max.bytes",
        "104857600",
        "largest request frame accepted; a larger one closes the connection",
    ),
    def(
        "max.connections",
        "10000",
        "connections accepted at once; more wait in the listen backlog",
    ),
    def(
        "max.inflight.requests.per.connection",
        "128",
        "requests of one connection processed concurrently before reading pauses",
    ),
    def(
        "queued.max.request.bytes",
        "536870912",
        "request bytes in flight across all connections before reading pauses",
    ),
    def(
        "fetch.max.bytes",
        "57671680",
        "most record bytes one fetch response carries, whatever the client asks",
    ),
    def(
        "partition.queue.length",
        "1024",
        "commands queued for one partition's owner task",
    ),
    def(
        "wal.flush.queue.length",
        "4096",
        "stamped batches queued for the write-ahead flusher (owners wait when it is full)",
    ),
    def(
        "batch.decompressed.max.bytes",
        "67108864",
        "largest a record batch may be once decompressed, where the broker looks inside one (the key check on compacted topics, the compactor); a larger one is refused as CORRUPT_MESSAGE",
    ),
    def(
        "wal.flush.queue.bytes",
        "67108864",
        "bytes of batches queued for the write-ahead flusher; a produce request waits for room before its batches reach the partition (an append larger than this takes all of it)",
    ),
    def(
        "group.queue.length",
        "256",
        "requests queued for one consumer group's coordinator task",
    ),
    def(
        "controller.queue.length",
        "1024",
        "topic-admin and ownership requests queued for the controller task (callers wait when it is full)",
    ),
    def(
        "index.cache.entries",
        "10000",
        "decoded segment indexes, and manifests of partitions read for clients in this zone, kept in memory (each cache)",
    ),
    def(
        "ownership.claim.concurrency",
        "16",
        "partitions and coordinator slots claimed, handed off or released at once by an ownership pass",
    ),
    def(
        "group.initial.rebalance.delay.ms",
        "3000",
        "how long a group leaving Empty waits for more members before its first rebalance completes",
    ),
    def(
        "group.min.session.timeout.ms",
        "6000",
        "smallest session timeout a consumer may ask for",
    ),
    def(
        "group.max.session.timeout.ms",
        "1800000",
        "largest session timeout a consumer may ask for",
    ),
    def("group.max.size", "1000", "members one consumer group may have"),
    def(
        "group.consumer.session.timeout.ms",
        "45000",
        "session timeout of consumer-protocol (KIP-848) group members",
    ),
    def(
        "group.consumer.heartbeat.interval.ms",
        "5000",
        "heartbeat interval the coordinator gives consumer-protocol (KIP-848) members",
    ),
    def(
        "groups.max",
        "100000",
        "consumer groups the coordinator keeps in memory at once",
    ),
    def(
        "offsets.retention.minutes",
        "10080",
        "committed offsets of a group without members are deleted this long after their last commit",
    ),
    def(
        "offsets.retention.check.interval.ms",
        "600000",
        "how often expired committed offsets are deleted",
    ),
    def(
        "transaction.max.timeout.ms",
        "900000",
        "longest transaction timeout a producer may ask for (transaction.timeout.ms); longer requests get INVALID_TRANSACTION_TIMEOUT",
    ),
    def(
        "transaction.abort.timed.out.transaction.cleanup.interval.ms",
        "10000",
        "how often the transaction coordinator aborts transactions open past their timeout (fencing their producers) and forgets expired transactional ids",
    ),
    def(
        "transactional.id.expiration.ms",
        "604800000",
        "a transactional id with no transaction open and no request for this long is forgotten",
    ),
    def(
        "transaction.max.open",
        "10000",
        "transactions open at once on one broker's coordinator; beyond it, starting one gets COORDINATOR_LOAD_IN_PROGRESS and the producer retries",
    ),
    def(
        "offset.metadata.max.bytes",
        "4096",
        "longest metadata string an offset commit may carry",
    ),
    def(
        "auto.create.topics.enable",
        "true",
        "create a topic when a client produces to or asks metadata for one that does not exist",
    ),
    def("num.partitions", "1", "partitions of an auto-created topic"),
    topic(
        "segment.bytes",
        "67108864",
        "seal the active segment and upload it once it holds this many bytes",
    ),
    topic(
        "segment.ms",
        "3600000",
        "seal the active segment once it is this old, so quiet partitions release write-ahead objects",
    ),
    topic(
        "retention.ms",
        "604800000",
        "delete whole segments whose newest record is older than this; -1 keeps forever",
    ),
    topic(
        "retention.bytes",
        "-1",
        "delete the oldest whole segments while the partition is larger than this; -1 = no limit",
    ),
    topic(
        "max.message.bytes",
        "1048588",
        "largest record batch accepted (after compression)",
    ),
    topic(
        "cleanup.policy",
        "delete",
        "`delete` (retention drops whole old segments), `compact` (keep the newest record per key) or `compact,delete` (both)",
    ),
    topic(
        "min.compaction.lag.ms",
        "0",
        "a record stays uncompacted at least this long after it was written",
    ),
    topic(
        "max.compaction.lag.ms",
        "9223372036854775807",
        "a record becomes eligible for compaction at most this long after it was written, whatever the dirty ratio",
    ),
    topic(
        "delete.retention.ms",
        "86400000",
        "how long a tombstone (a record with a null value) stays readable after the compaction that first kept it",
    ),
    topic(
        "min.cleanable.dirty.ratio",
        "0.5",
        "compact a partition once its uncompacted bytes are at least this share of its sealed bytes",
    ),
    topic(
        "message.timestamp.type",
        "CreateTime",
        "only CreateTime is supported: timestamps are stored as the producer sent them",
    ),
    topic(
        "index.interval.bytes",
        "4096",
        "bytes of batches between two entries of a segment's offset index",
    ),
];

pub(crate) fn setting(name: &str) -> Option<&'static SettingDef> {
    SETTINGS.iter().find(|s| s.name == name)
}

/// Effective topic-level settings (broker default overlaid with a topic's overrides).
#[derive(Debug, Clone, PartialEq)]
pub struct TopicConfig {
    pub segment_bytes: u64,
    pub segment_ms: i64,
    pub retention_ms: i64,
    pub retention_bytes: i64,
    pub max_message_bytes: usize,
    pub index_interval_bytes: u64,
    pub cleanup: CleanupPolicy,
    pub min_compaction_lag_ms: i64,
    pub max_compaction_lag_ms: i64,
    pub delete_retention_ms: i64,
    pub min_cleanable_dirty_ratio: f64,
}

/// `cleanup.policy`: which of retention and compaction apply to a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CleanupPolicy {
    pub delete: bool,
    pub compact: bool,
}

impl CleanupPolicy {
    /// Parses Kafka's list form (`compact,delete`, in any order, spaces allowed).
    pub fn parse(value: &str) -> Option<CleanupPolicy> {
        let mut policy = CleanupPolicy::default();
        for part in value.split(',').map(str::trim) {
            match part {
                "delete" => policy.delete = true,
                "compact" => policy.compact = true,
                _ => return None,
            }
        }
        Some(policy)
    }
}

/// A topic config value failed validation; the message says which and why.
#[derive(Debug, thiserror::Error)]
#[error("invalid value {value:?} for {name}: {reason}")]
pub struct InvalidConfig {
    pub name: String,
    pub value: String,
    pub reason: String,
}

impl TopicConfig {
    /// Validates one topic-level key/value; unknown keys are rejected.
    pub fn validate(name: &str, value: &str) -> Result<(), InvalidConfig> {
        let invalid = |reason: &str| InvalidConfig {
            name: name.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let Some(def) = setting(name).filter(|d| d.topic) else {
            return Err(invalid("unknown topic config"));
        };
        match def.name {
            "cleanup.policy" => match CleanupPolicy::parse(value) {
                Some(_) => Ok(()),
                None => Err(invalid("expected a list of `compact` and `delete`")),
            },
            "message.timestamp.type" if value != "CreateTime" => {
                Err(invalid("only CreateTime is supported"))
            }
            "message.timestamp.type" => Ok(()),
            "min.compaction.lag.ms" | "delete.retention.ms" => match value.parse::<i64>() {
                Ok(v) if v >= 0 => Ok(()),
                _ => Err(invalid("expected an integer >= 0")),
            },
            "min.cleanable.dirty.ratio" => match value.parse::<f64>() {
                Ok(v) if (0.0..=1.0).contains(&v) => Ok(()),
                _ => Err(invalid("expected a number from 0 to 1")),
            },
            "retention.ms" | "retention.bytes" => match value.parse::<i64>() {
                Ok(v) if v >= -1 => Ok(()),
                _ => Err(invalid("expected an integer >= -1")),
            },
            // Kafka's range; a segment is uploaded as one PUT (S3 takes up to 5 GiB).
            "segment.bytes" => match value.parse::<u64>() {
                Ok(v) if (1024..=i32::MAX as u64).contains(&v) => Ok(()),
                _ => Err(invalid("expected an integer from 1024 to 2147483647")),
            },
            _ => match value.parse::<i64>() {
                Ok(v) if v >= 1 => Ok(()),
                _ => Err(invalid("expected a positive integer")),
            },
        }
    }

    /// Broker defaults (from `values`) overlaid with topic overrides.
    pub fn resolve(
        defaults: &BTreeMap<String, String>,
        overrides: &BTreeMap<String, String>,
    ) -> Self {
        let get = |name: &str| -> &str {
            overrides
                .get(name)
                .or_else(|| defaults.get(name))
                .map(String::as_str)
                .unwrap_or_else(|| setting(name).map_or("", |d| d.default))
        };
        let num = |name: &str| -> i64 {
            get(name)
                .parse()
                .or_else(|_| setting(name).map_or("0", |d| d.default).parse())
                .unwrap_or(0)
        };
        TopicConfig {
            segment_bytes: num("segment.bytes").max(1024) as u64,
            segment_ms: num("segment.ms").max(1),
            retention_ms: num("retention.ms"),
            retention_bytes: num("retention.bytes"),
            max_message_bytes: num("max.message.bytes").max(1) as usize,
            index_interval_bytes: num("index.interval.bytes").max(1) as u64,
            cleanup: CleanupPolicy::parse(get("cleanup.policy")).unwrap_or(CleanupPolicy {
                delete: true,
                compact: false,
            }),
            min_compaction_lag_ms: num("min.compaction.lag.ms").max(0),
            max_compaction_lag_ms: num("max.compaction.lag.ms").max(1),
            delete_retention_ms: num("delete.retention.ms").max(0),
            min_cleanable_dirty_ratio: get("min.cleanable.dirty.ratio")
                .parse::<f64>()
                .unwrap_or(0.5)
                .clamp(0.0, 1.0),
        }
    }
}

/// The broker's resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Every setting by name, after all sources were applied.
    pub values: BTreeMap<String, String>,
    pub listen: String,
    pub advertise: String,
    pub http: String,
    pub data_dir: PathBuf,
    pub object_store_url: String,
    /// How the object store is opened and how its requests are retried and limited.
    pub object_store: tiering::StoreOptions,
    /// The block cache of object-store data.
    pub cache: tiering::CacheOptions,
    pub metadata_url: String,
    pub metadata_request_timeout_ms: u64,
    pub metadata_bucket_queue_length: usize,
    pub broker_id: i32,
    pub zone: Option<String>,
    pub broker_lease_ms: u64,
    pub ownership_check_interval_ms: u64,
    pub store_unreachable_timeout_ms: u64,
    pub ownership_hold_down_ms: u64,
    pub cache_disk_min_free_bytes: u64,
    pub cache_disk_check_interval_ms: u64,
    pub zone_reads_refresh_ms: u64,
    pub offsets_topic_num_partitions: i32,
    pub cluster_id: String,
    pub log_json: bool,
    pub metrics_partition_labels: bool,
    pub wal_flush_interval_ms: u64,
    /// Shortest time between flush starts, from `wal.flush.max.per.second` (zero: no
    /// bound).
    pub wal_flush_min_gap: Duration,
    pub wal_flush_bytes: usize,
    pub wal_flush_timeout_ms: u64,
    pub wal_flush_concurrency: usize,
    pub wal_gc_interval_ms: u64,
    pub orphan_check_interval_ms: u64,
    pub orphan_grace_ms: u64,
    pub retention_check_interval_ms: u64,
    pub segment_upload_concurrency: usize,
    pub log_cleaner_threads: usize,
    pub log_cleaner_dedupe_buffer_size: usize,
    pub log_cleaner_backoff_ms: u64,
    pub file_delete_delay_ms: u64,
    /// `log.cleaner.io.max.bytes.per.second`; `None`: no bound.
    pub log_cleaner_io_max_bytes_per_second: Option<u64>,
    pub request_max_bytes: usize,
    pub max_connections: usize,
    pub max_inflight_per_connection: usize,
    pub queued_max_request_bytes: usize,
    pub partition_queue_length: usize,
    pub wal_flush_queue_length: usize,
    pub wal_flush_queue_bytes: usize,
    pub batch_decompressed_max_bytes: usize,
    pub group_queue_length: usize,
    pub controller_queue_length: usize,
    pub index_cache_entries: usize,
    pub ownership_claim_concurrency: usize,
    pub fetch_max_bytes: usize,
    pub group_initial_rebalance_delay_ms: i64,
    pub group_min_session_timeout_ms: i32,
    pub group_max_session_timeout_ms: i32,
    pub group_max_size: usize,
    pub group_consumer_session_timeout_ms: i64,
    pub group_consumer_heartbeat_interval_ms: i32,
    pub groups_max: usize,
    pub offsets_retention_ms: i64,
    pub offsets_retention_check_interval_ms: u64,
    pub offset_metadata_max_bytes: usize,
    pub transaction_max_timeout_ms: i32,
    pub transaction_abort_timed_out_transaction_cleanup_interval_ms: u64,
    pub transactional_id_expiration_ms: i64,
    pub transaction_max_open: usize,
    pub auto_create_topics: bool,
    pub num_partitions: i32,
    /// Broker-wide topic defaults.
    pub topic_defaults: TopicConfig,
}

impl Config {
    /// Resolves a configuration from explicitly given values (name -> text).
    /// Unknown names are an error, so a typo never silently falls back to a default.
    pub fn from_values(given: BTreeMap<String, String>) -> anyhow::Result<Config> {
        let mut values: BTreeMap<String, String> = SETTINGS
            .iter()
            .map(|d| (d.name.to_string(), d.default.to_string()))
            .collect();
        for (name, value) in given {
            if setting(&name).is_none() {
                bail!("unknown setting {name:?} (see `strata serve --help`)");
            }
            values.insert(name, value);
        }
        for def in SETTINGS.iter().filter(|d| d.topic) {
            TopicConfig::validate(def.name, &values[def.name])?;
        }
        let text = |name: &str| values[name].clone();
        let num = |name: &str| -> anyhow::Result<i64> {
            values[name].parse::<i64>().with_context(|| {
                format!("setting {name} must be an integer, got {:?}", values[name])
            })
        };
        let positive = |name: &str| -> anyhow::Result<u64> {
            let v = num(name)?;
            if v < 1 {
                bail!("setting {name} must be at least 1, got {v}");
            }
            Ok(v as u64)
        };
        let data_dir = PathBuf::from(text("data-dir"));
        let object_store_url = match text("object-store") {
            s if s.is_empty() => {
                format!("file://{}", absolute(&data_dir.join("objects"))?.display())
            }
            s => s,
        };
        let remote = ["s3://", "gs://", "az://"]
            .iter()
            .any(|p| object_store_url.to_ascii_lowercase().starts_with(p));
        let metadata_url = match text("metadata") {
            // A broker on a remote store keeps nothing it needs on local disk.
            s if s.is_empty() && remote => "bucket://".to_owned(),
            s if s.is_empty() => format!(
                "sqlite://{}",
                absolute(&data_dir.join("metadata.db"))?.display()
            ),
            s => s,
        };
        let listen = text("listen");
        let advertise = match text("advertise") {
            s if s.is_empty() => listen.clone(),
            s => s,
        };
        let log_json = match text("log-format").as_str() {
            "text" => false,
            "json" => true,
            other => bail!("setting log-format must be text or json, got {other:?}"),
        };
        let boolean = |name: &str| -> anyhow::Result<bool> {
            match values[name].as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                other => bail!("setting {name} must be true or false, got {other:?}"),
            }
        };
        let auto_create_topics = boolean("auto.create.topics.enable")?;
        let broker_id = i32::try_from(num("broker-id")?).context("broker-id out of range")?;
        if broker_id < 0 {
            bail!("broker-id must not be negative");
        }
        let topic_defaults = TopicConfig::resolve(&values, &BTreeMap::new());
        // Object-store PUTs are billed on cloud stores: by default no more flushes than
        // one per interval there, as many as the disk takes on local files.
        let flushes_per_second = match text("wal.flush.max.per.second").as_str() {
            "" if remote => (1000 / positive("wal.flush.interval.ms")?).max(1),
            "" => 0,
            _ => u64::try_from(num("wal.flush.max.per.second")?)
                .context("wal.flush.max.per.second must not be negative")?,
        };
        let wal_flush_min_gap = match flushes_per_second {
            0 => Duration::ZERO,
            n => Duration::from_secs(1) / n.min(1_000_000) as u32,
        };
        if positive("socket.request.max.bytes")? > positive("queued.max.request.bytes")? {
            bail!("socket.request.max.bytes must not exceed queued.max.request.bytes (one request must fit the budget)");
        }
        let blocks_dir = data_dir.join("cache").join("blocks");
        Ok(Config {
            listen,
            advertise,
            http: text("http"),
            data_dir,
            object_store_url,
            object_store: tiering::StoreOptions {
                fsync: boolean("object-store.fsync")?,
                request_timeout: Duration::from_millis(positive(
                    "object-store.request.timeout.ms",
                )?),
                retry_timeout: Duration::from_millis(positive("object-store.retry.timeout.ms")?),
                write_concurrency: positive("object-store.write.concurrency")? as usize,
                read_concurrency: positive("object-store.read.concurrency")? as usize,
                replay_concurrency: positive("object-store.replay.concurrency")? as usize,
                compact_concurrency: positive("object-store.compaction.concurrency")? as usize,
            },
            cache: tiering::CacheOptions {
                memory_bytes: positive("cache.memory.bytes")? as usize,
                disk_bytes: num("cache.disk.bytes")?.max(0) as usize,
                dir: blocks_dir,
                block_bytes: positive("cache.block.bytes")?.max(4096),
                readahead_blocks: num("cache.readahead.blocks")?.max(0) as u64,
            },
            metadata_url,
            metadata_request_timeout_ms: positive("metadata.request.timeout.ms")?,
            metadata_bucket_queue_length: positive("metadata.bucket.queue.length")? as usize,
            broker_id,
            zone: Some(text("zone")).filter(|z| !z.is_empty()),
            broker_lease_ms: positive("broker.lease.ms")?.max(300),
            ownership_check_interval_ms: positive("ownership.check.interval.ms")?,
            store_unreachable_timeout_ms: positive("store.unreachable.timeout.ms")?,
            ownership_hold_down_ms: num("ownership.hold.down.ms")?.max(0) as u64,
            cache_disk_min_free_bytes: num("cache.disk.min.free.bytes")?.max(0) as u64,
            cache_disk_check_interval_ms: positive("cache.disk.check.interval.ms")?,
            zone_reads_refresh_ms: positive("zone.reads.refresh.ms")?,
            offsets_topic_num_partitions: positive("offsets.topic.num.partitions")?
                .min(MAX_PARTITIONS as u64) as i32,
            cluster_id: text("cluster-id"),
            log_json,
            metrics_partition_labels: boolean("metrics.partition.labels")?,
            wal_flush_interval_ms: positive("wal.flush.interval.ms")?,
            wal_flush_min_gap,
            wal_flush_bytes: positive("wal.flush.bytes")? as usize,
            wal_flush_timeout_ms: positive("wal.flush.timeout.ms")?,
            wal_flush_concurrency: positive("wal.flush.concurrency")? as usize,
            wal_gc_interval_ms: positive("wal.gc.interval.ms")?,
            orphan_check_interval_ms: positive("orphan.check.interval.ms")?,
            orphan_grace_ms: num("orphan.grace.ms")?.max(0) as u64,
            retention_check_interval_ms: positive("log.retention.check.interval.ms")?,
            segment_upload_concurrency: positive("segment.upload.concurrency")? as usize,
            log_cleaner_threads: positive("log.cleaner.threads")? as usize,
            log_cleaner_dedupe_buffer_size: positive("log.cleaner.dedupe.buffer.size")? as usize,
            log_cleaner_backoff_ms: positive("log.cleaner.backoff.ms")?,
            file_delete_delay_ms: positive("file.delete.delay.ms")?,
            log_cleaner_io_max_bytes_per_second: match num("log.cleaner.io.max.bytes.per.second")? {
                0 => None,
                n if n > 0 => Some(n as u64),
                n => bail!("log.cleaner.io.max.bytes.per.second must not be negative, got {n}"),
            },
            request_max_bytes: positive("socket.request.max.bytes")? as usize,
            max_connections: positive("max.connections")? as usize,
            max_inflight_per_connection: positive("max.inflight.requests.per.connection")? as usize,
            queued_max_request_bytes: positive("queued.max.request.bytes")? as usize,
            partition_queue_length: positive("partition.queue.length")? as usize,
            wal_flush_queue_length: positive("wal.flush.queue.length")? as usize,
            wal_flush_queue_bytes: positive("wal.flush.queue.bytes")? as usize,
            batch_decompressed_max_bytes: positive("batch.decompressed.max.bytes")? as usize,
            group_queue_length: positive("group.queue.length")? as usize,
            controller_queue_length: positive("controller.queue.length")? as usize,
            index_cache_entries: positive("index.cache.entries")? as usize,
            ownership_claim_concurrency: positive("ownership.claim.concurrency")? as usize,
            fetch_max_bytes: positive("fetch.max.bytes")? as usize,
            group_initial_rebalance_delay_ms: num("group.initial.rebalance.delay.ms")?.max(0),
            group_min_session_timeout_ms: i32::try_from(positive("group.min.session.timeout.ms")?)
                .context("group.min.session.timeout.ms out of range")?,
            group_max_session_timeout_ms: i32::try_from(positive("group.max.session.timeout.ms")?)
                .context("group.max.session.timeout.ms out of range")?,
            group_max_size: positive("group.max.size")? as usize,
            group_consumer_session_timeout_ms: positive("group.consumer.session.timeout.ms")?
                as i64,
            group_consumer_heartbeat_interval_ms: i32::try_from(positive(
                "group.consumer.heartbeat.interval.ms",
            )?)
            .context("group.consumer.heartbeat.interval.ms out of range")?,
            groups_max: positive("groups.max")? as usize,
            offsets_retention_ms: positive("offsets.retention.minutes")?.saturating_mul(60_000)
                as i64,
            offsets_retention_check_interval_ms: positive("offsets.retention.check.interval.ms")?,
            offset_metadata_max_bytes: positive("offset.metadata.max.bytes")? as usize,
            transaction_max_timeout_ms: i32::try_from(positive("transaction.max.timeout.ms")?)
                .context("transaction.max.timeout.ms out of range")?,
            transaction_abort_timed_out_transaction_cleanup_interval_ms: positive(
                "transaction.abort.timed.out.transaction.cleanup.interval.ms",
            )?,
            transactional_id_expiration_ms: positive("transactional.id.expiration.ms")? as i64,
            transaction_max_open: positive("transaction.max.open")? as usize,
            auto_create_topics,
            num_partitions: i32::try_from(positive("num.partitions")?)
                .context("num.partitions out of range")?,
            topic_defaults,
            values,
        })
    }

    /// Reads a TOML file into setting values. Nested tables and dotted keys both flatten
    /// to dotted names, so `wal.flush.interval.ms = 10` and `[wal]\nflush.interval.ms = 10`
    /// mean the same.
    pub fn read_toml(path: &std::path::Path) -> anyhow::Result<BTreeMap<String, String>> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let table: toml::Table = toml::from_str(&text)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        let mut out = BTreeMap::new();
        flatten("", &toml::Value::Table(table), &mut out)?;
        Ok(out)
    }
}

fn flatten(
    prefix: &str,
    value: &toml::Value,
    out: &mut BTreeMap<String, String>,
) -> anyhow::Result<()> {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&name, v, out)?;
            }
        }
        toml::Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        toml::Value::Integer(i) => {
            out.insert(prefix.to_string(), i.to_string());
        }
        toml::Value::Boolean(b) => {
            out.insert(prefix.to_string(), b.to_string());
        }
        toml::Value::Float(f) => {
            out.insert(prefix.to_string(), f.to_string());
        }
        other => bail!("config key {prefix}: unsupported value {other}"),
    }
    Ok(())
}

fn absolute(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve() {
        let c = Config::from_values(BTreeMap::new()).expect("defaults are valid");
        assert_eq!(c.listen, "127.0.0.1:9092");
        assert_eq!(c.advertise, "127.0.0.1:9092");
        assert_eq!(c.wal_flush_interval_ms, 25);
        assert!(c.object_store_url.starts_with("file:///"));
        assert!(c.object_store_url.ends_with("/data/objects"));
        assert_eq!(c.topic_defaults.retention_bytes, -1);
    }

    /// The flush-rate bound: one flush per interval on cloud stores unless set, none on
    /// local files, as set otherwise; `0` lifts it and a negative rate is refused.
    #[test]
    fn the_flush_rate_bound_follows_the_store() {
        let gap = |pairs: &[(&str, &str)]| {
            let v = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Config::from_values(v).map(|c| c.wal_flush_min_gap)
        };
        let s3 = ("object-store", "s3://bucket/prefix");
        assert_eq!(gap(&[]).expect("file"), Duration::ZERO);
        assert_eq!(gap(&[s3]).expect("s3"), Duration::from_millis(25));
        assert_eq!(
            gap(&[s3, ("wal.flush.interval.ms", "100")]).expect("s3"),
            Duration::from_millis(100)
        );
        assert_eq!(
            gap(&[s3, ("wal.flush.max.per.second", "0")]).expect("s3"),
            Duration::ZERO
        );
        assert_eq!(
            gap(&[("wal.flush.max.per.second", "200")]).expect("file"),
            Duration::from_millis(5)
        );
        assert!(gap(&[("wal.flush.max.per.second", "-1")]).is_err());
    }

    /// `cleanup.policy` is Kafka's list; the compaction settings keep Kafka's ranges.
    #[test]
    fn cleanup_policies_and_compaction_settings() {
        let policy = |v: &str| CleanupPolicy::parse(v).map(|p| (p.delete, p.compact));
        assert_eq!(policy("delete"), Some((true, false)));
        assert_eq!(policy("compact"), Some((false, true)));
        assert_eq!(policy("compact, delete"), Some((true, true)));
        assert_eq!(policy("delete,compact"), Some((true, true)));
        assert_eq!(policy("compact,"), None);
        assert_eq!(policy(""), None);
        for (name, good, bad) in [
            ("cleanup.policy", "compact,delete", "compaction"),
            ("min.compaction.lag.ms", "0", "-1"),
            ("max.compaction.lag.ms", "1", "0"),
            ("delete.retention.ms", "0", "-5"),
            ("min.cleanable.dirty.ratio", "0.25", "1.5"),
        ] {
            assert!(TopicConfig::validate(name, good).is_ok(), "{name}={good}");
            assert!(TopicConfig::validate(name, bad).is_err(), "{name}={bad}");
        }
        let overrides = [
            ("cleanup.policy", "compact"),
            ("min.cleanable.dirty.ratio", "0.1"),
            ("delete.retention.ms", "1000"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = TopicConfig::resolve(&BTreeMap::new(), &overrides);
        assert_eq!(
            c.cleanup,
            CleanupPolicy {
                delete: false,
                compact: true
            }
        );
        assert_eq!(c.min_cleanable_dirty_ratio, 0.1);
        assert_eq!(c.delete_retention_ms, 1000);
        assert_eq!(c.max_compaction_lag_ms, i64::MAX);
        let d = TopicConfig::resolve(&BTreeMap::new(), &BTreeMap::new());
        assert_eq!(
            d.cleanup,
            CleanupPolicy {
                delete: true,
                compact: false
            }
        );
    }

    #[test]
    fn unknown_and_invalid_settings_are_rejected() {
        let mut v = BTreeMap::new();
        v.insert("wal.flush.intervl.ms".to_string(), "3".to_string());
        assert!(Config::from_values(v).is_err());
        let mut v = BTreeMap::new();
        v.insert("cleanup.policy".to_string(), "compress".to_string());
        assert!(Config::from_values(v).is_err());
        let mut v = BTreeMap::new();
        v.insert("wal.flush.interval.ms".to_string(), "0".to_string());
        assert!(Config::from_values(v).is_err());
    }

    #[test]
    fn toml_nested_and_dotted_keys_flatten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "listen = \"0.0.0.0:1\"\nretention.ms = -1\n[wal]\nflush.interval.ms = 7\n",
        )
        .expect("write");
        let v = Config::read_toml(&path).expect("parse");
        assert_eq!(v["wal.flush.interval.ms"], "7");
        assert_eq!(v["retention.ms"], "-1");
        let c = Config::from_values(v).expect("valid");
        assert_eq!(c.wal_flush_interval_ms, 7);
        assert_eq!(c.topic_defaults.retention_ms, -1);
    }

    #[test]
    fn readme_documents_every_setting() {
        let readme = include_str!("../README.md");
        for d in SETTINGS {
            let row = format!("| `{}` | `--{}` | `{}` |", d.name, d.flag(), d.env());
            assert!(
                readme.contains(&row),
                "README.md lacks the configuration row for {}",
                d.name
            );
        }
    }

    #[test]
    fn names_map_to_flags_and_env() {
        let d = setting("wal.flush.interval.ms").expect("exists");
        assert_eq!(d.flag(), "wal-flush-interval-ms");
        assert_eq!(d.env(), "STRATA_WAL_FLUSH_INTERVAL_MS");
        assert_eq!(
            setting("data-dir").expect("exists").env(),
            "STRATA_DATA_DIR"
        );
    }
}
