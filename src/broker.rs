//! The broker: the wiring of its components (object store, metadata store, block
//! cache, flusher, group coordinator, membership, the topic registry and the
//! controller) and the periodic loops that only observe (disk, store health, garbage).
//!
//! What the broker serves changes in one place, the controller task
//! (`crate::controller`); request handlers read the registry (`crate::registry`) and
//! reach the controller through its handle.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, Semaphore};
use tracing::{info, warn};
use uuid::Uuid;

use crate::config::Config;
use crate::controller::{Controller, ControllerHandle};
use crate::log::partition::{LogContext, PartitionHandle};
use crate::log::read::IndexCache;
use crate::metadata::MetadataStore;
use crate::ownership::Ownership;
pub use crate::registry::Topic;
use crate::registry::{stop_task, TopicRegistry};
use crate::wal::{Flusher, FlusherConfig};

pub use crate::registry::{serve, validate_topic_name, TopicError};

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
    /// The topics and the partition tasks this broker runs (handlers only read it).
    pub registry: Arc<TopicRegistry>,
    /// The one task that changes what this broker serves: topic admin, ownership.
    pub controller: ControllerHandle,
    /// Whether this broker reaches its stores, and whether it stepped down for lack of one.
    health: std::sync::Mutex<crate::health::Health>,
    /// Every background task, cancelled and awaited at shutdown.
    tasks: Arc<crate::tasks::Tasks>,
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
        let meta = crate::metadata::open(
            &config.metadata_url,
            &store,
            Duration::from_millis(config.metadata_request_timeout_ms),
        )
        .await?;
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
        let (controller, requests) = ControllerHandle::new(config.controller_queue_length);
        let registry = Arc::new(TopicRegistry::default());
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
            registry,
            controller,
            health: std::sync::Mutex::new(health),
            tasks,
        });
        let controller = Controller {
            config: broker.config.clone(),
            store: broker.store.clone(),
            meta: broker.meta.clone(),
            log: broker.log.clone(),
            membership: broker.membership.clone(),
            ownership: broker.ownership.clone(),
            groups: broker.groups.clone(),
            registry: broker.registry.clone(),
        };
        crate::controller::first_pass(&controller).await?;
        info!(
            session,
            topics = broker.topics().len(),
            partitions = broker.local_partition_count(),
            "partitions recovered"
        );
        broker.tasks.spawn(crate::controller::run(
            controller,
            requests,
            broker.tasks.cancelled(),
        ));
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
                        b.controller.step_down(object, metadata).await
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

    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.registry.topic(name)
    }

    pub fn topic_by_id(&self, id: &Uuid) -> Option<Arc<Topic>> {
        self.registry.topic_by_id(id)
    }

    /// Every topic, by name.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.registry.topics()
    }

    /// This broker's task for a partition, if it runs one.
    pub fn local_partition(&self, topic: &str, partition: i32) -> Option<PartitionHandle> {
        let topic = self.topic(topic)?;
        let slot = topic.partitions.get(usize::try_from(partition).ok()?)?;
        slot.get()
    }

    /// Partition tasks this broker runs.
    pub fn local_partition_count(&self) -> usize {
        self.registry.local_partition_count()
    }
}

impl Broker {
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
        let controller = self.controller.depth();
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
            ("controller", controller.0, controller.1),
        ]
    }
}
