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
use tokio::sync::Semaphore;
use tracing::{info, warn};
use uuid::Uuid;

use crate::config::Config;
use crate::controller::{Controller, ControllerHandle};
use crate::log::partition::{LogContext, PartitionHandle};
use crate::log::read::IndexCache;
use crate::metadata::MetadataStore;
use crate::ownership::Ownership;
pub(crate) use crate::registry::Topic;
use crate::registry::{stop_task, TopicRegistry};
use crate::wal::{Flusher, FlusherConfig};

pub(crate) use crate::registry::{serve, validate_topic_name, TopicError};

#[derive(Debug)]
pub(crate) struct Broker {
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
    /// The transaction coordinator of the transactional ids whose slots it holds.
    pub txns: Arc<crate::txn::TxnCoordinator>,
    /// The topics and the partition tasks this broker runs (handlers only read it).
    pub registry: Arc<TopicRegistry>,
    /// The one task that changes what this broker serves: topic admin, ownership.
    pub controller: ControllerHandle,
    /// Whether this broker reaches its stores, and whether it stepped down for lack of one.
    health: crate::health::StoreWatch,
    /// Every background task, cancelled and awaited at shutdown.
    tasks: Arc<crate::tasks::Tasks>,
}

/// The parts a broker runs on: its object store, metadata store and block cache.
/// [`Components::open`] opens them from the settings; tests and the simulation build
/// their own (a fault-injecting object store, a metadata store in it) and hand them to
/// [`Broker::start`]. Time and random ids come from the one seam, `crate::clock`,
/// which a paused test runtime controls.
#[derive(Debug)]
pub(crate) struct Components {
    pub store: Arc<tiering::Store>,
    pub meta: Arc<dyn MetadataStore>,
    pub blocks: Arc<tiering::BlockCache>,
}

impl Components {
    /// Opens the object store named by the settings (checking that it supports
    /// create-only writes), the block cache over it and the metadata store.
    pub(crate) async fn open(config: &Config) -> anyhow::Result<Components> {
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
        // SQLite fsyncs its commits unless the objects they name are not fsynced either
        // (a `file://` store with `object-store.fsync=false`): syncing one without the
        // other buys no guarantee, only a second fsync per flush.
        let local_objects = config.object_store_url.starts_with("file://");
        let sqlite_synced = config.object_store.fsync || !local_objects;
        let meta = crate::metadata::open(
            &config.metadata_url,
            &store,
            Duration::from_millis(config.metadata_request_timeout_ms),
            config.metadata_bucket_queue_length,
            sqlite_synced,
        )
        .await?;
        Ok(Components {
            store,
            meta,
            blocks,
        })
    }
}

impl Broker {
    /// Joins the cluster on the given components, starts the flusher, and claims and
    /// recovers this broker's share of the partitions and coordinator slots.
    pub(crate) async fn start(
        config: Config,
        components: Components,
    ) -> anyhow::Result<Arc<Broker>> {
        if config.metrics_partition_labels {
            crate::metrics::metrics().enable_partition_labels();
        }
        let Components {
            store,
            meta,
            blocks,
        } = components;
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
        let (flush_tx, flush_rx) = crate::wal::FlushQueue::new(
            config.wal_flush_queue_length,
            config.wal_flush_queue_bytes,
        );
        let flusher = Flusher::new(
            FlusherConfig {
                broker_id: config.broker_id,
                session,
                interval: Duration::from_millis(config.wal_flush_interval_ms),
                min_gap: config.wal_flush_min_gap,
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
            compaction_permits: Arc::new(Semaphore::new(config.log_cleaner_threads)),
            cleaner: crate::log::partition::CleanerSettings {
                map_bytes: config.log_cleaner_dedupe_buffer_size / config.log_cleaner_threads,
                backoff: Duration::from_millis(config.log_cleaner_backoff_ms),
                delete_delay: Duration::from_millis(config.file_delete_delay_ms),
                batch_limit: config.batch_decompressed_max_bytes,
                throttle: Arc::new(crate::log::compact::throttle::Throttle::new(
                    config.log_cleaner_io_max_bytes_per_second,
                )),
            },
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
        let indexes = IndexCache::new(config.index_cache_entries);
        let (controller, requests) = ControllerHandle::new(config.controller_queue_length);
        let health = crate::health::StoreWatch::new(
            Duration::from_millis(config.store_unreachable_timeout_ms),
            Duration::from_millis(config.ownership_hold_down_ms),
            store.clone(),
            membership.clone(),
            controller.clone(),
        );
        let registry = Arc::new(TopicRegistry::default());
        let txn_config = crate::txn::TxnConfig {
            max_timeout_ms: config.transaction_max_timeout_ms,
            id_expiration_ms: config.transactional_id_expiration_ms,
            max_open: config.transaction_max_open,
        };
        let broker = Arc::new_cyclic(|weak| Broker {
            txns: crate::txn::TxnCoordinator::new(
                meta.clone(),
                ownership.clone(),
                txn_config,
                Arc::new(BrokerMarkers {
                    broker: weak.clone(),
                }),
                tasks.clone(),
            ),
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
            health,
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
        broker.spawn_txn_timeouts();
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

    /// Aborts transactions open past their timeout and forgets idle transactional ids
    /// (`transaction.abort.timed.out.transaction.cleanup.interval.ms`), and drops the
    /// ids of slots given up.
    fn spawn_txn_timeouts(self: &Arc<Self>) {
        let every = Duration::from_millis(
            self.config
                .transaction_abort_timed_out_transaction_cleanup_interval_ms,
        );
        self.spawn_every(every, |b| async move {
            b.txns.drop_unheld().await;
            b.txns.check_timeouts().await;
        });
    }

    /// Once a second: whether the stores still answer, and stepping down or back.
    fn spawn_health_check(self: &Arc<Self>) {
        self.spawn_every(
            self.health.period(),
            |b| async move { b.health.check().await },
        );
    }

    /// Whether this broker has stepped down for lack of a store; `Some(reason)` if so.
    pub(crate) fn stepped_down(&self) -> Option<&'static str> {
        self.health.stepped_down()
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

    pub(crate) fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.registry.topic(name)
    }

    pub(crate) fn topic_by_id(&self, id: &Uuid) -> Option<Arc<Topic>> {
        self.registry.topic_by_id(id)
    }

    /// Every topic, by name.
    pub(crate) fn topics(&self) -> Vec<Arc<Topic>> {
        self.registry.topics()
    }

    /// This broker's task for a partition, if it runs one.
    pub(crate) fn local_partition(&self, topic: &str, partition: i32) -> Option<PartitionHandle> {
        let topic = self.topic(topic)?;
        let slot = topic.partitions.get(usize::try_from(partition).ok()?)?;
        slot.get()
    }

    /// Partition tasks this broker runs.
    pub(crate) fn local_partition_count(&self) -> usize {
        self.registry.local_partition_count()
    }
}

impl Broker {
    /// Graceful shutdown, second half (the listener is closed): stops what is left,
    /// deregisters and closes the cache.
    pub(crate) async fn shutdown(&self) {
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
    pub(crate) fn queue_depths(&self) -> Vec<(&'static str, usize, usize)> {
        let (flush_batches, flush_bytes) = self.log.flusher.depth();
        let controller = self.controller.depth();
        let partitions = self
            .topics()
            .iter()
            .flat_map(|t| t.local_partitions())
            .map(|p| p.cmd.max_capacity() - p.cmd.capacity())
            .max()
            .unwrap_or(0);
        let mut depths = vec![
            ("wal_flush", flush_batches.0, flush_batches.1),
            ("wal_flush_bytes", flush_bytes.0, flush_bytes.1),
            ("partition", partitions, self.config.partition_queue_length),
            (
                "group",
                self.groups.queue_depth_max(),
                self.config.group_queue_length,
            ),
            ("controller", controller.0, controller.1),
        ];
        if let Some((depth, capacity)) = self.meta.queue_depth() {
            depths.push(("metadata_bucket", depth, capacity));
        }
        depths
    }
}

#[cfg(test)]
mod tests {
    //! Whole brokers on injected components: an in-memory object store that fails or
    //! stalls on demand, with the metadata kept in it (`bucket://`).

    use std::collections::BTreeMap;

    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{ProduceRequest, TopicName};
    use kafka_protocol::protocol::StrBytes;
    use tiering::faults::{FaultyStore, PutFault};

    use super::*;
    use crate::metadata::bucket::BucketStore;
    use crate::metadata::instrumented::Instrumented;

    /// A broker on `bucket`, its cache in memory only, with `settings` over the defaults.
    async fn broker_on(
        bucket: &Arc<FaultyStore>,
        dir: &std::path::Path,
        settings: &[(&str, &str)],
    ) -> Arc<Broker> {
        let mut given = BTreeMap::from([
            ("data-dir".to_owned(), dir.display().to_string()),
            ("cache.disk.bytes".to_owned(), "0".to_owned()),
            ("broker-id".to_owned(), "1".to_owned()),
        ]);
        given.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = Config::from_values(given).expect("settings");
        let store = Arc::new(tiering::Store::new(
            bucket.clone(),
            "faulty".into(),
            &config.object_store,
        ));
        let blocks = tiering::BlockCache::open(store.clone(), &config.cache, None)
            .await
            .expect("block cache");
        let meta = Arc::new(Instrumented::new(
            Arc::new(BucketStore::open(store.clone()).await.expect("metadata")),
            Duration::from_millis(config.metadata_request_timeout_ms),
        ));
        Broker::start(
            config,
            Components {
                store,
                meta,
                blocks,
            },
        )
        .await
        .expect("broker starts")
    }

    /// One acks=all batch of `count` records to partition 0 of `topic`: (error, base offset).
    async fn produce(broker: &Arc<Broker>, topic: &str, count: i32) -> (i16, i64) {
        let batch = crate::log::batch::tests::make_batch(count, -1, -1, -1, crate::clock::now_ms());
        let request = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_owned())))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(0)
                    .with_records(Some(batch))])]);
        let response =
            crate::handlers::produce::produce(broker, request, 9, crate::clock::instant(), None)
                .await
                .expect("acks=all answers");
        let partition = &response.responses[0].partition_responses[0];
        (partition.error_code, partition.base_offset)
    }

    /// A write-ahead object the store refuses is never acknowledged and takes no
    /// offsets: once the store takes writes again, the next batch starts at 0.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_the_injected_store_refuses_is_not_acknowledged() {
        let dir = tempfile::tempdir().expect("temp dir");
        let bucket = Arc::new(FaultyStore::new());
        let broker = broker_on(&bucket, dir.path(), &[("wal.flush.timeout.ms", "300")]).await;
        broker
            .controller
            .create_topic("t", 1, BTreeMap::new(), false)
            .await
            .expect("topic created");
        bucket.fail_always(Some(PutFault::Fail { retriable: true }));
        let (error, _) = produce(&broker, "t", 3).await;
        assert_ne!(
            error, 0,
            "a batch whose object was never written was acknowledged"
        );
        bucket.fail_always(None);
        assert_eq!(produce(&broker, "t", 2).await, (0, 0));
        assert_eq!(produce(&broker, "t", 1).await, (0, 2));
        broker.shutdown().await;
    }

    /// Stepping down does not wait behind a controller job stuck on a store that does
    /// not answer: the job is dropped (its caller hears that the controller stopped),
    /// and the controller serves the next request once the store answers again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stepping_down_drops_a_controller_job_stuck_on_the_store() {
        let dir = tempfile::tempdir().expect("temp dir");
        let bucket = Arc::new(FaultyStore::new());
        // Nothing gives up on the stalled write by itself within the test.
        let long = [
            ("metadata.request.timeout.ms", "600000"),
            ("object-store.request.timeout.ms", "600000"),
            ("object-store.retry.timeout.ms", "600000"),
            // Shutdown waits at most this for tasks still stuck on stalled writes.
            ("wal.flush.timeout.ms", "1000"),
        ];
        let broker = broker_on(&bucket, dir.path(), &long).await;
        bucket.fail_always(Some(PutFault::Stall { land: false }));
        let stuck = {
            let controller = broker.controller.clone();
            tokio::spawn(async move {
                controller
                    .create_topic("stuck", 1, BTreeMap::new(), false)
                    .await
            })
        };
        // The controller runs the request, which waits on the stalled metadata write.
        while bucket.stalled() == 0 {
            crate::clock::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !stuck.is_finished(),
            "the create should be stuck on the store"
        );
        tokio::time::timeout(
            Duration::from_secs(30),
            broker.controller.step_down(false, true),
        )
        .await
        .expect("the step-down did not wait for the stuck job");
        let answer = tokio::time::timeout(Duration::from_secs(30), stuck)
            .await
            .expect("the dropped job's caller was answered")
            .expect("task");
        assert!(
            matches!(answer, Err(TopicError::Internal(_))),
            "unexpected answer {answer:?}"
        );
        // The bucket store's writer gives up on the stalled write after its own
        // deadline; then the next request goes through.
        bucket.fail_always(None);
        broker
            .controller
            .create_topic("next", 1, BTreeMap::new(), false)
            .await
            .expect("the controller serves again");
        broker.shutdown().await;
    }
}

/// Why a marker was not written to a partition of this broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MarkerWriteError {
    /// This broker does not serve the partition (or the topic is unknown here).
    NotServed(kafka_protocol::ResponseError),
    /// The owner task refused or could not commit it.
    Refused(crate::log::partition::AppendError),
}

impl Broker {
    /// Writes a transaction marker to a partition this broker owns, answered once it is
    /// committed.
    pub(crate) async fn write_marker(
        &self,
        topic: &str,
        partition: i32,
        marker: crate::log::marker::Marker,
    ) -> Result<(), MarkerWriteError> {
        use crate::log::partition::{AppendError, PartitionCmd};
        let handle =
            serve(self.topic(topic).as_ref(), partition).map_err(MarkerWriteError::NotServed)?;
        let (reply, rx) = tokio::sync::oneshot::channel();
        handle
            .cmd
            .send(PartitionCmd::WriteMarker { marker, reply })
            .await
            .map_err(|_| MarkerWriteError::Refused(AppendError::NotLeader))?;
        match rx.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(MarkerWriteError::Refused(e)),
            Err(_) => Err(MarkerWriteError::Refused(AppendError::NotLeader)),
        }
    }
}

/// The broker's [`crate::txn::MarkerWriter`]: the owner task when this broker owns the
/// partition, the owning broker otherwise (a weak reference: the broker owns its
/// coordinator).
#[derive(Debug)]
struct BrokerMarkers {
    broker: std::sync::Weak<Broker>,
}

#[async_trait::async_trait]
impl crate::txn::MarkerWriter for BrokerMarkers {
    async fn write(
        &self,
        topic: &str,
        partition: i32,
        marker: crate::log::marker::Marker,
    ) -> crate::txn::MarkerOutcome {
        use crate::log::partition::AppendError;
        use crate::txn::MarkerOutcome;
        let Some(broker) = self.broker.upgrade() else {
            return MarkerOutcome::Retry("the broker is stopping".into());
        };
        let Some(t) = broker.topic(topic) else {
            return MarkerOutcome::Skip("the topic no longer exists".into());
        };
        if partition < 0 || partition >= t.partition_count() {
            return MarkerOutcome::Skip("the partition no longer exists".into());
        }
        if t.partition(partition).is_ok() {
            return match broker.write_marker(topic, partition, marker).await {
                Ok(()) => MarkerOutcome::Written,
                Err(MarkerWriteError::Refused(e @ AppendError::Marker(_))) => {
                    MarkerOutcome::Skip(e.to_string())
                }
                Err(e) => MarkerOutcome::Retry(format!("{e:?}")),
            };
        }
        let live = broker.membership.live();
        let Some(owner) = broker
            .ownership
            .leader(&live, &t.key(partition))
            .broker_id
            .filter(|id| *id != broker.config.broker_id)
            .and_then(|id| live.iter().find(|b| b.broker_id == id))
        else {
            return MarkerOutcome::Retry("the partition has no owner now".into());
        };
        let addr = format!("{}:{}", owner.host, owner.port);
        crate::markers::outcome(crate::markers::write_remote(&addr, topic, partition, marker).await)
    }
}
