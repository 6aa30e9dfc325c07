//! The classic consumer-group protocol as a pure state machine: JoinGroup, SyncGroup,
//! Heartbeat, LeaveGroup and timers, with Kafka's rules (MEMBER_ID_REQUIRED, protocol
//! selection, leader election, the initial rebalance delay, rebalance and session
//! timeouts, static membership and instance fencing).
//!
//! `Group::handle(event, now)` changes the state and returns the replies to send; it does
//! no I/O and reads no clock, so every transition is unit-tested exhaustively below. The
//! group's task (see `group::coordinator`) owns one `Group`, turns requests into events,
//! keeps the reply channels under the tokens the replies name, and ticks the timers at
//! `next_deadline()`.

use bytes::Bytes;
use indexmap::IndexMap;
use kafka_protocol::ResponseError;

/// Kafka's group states; the names are what DescribeGroups and ListGroups report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
    Dead,
}

impl GroupState {
    pub(crate) fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
            GroupState::Dead => "Dead",
        }
    }
}

/// Limits and delays the coordinator applies (broker settings).
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupLimits {
    pub min_session_timeout_ms: i32,
    pub max_session_timeout_ms: i32,
    pub initial_rebalance_delay_ms: i64,
    pub max_members: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    /// (protocol name, metadata), in the member's order of preference.
    pub protocols: Vec<(String, Bytes)>,
    pub assignment: Bytes,
    /// Token of a JoinGroup waiting for the rebalance to complete.
    pub join_waiter: Option<u64>,
    /// Token of a SyncGroup waiting for the leader's assignment.
    pub sync_waiter: Option<u64>,
    /// Sent SyncGroup in this generation.
    pub synced: bool,
    /// When the session expires unless a heartbeat (or join/sync) arrives.
    pub session_deadline_ms: i64,
}

impl Member {
    fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }
}

/// What a JoinGroup gets back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JoinResult {
    pub error: Option<ResponseError>,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// Filled for the leader: (member id, instance id, metadata of the chosen protocol).
    pub members: Vec<(String, Option<String>, Bytes)>,
    /// KIP-814: the leader need not compute a new assignment (static leader rejoin).
    pub skip_assignment: bool,
}

impl JoinResult {
    fn error(error: ResponseError, member_id: &str) -> JoinResult {
        JoinResult {
            error: Some(error),
            generation: -1,
            protocol_type: None,
            protocol_name: None,
            leader: String::new(),
            member_id: member_id.to_string(),
            members: Vec::new(),
            skip_assignment: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyncResult {
    pub error: Option<ResponseError>,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub assignment: Bytes,
}

impl SyncResult {
    fn error(error: ResponseError) -> SyncResult {
        SyncResult {
            error: Some(error),
            protocol_type: None,
            protocol_name: None,
            assignment: Bytes::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Join(JoinResult),
    Sync(SyncResult),
    Heartbeat(Option<ResponseError>),
    /// Per member: (member id, instance id, error).
    Leave(Vec<(String, Option<String>, Option<ResponseError>)>),
}

#[derive(Debug, Clone)]
pub(crate) struct JoinRequest {
    pub token: u64,
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    /// JoinGroup v4+: a new member first gets MEMBER_ID_REQUIRED with its id.
    pub require_known_member_id: bool,
    /// A fresh member id for this request, should the coordinator need one.
    pub new_member_id: String,
}

#[derive(Debug, Clone)]
pub(crate) struct SyncRequest {
    pub token: u64,
    pub member_id: String,
    pub instance_id: Option<String>,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    /// The leader's assignment (empty for followers).
    pub assignments: Vec<(String, Bytes)>,
}

#[derive(Debug, Clone)]
pub(crate) enum Event {
    Join(JoinRequest),
    Sync(SyncRequest),
    Heartbeat {
        token: u64,
        member_id: String,
        instance_id: Option<String>,
        generation: i32,
    },
    Leave {
        token: u64,
        members: Vec<(String, Option<String>)>,
    },
    /// Time passed: expire sessions and finish overdue rebalance phases.
    Tick,
}

#[derive(Debug, Clone)]
pub(crate) struct Group {
    pub id: String,
    pub state: GroupState,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: Option<String>,
    pub members: IndexMap<String, Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, with the time they lapse.
    pub pending: IndexMap<String, i64>,
    /// Static members: instance id -> member id.
    pub instances: IndexMap<String, String>,
    /// When the join phase ends even if not everyone rejoined.
    pub join_deadline_ms: Option<i64>,
    /// When the sync phase ends if the leader has not assigned.
    pub sync_deadline_ms: Option<i64>,
    /// A group leaving Empty waits this long for more members before its first join completes.
    initial_delay_until: Option<i64>,
    /// Completed rebalances (for metrics).
    pub rebalances: u64,
    limits: GroupLimits,
}

type Replies = Vec<(u64, Reply)>;

impl Group {
    pub(crate) fn new(id: &str, limits: GroupLimits) -> Group {
        Group {
            id: id.to_string(),
            state: GroupState::Empty,
            generation: 0,
            protocol_type: None,
            protocol_name: None,
            leader: None,
            members: IndexMap::new(),
            pending: IndexMap::new(),
            instances: IndexMap::new(),
            join_deadline_ms: None,
            sync_deadline_ms: None,
            initial_delay_until: None,
            rebalances: 0,
            limits,
        }
    }

    /// The earliest time at which `Tick` has something to do.
    pub(crate) fn next_deadline(&self) -> Option<i64> {
        let sessions = self
            .members
            .values()
            .filter(|m| m.join_waiter.is_none())
            .map(|m| m.session_deadline_ms);
        sessions
            .chain(self.pending.values().copied())
            .chain(self.join_deadline_ms)
            .chain(self.sync_deadline_ms)
            .min()
    }

    pub(crate) fn handle(&mut self, event: Event, now: i64) -> Replies {
        let mut out = Vec::new();
        match event {
            Event::Join(j) => self.join(j, now, &mut out),
            Event::Sync(s) => self.sync(s, now, &mut out),
            Event::Heartbeat {
                token,
                member_id,
                instance_id,
                generation,
            } => {
                let r = self.heartbeat(&member_id, instance_id.as_deref(), generation, now);
                out.push((token, Reply::Heartbeat(r)));
            }
            Event::Leave { token, members } => {
                let results = members
                    .into_iter()
                    .map(|(m, i)| {
                        let e = self.leave(&m, i.as_deref(), now, &mut out);
                        (m, i, e)
                    })
                    .collect();
                out.push((token, Reply::Leave(results)));
            }
            Event::Tick => self.tick(now, &mut out),
        }
        out
    }

    /// Checks an OffsetCommit's membership claims. `Ok` means the commit may be stored.
    pub(crate) fn validate_commit(
        &self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
    ) -> Result<(), ResponseError> {
        if generation < 0 && member_id.is_empty() {
            // A commit from outside the group (admin tools, manual assignment): only
            // while no member could be overwritten.
            return if self.members.is_empty() {
                Ok(())
            } else {
                Err(ResponseError::UnknownMemberId)
            };
        }
        self.check_member(member_id, instance_id)?;
        if generation != self.generation {
            return Err(ResponseError::IllegalGeneration);
        }
        if self.state == GroupState::CompletingRebalance {
            return Err(ResponseError::RebalanceInProgress);
        }
        Ok(())
    }

    fn check_member(
        &self,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> Result<(), ResponseError> {
        if let Some(inst) = instance_id {
            match self.instances.get(inst) {
                Some(current) if current != member_id => {
                    return Err(ResponseError::FencedInstanceId)
                }
                _ => {}
            }
        }
        if !self.members.contains_key(member_id) {
            return Err(ResponseError::UnknownMemberId);
        }
        Ok(())
    }

    fn join(&mut self, j: JoinRequest, now: i64, out: &mut Replies) {
        let token = j.token;
        let fail = |e, out: &mut Replies| {
            out.push((token, Reply::Join(JoinResult::error(e, &j.member_id))))
        };
        if self.state == GroupState::Dead {
            return fail(ResponseError::CoordinatorNotAvailable, out);
        }
        if j.session_timeout_ms < self.limits.min_session_timeout_ms
            || j.session_timeout_ms > self.limits.max_session_timeout_ms
        {
            return fail(ResponseError::InvalidSessionTimeout, out);
        }
        if j.protocol_type.is_empty()
            || j.protocols.is_empty()
            || !self.supports(&j.protocol_type, &j.protocols)
        {
            return fail(ResponseError::InconsistentGroupProtocol, out);
        }
        if j.member_id.is_empty() {
            if let Some(inst) = j.instance_id.clone() {
                if let Some(old) = self.instances.get(&inst).cloned() {
                    return self.static_rejoin(j, &old, now, out);
                }
                if self.members.len() >= self.limits.max_members {
                    return fail(ResponseError::GroupMaxSizeReached, out);
                }
                let id = j.new_member_id.clone();
                self.instances.insert(inst, id.clone());
                self.add_member(id, &j, now);
                return self.prepare_rebalance(now, out);
            }
            if self.members.len() + self.pending.len() >= self.limits.max_members {
                return fail(ResponseError::GroupMaxSizeReached, out);
            }
            if j.require_known_member_id {
                self.pending
                    .insert(j.new_member_id.clone(), now + j.session_timeout_ms as i64);
                out.push((
                    token,
                    Reply::Join(JoinResult::error(
                        ResponseError::MemberIdRequired,
                        &j.new_member_id,
                    )),
                ));
                return;
            }
            let id = j.new_member_id.clone();
            self.add_member(id, &j, now);
            return self.prepare_rebalance(now, out);
        }
        if self.pending.shift_remove(&j.member_id).is_some() {
            let id = j.member_id.clone();
            self.add_member(id, &j, now);
            return self.prepare_rebalance(now, out);
        }
        if let Err(e) = self.check_member(&j.member_id, j.instance_id.as_deref()) {
            return fail(e, out);
        }
        let changed = {
            let m = &self.members[&j.member_id];
            m.protocols != j.protocols
        };
        let is_leader = self.leader.as_deref() == Some(j.member_id.as_str());
        {
            let m = self.members.get_mut(&j.member_id).expect("checked above");
            m.protocols = j.protocols.clone();
            m.session_timeout_ms = j.session_timeout_ms;
            m.rebalance_timeout_ms = j.rebalance_timeout_ms;
            m.client_id = j.client_id.clone();
            m.client_host = j.client_host.clone();
            m.session_deadline_ms = now + j.session_timeout_ms as i64;
            if let Some(old) = m.join_waiter.replace(token) {
                out.push((
                    old,
                    Reply::Join(JoinResult::error(
                        ResponseError::RebalanceInProgress,
                        &j.member_id,
                    )),
                ));
            }
        }
        match self.state {
            GroupState::PreparingRebalance => self.try_complete_join(now, out),
            GroupState::CompletingRebalance | GroupState::Stable
                if !(changed || self.state == GroupState::Stable && is_leader) =>
            {
                // A repeated join with the same metadata (a lost response): answer with the
                // current generation, no rebalance.
                let m = self.members.get_mut(&j.member_id).expect("checked above");
                m.join_waiter = None;
                let result = self.join_result(&j.member_id, false);
                out.push((token, Reply::Join(result)));
            }
            _ => self.prepare_rebalance(now, out),
        }
    }

    /// A static member (known instance id) restarted: it takes over its old identity.
    fn static_rejoin(&mut self, j: JoinRequest, old_id: &str, now: i64, out: &mut Replies) {
        let Some(mut m) = self.members.shift_remove(old_id) else {
            return;
        };
        // The old incarnation's outstanding requests are fenced.
        if let Some(t) = m.join_waiter.take() {
            out.push((
                t,
                Reply::Join(JoinResult::error(ResponseError::FencedInstanceId, old_id)),
            ));
        }
        if let Some(t) = m.sync_waiter.take() {
            out.push((
                t,
                Reply::Sync(SyncResult::error(ResponseError::FencedInstanceId)),
            ));
        }
        let new_id = j.new_member_id.clone();
        let unchanged = m.protocols == j.protocols;
        m.member_id = new_id.clone();
        m.protocols = j.protocols.clone();
        m.client_id = j.client_id.clone();
        m.client_host = j.client_host.clone();
        m.session_timeout_ms = j.session_timeout_ms;
        m.rebalance_timeout_ms = j.rebalance_timeout_ms;
        m.session_deadline_ms = now + j.session_timeout_ms as i64;
        self.members.insert(new_id.clone(), m);
        if let Some(inst) = &j.instance_id {
            self.instances.insert(inst.clone(), new_id.clone());
        }
        let was_leader = self.leader.as_deref() == Some(old_id);
        if was_leader {
            self.leader = Some(new_id.clone());
        }
        match self.state {
            GroupState::Stable if unchanged => {
                // Same subscription: hand back the old assignment without a rebalance.
                let result = self.join_result(&new_id, was_leader);
                out.push((j.token, Reply::Join(result)));
            }
            GroupState::PreparingRebalance => {
                self.members.get_mut(&new_id).expect("inserted").join_waiter = Some(j.token);
                self.try_complete_join(now, out);
            }
            _ => {
                self.members.get_mut(&new_id).expect("inserted").join_waiter = Some(j.token);
                self.prepare_rebalance(now, out);
            }
        }
    }

    fn add_member(&mut self, id: String, j: &JoinRequest, now: i64) {
        self.members.insert(
            id.clone(),
            Member {
                member_id: id,
                instance_id: j.instance_id.clone(),
                client_id: j.client_id.clone(),
                client_host: j.client_host.clone(),
                session_timeout_ms: j.session_timeout_ms,
                rebalance_timeout_ms: j.rebalance_timeout_ms,
                protocol_type: j.protocol_type.clone(),
                protocols: j.protocols.clone(),
                assignment: Bytes::new(),
                join_waiter: Some(j.token),
                sync_waiter: None,
                synced: false,
                session_deadline_ms: now + j.session_timeout_ms as i64,
            },
        );
        if self.protocol_type.is_none() {
            self.protocol_type = Some(j.protocol_type.clone());
        }
    }

    /// Whether a member with these protocols can join the current members.
    fn supports(&self, protocol_type: &str, protocols: &[(String, Bytes)]) -> bool {
        if self.members.is_empty() {
            return true;
        }
        if self
            .protocol_type
            .as_deref()
            .is_some_and(|t| t != protocol_type)
        {
            return false;
        }
        protocols.iter().any(|(name, _)| {
            self.members
                .values()
                .all(|m| m.protocols.iter().any(|(n, _)| n == name))
        })
    }

    fn prepare_rebalance(&mut self, now: i64, out: &mut Replies) {
        if self.state == GroupState::CompletingRebalance {
            // Followers waiting for the leader's assignment must rejoin.
            for m in self.members.values_mut() {
                if let Some(t) = m.sync_waiter.take() {
                    out.push((
                        t,
                        Reply::Sync(SyncResult::error(ResponseError::RebalanceInProgress)),
                    ));
                }
            }
        }
        let rebalance_timeout = self
            .members
            .values()
            .map(|m| m.rebalance_timeout_ms as i64)
            .max()
            .unwrap_or(0);
        match self.state {
            GroupState::Empty => {
                // The first members of an empty group wait a little for the others.
                let delay = self
                    .limits
                    .initial_rebalance_delay_ms
                    .min(rebalance_timeout.max(1));
                self.initial_delay_until = Some(now + delay);
                self.join_deadline_ms = Some(now + delay);
            }
            GroupState::PreparingRebalance => {}
            _ => self.join_deadline_ms = Some(now + rebalance_timeout),
        }
        self.state = GroupState::PreparingRebalance;
        self.sync_deadline_ms = None;
        self.try_complete_join(now, out);
    }

    fn try_complete_join(&mut self, now: i64, out: &mut Replies) {
        if self.state != GroupState::PreparingRebalance {
            return;
        }
        let all_joined =
            self.members.values().all(|m| m.join_waiter.is_some()) && self.pending.is_empty();
        let initial_delay = self.initial_delay_until.is_some_and(|d| now < d);
        if all_joined && !initial_delay {
            self.complete_join(now, out);
        }
    }

    fn complete_join(&mut self, now: i64, out: &mut Replies) {
        // Members that did not rejoin in time are out.
        let gone: Vec<String> = self
            .members
            .values()
            .filter(|m| m.join_waiter.is_none())
            .map(|m| m.member_id.clone())
            .collect();
        for id in gone {
            self.remove_member(&id, out);
        }
        self.pending.clear();
        self.join_deadline_ms = None;
        self.initial_delay_until = None;
        self.generation += 1;
        self.rebalances += 1;
        if self.members.is_empty() {
            self.state = GroupState::Empty;
            self.protocol_name = None;
            self.protocol_type = None;
            self.leader = None;
            return;
        }
        self.protocol_name = self.select_protocol();
        if self
            .leader
            .as_ref()
            .is_none_or(|l| !self.members.contains_key(l))
        {
            self.leader = self.members.keys().next().cloned();
        }
        self.state = GroupState::CompletingRebalance;
        let rebalance_timeout = self
            .members
            .values()
            .map(|m| m.rebalance_timeout_ms as i64)
            .max()
            .unwrap_or(0);
        self.sync_deadline_ms = Some(now + rebalance_timeout);
        let ids: Vec<String> = self.members.keys().cloned().collect();
        for id in ids {
            let result = self.join_result(&id, false);
            let m = self.members.get_mut(&id).expect("listed");
            m.synced = false;
            m.assignment = Bytes::new();
            m.session_deadline_ms = now + m.session_timeout_ms as i64;
            if let Some(t) = m.join_waiter.take() {
                out.push((t, Reply::Join(result)));
            }
        }
    }

    /// Each member votes for its first supported protocol among those all support.
    fn select_protocol(&self) -> Option<String> {
        let first = self.members.values().next()?;
        let candidates: Vec<&String> = first
            .protocols
            .iter()
            .map(|(n, _)| n)
            .filter(|n| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(x, _)| x == *n))
            })
            .collect();
        let mut votes: IndexMap<&String, usize> = candidates.iter().map(|c| (*c, 0)).collect();
        for m in self.members.values() {
            if let Some((n, _)) = m.protocols.iter().find(|(n, _)| candidates.contains(&n)) {
                *votes.entry(n).or_default() += 1;
            }
        }
        let best = votes.values().copied().max()?;
        votes
            .into_iter()
            .find(|(_, v)| *v == best)
            .map(|(n, _)| n.clone())
    }

    fn join_result(&self, member_id: &str, skip_assignment: bool) -> JoinResult {
        let protocol = self.protocol_name.clone().unwrap_or_default();
        let is_leader = self.leader.as_deref() == Some(member_id);
        JoinResult {
            error: None,
            generation: self.generation,
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol_name.clone(),
            leader: self.leader.clone().unwrap_or_default(),
            member_id: member_id.to_string(),
            members: if is_leader {
                self.members
                    .values()
                    .map(|m| {
                        (
                            m.member_id.clone(),
                            m.instance_id.clone(),
                            m.metadata_for(&protocol),
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            },
            skip_assignment,
        }
    }

    fn sync(&mut self, s: SyncRequest, now: i64, out: &mut Replies) {
        let fail = |e, out: &mut Replies| out.push((s.token, Reply::Sync(SyncResult::error(e))));
        if let Err(e) = self.check_member(&s.member_id, s.instance_id.as_deref()) {
            return fail(e, out);
        }
        if s.generation != self.generation {
            return fail(ResponseError::IllegalGeneration, out);
        }
        let type_ok = s
            .protocol_type
            .as_ref()
            .is_none_or(|t| Some(t) == self.protocol_type.as_ref());
        let name_ok = s
            .protocol_name
            .as_ref()
            .is_none_or(|n| Some(n) == self.protocol_name.as_ref());
        if !type_ok || !name_ok {
            return fail(ResponseError::InconsistentGroupProtocol, out);
        }
        match self.state {
            GroupState::Empty | GroupState::Dead => fail(ResponseError::UnknownMemberId, out),
            GroupState::PreparingRebalance => fail(ResponseError::RebalanceInProgress, out),
            GroupState::Stable => {
                let m = self.members.get_mut(&s.member_id).expect("checked");
                m.session_deadline_ms = now + m.session_timeout_ms as i64;
                m.synced = true;
                let result = self.sync_result(&s.member_id);
                out.push((s.token, Reply::Sync(result)));
            }
            GroupState::CompletingRebalance => {
                {
                    let m = self.members.get_mut(&s.member_id).expect("checked");
                    m.session_deadline_ms = now + m.session_timeout_ms as i64;
                    m.synced = true;
                    if let Some(old) = m.sync_waiter.replace(s.token) {
                        out.push((
                            old,
                            Reply::Sync(SyncResult::error(ResponseError::RebalanceInProgress)),
                        ));
                    }
                }
                if self.leader.as_deref() == Some(s.member_id.as_str()) {
                    for m in self.members.values_mut() {
                        m.assignment = s
                            .assignments
                            .iter()
                            .find(|(id, _)| *id == m.member_id)
                            .map(|(_, a)| a.clone())
                            .unwrap_or_default();
                    }
                    self.state = GroupState::Stable;
                    self.sync_deadline_ms = None;
                    let ids: Vec<String> = self.members.keys().cloned().collect();
                    for id in ids {
                        let result = self.sync_result(&id);
                        if let Some(t) =
                            self.members.get_mut(&id).and_then(|m| m.sync_waiter.take())
                        {
                            out.push((t, Reply::Sync(result)));
                        }
                    }
                }
            }
        }
    }

    fn sync_result(&self, member_id: &str) -> SyncResult {
        SyncResult {
            error: None,
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol_name.clone(),
            assignment: self
                .members
                .get(member_id)
                .map(|m| m.assignment.clone())
                .unwrap_or_default(),
        }
    }

    fn heartbeat(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        now: i64,
    ) -> Option<ResponseError> {
        if let Err(e) = self.check_member(member_id, instance_id) {
            return Some(e);
        }
        if generation != self.generation {
            return Some(ResponseError::IllegalGeneration);
        }
        let m = self.members.get_mut(member_id).expect("checked");
        m.session_deadline_ms = now + m.session_timeout_ms as i64;
        match self.state {
            GroupState::PreparingRebalance => Some(ResponseError::RebalanceInProgress),
            GroupState::Empty | GroupState::Dead => Some(ResponseError::UnknownMemberId),
            _ => None,
        }
    }

    fn leave(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        now: i64,
        out: &mut Replies,
    ) -> Option<ResponseError> {
        let id = match instance_id {
            Some(inst) => match self.instances.get(inst) {
                None => return Some(ResponseError::UnknownMemberId),
                Some(current) if !member_id.is_empty() && current != member_id => {
                    return Some(ResponseError::FencedInstanceId)
                }
                Some(current) => current.clone(),
            },
            None => member_id.to_string(),
        };
        if self.pending.shift_remove(&id).is_some() {
            self.try_complete_join(now, out);
            return None;
        }
        if !self.members.contains_key(&id) {
            return Some(ResponseError::UnknownMemberId);
        }
        self.remove_member(&id, out);
        self.after_departure(now, out);
        None
    }

    fn remove_member(&mut self, id: &str, out: &mut Replies) {
        if let Some(m) = self.members.shift_remove(id) {
            if let Some(t) = m.join_waiter {
                out.push((
                    t,
                    Reply::Join(JoinResult::error(ResponseError::UnknownMemberId, id)),
                ));
            }
            if let Some(t) = m.sync_waiter {
                out.push((
                    t,
                    Reply::Sync(SyncResult::error(ResponseError::UnknownMemberId)),
                ));
            }
            if let Some(inst) = m.instance_id {
                if self.instances.get(&inst).is_some_and(|cur| cur == id) {
                    self.instances.shift_remove(&inst);
                }
            }
            if self.leader.as_deref() == Some(id) {
                self.leader = None;
            }
        }
    }

    fn after_departure(&mut self, now: i64, out: &mut Replies) {
        match self.state {
            GroupState::Stable | GroupState::CompletingRebalance => {
                self.prepare_rebalance(now, out)
            }
            GroupState::PreparingRebalance => {
                if self.members.is_empty() && self.pending.is_empty() {
                    self.complete_join(now, out);
                } else {
                    self.try_complete_join(now, out);
                }
            }
            GroupState::Empty | GroupState::Dead => {}
        }
    }

    fn tick(&mut self, now: i64, out: &mut Replies) {
        self.pending.retain(|_, deadline| *deadline > now);
        let expired: Vec<String> = self
            .members
            .values()
            .filter(|m| m.join_waiter.is_none() && m.session_deadline_ms <= now)
            .map(|m| m.member_id.clone())
            .collect();
        for id in &expired {
            self.remove_member(id, out);
        }
        if !expired.is_empty() {
            self.after_departure(now, out);
        }
        if self.state == GroupState::PreparingRebalance
            && self.join_deadline_ms.is_some_and(|d| d <= now)
        {
            self.complete_join(now, out);
        } else if self.state == GroupState::PreparingRebalance {
            self.try_complete_join(now, out);
        }
        if self.state == GroupState::CompletingRebalance
            && self.sync_deadline_ms.is_some_and(|d| d <= now)
        {
            // The leader never assigned: members that did not sync are out; start over.
            let unsynced: Vec<String> = self
                .members
                .values()
                .filter(|m| !m.synced)
                .map(|m| m.member_id.clone())
                .collect();
            for id in unsynced {
                self.remove_member(&id, out);
            }
            self.prepare_rebalance(now, out);
        }
        if self.members.is_empty()
            && self.state != GroupState::Empty
            && self.state != GroupState::Dead
            && self.pending.is_empty()
        {
            self.state = GroupState::Empty;
            self.join_deadline_ms = None;
            self.sync_deadline_ms = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: GroupLimits = GroupLimits {
        min_session_timeout_ms: 1000,
        max_session_timeout_ms: 60_000,
        initial_rebalance_delay_ms: 100,
        max_members: 10,
    };

    struct Harness {
        g: Group,
        now: i64,
        token: u64,
    }

    impl Harness {
        fn new() -> Harness {
            Harness {
                g: Group::new("g", LIMITS),
                now: 0,
                token: 0,
            }
        }

        fn next(&mut self) -> u64 {
            self.token += 1;
            self.token
        }

        fn join_req(
            &mut self,
            member_id: &str,
            instance: Option<&str>,
            protocols: &[&str],
        ) -> JoinRequest {
            let token = self.next();
            JoinRequest {
                token,
                member_id: member_id.to_string(),
                instance_id: instance.map(str::to_string),
                client_id: "c".into(),
                client_host: "/127.0.0.1".into(),
                session_timeout_ms: 10_000,
                rebalance_timeout_ms: 5_000,
                protocol_type: "consumer".into(),
                protocols: protocols
                    .iter()
                    .map(|p| (p.to_string(), Bytes::from(format!("meta-{p}"))))
                    .collect(),
                require_known_member_id: true,
                new_member_id: format!("m{token}"),
            }
        }

        fn step(&mut self, e: Event) -> Replies {
            self.g.handle(e, self.now)
        }

        /// Full v4+ join of a new member: MEMBER_ID_REQUIRED, then the real join.
        fn join_new(&mut self, instance: Option<&str>) -> (String, Replies) {
            let j = self.join_req("", instance, &["range"]);
            let r = self.step(Event::Join(j));
            if let Some(inst) = instance {
                // Static members skip MEMBER_ID_REQUIRED.
                return (self.g.instances[inst].clone(), r);
            }
            let Reply::Join(res) = &r[0].1 else {
                panic!("join reply expected")
            };
            assert_eq!(res.error, Some(ResponseError::MemberIdRequired));
            let id = res.member_id.clone();
            let j = self.join_req(&id, None, &["range"]);
            (id, self.step(Event::Join(j)))
        }

        fn tick_to(&mut self, t: i64) -> Replies {
            self.now = t;
            self.step(Event::Tick)
        }

        fn sync(
            &mut self,
            member: &str,
            generation: i32,
            assignments: Vec<(String, Bytes)>,
        ) -> Replies {
            let token = self.next();
            self.step(Event::Sync(SyncRequest {
                token,
                member_id: member.into(),
                instance_id: None,
                generation,
                protocol_type: Some("consumer".into()),
                protocol_name: Some("range".into()),
                assignments,
            }))
        }

        fn heartbeat(&mut self, member: &str, generation: i32) -> Option<ResponseError> {
            let token = self.next();
            let r = self.step(Event::Heartbeat {
                token,
                member_id: member.into(),
                instance_id: None,
                generation,
            });
            match &r[..] {
                [(_, Reply::Heartbeat(e))] => *e,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn joins(r: &Replies) -> Vec<&JoinResult> {
        r.iter()
            .filter_map(|(_, x)| {
                if let Reply::Join(j) = x {
                    Some(j)
                } else {
                    None
                }
            })
            .collect()
    }

    fn syncs(r: &Replies) -> Vec<&SyncResult> {
        r.iter()
            .filter_map(|(_, x)| {
                if let Reply::Sync(s) = x {
                    Some(s)
                } else {
                    None
                }
            })
            .collect()
    }

    /// Two members join a new group, the leader assigns, both are Stable.
    fn stable_pair(h: &mut Harness) -> (String, String) {
        let (a, r) = h.join_new(None);
        assert!(r.is_empty(), "first join waits for the initial delay");
        let (b, r) = h.join_new(None);
        assert!(r.is_empty());
        let r = h.tick_to(100);
        let js = joins(&r);
        assert_eq!(js.len(), 2);
        assert!(js
            .iter()
            .all(|j| j.generation == 1 && j.error.is_none() && j.leader == a));
        let leader = js.iter().find(|j| j.member_id == a).expect("leader reply");
        assert_eq!(leader.members.len(), 2);
        assert_eq!(leader.members[0].2, Bytes::from("meta-range"));
        assert!(js
            .iter()
            .find(|j| j.member_id == b)
            .expect("follower")
            .members
            .is_empty());
        assert_eq!(h.g.state, GroupState::CompletingRebalance);
        assert!(
            h.sync(&b, 1, vec![]).is_empty(),
            "follower waits for the leader"
        );
        let r = h.sync(
            &a,
            1,
            vec![(a.clone(), Bytes::from("A")), (b.clone(), Bytes::from("B"))],
        );
        let ss = syncs(&r);
        assert_eq!(ss.len(), 2);
        assert!(ss.iter().any(|s| s.assignment == "A"));
        assert!(ss.iter().any(|s| s.assignment == "B"));
        assert_eq!(h.g.state, GroupState::Stable);
        (a, b)
    }

    #[test]
    fn join_sync_and_heartbeats() {
        let mut h = Harness::new();
        let (a, b) = stable_pair(&mut h);
        assert_eq!(h.heartbeat(&a, 1), None);
        assert_eq!(h.heartbeat(&b, 0), Some(ResponseError::IllegalGeneration));
        assert_eq!(
            h.heartbeat("nobody", 1),
            Some(ResponseError::UnknownMemberId)
        );
        assert_eq!(h.g.validate_commit(&a, None, 1), Ok(()));
        assert_eq!(
            h.g.validate_commit(&a, None, 0),
            Err(ResponseError::IllegalGeneration)
        );
        assert_eq!(
            h.g.validate_commit("x", None, 1),
            Err(ResponseError::UnknownMemberId)
        );
        assert_eq!(
            h.g.validate_commit("", None, -1),
            Err(ResponseError::UnknownMemberId)
        );
    }

    #[test]
    fn new_member_triggers_rebalance_and_existing_members_rejoin() {
        let mut h = Harness::new();
        let (a, b) = stable_pair(&mut h);
        let (c, r) = h.join_new(None);
        assert!(r.is_empty());
        assert_eq!(h.g.state, GroupState::PreparingRebalance);
        assert_eq!(h.heartbeat(&a, 1), Some(ResponseError::RebalanceInProgress));
        let ja = h.join_req(&a, None, &["range"]);
        assert!(h.step(Event::Join(ja)).is_empty());
        let jb = h.join_req(&b, None, &["range"]);
        let r = h.step(Event::Join(jb));
        let js = joins(&r);
        assert_eq!(js.len(), 3, "all three answered once everyone rejoined");
        assert!(js.iter().all(|j| j.generation == 2 && j.leader == a));
        assert!(h.g.members.contains_key(&c));
    }

    #[test]
    fn members_that_do_not_rejoin_are_dropped_at_the_rebalance_timeout() {
        let mut h = Harness::new();
        let (a, b) = stable_pair(&mut h);
        h.now = 1_000;
        let (_c, _) = h.join_new(None);
        let ja = h.join_req(&a, None, &["range"]);
        h.step(Event::Join(ja));
        // b never rejoins: after the rebalance timeout (5 s) the join completes without it.
        let r = h.tick_to(6_001);
        let js = joins(&r);
        assert_eq!(js.len(), 2);
        assert!(!h.g.members.contains_key(&b));
        assert_eq!(h.g.generation, 2);
    }

    #[test]
    fn session_expiry_rebalances() {
        let mut h = Harness::new();
        let (a, b) = stable_pair(&mut h);
        h.now = 9_000;
        assert_eq!(h.heartbeat(&a, 1), None);
        h.tick_to(10_101);
        assert!(!h.g.members.contains_key(&b), "b's session expired");
        assert_eq!(h.g.state, GroupState::PreparingRebalance);
        let ja = h.join_req(&a, None, &["range"]);
        let r = h.step(Event::Join(ja));
        assert_eq!(joins(&r).len(), 1);
        assert_eq!(h.g.generation, 2);
    }

    #[test]
    fn leave_rebalances_at_once_and_last_leave_empties() {
        let mut h = Harness::new();
        let (a, b) = stable_pair(&mut h);
        let token = h.next();
        let r = h.step(Event::Leave {
            token,
            members: vec![(b.clone(), None)],
        });
        assert!(matches!(&r.last().expect("reply").1, Reply::Leave(v) if v[0].2.is_none()));
        assert_eq!(h.g.state, GroupState::PreparingRebalance);
        let ja = h.join_req(&a, None, &["range"]);
        let r = h.step(Event::Join(ja));
        assert_eq!(joins(&r)[0].generation, 2);
        let token = h.next();
        let r = h.step(Event::Leave {
            token,
            members: vec![("ghost".into(), None)],
        });
        assert!(
            matches!(&r[0].1, Reply::Leave(v) if v[0].2 == Some(ResponseError::UnknownMemberId))
        );
        h.sync(&a, 2, vec![(a.clone(), Bytes::new())]);
        let token = h.next();
        h.step(Event::Leave {
            token,
            members: vec![(a.clone(), None)],
        });
        h.tick_to(20_000);
        assert_eq!(h.g.state, GroupState::Empty);
        assert_eq!(h.g.validate_commit("", None, -1), Ok(()));
    }

    #[test]
    fn inconsistent_protocols_and_bad_timeouts_are_refused() {
        let mut h = Harness::new();
        stable_pair(&mut h);
        let j = h.join_req("", None, &["roundrobin"]);
        let r = h.step(Event::Join(j));
        assert_eq!(
            joins(&r)[0].error,
            Some(ResponseError::InconsistentGroupProtocol)
        );
        let mut j = h.join_req("", None, &["range"]);
        j.session_timeout_ms = 10;
        let r = h.step(Event::Join(j));
        assert_eq!(
            joins(&r)[0].error,
            Some(ResponseError::InvalidSessionTimeout)
        );
        let j = h.join_req("unknown-member", None, &["range"]);
        let r = h.step(Event::Join(j));
        assert_eq!(joins(&r)[0].error, Some(ResponseError::UnknownMemberId));
    }

    #[test]
    fn protocol_selection_follows_votes_among_common_protocols() {
        let mut h = Harness::new();
        let mut j = h.join_req("", None, &["cooperative-sticky", "range"]);
        j.require_known_member_id = false;
        h.step(Event::Join(j));
        let mut j = h.join_req("", None, &["range", "cooperative-sticky"]);
        j.require_known_member_id = false;
        h.step(Event::Join(j));
        let mut j = h.join_req("", None, &["range"]);
        j.require_known_member_id = false;
        h.step(Event::Join(j));
        let r = h.tick_to(200);
        assert_eq!(joins(&r).len(), 3);
        assert_eq!(
            h.g.protocol_name.as_deref(),
            Some("range"),
            "only range is common to all"
        );
    }

    #[test]
    fn static_member_rejoin_keeps_assignment_without_rebalance() {
        let mut h = Harness::new();
        let (a, _) = h.join_new(Some("i-a"));
        let (b, _) = h.join_new(Some("i-b"));
        let r = h.tick_to(100);
        assert_eq!(joins(&r).len(), 2);
        h.sync(&b, 1, vec![]);
        h.sync(
            &a,
            1,
            vec![(a.clone(), Bytes::from("A")), (b.clone(), Bytes::from("B"))],
        );
        assert_eq!(h.g.state, GroupState::Stable);
        // b restarts: a new join with its instance id and no member id.
        let j = h.join_req("", Some("i-b"), &["range"]);
        let r = h.step(Event::Join(j));
        let js = joins(&r);
        assert_eq!(js.len(), 1);
        assert_eq!(js[0].generation, 1, "no new generation");
        let new_b = js[0].member_id.clone();
        assert_ne!(new_b, b);
        assert_eq!(h.g.state, GroupState::Stable);
        let r = h.sync(&new_b, 1, vec![]);
        assert_eq!(syncs(&r)[0].assignment, Bytes::from("B"));
        // The old incarnation is fenced.
        let token = h.next();
        let r = h.step(Event::Heartbeat {
            token,
            member_id: b.clone(),
            instance_id: Some("i-b".into()),
            generation: 1,
        });
        assert!(matches!(
            &r[0].1,
            Reply::Heartbeat(Some(ResponseError::FencedInstanceId))
        ));
        assert_eq!(
            h.g.validate_commit(&b, Some("i-b"), 1),
            Err(ResponseError::FencedInstanceId)
        );
        assert_eq!(
            h.heartbeat(&a, 1),
            None,
            "the other member saw no rebalance"
        );
    }

    #[test]
    fn leader_that_never_syncs_is_replaced() {
        let mut h = Harness::new();
        let (a, _) = h.join_new(None);
        let (b, _) = h.join_new(None);
        h.tick_to(100);
        assert!(h.sync(&b, 1, vec![]).is_empty());
        // a (the leader) never syncs: after the rebalance timeout it is removed.
        let r = h.tick_to(100 + 5_001);
        assert!(!h.g.members.contains_key(&a));
        assert!(syncs(&r)
            .iter()
            .any(|s| s.error == Some(ResponseError::RebalanceInProgress)));
        assert_eq!(h.g.state, GroupState::PreparingRebalance);
    }

    #[test]
    fn pending_member_ids_lapse_and_group_size_is_bounded() {
        let mut h = Harness::new();
        let j = h.join_req("", None, &["range"]);
        h.step(Event::Join(j));
        assert_eq!(h.g.pending.len(), 1);
        h.tick_to(10_001);
        assert!(h.g.pending.is_empty());
        for _ in 0..LIMITS.max_members {
            let mut j = h.join_req("", None, &["range"]);
            j.require_known_member_id = false;
            h.step(Event::Join(j));
        }
        let mut j = h.join_req("", None, &["range"]);
        j.require_known_member_id = false;
        let r = h.step(Event::Join(j));
        assert_eq!(joins(&r)[0].error, Some(ResponseError::GroupMaxSizeReached));
    }
}
