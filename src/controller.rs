//! The controller: the one task that changes what this broker serves. It owns topic
//! administration (create, delete, grow, reconfigure, auto-create), the registry's
//! writes, ownership passes (claims, hand-offs, step-downs; on its own ticker every
//! `ownership.check.interval.ms`), the graceful hand-off and stepping down for lack of a
//! store.
//!
//! Everyone else asks through [`ControllerHandle`]: a bounded queue
//! (`controller.queue.length`) and a reply per request. Running one request at a time
//! is what makes the registry and the claims consistent without locks: a topic is
//! never created halfway through an ownership pass, and no request handler ever runs a
//! pass inline (it waits for the controller's answer instead).

use std::collections::BTreeMap;

use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::clock::now_ms;
use crate::config::{Config, TopicConfig, MAX_PARTITIONS};
use crate::log::partition::{self, PartitionCmd};
use crate::metadata::{MetaError, PartitionKey, TopicRecord};
use crate::ownership::{Action, Held, PlanInput, COORDINATOR_TOPIC};
use crate::registry::{
    stop_task, validate_topic_name, PartitionSlot, Topic, TopicError, TopicRegistry,
};

type Reply<T> = oneshot::Sender<T>;

/// The controller's queues, as the task reads them: requests in order, and stepping
/// down, which goes first.
pub(crate) struct Requests {
    requests: mpsc::Receiver<Request>,
    urgent: mpsc::Receiver<StepDown>,
}

/// A step-down: (object store unreachable, metadata store unreachable, reply).
type StepDown = (bool, bool, Reply<()>);

/// A request to the controller.
enum Request {
    CreateTopic {
        name: String,
        partitions: i32,
        configs: BTreeMap<String, String>,
        validate_only: bool,
        reply: Reply<Result<Arc<Topic>, TopicError>>,
    },
    AutoCreate {
        name: String,
        reply: Reply<Result<Arc<Topic>, TopicError>>,
    },
    DeleteTopic {
        name: String,
        reply: Reply<Result<Uuid, TopicError>>,
    },
    CreatePartitions {
        name: String,
        count: i32,
        validate_only: bool,
        reply: Reply<Result<(), TopicError>>,
    },
    SetTopicConfigs {
        name: String,
        overrides: BTreeMap<String, String>,
        validate_only: bool,
        reply: Reply<Result<(), TopicError>>,
    },
    HandOff {
        reply: Reply<()>,
    },
}

/// How the rest of the broker reaches the controller.
#[derive(Debug, Clone)]
pub(crate) struct ControllerHandle {
    tx: mpsc::Sender<Request>,
    urgent: mpsc::Sender<StepDown>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("controller request")
    }
}

fn stopped() -> TopicError {
    TopicError::Internal("the controller has stopped (shutting down)".into())
}

impl ControllerHandle {
    /// A handle and the queue the controller task reads.
    pub(crate) fn new(capacity: usize) -> (ControllerHandle, Requests) {
        let (tx, requests) = mpsc::channel(capacity.max(1));
        let (urgent_tx, urgent) = mpsc::channel(1);
        (
            ControllerHandle {
                tx,
                urgent: urgent_tx,
            },
            Requests { requests, urgent },
        )
    }

    /// Requests waiting, against the queue's capacity.
    pub(crate) fn depth(&self) -> (usize, usize) {
        (
            self.tx.max_capacity() - self.tx.capacity(),
            self.tx.max_capacity(),
        )
    }

    async fn call<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(request(reply)).await.ok()?;
        answer.await.ok()
    }

    /// A topic request; a controller that stopped answers as an internal error.
    async fn topic_call<T>(
        &self,
        request: impl FnOnce(Reply<Result<T, TopicError>>) -> Request,
    ) -> Result<T, TopicError> {
        self.call(request).await.unwrap_or_else(|| Err(stopped()))
    }

    /// Validates and creates a topic (`partitions` -1: `num.partitions`) and claims
    /// this broker's share of it.
    pub(crate) async fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        configs: BTreeMap<String, String>,
        validate_only: bool,
    ) -> Result<Arc<Topic>, TopicError> {
        let name = name.to_owned();
        self.topic_call(|reply| Request::CreateTopic {
            name,
            partitions,
            configs,
            validate_only,
            reply,
        })
        .await
    }

    /// Auto-creation on Metadata/Produce; a topic another broker just made is picked
    /// up from the metadata store.
    pub(crate) async fn auto_create(&self, name: &str) -> Result<Arc<Topic>, TopicError> {
        let name = name.to_owned();
        self.topic_call(|reply| Request::AutoCreate { name, reply })
            .await
    }

    pub(crate) async fn delete_topic(&self, name: &str) -> Result<Uuid, TopicError> {
        let name = name.to_owned();
        self.topic_call(|reply| Request::DeleteTopic { name, reply })
            .await
    }

    /// Grows a topic to `count` partitions.
    pub(crate) async fn create_partitions(
        &self,
        name: &str,
        count: i32,
        validate_only: bool,
    ) -> Result<(), TopicError> {
        let name = name.to_owned();
        self.topic_call(|reply| Request::CreatePartitions {
            name,
            count,
            validate_only,
            reply,
        })
        .await
    }

    /// Replaces a topic's overrides and tells its partitions.
    pub(crate) async fn set_topic_configs(
        &self,
        name: &str,
        overrides: BTreeMap<String, String>,
        validate_only: bool,
    ) -> Result<(), TopicError> {
        let name = name.to_owned();
        self.topic_call(|reply| Request::SetTopicConfigs {
            name,
            overrides,
            validate_only,
            reply,
        })
        .await
    }

    /// Registers as draining and hands every partition and coordinator slot off.
    pub(crate) async fn hand_off(&self) {
        self.call(|reply| Request::HandOff { reply }).await;
    }

    /// Gives up everything at once for lack of a store.
    pub(crate) async fn step_down(&self, object: bool, metadata: bool) {
        let (reply, answer) = oneshot::channel();
        if self.urgent.send((object, metadata, reply)).await.is_ok() {
            let _ = answer.await;
        }
    }
}

/// What the controller works with: the components it changes or consults.
#[derive(Debug)]
pub(crate) struct Controller {
    pub config: Config,
    pub store: Arc<tiering::Store>,
    pub meta: Arc<dyn crate::metadata::MetadataStore>,
    pub log: Arc<crate::log::partition::LogContext>,
    pub membership: Arc<crate::membership::Membership>,
    pub ownership: Arc<crate::ownership::Ownership>,
    pub groups: Arc<crate::group::Coordinator>,
    pub registry: Arc<TopicRegistry>,
}

/// The controller task: requests one at a time, and an ownership pass on every tick.
pub(crate) async fn run(
    broker: Controller,
    Requests {
        mut requests,
        mut urgent,
    }: Requests,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut tick = crate::clock::interval(Duration::from_millis(
        broker.config.ownership_check_interval_ms,
    ));
    // The first pass ran at start-up.
    tick.reset();
    // The job running now (a request or a pass), one at a time. Stepping down for lack
    // of a store does not wait behind it: a job stuck on the store that cannot be
    // reached is dropped (whatever it did not finish, the next pass redoes; a request
    // dropped this way is answered as if the controller had stopped).
    let mut job: Option<futures::future::BoxFuture<'_, ()>> = None;
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => return,
            Some((object, metadata, reply)) = urgent.recv() => {
                if job.take().is_some() {
                    warn!("stepping down: the job in progress is abandoned");
                }
                broker.run_step_down(object, metadata).await;
                let _ = reply.send(());
            }
            () = async { job.as_mut().expect("guarded").await }, if job.is_some() => job = None,
            request = requests.recv(), if job.is_none() => match request {
                Some(request) => job = Some(Box::pin(broker.serve_request(request))),
                None => return,
            },
            _ = tick.tick(), if job.is_none() => {
                job = Some(Box::pin(async {
                    if let Err(e) = broker.run_pass().await {
                        warn!(error = %e, "ownership pass failed; retrying");
                    }
                }));
            }
        }
    }
}

/// Start-up, before the task runs: the coordinator slots' topic exists and this
/// broker has claimed and recovered its share.
pub(crate) async fn first_pass(broker: &Controller) -> anyhow::Result<()> {
    broker.ensure_coordinator_topic().await?;
    broker.run_pass().await.context("claiming partitions")
}

/// A registry entry for a topic record, keeping the slots (and so the running partition
/// tasks) of `previous`, the entry it replaces.
fn topic_entry(config: &Config, record: &TopicRecord, previous: Option<&Topic>) -> Topic {
    let mut partitions: Vec<Arc<PartitionSlot>> =
        previous.map_or_else(Vec::new, |t| t.partitions.clone());
    partitions.resize_with(record.partitions.max(0) as usize, Default::default);
    Topic {
        name: Arc::from(record.name.as_str()),
        id: record.id,
        overrides: record.configs.clone(),
        config: TopicConfig::resolve(&config.values, &record.configs),
        partitions,
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

impl Controller {
    fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.registry.topic(name)
    }

    fn topic_by_id(&self, id: &Uuid) -> Option<Arc<Topic>> {
        self.registry.topic_by_id(id)
    }

    fn topics(&self) -> Vec<Arc<Topic>> {
        self.registry.topics()
    }

    fn local_partition_count(&self) -> usize {
        self.registry.local_partition_count()
    }

    async fn serve_request(&self, request: Request) {
        match request {
            Request::CreateTopic {
                name,
                partitions,
                configs,
                validate_only,
                reply,
            } => {
                let _ = reply.send(
                    self.run_create_topic(&name, partitions, configs, validate_only)
                        .await,
                );
            }
            Request::AutoCreate { name, reply } => {
                let _ = reply.send(self.run_auto_create(&name).await);
            }
            Request::DeleteTopic { name, reply } => {
                let _ = reply.send(self.run_delete_topic(&name).await);
            }
            Request::CreatePartitions {
                name,
                count,
                validate_only,
                reply,
            } => {
                let _ = reply.send(
                    self.run_create_partitions(&name, count, validate_only)
                        .await,
                );
            }
            Request::SetTopicConfigs {
                name,
                overrides,
                validate_only,
                reply,
            } => {
                let _ = reply.send(
                    self.run_set_topic_configs(&name, overrides, validate_only)
                        .await,
                );
            }
            Request::HandOff { reply } => {
                self.run_hand_off().await;
                let _ = reply.send(());
            }
        }
    }

    /// Creates the coordinator slots' internal topic if no broker has yet.
    /// Gives up every partition and coordinator slot at once because a store cannot
    /// be reached: registers as draining (so no one hands anything back), stops the
    /// partition tasks (their waiting producers are told to retry elsewhere; batches in
    /// flight were never acknowledged) and releases what it held, so brokers that reach
    /// the stores claim it on their next pass (or after the lease, when the metadata
    /// store is the one cut off).
    async fn run_step_down(&self, object: bool, metadata: bool) {
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

    /// Validates and creates a topic. `partitions`: -1 means `num.partitions`.
    async fn run_create_topic(
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
        if let Some(t) = self.topic(name) {
            return if validate_only {
                Ok(t)
            } else {
                Err(TopicError::Exists)
            };
        }
        let record = TopicRecord {
            name: name.to_string(),
            id: crate::clock::unique_id(),
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
        self.registry
            .insert(topic_entry(&self.config, &record, None));
        // Claim this broker's share now; the others pick the topic up on their next pass.
        if let Err(e) = self.run_pass().await {
            warn!(topic = name, error = %e, "could not claim the new topic's partitions yet; the next pass will");
        }
        self.topic(name).ok_or(TopicError::NotFound)
    }

    /// Auto-creation on Metadata/Produce when `auto.create.topics.enable` allows it.
    /// A topic another broker just made is picked up from the metadata store.
    async fn run_auto_create(&self, name: &str) -> Result<Arc<Topic>, TopicError> {
        match self
            .run_create_topic(name, -1, BTreeMap::new(), false)
            .await
        {
            Err(TopicError::Exists) => {
                if self.topic(name).is_none() {
                    if let Err(e) = self.run_pass().await {
                        warn!(topic = name, error = %e, "could not read the topic from the metadata store");
                    }
                }
                self.topic(name).ok_or(TopicError::NotFound)
            }
            other => other,
        }
    }

    async fn run_delete_topic(&self, name: &str) -> Result<Uuid, TopicError> {
        refuse_internal(name)?;
        let record = match self.meta.delete_topic(name).await {
            Ok(r) => r,
            Err(MetaError::TopicNotFound) => return Err(TopicError::NotFound),
            Err(e) => return Err(e.into()),
        };
        let removed = self.registry.remove(&record.id);
        if let Some(topic) = removed {
            self.stop_partitions(&topic).await;
        }
        // Groups' committed offsets for the topic go with it, so a topic re-created under
        // the same name starts with no committed position (as in Kafka).
        let partitions: Vec<(String, i32)> = (0..record.partitions)
            .map(|p| (name.to_string(), p))
            .collect();
        for group in self.meta.offset_groups().await.unwrap_or_default() {
            if let Err(e) = self
                .meta
                .delete_offsets(&group, Some(&partitions), None)
                .await
            {
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
    async fn run_create_partitions(
        &self,
        name: &str,
        count: i32,
        validate_only: bool,
    ) -> Result<(), TopicError> {
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
        self.registry
            .insert(topic_entry(&self.config, &record, Some(&topic)));
        if let Err(e) = self.run_pass().await {
            warn!(topic = name, error = %e, "could not claim the new partitions yet; the next pass will");
        }
        Ok(())
    }

    /// Replaces a topic's overrides and tells its partitions.
    async fn run_set_topic_configs(
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
        let topic = self.topic(name).ok_or(TopicError::NotFound)?;
        self.meta.set_topic_configs(name, &overrides).await?;
        let config = TopicConfig::resolve(&self.config.values, &overrides);
        for p in topic.local_partitions() {
            let _ = p.cmd.send(PartitionCmd::Configure(config.clone())).await;
        }
        self.registry.insert(Topic {
            name: topic.name.clone(),
            id: topic.id,
            overrides,
            config,
            partitions: topic.partitions.clone(),
        });
        Ok(())
    }

    /// Graceful shutdown, first half: registers as draining and hands every partition
    /// and coordinator slot off while the listener still answers, so in-flight produces
    /// complete and clients are redirected to the new owners.
    async fn run_hand_off(&self) {
        if let Err(e) = self.membership.drain().await {
            warn!(error = %e, "could not register as draining; handing off anyway");
        }
        if let Err(e) = self.run_pass().await {
            warn!(error = %e, "hand-off pass failed; the partitions move when the lease expires");
        }
    }

    /// Creates the coordinator slots' internal topic if no broker has yet.
    async fn ensure_coordinator_topic(&self) -> anyhow::Result<()> {
        let record = TopicRecord {
            name: COORDINATOR_TOPIC.to_owned(),
            id: crate::clock::unique_id(),
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
            let entry = topic_entry(&self.config, record, current.as_deref());
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
            self.registry.insert(entry);
        }
        gone.extend(
            self.topics()
                .into_iter()
                .filter(|t| !records.iter().any(|r| r.id == t.id)),
        );
        for topic in gone {
            self.registry.remove(&topic.id);
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
    async fn run_pass(&self) -> Result<(), MetaError> {
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
}
