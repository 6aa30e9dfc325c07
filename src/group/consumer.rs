//! The next-generation consumer group protocol (KIP-848) as a pure state machine:
//! ConsumerGroupHeartbeat with server-side assignment (`uniform` and `range`).
//!
//! The group has an epoch that rises whenever membership, subscriptions or the
//! subscribed topics' partition counts change; for each epoch the assignor computes a
//! target assignment. Members then reconcile towards it one heartbeat at a time: a
//! member first gives up the partitions it must revoke, and a partition is handed to its
//! new owner only once the previous owner no longer reports owning it, so no partition
//! is ever consumed by two members at once. A member's epoch reaches the group epoch
//! when it has nothing left to revoke. Like `classic`, it reads no clock and does no I/O.

use std::collections::{BTreeMap, BTreeSet};

use indexmap::IndexMap;
use kafka_protocol::ResponseError;
use uuid::Uuid;

pub(crate) type TopicPartition = (Uuid, i32);

/// Subscribed topics as the broker knows them: name -> (topic id, partition count).
pub(crate) type TopicsSnapshot = BTreeMap<String, (Uuid, i32)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Assignor {
    Uniform,
    Range,
}

impl Assignor {
    pub(crate) fn parse(name: Option<&str>) -> Option<Assignor> {
        match name {
            None | Some("uniform") => Some(Assignor::Uniform),
            Some("range") => Some(Assignor::Range),
            Some(_) => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Assignor::Uniform => "uniform",
            Assignor::Range => "range",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct ConsumerLimits {
    pub session_timeout_ms: i64,
    pub heartbeat_interval_ms: i32,
    pub max_members: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct CMember {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub epoch: i32,
    pub subscribed: Vec<String>,
    pub rebalance_timeout_ms: i32,
    /// What this member is told it owns.
    pub assigned: BTreeSet<TopicPartition>,
    /// What the member last reported owning.
    pub owned: BTreeSet<TopicPartition>,
    /// The assignment last sent, to send it again only when it changes.
    sent: Option<BTreeSet<TopicPartition>>,
    pub session_deadline_ms: i64,
    /// Set while the member still owns partitions it must give up.
    revoke_deadline_ms: Option<i64>,
}

#[derive(Debug, Clone)]
pub(crate) struct Heartbeat {
    pub member_id: String,
    pub member_epoch: i32,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: i32,
    /// `None` = unchanged since the last heartbeat.
    pub subscribed: Option<Vec<String>>,
    pub assignor: Option<String>,
    /// `None` = unchanged since the last heartbeat.
    pub owned: Option<Vec<TopicPartition>>,
    /// Fresh member id, used when the client sent none (v0).
    pub new_member_id: String,
    /// Current partition counts of the topics any member subscribes to.
    pub topics: TopicsSnapshot,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeartbeatReply {
    pub error: Option<(ResponseError, &'static str)>,
    pub member_id: String,
    pub member_epoch: i32,
    pub heartbeat_interval_ms: i32,
    /// `None` = unchanged.
    pub assignment: Option<Vec<TopicPartition>>,
}

#[derive(Debug, Clone)]
pub(crate) struct ConsumerGroup {
    pub epoch: i32,
    /// Epoch the target assignment was computed for.
    pub assignment_epoch: i32,
    pub assignor: Assignor,
    pub members: IndexMap<String, CMember>,
    pub target: BTreeMap<String, BTreeSet<TopicPartition>>,
    pub topics: TopicsSnapshot,
    limits: ConsumerLimits,
}

impl ConsumerGroup {
    pub(crate) fn new(limits: ConsumerLimits) -> ConsumerGroup {
        ConsumerGroup {
            epoch: 0,
            assignment_epoch: 0,
            assignor: Assignor::Uniform,
            members: IndexMap::new(),
            target: BTreeMap::new(),
            topics: BTreeMap::new(),
            limits,
        }
    }

    /// Kafka's consumer-group states.
    pub(crate) fn state(&self) -> &'static str {
        if self.members.is_empty() {
            "Empty"
        } else if self.assignment_epoch < self.epoch {
            "Assigning"
        } else if self.members.values().any(|m| m.epoch != self.epoch) {
            "Reconciling"
        } else {
            "Stable"
        }
    }

    pub(crate) fn next_deadline(&self) -> Option<i64> {
        self.members
            .values()
            .flat_map(|m| [Some(m.session_deadline_ms), m.revoke_deadline_ms])
            .flatten()
            .min()
    }

    /// Expires sessions and members that did not revoke in time.
    pub(crate) fn tick(&mut self, now: i64) {
        let gone: Vec<String> = self
            .members
            .values()
            .filter(|m| {
                m.session_deadline_ms <= now || m.revoke_deadline_ms.is_some_and(|d| d <= now)
            })
            .map(|m| m.member_id.clone())
            .collect();
        if !gone.is_empty() {
            for id in gone {
                self.members.shift_remove(&id);
            }
            self.bump();
        }
    }

    fn bump(&mut self) {
        self.epoch += 1;
        self.compute_target();
    }

    /// Checks an OffsetCommit's member id and epoch.
    pub(crate) fn validate_commit(&self, member_id: &str, epoch: i32) -> Result<(), ResponseError> {
        if member_id.is_empty() && epoch < 0 {
            return if self.members.is_empty() {
                Ok(())
            } else {
                Err(ResponseError::UnknownMemberId)
            };
        }
        let m = self
            .members
            .get(member_id)
            .ok_or(ResponseError::UnknownMemberId)?;
        match epoch.cmp(&m.epoch) {
            std::cmp::Ordering::Equal => Ok(()),
            std::cmp::Ordering::Greater => Err(ResponseError::FencedMemberEpoch),
            std::cmp::Ordering::Less => Err(ResponseError::StaleMemberEpoch),
        }
    }

    pub(crate) fn heartbeat(&mut self, hb: Heartbeat, now: i64) -> HeartbeatReply {
        let fail = |e: ResponseError, msg: &'static str, id: &str, epoch: i32| HeartbeatReply {
            error: Some((e, msg)),
            member_id: id.to_string(),
            member_epoch: epoch,
            heartbeat_interval_ms: 0,
            assignment: None,
        };
        if hb.member_epoch == -1 || hb.member_epoch == -2 {
            // Leaving (a static member's temporary leave is treated as a leave too).
            if self.members.shift_remove(&hb.member_id).is_some() {
                self.bump();
            }
            return HeartbeatReply {
                error: None,
                member_id: hb.member_id,
                member_epoch: hb.member_epoch,
                heartbeat_interval_ms: 0,
                assignment: None,
            };
        }
        // A null assignor means "unchanged": the group keeps the one last asked for.
        let assignor = match hb.assignor.as_deref() {
            None => self.assignor,
            Some(name) => match Assignor::parse(Some(name)) {
                Some(a) => a,
                None => {
                    return fail(
                        ResponseError::UnsupportedAssignor,
                        "supported assignors: uniform, range",
                        &hb.member_id,
                        hb.member_epoch,
                    )
                }
            },
        };
        let member_id = if hb.member_id.is_empty() {
            hb.new_member_id.clone()
        } else {
            hb.member_id.clone()
        };
        let mut changed = false;
        if hb.member_epoch == 0 {
            if hb.subscribed.is_none() {
                return fail(
                    ResponseError::InvalidRequest,
                    "a joining member must send its subscription",
                    &member_id,
                    0,
                );
            }
            // A static member replaces its previous incarnation.
            if let Some(inst) = &hb.instance_id {
                let old = self
                    .members
                    .values()
                    .find(|m| m.instance_id.as_ref() == Some(inst) && m.member_id != member_id)
                    .map(|m| m.member_id.clone());
                if let Some(old) = old {
                    self.members.shift_remove(&old);
                    changed = true;
                }
            }
            if !self.members.contains_key(&member_id) {
                if self.members.len() >= self.limits.max_members {
                    return fail(
                        ResponseError::GroupMaxSizeReached,
                        "the group is full",
                        &member_id,
                        0,
                    );
                }
                changed = true;
            }
            // A (re)joining member owns nothing until told otherwise.
            self.members.insert(
                member_id.clone(),
                CMember {
                    member_id: member_id.clone(),
                    instance_id: hb.instance_id.clone(),
                    rack_id: hb.rack_id.clone(),
                    client_id: hb.client_id.clone(),
                    client_host: hb.client_host.clone(),
                    epoch: 0,
                    subscribed: Vec::new(),
                    rebalance_timeout_ms: hb.rebalance_timeout_ms,
                    assigned: BTreeSet::new(),
                    owned: BTreeSet::new(),
                    sent: None,
                    session_deadline_ms: now + self.limits.session_timeout_ms,
                    revoke_deadline_ms: None,
                },
            );
        } else {
            let Some(m) = self.members.get(&member_id) else {
                return fail(
                    ResponseError::UnknownMemberId,
                    "unknown member: rejoin with epoch 0",
                    &member_id,
                    hb.member_epoch,
                );
            };
            if hb.member_epoch != m.epoch {
                return fail(
                    ResponseError::FencedMemberEpoch,
                    "member epoch is not current: rejoin",
                    &member_id,
                    hb.member_epoch,
                );
            }
        }
        let m = self.members.get_mut(&member_id).expect("present");
        m.session_deadline_ms = now + self.limits.session_timeout_ms;
        m.rebalance_timeout_ms = hb.rebalance_timeout_ms;
        if let Some(subs) = hb.subscribed {
            let mut subs = subs;
            subs.sort();
            subs.dedup();
            if subs != m.subscribed {
                m.subscribed = subs;
                changed = true;
            }
        }
        if let Some(owned) = hb.owned {
            m.owned = owned.into_iter().collect();
        }
        if self.assignor != assignor {
            self.assignor = assignor;
            changed = true;
        }
        let subscribed: BTreeSet<&String> = self
            .members
            .values()
            .flat_map(|m| m.subscribed.iter())
            .collect();
        let snapshot: TopicsSnapshot = hb
            .topics
            .into_iter()
            .filter(|(t, _)| subscribed.contains(t))
            .collect();
        if snapshot != self.topics {
            self.topics = snapshot;
            changed = true;
        }
        if changed {
            self.bump();
        }
        self.reconcile(&member_id, now);
        let m = self.members.get_mut(&member_id).expect("present");
        let assignment =
            (m.sent.as_ref() != Some(&m.assigned)).then(|| m.assigned.iter().copied().collect());
        m.sent = Some(m.assigned.clone());
        HeartbeatReply {
            error: None,
            member_id,
            member_epoch: m.epoch,
            heartbeat_interval_ms: self.limits.heartbeat_interval_ms,
            assignment,
        }
    }

    /// Moves one member towards its target: drop what it must revoke, add what no other
    /// member still owns, and take the group epoch once nothing is left to revoke.
    fn reconcile(&mut self, member_id: &str, now: i64) {
        let target = self.target.get(member_id).cloned().unwrap_or_default();
        let owned_elsewhere: BTreeSet<TopicPartition> = self
            .members
            .values()
            .filter(|o| o.member_id != member_id)
            .flat_map(|o| o.owned.union(&o.assigned).copied())
            .collect();
        let epoch = self.epoch;
        let m = self.members.get_mut(member_id).expect("present");
        let keep: BTreeSet<TopicPartition> = m.assigned.intersection(&target).copied().collect();
        let still_owns_revoked = m.owned.iter().any(|tp| !target.contains(tp));
        if still_owns_revoked {
            // Revocation first: the member keeps consuming what it keeps.
            m.assigned = keep;
            m.revoke_deadline_ms
                .get_or_insert(now + m.rebalance_timeout_ms as i64);
            return;
        }
        m.revoke_deadline_ms = None;
        let add: BTreeSet<TopicPartition> = target
            .difference(&keep)
            .filter(|tp| !owned_elsewhere.contains(tp))
            .copied()
            .collect();
        m.assigned = keep.union(&add).copied().collect();
        m.epoch = epoch;
    }

    fn compute_target(&mut self) {
        let mut members: Vec<(&String, &Vec<String>)> = self
            .members
            .iter()
            .map(|(id, m)| (id, &m.subscribed))
            .collect();
        members.sort();
        let mut target: BTreeMap<String, BTreeSet<TopicPartition>> = members
            .iter()
            .map(|(id, _)| ((*id).clone(), BTreeSet::new()))
            .collect();
        match self.assignor {
            Assignor::Range => {
                for (name, (id, count)) in &self.topics {
                    let subs: Vec<&String> = members
                        .iter()
                        .filter(|(_, s)| s.contains(name))
                        .map(|(m, _)| *m)
                        .collect();
                    if subs.is_empty() {
                        continue;
                    }
                    let per = *count as usize / subs.len();
                    let extra = *count as usize % subs.len();
                    let mut p = 0i32;
                    for (i, m) in subs.iter().enumerate() {
                        let n = per + usize::from(i < extra);
                        for _ in 0..n {
                            target.get_mut(*m).expect("listed").insert((*id, p));
                            p += 1;
                        }
                    }
                }
            }
            Assignor::Uniform => {
                // Sticky and balanced: keep current partitions up to each member's share,
                // then hand the rest to the eligible member with the fewest.
                let all: Vec<(String, TopicPartition)> = self
                    .topics
                    .iter()
                    .flat_map(|(name, (id, count))| {
                        (0..*count).map(move |p| (name.clone(), (*id, p)))
                    })
                    .collect();
                let eligible = |name: &str| -> Vec<&String> {
                    members
                        .iter()
                        .filter(|(_, s)| s.iter().any(|t| t == name))
                        .map(|(m, _)| *m)
                        .collect()
                };
                let share = if members.is_empty() {
                    0
                } else {
                    all.len().div_ceil(members.len())
                };
                let mut taken = BTreeSet::new();
                for (id, m) in &self.members {
                    for tp in &m.assigned {
                        let still_valid = all
                            .iter()
                            .any(|(name, x)| x == tp && m.subscribed.contains(name));
                        let t = target.get_mut(id).expect("listed");
                        if still_valid && t.len() < share && taken.insert(*tp) {
                            t.insert(*tp);
                        }
                    }
                }
                for (name, tp) in &all {
                    if taken.contains(tp) {
                        continue;
                    }
                    let candidates = eligible(name);
                    if let Some(best) = candidates.iter().min_by_key(|m| (target[**m].len(), **m)) {
                        target.get_mut(*best).expect("listed").insert(*tp);
                        taken.insert(*tp);
                    }
                }
            }
        }
        self.target = target;
        self.assignment_epoch = self.epoch;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ConsumerLimits = ConsumerLimits {
        session_timeout_ms: 10_000,
        heartbeat_interval_ms: 500,
        max_members: 10,
    };

    fn topic() -> (Uuid, TopicsSnapshot) {
        let id = Uuid::from_u128(7);
        (id, [("t".to_string(), (id, 6))].into_iter().collect())
    }

    fn hb(
        id: &str,
        epoch: i32,
        owned: Option<Vec<TopicPartition>>,
        topics: &TopicsSnapshot,
    ) -> Heartbeat {
        Heartbeat {
            member_id: id.into(),
            member_epoch: epoch,
            instance_id: None,
            rack_id: None,
            client_id: "c".into(),
            client_host: "/127.0.0.1".into(),
            rebalance_timeout_ms: 5_000,
            subscribed: (epoch == 0).then(|| vec!["t".to_string()]),
            assignor: None,
            owned,
            new_member_id: format!("gen-{id}"),
            topics: topics.clone(),
        }
    }

    #[test]
    fn one_member_gets_everything_then_shares_without_overlap() {
        let (id, topics) = topic();
        let mut g = ConsumerGroup::new(LIMITS);
        let r = g.heartbeat(hb("a", 0, Some(vec![]), &topics), 0);
        assert_eq!(r.member_epoch, 1);
        let a_parts = r.assignment.expect("initial assignment");
        assert_eq!(a_parts.len(), 6);
        // a confirms ownership; b joins.
        let r = g.heartbeat(hb("a", 1, Some(a_parts.clone()), &topics), 1);
        assert_eq!(r.assignment, None, "unchanged assignment is not resent");
        let rb = g.heartbeat(hb("b", 0, Some(vec![]), &topics), 2);
        assert_eq!(g.epoch, 2);
        assert_eq!(
            rb.assignment,
            Some(vec![]),
            "b gets nothing while a still owns everything"
        );
        assert_eq!(rb.member_epoch, 2);
        // a must revoke three partitions; it keeps its epoch until it does.
        let ra = g.heartbeat(hb("a", 1, None, &topics), 3);
        let keep = ra.assignment.expect("shrunk assignment");
        assert_eq!(keep.len(), 3);
        assert_eq!(ra.member_epoch, 1);
        let ra = g.heartbeat(hb("a", 1, Some(keep.clone()), &topics), 4);
        assert_eq!(ra.member_epoch, 2);
        // Now b receives the rest.
        let rb = g.heartbeat(hb("b", 2, Some(vec![]), &topics), 5);
        let b_parts = rb.assignment.expect("b's partitions");
        assert_eq!(b_parts.len(), 3);
        let all: BTreeSet<_> = keep.iter().chain(b_parts.iter()).copied().collect();
        assert_eq!(all.len(), 6);
        assert!(all.iter().all(|(t, _)| *t == id));
        assert_eq!(g.state(), "Stable");
        assert_eq!(g.validate_commit("a", 2), Ok(()));
        assert_eq!(
            g.validate_commit("a", 1),
            Err(ResponseError::StaleMemberEpoch)
        );
        assert_eq!(
            g.validate_commit("zz", 2),
            Err(ResponseError::UnknownMemberId)
        );
    }

    #[test]
    fn leave_and_session_expiry_move_partitions() {
        let (_, topics) = topic();
        let mut g = ConsumerGroup::new(LIMITS);
        let a = g
            .heartbeat(hb("a", 0, Some(vec![]), &topics), 0)
            .assignment
            .expect("a");
        g.heartbeat(hb("a", 1, Some(a), &topics), 0);
        g.heartbeat(hb("b", 0, Some(vec![]), &topics), 0);
        let r = g.heartbeat(hb("b", 2, None, &topics), 0);
        assert_eq!(r.error, None);
        // a leaves: b eventually owns everything.
        let r = g.heartbeat(hb("a", -1, None, &topics), 1);
        assert_eq!(r.member_epoch, -1);
        let rb = g.heartbeat(hb("b", 2, Some(vec![]), &topics), 2);
        assert_eq!(rb.assignment.map(|a| a.len()), Some(6));
        // b stops heartbeating: it expires.
        g.tick(2 + LIMITS.session_timeout_ms);
        assert!(g.members.is_empty());
        assert_eq!(g.state(), "Empty");
        let r = g.heartbeat(hb("b", 4, None, &topics), 20_000);
        assert_eq!(r.error.map(|e| e.0), Some(ResponseError::UnknownMemberId));
    }

    #[test]
    fn stale_epochs_are_fenced_and_unknown_assignors_refused() {
        let (_, topics) = topic();
        let mut g = ConsumerGroup::new(LIMITS);
        g.heartbeat(hb("a", 0, Some(vec![]), &topics), 0);
        let r = g.heartbeat(hb("a", 7, None, &topics), 0);
        assert_eq!(r.error.map(|e| e.0), Some(ResponseError::FencedMemberEpoch));
        let mut h = hb("c", 0, Some(vec![]), &topics);
        h.assignor = Some("magic".into());
        assert_eq!(
            g.heartbeat(h, 0).error.map(|e| e.0),
            Some(ResponseError::UnsupportedAssignor)
        );
    }

    #[test]
    fn range_assignor_splits_contiguously() {
        let (id, topics) = topic();
        let mut g = ConsumerGroup::new(LIMITS);
        for m in ["a", "b", "c", "d"] {
            let mut h = hb(m, 0, Some(vec![]), &topics);
            h.assignor = Some("range".into());
            g.heartbeat(h, 0);
        }
        assert_eq!(g.target["a"], [(id, 0), (id, 1)].into_iter().collect());
        assert_eq!(g.target["b"], [(id, 2), (id, 3)].into_iter().collect());
        assert_eq!(g.target["c"], [(id, 4)].into_iter().collect());
        assert_eq!(g.target["d"], [(id, 5)].into_iter().collect());
    }

    #[test]
    fn uniform_assignment_is_sticky() {
        let (_, topics) = topic();
        let mut g = ConsumerGroup::new(LIMITS);
        let a = g
            .heartbeat(hb("a", 0, Some(vec![]), &topics), 0)
            .assignment
            .expect("a");
        g.heartbeat(hb("a", 1, Some(a.clone()), &topics), 0);
        g.heartbeat(hb("b", 0, Some(vec![]), &topics), 0);
        let kept = &g.target["a"];
        assert_eq!(kept.len(), 3);
        assert!(
            kept.iter().all(|tp| a.contains(tp)),
            "a keeps a subset of what it had"
        );
    }

    #[test]
    fn unchanged_fields_do_not_bump_the_epoch() {
        let (_, topics) = topic();
        let mut g = ConsumerGroup::new(LIMITS);
        let mut h = hb("a", 0, Some(vec![]), &topics);
        h.assignor = Some("range".into());
        let r = g.heartbeat(h, 0);
        let epoch = g.epoch;
        // Later heartbeats leave subscription and assignor null: nothing changes.
        g.heartbeat(hb("a", r.member_epoch, r.assignment, &topics), 1);
        g.heartbeat(hb("a", epoch, None, &topics), 2);
        assert_eq!(g.epoch, epoch);
        assert_eq!(g.assignor, Assignor::Range);
    }

    #[test]
    fn partition_growth_bumps_the_epoch() {
        let (id, topics) = topic();
        let mut g = ConsumerGroup::new(LIMITS);
        g.heartbeat(hb("a", 0, Some(vec![]), &topics), 0);
        let epoch = g.epoch;
        let grown: TopicsSnapshot = [("t".to_string(), (id, 8))].into_iter().collect();
        let r = g.heartbeat(hb("a", epoch, None, &grown), 1);
        assert_eq!(g.epoch, epoch + 1);
        assert_eq!(r.assignment.map(|a| a.len()), Some(8));
    }
}
