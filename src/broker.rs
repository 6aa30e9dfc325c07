//! The broker: its components (object store, metadata store, flusher) and the topic
//! registry that maps topic names and ids to their partitions' owner tasks.
//!
//! The registry is a cache of the metadata store's topics (re-read every ownership
//! pass, so topics made through another broker appear here too) plus the handles of
//! the partition tasks this broker runs; the metadata store stays the source of truth.
//! `reconcile` applies the ownership plan: it starts the partitions and takes the
//! coordinator slots assigned to this broker, and hands off or gives up the others.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::clock::now_ms;
use crate::config::{Config, TopicConfig, MAX_PARTITIONS};
use crate::log::partition::{self, LogContext, PartitionCmd, PartitionHandle};
use crate::log::read::IndexCache;
use crate::metadata::{MetaError, MetadataStore, PartitionKey, TopicRecord};
use crate::ownership::{Action, Held, Ownership, PlanInput, COORDINATOR_TOPIC};
use crate::wal::{Flusher, FlusherConfig};
use kafka_protocol::ResponseError;

/// One partition as this broker sees it: the owner task's handle while this broker
/// owns the partition, nothing otherwise.
#[derive(Debug, Default)]
pub struct PartitionSlot(RwLock<Option<PartitionHandle>>);

impl PartitionSlot {
    /// The local owner task, if any (serving, handing off, or fenced).
    pub fn get(&self) -> Option<PartitionHandle> {
        self.0.read().expect("partition slot lock poisoned").clone()
    }

    fn set(&self, handle: Option<PartitionHandle>) -> Option<PartitionHandle> {
        std::mem::replace(
            &mut *self.0.write().expect("partition slot lock poisoned"),
            handle,
        )
    }
}

/// A topic of the cluster; this broker serves the partitions whose slot holds a task.
#[derive(Debug)]
pub struct Topic {
    pub name: Arc<str>,
    pub id: Uuid,
    /// Topic-level overrides (Kafka names).
    pub overrides: BTreeMap<String, String>,
    pub config: TopicConfig,
    pub partitions: Vec<Arc<PartitionSlot>>,
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
    /// Reads of other brokers' partitions for clients in this broker's zone.
    pub zone_reads: crate::log::zone::ZoneReads,
    /// This broker's registration and the live brokers clients are told about.
    pub membership: Arc<crate::membership::Membership>,
    /// Who owns which partition and coordinator slot.
    pub ownership: Arc<Ownership>,
    /// Object-store blocks in memory and on local disk, for reads of sealed segments.
    pub blocks: Arc<tiering::BlockCache>,
    pub groups: Arc<crate::group::Coordinator>,
    registry: RwLock<Registry>,
    /// Serializes topic creation and deletion, and the registry's sync with the store.
    admin: tokio::sync::Mutex<()>,
    /// One ownership pass at a time.
    reconciling: tokio::sync::Mutex<()>,
    /// Whether this broker reaches its stores, and whether it stepped down for lack of one.
    health: std::sync::Mutex<crate::health::Health>,
    /// Every background task, cancelled and awaited at shutdown.
    tasks: Arc<crate::tasks::Tasks>,
}

impl Topic {
    pub fn partition_count(&self) -> i32 {
        self.partitions.len() as i32
    }

    pub fn key(&self, index: i32) -> PartitionKey {
        PartitionKey {
            topic_id: self.id,
            partition: index,
        }
    }

    /// The partition's owner task if this broker leads it now: UNKNOWN_TOPIC_OR_PARTITION
    /// for an index the topic lacks, NOT_LEADER_OR_FOLLOWER when another broker owns it
    /// (or this one is handing it off).
    pub fn partition(&self, index: i32) -> Result<PartitionHandle, ResponseError> {
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| self.partitions.get(i))
            .ok_or(ResponseError::UnknownTopicOrPartition)?;
        match slot.get() {
            Some(h) if h.shared.is_serving() => Ok(h),
            _ => Err(ResponseError::NotLeaderOrFollower),
        }
    }

    /// Every partition task this broker runs for the topic.
    pub fn local_partitions(&self) -> Vec<PartitionHandle> {
        self.partitions.iter().filter_map(|s| s.get()).collect()
    }
}

/// The partition of an optional topic (a missing topic is UNKNOWN_TOPIC_OR_PARTITION).
pub fn serve(topic: Option<&Arc<Topic>>, index: i32) -> Result<PartitionHandle, ResponseError> {
    topic
        .ok_or(ResponseError::UnknownTopicOrPartition)?
        .partition(index)
}

impl Broker {
    /// Opens the stores, joins the cluster, starts the flusher, and claims and recovers
    /// this broker's share of the partitions and coordinator slots.
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
        let disk = Arc::new(crate::disk::CacheDisk::new(
            config.data_dir.join("cache"),
            config.cache_disk_min_free_bytes,
            blocks.clone(),
        ));
        std::fs::create_dir_all(config.data_dir.join("cache"))
            .context("creating the cache directory")?;
        {
            let disk = disk.clone();
            tokio::task::spawn_blocking(move || disk.check())
                .await
                .context("checking the cache disk")?;
        }
        let meta = crate::metadata::open(&config.metadata_url, &store).await?;
        let session = meta.start_broker_session(config.broker_id).await?;
        let (host, port) = crate::config::host_port(&config.advertise);
        let membership = crate::membership::Membership::join(
            meta.clone(),
            crate::metadata::BrokerRecord {
                broker_id: config.broker_id,
                session,
                host,
                port,
                zone: config.zone.clone(),
                lease_expires_ms: 0,
                draining: false,
            },
            Duration::from_millis(config.broker_lease_ms),
        )
        .await
        .context("registering the broker")?;
        let tasks = Arc::new(crate::tasks::Tasks::new());
        membership.spawn(&tasks);
        let ownership = Arc::new(Ownership::new(membership.clone()));
        let (flush_tx, flush_rx) = mpsc::channel(config.wal_flush_queue_length);
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
        tasks.spawn(flusher.run(flush_rx, tasks.cancelled()));
        let log = Arc::new(LogContext {
            store: store.clone(),
            blocks: blocks.clone(),
            meta: meta.clone(),
            flusher: flush_tx,
            cache_dir: config.data_dir.join("cache"),
            disk,
            upload_permits: Arc::new(Semaphore::new(config.segment_upload_concurrency)),
            retention_check_interval: Duration::from_millis(config.retention_check_interval_ms),
            queue_length: config.partition_queue_length,
            broker_id: config.broker_id,
            tasks: tasks.clone(),
        });
        let groups = crate::group::Coordinator::new(
            meta.clone(),
            ownership.clone(),
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
                queue_length: config.group_queue_length,
            },
            tasks.clone(),
        );
        let zone_reads = crate::log::zone::ZoneReads::new(
            meta.clone(),
            Duration::from_millis(config.zone_reads_refresh_ms),
            config.index_cache_entries,
        );
        let health = crate::health::Health::new(
            Duration::from_millis(config.store_unreachable_timeout_ms),
            Duration::from_millis(config.ownership_hold_down_ms),
            crate::clock::instant(),
        );
        let indexes = IndexCache::new(config.index_cache_entries);
        let broker = Arc::new(Broker {
            groups,
            config,
            store,
            meta,
            log,
            indexes,
            zone_reads,
            membership,
            ownership,
            blocks,
            registry: RwLock::new(Registry::default()),
            admin: tokio::sync::Mutex::new(()),
            reconciling: tokio::sync::Mutex::new(()),
            health: std::sync::Mutex::new(health),
            tasks,
        });
        broker.ensure_coordinator_topic().await?;
        broker.reconcile().await.context("claiming partitions")?;
        info!(
            session,
            topics = broker.topics().len(),
            partitions = broker.local_partition_count(),
            "partitions recovered"
        );
        broker.spawn_ownership_loop();
        broker.spawn_disk_check();
        broker.spawn_health_check();
        broker.spawn_wal_gc();
        broker.spawn_orphan_collector();
        Ok(broker)
    }

    /// Runs `job` every `every` for as long as the broker lives (the task holds only a
    /// weak reference, so a dropped broker ends it).
    fn spawn_every<F, Fut>(self: &Arc<Self>, every: Duration, job: F)
    where
        F: Fn(Arc<Broker>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let weak = Arc::downgrade(self);
        let job = Arc::new(job);
        self.tasks.spawn_every(every, move || {
            let (weak, job) = (weak.clone(), job.clone());
            async move {
                let Some(b) = weak.upgrade() else {
                    return false;
                };
                job(b).await;
                true
            }
        });
    }

    /// Checks the cache disk's free space every `cache.disk.check.interval.ms`.
    fn spawn_disk_check(self: &Arc<Self>) {
        let every = Duration::from_millis(self.config.cache_disk_check_interval_ms);
        self.spawn_every(every, |b| async move {
            let disk = b.log.disk.clone();
            let _ = tokio::task::spawn_blocking(move || disk.check()).await;
        });
    }

    /// Once a second: whether the stores still answer (an idle object store is asked
    /// about a key that never exists), and stepping down or back accordingly.
    fn spawn_health_check(self: &Arc<Self>) {
        let deadline = Duration::from_millis(self.config.store_unreachable_timeout_ms);
        // An idle store is probed often enough to notice a cut well within the deadline.
        let probe_every = (deadline / 4).max(Duration::from_millis(100));
        self.spawn_every(
            Duration::from_secs(1).min(probe_every),
            move |b| async move {
                // Ask a store that has been quiet, so a broker that was merely idle (or
                // paused) is never taken for one cut off.
                let now = crate::clock::instant();
                let quiet =
                    |t: Option<std::time::Instant>| t.is_none_or(|t| now - t >= probe_every);
                if quiet(b.store.last_answer()) {
                    b.store.probe(probe_every).await;
                }
                if quiet(crate::metadata::instrumented::last_answer()) {
                    let _ = tokio::time::timeout(probe_every, b.membership.refresh()).await;
                }
                let observation = crate::health::Observation {
                    now: crate::clock::instant(),
                    object_answered: b.store.last_answer(),
                    metadata_answered: crate::metadata::instrumented::last_answer(),
                    others_serving: b.membership.others_serving(),
                };
                let (change, object, metadata) = {
                    let mut health = b.health.lock().expect("health lock poisoned");
                    let change = health.step(&observation);
                    (
                        change,
                        health.object_reachable(),
                        health.metadata_reachable(),
                    )
                };
                let m = crate::metrics::metrics();
                m.store_reachable
                    .with_label_values(&["object"])
                    .set(i64::from(object));
                m.store_reachable
                    .with_label_values(&["metadata"])
                    .set(i64::from(metadata));
                match change {
                    Some(crate::health::Change::StepDown { object, metadata }) => {
                        b.step_down(object, metadata).await
                    }
                    Some(crate::health::Change::Return) => {
                        m.stepped_down.set(0);
                        info!("both stores answer again: taking partitions again");
                        let back = b.membership.set_stepped_down(false);
                        if !matches!(tokio::time::timeout(probe_every, back).await, Ok(Ok(()))) {
                            warn!(
                                "could not register as serving again yet; the next heartbeat will"
                            );
                        }
                    }
                    None => {}
                }
            },
        );
    }

    /// Whether this broker has stepped down for lack of a store; `Some(reason)` if so.
    pub fn stepped_down(&self) -> Option<&'static str> {
        let health = self.health.lock().expect("health lock poisoned");
        if !health.stepped_down() {
            return None;
        }
        Some(
            match (health.object_reachable(), health.metadata_reachable()) {
                (false, _) => "stepped down: the object store is unreachable\n",
                (true, false) => "stepped down: the metadata store is unreachable\n",
                (true, true) => {
                    "stepped down: waiting out the hold-down after the stores came back\n"
                }
            },
        )
    }

    /// Gives up every partition and coordinator slot at once because a store cannot
    /// be reached: registers as draining (so no one hands anything back), stops the
    /// partition tasks (their waiting producers are told to retry elsewhere; batches in
    /// flight were never acknowledged) and releases what it held, so brokers that reach
    /// the stores claim it on their next pass (or after the lease, when the metadata
    /// store is the one cut off).
    async fn step_down(&self, object: bool, metadata: bool) {
        warn!(
            object_store_unreachable = object,
            metadata_store_unreachable = metadata,
            partitions = self.local_partition_count(),
            "cannot reach a store: stepping down from every partition and coordinator slot"
        );
        // Draining from now on in this broker's own view, so no pass claims anything.
        self.membership.mark_stepped_down(true);
        let mut held: Vec<(PartitionKey, i32)> = Vec::new();
        let mut tasks = Vec::new();
        for t in self.topics() {
            for (i, slot) in t.partitions.iter().enumerate() {
                if let Some(h) = slot.set(None) {
                    held.push((t.key(i as i32), h.shared.leader_epoch));
                    tasks.push(h);
                }
            }
        }
        // At once: a task stuck behind a store that does not answer must not hold up
        // the others.
        futures::future::join_all(tasks.iter().map(stop_task)).await;
        for (key, _) in self.ownership.held_slots() {
            if let Some(epoch) = self.ownership.drop_slot(&key) {
                self.groups
                    .evict(|g| self.ownership.group_key(g) == Some(key));
                held.push((key, epoch));
            }
        }
        let m = crate::metrics::metrics();
        m.ownership_changes
            .with_label_values(&["stepped_down"])
            .inc_by(held.len() as u64);
        for (key, epoch) in &held {
            self.ownership.note_owner(*key, *epoch, None);
        }
        m.stepped_down.set(1);
        // Bounded: the metadata store may be the one that does not answer. The flag is
        // set either way, so the next heartbeat that gets through registers as draining.
        let registered = self.membership.set_stepped_down(true);
        if !matches!(
            tokio::time::timeout(Duration::from_secs(2), registered).await,
            Ok(Ok(()))
        ) {
            warn!("could not register as draining; the lease will expire");
        }
        if metadata {
            return;
        }
        use futures::StreamExt;
        futures::stream::iter(held)
            .for_each_concurrent(
                self.config.ownership_claim_concurrency,
                |(key, epoch)| async move {
                    let release = self.meta.release_partition(key, epoch);
                    match tokio::time::timeout(Duration::from_secs(5), release).await {
                        Ok(Ok(())) | Ok(Err(MetaError::Fenced(_))) => {}
                        Ok(Err(e)) => {
                            debug!(error = %e, "could not release; it moves when the lease expires")
                        }
                        Err(_) => debug!("release timed out; it moves when the lease expires"),
                    }
                },
            )
            .await;
    }

    fn spawn_wal_gc(self: &Arc<Self>) {
        let every = Duration::from_millis(self.config.wal_gc_interval_ms);
        self.spawn_every(every, |b| async move {
            match crate::wal::collect_garbage(b.store.as_ref(), b.meta.as_ref()).await {
                Ok(0) => {}
                Ok(n) => info!(
                    objects = n,
                    "deleted write-ahead objects covered by segments"
                ),
                Err(e) => warn!(error = %e, "write-ahead garbage collection failed"),
            }
        });
    }

    fn spawn_orphan_collector(self: &Arc<Self>) {
        let every = Duration::from_millis(self.config.orphan_check_interval_ms);
        let grace = Duration::from_millis(self.config.orphan_grace_ms);
        self.spawn_every(every, move |b| async move {
            let now = crate::clock::now_ms();
            match crate::orphans::collect(b.store.as_ref(), b.meta.as_ref(), grace, now).await {
                Ok(0) => {}
                Ok(n) => info!(objects = n, "deleted orphaned objects"),
                Err(e) => warn!(error = %e, "orphan collection failed"),
            }
        });
    }

    /// A registry entry for a topic record, keeping the slots (and so the running
    /// partition tasks) of `previous`, the entry it replaces.
    fn topic_entry(&self, record: &TopicRecord, previous: Option<&Topic>) -> Topic {
        let mut partitions: Vec<Arc<PartitionSlot>> =
            previous.map_or_else(Vec::new, |t| t.partitions.clone());
        partitions.resize_with(record.partitions.max(0) as usize, Default::default);
        Topic {
            name: Arc::from(record.name.as_str()),
            id: record.id,
            overrides: record.configs.clone(),
            config: TopicConfig::resolve(&self.config.values, &record.configs),
            partitions,
        }
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

    /// This broker's task for a partition, if it runs one.
    pub fn local_partition(&self, topic: &str, partition: i32) -> Option<PartitionHandle> {
        let topic = self.topic(topic)?;
        let slot = topic.partitions.get(usize::try_from(partition).ok()?)?;
        slot.get()
    }

    /// Partition tasks this broker runs.
    pub fn local_partition_count(&self) -> usize {
        self.topics()
            .iter()
            .map(|t| t.local_partitions().len())
            .sum()
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
        refuse_internal(name)?;
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
        info!(topic = name, partitions, id = %record.id, "topic created");
        self.insert(self.topic_entry(&record, None));
        drop(_guard);
        // Claim this broker's share now; the others pick the topic up on their next pass.
        if let Err(e) = self.reconcile().await {
            warn!(topic = name, error = %e, "could not claim the new topic's partitions yet; the next pass will");
        }
        self.topic(name).ok_or(TopicError::NotFound)
    }

    /// Auto-creation on Metadata/Produce when `auto.create.topics.enable` allows it.
    /// A topic another broker just made is picked up from the metadata store.
    pub async fn auto_create(&self, name: &str) -> Result<Arc<Topic>, TopicError> {
        match self.create_topic(name, -1, BTreeMap::new(), false).await {
            Err(TopicError::Exists) => {
                if self.topic(name).is_none() {
                    if let Err(e) = self.reconcile().await {
                        warn!(topic = name, error = %e, "could not read the topic from the metadata store");
                    }
                }
                self.topic(name).ok_or(TopicError::NotFound)
            }
            other => other,
        }
    }

    pub async fn delete_topic(&self, name: &str) -> Result<Uuid, TopicError> {
        refuse_internal(name)?;
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
            self.stop_partitions(&topic).await;
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
        let record = TopicRecord {
            name: topic.name.to_string(),
            id: topic.id,
            partitions: count,
            configs: topic.overrides.clone(),
            created_ms: 0,
        };
        self.insert(self.topic_entry(&record, Some(&topic)));
        drop(_guard);
        if let Err(e) = self.reconcile().await {
            warn!(topic = name, error = %e, "could not claim the new partitions yet; the next pass will");
        }
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
        for p in topic.local_partitions() {
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

/// Stops a partition task this broker no longer owns: it takes no more writes at once,
/// and the stop itself waits at most a few seconds for room in the task's queue.
async fn stop_task(h: &PartitionHandle) {
    h.shared
        .fenced
        .store(true, std::sync::atomic::Ordering::Release);
    let stop = h.cmd.send(PartitionCmd::Stop);
    if tokio::time::timeout(Duration::from_secs(5), stop)
        .await
        .is_err()
    {
        warn!(topic = %h.topic, partition = h.partition, "partition task did not take its stop in time; it takes no writes");
    }
}

/// The coordinator slots' topic is the cluster's own: clients may neither create nor
/// delete it (Kafka refuses the same for its internal topics).
fn refuse_internal(name: &str) -> Result<(), TopicError> {
    if name == COORDINATOR_TOPIC {
        return Err(TopicError::InvalidTopic(format!(
            "{name} is an internal topic"
        )));
    }
    Ok(())
}

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
    /// Graceful shutdown, first half: registers as draining and hands every partition
    /// and coordinator slot off while the listener still answers, so in-flight produces
    /// complete and clients are redirected to the new owners.
    pub async fn hand_off(self: &Arc<Self>) {
        if let Err(e) = self.membership.drain().await {
            warn!(error = %e, "could not register as draining; handing off anyway");
        }
        if let Err(e) = self.reconcile().await {
            warn!(error = %e, "hand-off pass failed; the partitions move when the lease expires");
        }
    }

    /// Graceful shutdown, second half (the listener is closed): stops what is left,
    /// deregisters and closes the cache.
    pub async fn shutdown(&self) {
        let tasks: Vec<PartitionHandle> = self
            .topics()
            .iter()
            .flat_map(|t| t.local_partitions())
            .collect();
        futures::future::join_all(tasks.iter().map(stop_task)).await;
        // Loops end, the flusher writes and commits what it still holds, and every task
        // is awaited (bounded by the flush deadline).
        let deadline = Duration::from_millis(self.config.wal_flush_timeout_ms + 1000);
        self.tasks.shutdown(deadline).await;
        self.membership.leave().await;
        self.blocks.close().await;
    }

    /// Depths of the broker's queues against their capacities, for the scrape:
    /// (queue, depth, capacity); per-partition and per-group queues report the fullest.
    pub fn queue_depths(&self) -> Vec<(&'static str, usize, usize)> {
        let flusher = &self.log.flusher;
        let partitions = self
            .topics()
            .iter()
            .flat_map(|t| t.local_partitions())
            .map(|p| p.cmd.max_capacity() - p.cmd.capacity())
            .max()
            .unwrap_or(0);
        vec![
            (
                "wal_flush",
                flusher.max_capacity() - flusher.capacity(),
                flusher.max_capacity(),
            ),
            ("partition", partitions, self.config.partition_queue_length),
            (
                "group",
                self.groups.queue_depth_max(),
                self.config.group_queue_length,
            ),
        ]
    }

    /// Creates the coordinator slots' internal topic if no broker has yet.
    async fn ensure_coordinator_topic(&self) -> anyhow::Result<()> {
        let record = TopicRecord {
            name: COORDINATOR_TOPIC.to_owned(),
            id: Uuid::new_v4(),
            partitions: self.config.offsets_topic_num_partitions,
            configs: BTreeMap::new(),
            created_ms: now_ms(),
        };
        match self.meta.create_topic(&record).await {
            Ok(()) | Err(MetaError::TopicExists) => Ok(()),
            Err(e) => Err(e).context("creating the coordinator slots"),
        }
    }

    /// Brings the registry up to date with the metadata store's topics: topics made,
    /// grown, reconfigured or deleted through other brokers.
    async fn sync_topics(&self) -> Result<(), MetaError> {
        let _guard = self.admin.lock().await;
        let records = self.meta.list_topics().await?;
        let mut gone: Vec<Arc<Topic>> = Vec::new();
        for record in &records {
            if record.name == COORDINATOR_TOPIC {
                self.ownership.set_slot_topic(record.id, record.partitions);
                continue;
            }
            let current = self.topic_by_id(&record.id);
            let changed = current.as_ref().is_none_or(|t| {
                t.partition_count() != record.partitions || t.overrides != record.configs
            });
            if !changed {
                continue;
            }
            if current.is_none() {
                // A name reused by a new topic: the old one was deleted elsewhere.
                gone.extend(self.topic(&record.name));
            }
            let entry = self.topic_entry(record, current.as_deref());
            if current
                .as_ref()
                .is_some_and(|t| t.overrides != record.configs)
            {
                for p in entry.local_partitions() {
                    let _ = p
                        .cmd
                        .send(PartitionCmd::Configure(entry.config.clone()))
                        .await;
                }
            }
            self.insert(entry);
        }
        gone.extend(
            self.topics()
                .into_iter()
                .filter(|t| !records.iter().any(|r| r.id == t.id)),
        );
        for topic in gone {
            {
                let mut reg = self.registry.write().expect("registry lock poisoned");
                reg.by_id.remove(&topic.id);
                if reg
                    .by_name
                    .get(&topic.name)
                    .is_some_and(|t| t.id == topic.id)
                {
                    reg.by_name.remove(&topic.name);
                }
            }
            info!(topic = %topic.name, "topic deleted through another broker");
            self.stop_partitions(&topic).await;
        }
        Ok(())
    }

    /// Stops a removed topic's partition tasks and drops their local files.
    async fn stop_partitions(&self, topic: &Topic) {
        for (i, slot) in topic.partitions.iter().enumerate() {
            if let Some(p) = slot.set(None) {
                stop_task(&p).await;
            }
            let dir = self.log.cache_dir.join(format!("{}-{i}", topic.id));
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// One ownership pass: re-reads the live brokers, topics and owners, plans, and
    /// applies the plan.
    pub async fn reconcile(&self) -> Result<(), MetaError> {
        let _pass = self.reconciling.lock().await;
        self.membership.refresh().await?;
        self.sync_topics().await?;
        self.ownership
            .set_owners(self.meta.partition_owners().await?);
        let mut keys = self.ownership.slot_keys();
        let mut held = self.ownership.held_slots();
        for t in self.topics() {
            for (i, slot) in t.partitions.iter().enumerate() {
                let key = t.key(i as i32);
                keys.push(key);
                if let Some(h) = slot.get() {
                    held.insert(
                        key,
                        Held {
                            leader_epoch: h.shared.leader_epoch,
                            fenced: h.shared.is_fenced(),
                        },
                    );
                }
            }
        }
        let live = self.membership.live();
        let owners = self.ownership.owners();
        let input = PlanInput {
            me: self.config.broker_id,
            live: &live,
            owners: &owners,
            held: &held,
            patience: self.membership.lease(),
            trust_expiry: self.membership.settled(),
            now: crate::clock::instant(),
        };
        let actions = self.ownership.decide(&input, keys);
        if !actions.is_empty() {
            let count = |f: fn(&Action) -> bool| actions.iter().filter(|a| f(a)).count();
            info!(
                claim = count(|a| matches!(a, Action::Claim(_))),
                release = count(|a| matches!(a, Action::Release(_))),
                step_down = count(|a| matches!(a, Action::StepDown(_))),
                live = live.len(),
                "ownership changes"
            );
        }
        use futures::StreamExt;
        futures::stream::iter(actions)
            .for_each_concurrent(self.config.ownership_claim_concurrency, |a| self.apply(a))
            .await;
        Ok(())
    }

    async fn apply(&self, action: Action) {
        let m = crate::metrics::metrics();
        let me = self.config.broker_id;
        match action {
            Action::Claim(key) if self.ownership.is_slot(&key) => {
                match self.meta.claim_partition(key, me).await {
                    Ok(state) => {
                        self.ownership.hold_slot(key, state.leader_epoch);
                        m.ownership_changes.with_label_values(&["claimed"]).inc();
                        debug!(
                            slot = key.partition,
                            epoch = state.leader_epoch,
                            "coordinating the groups of a slot"
                        );
                    }
                    Err(e) => {
                        warn!(slot = key.partition, error = %e, "could not claim a coordinator slot")
                    }
                }
            }
            Action::Claim(key) => {
                let Some(topic) = self.topic_by_id(&key.topic_id) else {
                    return;
                };
                let Some(slot) = topic.partitions.get(key.partition as usize) else {
                    return;
                };
                match partition::start(
                    self.log.clone(),
                    topic.name.clone(),
                    key,
                    topic.config.clone(),
                )
                .await
                {
                    Ok((handle, _task)) => {
                        self.ownership
                            .note_owner(key, handle.shared.leader_epoch, Some(me));
                        if let Some(old) = slot.set(Some(handle)) {
                            stop_task(&old).await;
                        }
                        m.ownership_changes.with_label_values(&["claimed"]).inc();
                        // Deleted while it was being claimed: its slot is no longer
                        // registered, so stop the task here (nothing else would).
                        if self.topic_by_id(&key.topic_id).is_none() {
                            if let Some(h) = slot.set(None) {
                                stop_task(&h).await;
                            }
                            let dir = self
                                .log
                                .cache_dir
                                .join(format!("{}-{}", key.topic_id, key.partition));
                            let _ = std::fs::remove_dir_all(dir);
                        }
                    }
                    Err(e) => {
                        warn!(topic = %topic.name, partition = key.partition, error = %e, "could not claim a partition; the next pass retries")
                    }
                }
            }
            Action::Release(key) if self.ownership.is_slot(&key) => {
                let Some(epoch) = self.ownership.drop_slot(&key) else {
                    return;
                };
                let evicted = self
                    .groups
                    .evict(|g| self.ownership.group_key(g) == Some(key));
                match self.meta.release_partition(key, epoch).await {
                    Ok(()) | Err(MetaError::Fenced(_)) => {}
                    Err(e) => {
                        warn!(slot = key.partition, error = %e, "could not release a coordinator slot; it moves when the lease expires")
                    }
                }
                self.ownership.note_owner(key, epoch, None);
                m.ownership_changes.with_label_values(&["released"]).inc();
                debug!(
                    slot = key.partition,
                    groups = evicted,
                    "handed a coordinator slot off"
                );
            }
            Action::Release(key) => self.release_partition(key).await,
            Action::StepDown(key) if self.ownership.is_slot(&key) => {
                if self.ownership.drop_slot(&key).is_some() {
                    self.groups
                        .evict(|g| self.ownership.group_key(g) == Some(key));
                    m.ownership_changes
                        .with_label_values(&["stepped_down"])
                        .inc();
                    info!(
                        slot = key.partition,
                        "another broker coordinates this slot now; stepped down"
                    );
                }
            }
            Action::StepDown(key) => {
                let Some(topic) = self.topic_by_id(&key.topic_id) else {
                    return;
                };
                let Some(slot) = topic.partitions.get(key.partition as usize) else {
                    return;
                };
                if let Some(h) = slot.set(None) {
                    stop_task(&h).await;
                    m.ownership_changes
                        .with_label_values(&["stepped_down"])
                        .inc();
                    warn!(topic = %topic.name, partition = key.partition, epoch = h.shared.leader_epoch, "another broker owns this partition now; stepped down");
                }
            }
        }
    }

    /// Hands a partition off: no new writes, the in-flight flush commits, then the
    /// partition is released in the metadata store and its task stops.
    async fn release_partition(&self, key: PartitionKey) {
        let Some(topic) = self.topic_by_id(&key.topic_id) else {
            return;
        };
        let Some(slot) = topic.partitions.get(key.partition as usize) else {
            return;
        };
        let Some(h) = slot.get() else {
            return;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Bounded as a whole: a stuck partition must not hold up the pass.
        let wait = Duration::from_millis(self.config.wal_flush_timeout_ms + 1000);
        let released = tokio::time::timeout(wait, async {
            h.cmd.send(PartitionCmd::Release(tx)).await.is_ok() && rx.await.is_ok()
        });
        if !matches!(released.await, Ok(true)) {
            warn!(topic = %topic.name, partition = key.partition, "in-flight writes did not finish before the hand-off");
        }
        let epoch = h.shared.leader_epoch;
        match self.meta.release_partition(key, epoch).await {
            Ok(()) | Err(MetaError::Fenced(_)) | Err(MetaError::PartitionNotFound) => {}
            Err(e) => {
                warn!(topic = %topic.name, partition = key.partition, error = %e, "could not release a partition; it moves when the lease expires")
            }
        }
        slot.set(None);
        stop_task(&h).await;
        self.ownership.note_owner(key, epoch, None);
        crate::metrics::metrics()
            .ownership_changes
            .with_label_values(&["released"])
            .inc();
        info!(topic = %topic.name, partition = key.partition, epoch, "handed a partition off");
    }

    /// Runs an ownership pass every `ownership.check.interval.ms`.
    fn spawn_ownership_loop(self: &Arc<Self>) {
        let every = Duration::from_millis(self.config.ownership_check_interval_ms);
        self.spawn_every(every, |b| async move {
            if let Err(e) = b.reconcile().await {
                warn!(error = %e, "ownership pass failed; retrying");
            }
        });
    }
}
