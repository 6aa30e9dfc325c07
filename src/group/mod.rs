//! The group coordinator: one task per consumer group, each owning its group's state
//! machine ([`classic::Group`]); committed offsets live in the metadata store.
//!
//! A broker coordinates the groups whose coordinator slot it holds (see `ownership`);
//! requests for other groups get NOT_COORDINATOR, and every offset commit is
//! conditional on the slot's epoch. Membership is memory only: when a slot changes
//! hands (or the broker restarts) members simply rejoin at the new coordinator, while
//! committed offsets survive in the metadata store.

pub(crate) mod classic;
pub(crate) mod consumer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::ResponseError;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::clock::now_ms;
use crate::metadata::{CommittedOffset, MetaError, MetadataStore, TxnOffsetRecord};
use crate::ownership::Ownership;
use classic::{Event, Group, GroupLimits, GroupState, JoinResult, Reply, SyncResult};
use consumer::{ConsumerGroup, ConsumerLimits, Heartbeat, HeartbeatReply};

/// Settings of the coordinator.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CoordinatorConfig {
    pub limits: GroupLimits,
    pub consumer_limits: ConsumerLimits,
    pub max_groups: usize,
    pub offset_metadata_max_bytes: usize,
    pub offsets_retention_ms: i64,
    pub offsets_retention_check_interval: Duration,
    /// Requests queued for one group's task (`group.queue.length`).
    pub queue_length: usize,
}

/// A snapshot for DescribeGroups and ListGroups.
#[derive(Debug, Clone)]
pub(crate) struct GroupSummary {
    /// "classic" or "consumer" (KIP-848).
    pub group_type: &'static str,
    /// Kafka's state name for the group's type.
    pub state_name: &'static str,
    pub protocol_type: String,
    pub protocol_name: String,
    /// (member id, instance id, client id, client host, metadata, assignment)
    pub members: Vec<MemberSummary>,
}

#[derive(Debug, Clone)]
pub(crate) struct MemberSummary {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub metadata: Bytes,
    pub assignment: Bytes,
}

/// Why a commit was refused as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitError {
    Group(ResponseError),
    Store(ResponseError),
}

enum GroupCmd {
    Event(Event, oneshot::Sender<Reply>),
    Commit {
        member_id: String,
        instance_id: Option<String>,
        generation: i32,
        offsets: Vec<CommittedOffset>,
        /// TxnOffsetCommit: the producer whose transaction the offsets belong to.
        producer_id: Option<i64>,
        reply: oneshot::Sender<Result<(), CommitError>>,
    },
    Describe(oneshot::Sender<GroupSummary>),
    /// OffsetFetch v9: is this member of a consumer-protocol group at this epoch?
    CheckMemberEpoch {
        member_id: String,
        epoch: i32,
        reply: oneshot::Sender<Result<(), ResponseError>>,
    },
    ConsumerHeartbeat(Box<Heartbeat>, oneshot::Sender<HeartbeatReply>),
    ConsumerDescribe(oneshot::Sender<Option<ConsumerGroup>>),
    /// Deletes the group if it has no members; the task then ends.
    Delete(oneshot::Sender<Result<(), ResponseError>>),
}

#[derive(Debug)]
pub(crate) struct Coordinator {
    groups: Mutex<HashMap<String, mpsc::Sender<GroupCmd>>>,
    meta: Arc<dyn MetadataStore>,
    ownership: Arc<Ownership>,
    pub config: CoordinatorConfig,
    tokens: AtomicU64,
    /// Where the group tasks and the expiry loop are registered.
    tasks: Arc<crate::tasks::Tasks>,
}

impl std::fmt::Debug for GroupCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupCmd")
    }
}

impl Coordinator {
    pub(crate) fn new(
        meta: Arc<dyn MetadataStore>,
        ownership: Arc<Ownership>,
        config: CoordinatorConfig,
        tasks: Arc<crate::tasks::Tasks>,
    ) -> Arc<Coordinator> {
        let c = Arc::new(Coordinator {
            groups: Mutex::new(HashMap::new()),
            meta,
            ownership,
            config,
            tokens: AtomicU64::new(1),
            tasks,
        });
        c.spawn_offset_expiry();
        c
    }

    /// NOT_COORDINATOR unless this broker holds the group's coordinator slot.
    pub(crate) fn check_coordinator(&self, group_id: &str) -> Result<(), ResponseError> {
        match self.ownership.group_fence(group_id) {
            Some(_) => Ok(()),
            None => Err(ResponseError::NotCoordinator),
        }
    }

    /// Ends the tasks of the groups `gone` selects (their coordinator slot moved away):
    /// their members get NOT_COORDINATOR and rejoin at the new coordinator.
    pub(crate) fn evict(&self, gone: impl Fn(&str) -> bool) -> usize {
        let mut groups = self.groups.lock().expect("groups lock poisoned");
        let before = groups.len();
        groups.retain(|id, _| !gone(id));
        before - groups.len()
    }

    pub(crate) fn token(&self) -> u64 {
        self.tokens.fetch_add(1, Ordering::Relaxed)
    }

    fn handle(
        &self,
        group_id: &str,
        create: bool,
    ) -> Result<Option<mpsc::Sender<GroupCmd>>, ResponseError> {
        self.check_coordinator(group_id)?;
        let mut groups = self.groups.lock().expect("groups lock poisoned");
        // Again under the lock: a slot released in between has already evicted its
        // groups, and a task made now would outlive it.
        self.check_coordinator(group_id)?;
        if let Some(tx) = groups.get(group_id).filter(|tx| !tx.is_closed()) {
            return Ok(Some(tx.clone()));
        }
        if !create {
            return Ok(None);
        }
        if groups.len() >= self.config.max_groups {
            groups.retain(|_, tx| !tx.is_closed());
            if groups.len() >= self.config.max_groups {
                return Err(ResponseError::CoordinatorNotAvailable);
            }
        }
        let (tx, rx) = mpsc::channel(self.config.queue_length);
        let group = Group::new(group_id, self.config.limits);
        let consumer = ConsumerGroup::new(self.config.consumer_limits);
        let cancelled = self.tasks.cancelled();
        let (self_meta, self_ownership) = (self.meta.clone(), self.ownership.clone());
        self.tasks.spawn(async move {
            tokio::select! {
                _ = cancelled => {}
                _ = run_group(group, consumer, rx, self_meta, self_ownership) => {}
            }
        });
        groups.insert(group_id.to_string(), tx.clone());
        Ok(Some(tx))
    }

    /// Requests waiting in the fullest group queue (at most `group.queue.length`).
    pub(crate) fn queue_depth_max(&self) -> usize {
        self.groups
            .lock()
            .expect("groups lock poisoned")
            .values()
            .map(|tx| tx.max_capacity() - tx.capacity())
            .max()
            .unwrap_or(0)
    }

    /// Sends a join/sync/heartbeat/leave event and waits for its reply.
    pub(crate) async fn request(
        &self,
        group_id: &str,
        event: Event,
    ) -> Result<Reply, ResponseError> {
        let tx = self
            .handle(group_id, true)?
            .ok_or(ResponseError::CoordinatorNotAvailable)?;
        let (reply, rx) = oneshot::channel();
        tx.send(GroupCmd::Event(event, reply))
            .await
            .map_err(|_| ResponseError::CoordinatorNotAvailable)?;
        rx.await.map_err(|_| ResponseError::CoordinatorNotAvailable)
    }

    /// Validates membership and stores offsets, serialized with the group's other events.
    /// OffsetCommit, or with `producer_id` TxnOffsetCommit: the offsets are stored
    /// pending until the producer's transaction commits. A transactional commit that
    /// names no member (generation below 0) is not checked against the group, as in
    /// Kafka.
    pub(crate) async fn commit(
        &self,
        group_id: &str,
        member_id: String,
        instance_id: Option<String>,
        generation: i32,
        offsets: Vec<CommittedOffset>,
        producer_id: Option<i64>,
    ) -> Result<(), CommitError> {
        let tx = self
            .handle(group_id, true)
            .map_err(CommitError::Group)?
            .ok_or(CommitError::Group(ResponseError::CoordinatorNotAvailable))?;
        let (reply, rx) = oneshot::channel();
        let cmd = GroupCmd::Commit {
            member_id,
            instance_id,
            generation,
            offsets,
            producer_id,
            reply,
        };
        tx.send(cmd)
            .await
            .map_err(|_| CommitError::Group(ResponseError::CoordinatorNotAvailable))?;
        rx.await
            .map_err(|_| CommitError::Group(ResponseError::CoordinatorNotAvailable))?
    }

    /// A KIP-848 ConsumerGroupHeartbeat.
    pub(crate) async fn consumer_heartbeat(
        &self,
        group_id: &str,
        hb: Heartbeat,
    ) -> Result<HeartbeatReply, ResponseError> {
        let tx = self
            .handle(group_id, true)?
            .ok_or(ResponseError::CoordinatorNotAvailable)?;
        let (reply, rx) = oneshot::channel();
        tx.send(GroupCmd::ConsumerHeartbeat(Box::new(hb), reply))
            .await
            .map_err(|_| ResponseError::CoordinatorNotAvailable)?;
        rx.await.map_err(|_| ResponseError::CoordinatorNotAvailable)
    }

    /// OffsetFetch v9 from a member: refuses a stale or unknown member epoch of a
    /// consumer-protocol group (a group with no task has nothing to check).
    pub(crate) async fn check_member_epoch(
        &self,
        group_id: &str,
        member_id: &str,
        epoch: i32,
    ) -> Result<(), ResponseError> {
        let Some(tx) = self.handle(group_id, false)? else {
            return Ok(());
        };
        let (reply, rx) = oneshot::channel();
        let cmd = GroupCmd::CheckMemberEpoch {
            member_id: member_id.to_string(),
            epoch,
            reply,
        };
        if tx.send(cmd).await.is_err() {
            return Ok(());
        }
        rx.await.unwrap_or(Ok(()))
    }

    /// The KIP-848 group's state, if the group is one.
    pub(crate) async fn consumer_describe(&self, group_id: &str) -> Option<ConsumerGroup> {
        let tx = self.handle(group_id, false).ok()??;
        let (reply, rx) = oneshot::channel();
        tx.send(GroupCmd::ConsumerDescribe(reply)).await.ok()?;
        rx.await.ok()?
    }

    /// The group's live state, or `None` when no task runs for it.
    pub(crate) async fn describe(&self, group_id: &str) -> Option<GroupSummary> {
        let tx = self.handle(group_id, false).ok()??;
        let (reply, rx) = oneshot::channel();
        tx.send(GroupCmd::Describe(reply)).await.ok()?;
        rx.await.ok()
    }

    pub(crate) fn live_groups(&self) -> Vec<String> {
        let groups = self.groups.lock().expect("groups lock poisoned");
        let mut v: Vec<String> = groups
            .iter()
            .filter(|(_, tx)| !tx.is_closed())
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    /// Deletes a group with no members, and its committed offsets.
    pub(crate) async fn delete(&self, group_id: &str) -> Result<(), ResponseError> {
        let live = self.handle(group_id, false)?;
        if let Some(tx) = live {
            let (reply, rx) = oneshot::channel();
            if tx.send(GroupCmd::Delete(reply)).await.is_ok() {
                rx.await
                    .map_err(|_| ResponseError::CoordinatorNotAvailable)??;
            }
            self.groups
                .lock()
                .expect("groups lock poisoned")
                .remove(group_id);
            self.delete_offsets(group_id, None).await?;
            return Ok(());
        }
        match self.delete_offsets(group_id, None).await? {
            0 => Err(ResponseError::GroupIdNotFound),
            _ => Ok(()),
        }
    }

    /// Deletes committed offsets of a group this broker coordinates, under its lease on
    /// the group's slot: NOT_COORDINATOR once another broker coordinates it.
    pub(crate) async fn delete_offsets(
        &self,
        group_id: &str,
        partitions: Option<&[(String, i32)]>,
    ) -> Result<usize, ResponseError> {
        let fence = self
            .ownership
            .group_fence(group_id)
            .ok_or(ResponseError::NotCoordinator)?;
        match self
            .meta
            .delete_offsets(group_id, partitions, Some(fence))
            .await
        {
            Ok(n) => Ok(n),
            Err(MetaError::Fenced(_)) => Err(ResponseError::NotCoordinator),
            Err(_) => Err(ResponseError::CoordinatorNotAvailable),
        }
    }

    /// Offset retention: offsets of groups without members expire
    /// `offsets.retention.minutes` after their last commit.
    fn spawn_offset_expiry(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let every = self.config.offsets_retention_check_interval;
        self.tasks.spawn_every(every, move || {
            let weak = weak.clone();
            async move {
                let Some(c) = weak.upgrade() else {
                    return false;
                };
                c.expire_idle_offsets().await;
                true
            }
        });
    }

    /// Expires the committed offsets of this coordinator's groups that have no members
    /// and were last committed more than `offsets.retention.minutes` ago.
    async fn expire_idle_offsets(&self) {
        let c = self;
        let Ok(groups) = c.meta.offset_groups().await else {
            return;
        };
        let mut idle = Vec::new();
        // Each coordinator expires the offsets of its own groups, and only once it
        // has held their slot long enough for live members to have rejoined (a
        // group's members are in the memory of the coordinator they joined).
        let settled = Duration::from_millis(c.config.limits.max_session_timeout_ms.max(0) as u64);
        let own = |g: &String| {
            c.ownership
                .group_held_for(g)
                .is_some_and(|held| held >= settled)
        };
        for g in groups.into_iter().filter(own) {
            let active = match c.describe(&g).await {
                Some(s) => !s.members.is_empty(),
                None => false,
            };
            if !active {
                idle.push(g);
            }
        }
        let before_ms = now_ms() - c.config.offsets_retention_ms;
        for group in idle {
            // Under the lease on the group's slot: a coordinator that lost it expires
            // nothing of a group its successor may be serving.
            let Some(fence) = c.ownership.group_fence(&group) else {
                continue;
            };
            let groups = std::slice::from_ref(&group);
            match c.meta.expire_offsets(groups, before_ms, Some(fence)).await {
                Ok(0) => {}
                Ok(n) => info!(
                    group,
                    offsets = n,
                    "expired committed offsets past offsets.retention.minutes"
                ),
                Err(MetaError::Fenced(_)) => {
                    debug!(
                        group,
                        "offset expiry fenced: another broker coordinates the group"
                    )
                }
                Err(e) => warn!(group, error = %e, "offset expiry failed"),
            }
        }
    }
}

/// Which protocol a group speaks; a group without members may switch.
enum Kind {
    Classic,
    Consumer,
}

async fn run_group(
    mut group: Group,
    mut consumer: ConsumerGroup,
    mut rx: mpsc::Receiver<GroupCmd>,
    meta: Arc<dyn MetadataStore>,
    ownership: Arc<Ownership>,
) {
    let mut kind = Kind::Classic;
    let mut waiters: HashMap<u64, oneshot::Sender<Reply>> = HashMap::new();
    let rebalances = crate::metrics::metrics()
        .group_rebalances
        .with_label_values(&[group.id.as_str()]);
    loop {
        // A new generation (classic) or group epoch (consumer protocol) is a rebalance.
        let generations = (group.generation, consumer.epoch);
        let deadline = match kind {
            Kind::Classic => group.next_deadline(),
            Kind::Consumer => consumer.next_deadline(),
        };
        let sleep = match deadline {
            Some(d) => Duration::from_millis((d - now_ms()).max(0) as u64),
            None => Duration::from_secs(3600),
        };
        let replies = tokio::select! {
            cmd = rx.recv() => match cmd {
                None => break,
                Some(GroupCmd::Event(event, reply)) => {
                    if matches!(kind, Kind::Consumer) && consumer.members.is_empty() {
                        kind = Kind::Classic;
                    }
                    match kind {
                        Kind::Classic => {
                            waiters.insert(event_token(&event), reply);
                            group.handle(event, now_ms())
                        }
                        Kind::Consumer => {
                            // The group speaks the consumer protocol: classic members cannot join.
                            let _ = reply.send(refusal(&event, ResponseError::InconsistentGroupProtocol));
                            Vec::new()
                        }
                    }
                }
                Some(GroupCmd::ConsumerHeartbeat(hb, reply)) => {
                    if matches!(kind, Kind::Classic) && group.members.is_empty() {
                        kind = Kind::Consumer;
                    }
                    let answer = match kind {
                        Kind::Consumer => consumer.heartbeat(*hb, now_ms()),
                        Kind::Classic => HeartbeatReply {
                            error: Some((ResponseError::GroupIdNotFound, "the group uses the classic protocol")),
                            member_id: hb.member_id.clone(),
                            member_epoch: -1,
                            heartbeat_interval_ms: 0,
                            assignment: None,
                        },
                    };
                    let _ = reply.send(answer);
                    Vec::new()
                }
                Some(GroupCmd::ConsumerDescribe(reply)) => {
                    let _ = reply.send(matches!(kind, Kind::Consumer).then(|| consumer.clone()));
                    Vec::new()
                }
                Some(GroupCmd::Commit { member_id, instance_id, generation, offsets, producer_id, reply }) => {
                    let unchecked = producer_id.is_some() && member_id.is_empty() && generation < 0;
                    let valid = match kind {
                        _ if unchecked => Ok(()),
                        Kind::Classic => group.validate_commit(&member_id, instance_id.as_deref(), generation),
                        Kind::Consumer => consumer.validate_commit(&member_id, generation),
                    };
                    let fence = ownership.group_fence(&group.id);
                    let stored = |fence| {
                        let meta = meta.clone();
                        let group = group.id.clone();
                        let offsets = offsets.clone();
                        async move {
                            match producer_id {
                                None => meta.commit_offsets(&group, &offsets, fence).await,
                                Some(producer_id) => {
                                    let pending: Vec<TxnOffsetRecord> = offsets
                                        .into_iter()
                                        .map(|offset| TxnOffsetRecord { producer_id, offset })
                                        .collect();
                                    meta.commit_txn_offsets(&group, &pending, fence).await
                                }
                            }
                        }
                    };
                    let result = match (valid, fence) {
                        (Err(e), _) => Err(CommitError::Group(e)),
                        (Ok(()), None) => Err(CommitError::Group(ResponseError::NotCoordinator)),
                        (Ok(()), fence) => match stored(fence).await {
                            Ok(()) => Ok(()),
                            Err(MetaError::Fenced(_)) => {
                                warn!(group = %group.id, "offset commit fenced: another broker coordinates the group now");
                                Err(CommitError::Group(ResponseError::NotCoordinator))
                            }
                            Err(e) => {
                                warn!(group = %group.id, error = %e, "offset commit failed");
                                Err(CommitError::Store(ResponseError::CoordinatorNotAvailable))
                            }
                        },
                    };
                    let _ = reply.send(result);
                    Vec::new()
                }
                Some(GroupCmd::CheckMemberEpoch { member_id, epoch, reply }) => {
                    let _ = reply.send(match kind {
                        Kind::Consumer => consumer.validate_commit(&member_id, epoch),
                        // Classic groups have no member epochs: nothing to check.
                        Kind::Classic => Ok(()),
                    });
                    Vec::new()
                }
                Some(GroupCmd::Describe(reply)) => {
                    let _ = reply.send(match kind {
                        Kind::Classic => summary(&group),
                        Kind::Consumer => consumer_summary(&consumer),
                    });
                    Vec::new()
                }
                Some(GroupCmd::Delete(reply)) => {
                    if group.members.is_empty() && consumer.members.is_empty() {
                        group.state = GroupState::Dead;
                        let _ = reply.send(Ok(()));
                        debug!(group = %group.id, "group deleted");
                        return;
                    }
                    let _ = reply.send(Err(ResponseError::NonEmptyGroup));
                    Vec::new()
                }
            },
            _ = crate::clock::sleep(sleep) => match kind {
                Kind::Classic => group.handle(Event::Tick, now_ms()),
                Kind::Consumer => {
                    consumer.tick(now_ms());
                    Vec::new()
                }
            },
        };
        if (group.generation, consumer.epoch) != generations {
            rebalances.inc();
        }
        for (token, reply) in replies {
            if let Some(w) = waiters.remove(&token) {
                let _ = w.send(reply);
            }
        }
        // Requests whose caller gave up (connection closed) free their slot.
        waiters.retain(|_, w| !w.is_closed());
    }
}

/// The error answer to a classic request the group cannot take.
fn refusal(event: &Event, error: ResponseError) -> Reply {
    match event {
        Event::Join(j) => Reply::Join(JoinResult {
            error: Some(error),
            generation: -1,
            protocol_type: None,
            protocol_name: None,
            leader: String::new(),
            member_id: j.member_id.clone(),
            members: Vec::new(),
            skip_assignment: false,
        }),
        Event::Sync(_) => Reply::Sync(SyncResult {
            error: Some(error),
            protocol_type: None,
            protocol_name: None,
            assignment: bytes::Bytes::new(),
        }),
        Event::Heartbeat { .. } | Event::Tick => Reply::Heartbeat(Some(error)),
        Event::Leave { members, .. } => Reply::Leave(
            members
                .iter()
                .map(|(m, i)| (m.clone(), i.clone(), Some(error)))
                .collect(),
        ),
    }
}

fn consumer_summary(g: &ConsumerGroup) -> GroupSummary {
    GroupSummary {
        group_type: "consumer",
        state_name: g.state(),
        protocol_type: "consumer".to_string(),
        protocol_name: g.assignor.name().to_string(),
        members: g
            .members
            .values()
            .map(|m| MemberSummary {
                member_id: m.member_id.clone(),
                instance_id: m.instance_id.clone(),
                client_id: m.client_id.clone(),
                client_host: m.client_host.clone(),
                metadata: Bytes::new(),
                assignment: Bytes::new(),
            })
            .collect(),
    }
}

fn event_token(e: &Event) -> u64 {
    match e {
        Event::Join(j) => j.token,
        Event::Sync(s) => s.token,
        Event::Heartbeat { token, .. } | Event::Leave { token, .. } => *token,
        Event::Tick => 0,
    }
}

fn summary(g: &Group) -> GroupSummary {
    let protocol = g.protocol_name.clone().unwrap_or_default();
    GroupSummary {
        group_type: "classic",
        state_name: g.state.name(),
        protocol_type: g.protocol_type.clone().unwrap_or_default(),
        protocol_name: protocol.clone(),
        members: g
            .members
            .values()
            .map(|m| MemberSummary {
                member_id: m.member_id.clone(),
                instance_id: m.instance_id.clone(),
                client_id: m.client_id.clone(),
                client_host: m.client_host.clone(),
                metadata: m
                    .protocols
                    .iter()
                    .find(|(n, _)| *n == protocol)
                    .map(|(_, b)| b.clone())
                    .unwrap_or_default(),
                assignment: m.assignment.clone(),
            })
            .collect(),
    }
}
