//! The broker: its components (object store, metadata store, flusher) and the topic
//! registry that maps topic names and ids to their partitions' owner tasks.
//!
//! The registry is a cache of the metadata store's topics plus the handles of the
//! partition tasks this broker runs; the metadata store stays the source of truth.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, Semaphore};
use tracing::{info, warn};
use uuid::Uuid;

use crate::clock::now_ms;
use crate::config::{Config, TopicConfig};
use crate::log::partition::{self, LogContext, PartitionCmd, PartitionHandle};
use crate::log::read::IndexCache;
use crate::metadata::{MetaError, MetadataStore, PartitionKey, TopicRecord};
use crate::wal::{Flusher, FlusherConfig};

/// A topic this broker serves.
#[derive(Debug)]
pub struct Topic {
    pub name: Arc<str>,
    pub id: Uuid,
    /// Topic-level overrides (Kafka names).
    pub overrides: BTreeMap<String, String>,
    pub config: TopicConfig,
    pub partitions: Vec<PartitionHandle>,
}

#[derive(Debug, Default)]
struct Registry {
    by_name: HashMap<Arc<str>, Arc<Topic>>,
    by_id: HashMap<Uuid, Arc<Topic>>,
}

/// Why a topic operation failed; the handlers map each to a Kafka error code.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("topic already exists")]
    Exists,
    #[error("topic does not exist")]
    NotFound,
    #[error(transparent)]
    InvalidConfig(#[from] crate::config::InvalidConfig),
    #[error("invalid topic: {0}")]
    InvalidTopic(String),
    #[error("invalid partition count: {0}")]
    InvalidPartitions(String),
    #[error("metadata store: {0}")]
    Meta(#[from] MetaError),
    #[error("{0}")]
    Internal(String),
}

#[derive(Debug)]
pub struct Broker {
    pub config: Config,
    pub store: Arc<tiering::Store>,
    pub meta: Arc<dyn MetadataStore>,
    pub log: Arc<LogContext>,
    pub indexes: IndexCache,
    /// This broker's registration and the live brokers clients are told about.
    pub membership: Arc<crate::membership::Membership>,
    /// Object-store blocks in memory and on local disk, for reads of sealed segments.
    pub blocks: Arc<tiering::BlockCache>,
    pub groups: Arc<crate::group::Coordinator>,
    registry: RwLock<Registry>,
    /// Serializes topic creation and deletion (rare, and simpler to reason about).
    admin: tokio::sync::Mutex<()>,
}

impl Topic {
    /// The partition with this index, if the topic has it.
    pub fn partition(&self, index: i32) -> Option<&PartitionHandle> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.partitions.get(i))
    }
}

impl Broker {
    /// Opens the stores, starts the flusher, and claims and recovers every partition.
    pub async fn start(config: Config) -> anyhow::Result<Arc<Broker>> {
        if config.metrics_partition_labels {
            crate::metrics::metrics().enable_partition_labels();
        }
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        let store = Arc::new(
            tiering::Store::open(&config.object_store_url, &config.object_store).with_context(
                || {
                    format!(
                        "opening object store {}",
                        tiering::store::redact(&config.object_store_url)
                    )
                },
            )?,
        );
        store
            .check_conditional_create()
            .await
            .with_context(|| format!("checking object store {}", store.name()))?;
        let blocks = tiering::BlockCache::open(
            store.clone(),
            &config.cache,
            Some(&crate::metrics::metrics().registry),
        )
        .await
        .context("opening the block cache")?;
        let meta = crate::metadata::open(&config.metadata_url, &store).await?;
        let session = meta.start_broker_session(config.broker_id).await?;
        let (host, port) = crate::handlers::metadata::host_port(&config.advertise);
        let membership = crate::membership::Membership::join(
            meta.clone(),
            crate::metadata::BrokerRecord {
                broker_id: config.broker_id,
                session,
                host,
                port,
                zone: config.zone.clone(),
                lease_expires_ms: 0,
            },
            Duration::from_millis(config.broker_lease_ms),
        )
        .await
        .context("registering the broker")?;
        membership.spawn();
        let (flush_tx, flush_rx) = mpsc::channel(4096);
        let flusher = Flusher::new(
            FlusherConfig {
                broker_id: config.broker_id,
                session,
                interval: Duration::from_millis(config.wal_flush_interval_ms),
                max_bytes: config.wal_flush_bytes,
                timeout: Duration::from_millis(config.wal_flush_timeout_ms),
                concurrency: config.wal_flush_concurrency,
            },
            store.clone(),
            meta.clone(),
        );
        tokio::spawn(flusher.run(flush_rx));
        let log = Arc::new(LogContext {
            store: store.clone(),
            blocks: blocks.clone(),
            meta: meta.clone(),
            flusher: flush_tx,
            cache_dir: config.data_dir.join("cache"),
            upload_permits: Arc::new(Semaphore::new(config.segment_upload_concurrency)),
            retention_check_interval: Duration::from_millis(config.retention_check_interval_ms),
            queue_length: config.partition_queue_length,
            broker_id: config.broker_id,
        });
        let groups = crate::group::Coordinator::new(
            meta.clone(),
            crate::group::CoordinatorConfig {
                limits: crate::group::classic::GroupLimits {
                    min_session_timeout_ms: config.group_min_session_timeout_ms,
                    max_session_timeout_ms: config.group_max_session_timeout_ms,
                    initial_rebalance_delay_ms: config.group_initial_rebalance_delay_ms,
                    max_members: config.group_max_size,
                },
                consumer_limits: crate::group::consumer::ConsumerLimits {
                    session_timeout_ms: config.group_consumer_session_timeout_ms,
                    heartbeat_interval_ms: config.group_consumer_heartbeat_interval_ms,
                    max_members: config.group_max_size,
                },
                max_groups: config.groups_max,
                offset_metadata_max_bytes: config.offset_metadata_max_bytes,
                offsets_retention_ms: config.offsets_retention_ms,
                offsets_retention_check_interval: Duration::from_millis(
                    config.offsets_retention_check_interval_ms,
                ),
            },
        );
        let broker = Arc::new(Broker {
            groups,
            config,
            store,
            meta,
            log,
            indexes: IndexCache::new(10_000),
            membership,
            blocks,
            registry: RwLock::new(Registry::default()),
            admin: tokio::sync::Mutex::new(()),
        });
        let topics = broker.meta.list_topics().await?;
        info!(topics = topics.len(), session, "recovering partitions");
        for record in topics {
            let topic = broker.open_topic(&record).await?;
            broker.insert(topic);
        }
        broker.spawn_wal_gc();
        broker.spawn_orphan_collector();
        Ok(broker)
    }

    fn spawn_wal_gc(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let every = Duration::from_millis(self.config.wal_gc_interval_ms);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(b) = weak.upgrade() else { return };
                match crate::wal::collect_garbage(b.store.as_ref(), b.meta.as_ref()).await {
                    Ok(0) => {}
                    Ok(n) => info!(
                        objects = n,
                        "deleted write-ahead objects covered by segments"
                    ),
                    Err(e) => warn!(error = %e, "write-ahead garbage collection failed"),
                }
            }
        });
    }

    fn spawn_orphan_collector(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let every = Duration::from_millis(self.config.orphan_check_interval_ms);
        let grace = Duration::from_millis(self.config.orphan_grace_ms);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(b) = weak.upgrade() else { return };
                let now = crate::clock::now_ms();
                match crate::orphans::collect(b.store.as_ref(), b.meta.as_ref(), grace, now).await {
                    Ok(0) => {}
                    Ok(n) => info!(objects = n, "deleted orphaned objects"),
                    Err(e) => warn!(error = %e, "orphan collection failed"),
                }
            }
        });
    }

    async fn open_topic(&self, record: &TopicRecord) -> anyhow::Result<Topic> {
        let config = TopicConfig::resolve(&self.config.values, &record.configs);
        let name: Arc<str> = Arc::from(record.name.as_str());
        let partitions = self
            .start_partitions(record.id, &name, 0..record.partitions, &config)
            .await?;
        Ok(Topic {
            name,
            id: record.id,
            overrides: record.configs.clone(),
            config,
            partitions,
        })
    }

    /// Claims and recovers partitions, several at once (each may download its
    /// write-ahead tail), returning their handles in partition order.
    async fn start_partitions(
        &self,
        topic_id: Uuid,
        name: &Arc<str>,
        range: std::ops::Range<i32>,
        config: &TopicConfig,
    ) -> anyhow::Result<Vec<PartitionHandle>> {
        use futures::{StreamExt, TryStreamExt};
        futures::stream::iter(range)
            .map(|p| {
                let key = PartitionKey {
                    topic_id,
                    partition: p,
                };
                let (ctx, name, config) = (self.log.clone(), name.clone(), config.clone());
                async move {
                    partition::start(ctx, name, key, config)
                        .await
                        .map(|(h, _task)| h)
                }
            })
            .buffered(RECOVERY_CONCURRENCY)
            .try_collect()
            .await
    }

    fn insert(&self, topic: Topic) {
        let topic = Arc::new(topic);
        let mut reg = self.registry.write().expect("registry lock poisoned");
        reg.by_name.insert(topic.name.clone(), topic.clone());
        reg.by_id.insert(topic.id, topic);
    }

    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.registry
            .read()
            .expect("registry lock poisoned")
            .by_name
            .get(name)
            .cloned()
    }

    pub fn topic_by_id(&self, id: &Uuid) -> Option<Arc<Topic>> {
        self.registry
            .read()
            .expect("registry lock poisoned")
            .by_id
            .get(id)
            .cloned()
    }

    pub fn topics(&self) -> Vec<Arc<Topic>> {
        let mut v: Vec<_> = self
            .registry
            .read()
            .expect("registry lock poisoned")
            .by_name
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn partition(&self, topic: &str, partition: i32) -> Option<PartitionHandle> {
        self.topic(topic)?.partition(partition).cloned()
    }

    /// Validates and creates a topic. `partitions`: -1 means `num.partitions`.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        configs: BTreeMap<String, String>,
        validate_only: bool,
    ) -> Result<Arc<Topic>, TopicError> {
        validate_topic_name(name)?;
        let partitions = if partitions == -1 {
            self.config.num_partitions
        } else {
            partitions
        };
        if !(1..=MAX_PARTITIONS).contains(&partitions) {
            return Err(TopicError::InvalidPartitions(format!(
                "partition count must be between 1 and {MAX_PARTITIONS}, got {partitions}"
            )));
        }
        for (k, v) in &configs {
            TopicConfig::validate(k, v)?;
        }
        let _guard = self.admin.lock().await;
        if let Some(t) = self.topic(name) {
            return if validate_only {
                Ok(t)
            } else {
                Err(TopicError::Exists)
            };
        }
        let record = TopicRecord {
            name: name.to_string(),
            id: Uuid::new_v4(),
            partitions,
            configs,
            created_ms: now_ms(),
        };
        if validate_only {
            let config = TopicConfig::resolve(&self.config.values, &record.configs);
            return Ok(Arc::new(Topic {
                name: Arc::from(name),
                id: record.id,
                overrides: record.configs,
                config,
                partitions: Vec::new(),
            }));
        }
        match self.meta.create_topic(&record).await {
            Ok(()) => {}
            Err(MetaError::TopicExists) => return Err(TopicError::Exists),
            Err(e) => return Err(e.into()),
        }
        let topic = self
            .open_topic(&record)
            .await
            .map_err(|e| TopicError::Internal(format!("starting partitions: {e:#}")))?;
        info!(topic = name, partitions, id = %record.id, "topic created");
        self.insert(topic);
        self.topic(name).ok_or(TopicError::NotFound)
    }

    /// Auto-creation on Metadata/Produce when `auto.create.topics.enable` allows it.
    pub async fn auto_create(&self, name: &str) -> Result<Arc<Topic>, TopicError> {
        match self.create_topic(name, -1, BTreeMap::new(), false).await {
            Err(TopicError::Exists) => self.topic(name).ok_or(TopicError::NotFound),
            other => other,
        }
    }

    pub async fn delete_topic(&self, name: &str) -> Result<Uuid, TopicError> {
        let _guard = self.admin.lock().await;
        let record = match self.meta.delete_topic(name).await {
            Ok(r) => r,
            Err(MetaError::TopicNotFound) => return Err(TopicError::NotFound),
            Err(e) => return Err(e.into()),
        };
        let removed = {
            let mut reg = self.registry.write().expect("registry lock poisoned");
            reg.by_id.remove(&record.id);
            reg.by_name.remove(name)
        };
        if let Some(topic) = removed {
            for p in &topic.partitions {
                let _ = p.cmd.send(PartitionCmd::Stop).await;
                let dir = self
                    .log
                    .cache_dir
                    .join(format!("{}-{}", record.id, p.partition));
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        // Groups' committed offsets for the topic go with it, so a topic re-created under
        // the same name starts with no committed position (as in Kafka).
        let partitions: Vec<(String, i32)> = (0..record.partitions)
            .map(|p| (name.to_string(), p))
            .collect();
        for group in self.meta.offset_groups().await.unwrap_or_default() {
            if let Err(e) = self.meta.delete_offsets(&group, Some(&partitions)).await {
                warn!(group, topic = name, error = %e, "could not delete a deleted topic's committed offsets");
            }
        }
        // Segment objects go now; write-ahead objects when no other range needs them.
        let store = self.store.clone();
        let id = record.id;
        let count = record.partitions;
        tokio::spawn(async move {
            for p in 0..count {
                let prefix = tiering::keys::stream_prefix(&format!("{id}/{p}"));
                if let Err(e) = store.delete_prefix(&prefix).await {
                    warn!(topic_id = %id, error = %e, "could not delete a deleted topic's segments");
                }
            }
        });
        info!(topic = name, id = %record.id, "topic deleted");
        Ok(record.id)
    }

    /// Grows a topic to `count` partitions.
    pub async fn create_partitions(
        &self,
        name: &str,
        count: i32,
        validate_only: bool,
    ) -> Result<(), TopicError> {
        let _guard = self.admin.lock().await;
        let topic = self.topic(name).ok_or(TopicError::NotFound)?;
        let current = topic.partitions.len() as i32;
        if count <= current {
            return Err(TopicError::InvalidPartitions(format!(
                "topic has {current} partitions; the new count must be larger, got {count}"
            )));
        }
        if count > MAX_PARTITIONS {
            return Err(TopicError::InvalidPartitions(format!(
                "at most {MAX_PARTITIONS} partitions"
            )));
        }
        if validate_only {
            return Ok(());
        }
        self.meta.set_partition_count(name, count).await?;
        let mut partitions = topic.partitions.clone();
        let added = self
            .start_partitions(topic.id, &topic.name, current..count, &topic.config)
            .await
            .map_err(|e| TopicError::Internal(format!("starting partitions: {e:#}")))?;
        partitions.extend(added);
        self.insert(Topic {
            name: topic.name.clone(),
            id: topic.id,
            overrides: topic.overrides.clone(),
            config: topic.config.clone(),
            partitions,
        });
        Ok(())
    }

    /// Replaces a topic's overrides and tells its partitions.
    pub async fn set_topic_configs(
        &self,
        name: &str,
        overrides: BTreeMap<String, String>,
        validate_only: bool,
    ) -> Result<(), TopicError> {
        for (k, v) in &overrides {
            TopicConfig::validate(k, v)?;
        }
        if validate_only {
            return Ok(());
        }
        let _guard = self.admin.lock().await;
        let topic = self.topic(name).ok_or(TopicError::NotFound)?;
        self.meta.set_topic_configs(name, &overrides).await?;
        let config = TopicConfig::resolve(&self.config.values, &overrides);
        for p in &topic.partitions {
            let _ = p.cmd.send(PartitionCmd::Configure(config.clone())).await;
        }
        self.insert(Topic {
            name: topic.name.clone(),
            id: topic.id,
            overrides,
            config,
            partitions: topic.partitions.clone(),
        });
        Ok(())
    }
}

/// Partitions claimed and recovered at once.
const RECOVERY_CONCURRENCY: usize = 16;

/// Upper bound on partitions per topic (each is a task, a file and metadata rows).
pub const MAX_PARTITIONS: i32 = 10_000;

/// Kafka's topic name rules: 1..=249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), TopicError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > 249 || !ok_chars || name == "." || name == ".." {
        return Err(TopicError::InvalidTopic(format!(
            "topic name {name:?} must be 1 to 249 characters of [a-zA-Z0-9._-] and not '.' or '..'"
        )));
    }
    Ok(())
}

impl Broker {
    /// Stops the partition owners after letting batches already handed to the flusher
    /// commit (new requests stopped arriving when the listener closed).
    pub async fn shutdown(&self) {
        let grace = Duration::from_millis(self.config.wal_flush_interval_ms * 2 + 100);
        tokio::time::sleep(grace).await;
        for t in &self.topics() {
            for p in &t.partitions {
                let _ = p.cmd.send(PartitionCmd::Stop).await;
            }
        }
        self.membership.leave().await;
        self.blocks.close().await;
    }
}
