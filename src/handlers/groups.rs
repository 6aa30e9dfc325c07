//! Consumer-group APIs: FindCoordinator, JoinGroup, SyncGroup, Heartbeat, LeaveGroup,
//! ListGroups, DescribeGroups, DeleteGroups. The logic lives in `group::classic`; these
//! translate requests into events and replies into responses.

use std::sync::Arc;

use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::find_coordinator_response::Coordinator as CoordinatorEntry;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::{
    BrokerId, DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest,
    DescribeGroupsResponse, FindCoordinatorRequest, FindCoordinatorResponse, GroupId,
    HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest,
    LeaveGroupResponse, ListGroupsRequest, ListGroupsResponse, SyncGroupRequest, SyncGroupResponse,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use super::str_bytes;
use crate::broker::Broker;
use crate::group::classic::{Event, JoinRequest, Reply, SyncRequest};
use crate::group::consumer::Heartbeat;
use crate::metadata::BrokerRecord;
use kafka_protocol::messages::consumer_group_describe_response::{
    Assignment as DescribeAssignment, DescribedGroup as ConsumerDescribedGroup,
    Member as ConsumerDescribedMember, TopicPartitions as DescribeTopicPartitions,
};
use kafka_protocol::messages::consumer_group_heartbeat_response::{
    Assignment as ConsumerAssignment, TopicPartitions as HeartbeatTopicPartitions,
};
use kafka_protocol::messages::{
    ConsumerGroupDescribeRequest, ConsumerGroupDescribeResponse, ConsumerGroupHeartbeatRequest,
    ConsumerGroupHeartbeatResponse, TopicName,
};

const KEY_TYPE_GROUP: i8 = 0;
const KEY_TYPE_TRANSACTION: i8 = 1;

fn code(e: Option<ResponseError>) -> i16 {
    e.map_or(0, |e| e.code())
}

fn opt(s: &Option<StrBytes>) -> Option<String> {
    s.as_ref().map(|s| s.to_string())
}

/// Group ids must be non-empty (Kafka's INVALID_GROUP_ID).
fn valid_group(id: &GroupId) -> bool {
    !id.0.is_empty()
}

pub(crate) fn find_coordinator(
    broker: &Arc<Broker>,
    req: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    // The coordinator of a group is the broker holding its coordinator slot.
    // A transactional id's coordinator likewise (key type 1).
    let answer = |key: &StrBytes| -> Result<BrokerRecord, (ResponseError, Option<StrBytes>)> {
        match req.key_type {
            KEY_TYPE_GROUP if key.is_empty() => Err((ResponseError::InvalidGroupId, None)),
            KEY_TYPE_GROUP => broker
                .ownership
                .coordinator(key)
                .ok_or((ResponseError::CoordinatorNotAvailable, None)),
            KEY_TYPE_TRANSACTION if key.is_empty() => Err((ResponseError::InvalidRequest, None)),
            KEY_TYPE_TRANSACTION => broker
                .ownership
                .txn_coordinator(key)
                .ok_or((ResponseError::CoordinatorNotAvailable, None)),
            _ => Err((ResponseError::InvalidRequest, None)),
        }
    };
    let mut resp = FindCoordinatorResponse::default();
    if version >= 4 {
        resp.coordinators = req
            .coordinator_keys
            .iter()
            .map(|k| {
                let entry = CoordinatorEntry::default().with_key(k.clone());
                match answer(k) {
                    Ok(b) => entry
                        .with_node_id(BrokerId(b.broker_id))
                        .with_host(str_bytes(b.host))
                        .with_port(b.port),
                    Err((e, message)) => entry
                        .with_node_id(BrokerId(-1))
                        .with_port(-1)
                        .with_error_code(e.code())
                        .with_error_message(message),
                }
            })
            .collect();
        return resp;
    }
    match answer(&req.key) {
        Ok(b) => {
            resp.node_id = BrokerId(b.broker_id);
            resp.host = str_bytes(b.host);
            resp.port = b.port;
        }
        Err((e, message)) => {
            resp.error_code = e.code();
            resp.error_message = message;
            resp.node_id = BrokerId(-1);
            resp.port = -1;
        }
    }
    resp
}

pub(crate) async fn join_group(
    broker: &Arc<Broker>,
    req: JoinGroupRequest,
    version: i16,
    client_id: &str,
    client_host: &str,
) -> JoinGroupResponse {
    let fail = |e: ResponseError| {
        JoinGroupResponse::default()
            .with_error_code(e.code())
            .with_generation_id(-1)
            .with_member_id(req.member_id.clone())
    };
    if !valid_group(&req.group_id) {
        return fail(ResponseError::InvalidGroupId);
    }
    let coord = &broker.groups;
    let token = coord.token();
    let prefix = req
        .group_instance_id
        .as_ref()
        .map_or(client_id, |s| s.as_str());
    let event = Event::Join(JoinRequest {
        token,
        member_id: req.member_id.to_string(),
        instance_id: opt(&req.group_instance_id),
        client_id: client_id.to_string(),
        client_host: client_host.to_string(),
        session_timeout_ms: req.session_timeout_ms,
        // v0 has no rebalance timeout: Kafka uses the session timeout.
        rebalance_timeout_ms: if version == 0 {
            req.session_timeout_ms
        } else {
            req.rebalance_timeout_ms
        },
        protocol_type: req.protocol_type.to_string(),
        protocols: req
            .protocols
            .iter()
            .map(|p| (p.name.to_string(), p.metadata.clone()))
            .collect(),
        require_known_member_id: version >= 4,
        new_member_id: format!("{prefix}-{}", crate::clock::unique_id()),
    });
    match coord.request(&req.group_id.0, event).await {
        Ok(Reply::Join(r)) => JoinGroupResponse::default()
            .with_error_code(code(r.error))
            .with_generation_id(r.generation)
            .with_protocol_type(r.protocol_type.map(str_bytes))
            .with_protocol_name(r.protocol_name.map(str_bytes))
            .with_leader(str_bytes(r.leader))
            .with_skip_assignment(r.skip_assignment)
            .with_member_id(str_bytes(r.member_id))
            .with_members(
                r.members
                    .into_iter()
                    .map(|(id, inst, meta)| {
                        JoinGroupResponseMember::default()
                            .with_member_id(str_bytes(id))
                            .with_group_instance_id(inst.map(str_bytes))
                            .with_metadata(meta)
                    })
                    .collect(),
            ),
        Ok(_) => fail(ResponseError::UnknownServerError),
        Err(e) => fail(e),
    }
}

pub(crate) async fn sync_group(broker: &Arc<Broker>, req: SyncGroupRequest) -> SyncGroupResponse {
    let fail = |e: ResponseError| SyncGroupResponse::default().with_error_code(e.code());
    if !valid_group(&req.group_id) {
        return fail(ResponseError::InvalidGroupId);
    }
    let coord = &broker.groups;
    let event = Event::Sync(SyncRequest {
        token: coord.token(),
        member_id: req.member_id.to_string(),
        instance_id: opt(&req.group_instance_id),
        generation: req.generation_id,
        protocol_type: opt(&req.protocol_type),
        protocol_name: opt(&req.protocol_name),
        assignments: req
            .assignments
            .iter()
            .map(|a| (a.member_id.to_string(), a.assignment.clone()))
            .collect(),
    });
    match coord.request(&req.group_id.0, event).await {
        Ok(Reply::Sync(r)) => SyncGroupResponse::default()
            .with_error_code(code(r.error))
            .with_protocol_type(r.protocol_type.map(str_bytes))
            .with_protocol_name(r.protocol_name.map(str_bytes))
            .with_assignment(r.assignment),
        Ok(_) => fail(ResponseError::UnknownServerError),
        Err(e) => fail(e),
    }
}

pub(crate) async fn heartbeat(broker: &Arc<Broker>, req: HeartbeatRequest) -> HeartbeatResponse {
    if !valid_group(&req.group_id) {
        return HeartbeatResponse::default().with_error_code(ResponseError::InvalidGroupId.code());
    }
    let coord = &broker.groups;
    let event = Event::Heartbeat {
        token: coord.token(),
        member_id: req.member_id.to_string(),
        instance_id: opt(&req.group_instance_id),
        generation: req.generation_id,
    };
    let error = match coord.request(&req.group_id.0, event).await {
        Ok(Reply::Heartbeat(e)) => e,
        Ok(_) => Some(ResponseError::UnknownServerError),
        Err(e) => Some(e),
    };
    HeartbeatResponse::default().with_error_code(code(error))
}

pub(crate) async fn leave_group(
    broker: &Arc<Broker>,
    req: LeaveGroupRequest,
    version: i16,
) -> LeaveGroupResponse {
    if !valid_group(&req.group_id) {
        return LeaveGroupResponse::default().with_error_code(ResponseError::InvalidGroupId.code());
    }
    let members: Vec<(String, Option<String>)> = if version >= 3 {
        req.members
            .iter()
            .map(|m| (m.member_id.to_string(), opt(&m.group_instance_id)))
            .collect()
    } else {
        vec![(req.member_id.to_string(), None)]
    };
    let coord = &broker.groups;
    let event = Event::Leave {
        token: coord.token(),
        members,
    };
    match coord.request(&req.group_id.0, event).await {
        Ok(Reply::Leave(results)) => {
            let mut resp = LeaveGroupResponse::default();
            if version >= 3 {
                resp.members = results
                    .into_iter()
                    .map(|(m, i, e)| {
                        MemberResponse::default()
                            .with_member_id(str_bytes(m))
                            .with_group_instance_id(i.map(str_bytes))
                            .with_error_code(code(e))
                    })
                    .collect();
            } else {
                resp.error_code = code(results.first().and_then(|r| r.2));
            }
            resp
        }
        Ok(_) => {
            LeaveGroupResponse::default().with_error_code(ResponseError::UnknownServerError.code())
        }
        Err(e) => LeaveGroupResponse::default().with_error_code(e.code()),
    }
}

/// All groups: live ones with their state, and groups that only have committed offsets
/// (Empty).
pub(crate) async fn list_groups(
    broker: &Arc<Broker>,
    req: ListGroupsRequest,
) -> ListGroupsResponse {
    let mut resp = ListGroupsResponse::default();
    let mut seen = std::collections::BTreeMap::new();
    for g in broker.groups.live_groups() {
        if let Some(s) = broker.groups.describe(&g).await {
            if s.state_name != "Dead" {
                seen.insert(g, (s.state_name, s.protocol_type, s.group_type));
            }
        }
    }
    match broker.meta.offset_groups().await {
        Ok(groups) => {
            for g in groups {
                seen.entry(g)
                    .or_insert(("Empty", "consumer".to_string(), "classic"));
            }
        }
        Err(_) => resp.error_code = ResponseError::CoordinatorLoadInProgress.code(),
    }
    resp.groups = seen
        .into_iter()
        .filter(|(_, (state, _, _))| {
            req.states_filter.is_empty()
                || req
                    .states_filter
                    .iter()
                    .any(|f| f.as_str().eq_ignore_ascii_case(state))
        })
        .map(|(id, (state, protocol_type, group_type))| {
            ListedGroup::default()
                .with_group_id(GroupId(str_bytes(id)))
                .with_protocol_type(str_bytes(protocol_type))
                .with_group_state(str_bytes(state))
                .with_group_type(str_bytes(group_type))
        })
        .collect();
    resp
}

pub(crate) async fn describe_groups(
    broker: &Arc<Broker>,
    req: DescribeGroupsRequest,
) -> DescribeGroupsResponse {
    let mut resp = DescribeGroupsResponse::default();
    for id in req.groups {
        let mut g = DescribedGroup::default()
            .with_group_id(id.clone())
            .with_authorized_operations(i32::MIN);
        if req.include_authorized_operations {
            // READ 3, DESCRIBE 8, DELETE 6: no ACLs yet, everything is allowed.
            g.authorized_operations = (1 << 3) | (1 << 6) | (1 << 8);
        }
        if let Err(e) = broker.groups.check_coordinator(&id.0) {
            resp.groups.push(g.with_error_code(e.code()));
            continue;
        }
        match broker.groups.describe(&id.0).await {
            Some(s) => {
                g = g
                    .with_group_state(str_bytes(s.state_name))
                    .with_protocol_type(str_bytes(s.protocol_type))
                    .with_protocol_data(str_bytes(s.protocol_name))
                    .with_members(
                        s.members
                            .into_iter()
                            .map(|m| {
                                DescribedGroupMember::default()
                                    .with_member_id(str_bytes(m.member_id))
                                    .with_group_instance_id(m.instance_id.map(str_bytes))
                                    .with_client_id(str_bytes(m.client_id))
                                    .with_client_host(str_bytes(m.client_host))
                                    .with_member_metadata(m.metadata)
                                    .with_member_assignment(m.assignment)
                            })
                            .collect(),
                    );
            }
            None => {
                let has_offsets = broker
                    .meta
                    .fetch_offsets(&id.0)
                    .await
                    .map(|o| !o.is_empty())
                    .unwrap_or(false);
                let state = if has_offsets { "Empty" } else { "Dead" };
                g = g
                    .with_group_state(str_bytes(state))
                    .with_protocol_type(str_bytes(if has_offsets { "consumer" } else { "" }));
            }
        }
        resp.groups.push(g);
    }
    resp
}

pub(crate) async fn delete_groups(
    broker: &Arc<Broker>,
    req: DeleteGroupsRequest,
) -> DeleteGroupsResponse {
    let mut resp = DeleteGroupsResponse::default();
    for id in req.groups_names {
        let error = if id.0.is_empty() {
            Some(ResponseError::InvalidGroupId)
        } else {
            broker.groups.delete(&id.0).await.err()
        };
        resp.results.push(
            DeletableGroupResult::default()
                .with_group_id(id)
                .with_error_code(code(error)),
        );
    }
    resp
}

/// KIP-848: the consumer protocol's single request.
pub(crate) async fn consumer_group_heartbeat(
    broker: &Arc<Broker>,
    req: ConsumerGroupHeartbeatRequest,
    client_id: &str,
    client_host: &str,
) -> ConsumerGroupHeartbeatResponse {
    let fail = |e: ResponseError, msg: &str| {
        ConsumerGroupHeartbeatResponse::default()
            .with_error_code(e.code())
            .with_error_message(Some(str_bytes(msg)))
            .with_member_epoch(-1)
    };
    if !valid_group(&req.group_id) {
        return fail(ResponseError::InvalidGroupId, "group id must not be empty");
    }
    if req
        .subscribed_topic_regex
        .as_ref()
        .is_some_and(|r| !r.is_empty())
    {
        return fail(
            ResponseError::InvalidRequest,
            "regular-expression subscriptions are not supported yet",
        );
    }
    // Topic ids to names for the owned partitions, and the partition counts of every
    // topic (the group picks the ones its members subscribe to).
    let topics: crate::group::consumer::TopicsSnapshot = broker
        .topics()
        .iter()
        .map(|t| (t.name.to_string(), (t.id, t.partitions.len() as i32)))
        .collect();
    let hb = Heartbeat {
        member_id: req.member_id.to_string(),
        member_epoch: req.member_epoch,
        instance_id: opt(&req.instance_id),
        rack_id: opt(&req.rack_id),
        client_id: client_id.to_string(),
        client_host: client_host.to_string(),
        rebalance_timeout_ms: req.rebalance_timeout_ms,
        subscribed: req
            .subscribed_topic_names
            .as_ref()
            .map(|ts| ts.iter().map(|t| t.0.to_string()).collect()),
        assignor: opt(&req.server_assignor),
        owned: req.topic_partitions.as_ref().map(|tps| {
            tps.iter()
                .flat_map(|tp| tp.partitions.iter().map(move |p| (tp.topic_id, *p)))
                .collect()
        }),
        new_member_id: crate::clock::unique_id().to_string(),
        topics,
    };
    let (asked_epoch, owned_count) = (
        req.member_epoch,
        req.topic_partitions
            .as_ref()
            .map(|t| t.iter().map(|x| x.partitions.len()).sum::<usize>()),
    );
    match broker.groups.consumer_heartbeat(&req.group_id.0, hb).await {
        Ok(r) => {
            tracing::debug!(group = %req.group_id.0.as_str(), member = %r.member_id, asked_epoch, ?owned_count, epoch = r.member_epoch, assignment = ?r.assignment, error = ?r.error, "consumer group heartbeat");
            let mut resp = ConsumerGroupHeartbeatResponse::default()
                .with_member_id(Some(str_bytes(r.member_id)))
                .with_member_epoch(r.member_epoch)
                .with_heartbeat_interval_ms(r.heartbeat_interval_ms);
            if let Some((e, msg)) = r.error {
                resp = resp
                    .with_error_code(e.code())
                    .with_error_message(Some(str_bytes(msg)));
            }
            if let Some(parts) = r.assignment {
                resp.assignment = Some(
                    ConsumerAssignment::default().with_topic_partitions(group_by_topic(&parts)),
                );
            }
            resp
        }
        Err(e) => fail(e, "coordinator unavailable"),
    }
}

fn group_by_topic(parts: &[(uuid::Uuid, i32)]) -> Vec<HeartbeatTopicPartitions> {
    let mut by: std::collections::BTreeMap<uuid::Uuid, Vec<i32>> =
        std::collections::BTreeMap::new();
    for (t, p) in parts {
        by.entry(*t).or_default().push(*p);
    }
    by.into_iter()
        .map(|(t, ps)| {
            HeartbeatTopicPartitions::default()
                .with_topic_id(t)
                .with_partitions(ps)
        })
        .collect()
}

pub(crate) async fn consumer_group_describe(
    broker: &Arc<Broker>,
    req: ConsumerGroupDescribeRequest,
) -> ConsumerGroupDescribeResponse {
    let names: std::collections::HashMap<uuid::Uuid, String> = broker
        .topics()
        .iter()
        .map(|t| (t.id, t.name.to_string()))
        .collect();
    let described = |parts: &std::collections::BTreeSet<(uuid::Uuid, i32)>| {
        let mut by: std::collections::BTreeMap<uuid::Uuid, Vec<i32>> =
            std::collections::BTreeMap::new();
        for (t, p) in parts {
            by.entry(*t).or_default().push(*p);
        }
        DescribeAssignment::default().with_topic_partitions(
            by.into_iter()
                .map(|(t, ps)| {
                    DescribeTopicPartitions::default()
                        .with_topic_id(t)
                        .with_topic_name(TopicName(str_bytes(
                            names.get(&t).cloned().unwrap_or_default(),
                        )))
                        .with_partitions(ps)
                })
                .collect(),
        )
    };
    let mut resp = ConsumerGroupDescribeResponse::default();
    for id in req.group_ids {
        let mut out = ConsumerDescribedGroup::default()
            .with_group_id(id.clone())
            .with_authorized_operations(i32::MIN);
        if let Err(e) = broker.groups.check_coordinator(&id.0) {
            resp.groups.push(out.with_error_code(e.code()));
            continue;
        }
        match broker.groups.consumer_describe(&id.0).await {
            Some(g) => {
                out = out
                    .with_group_state(str_bytes(g.state()))
                    .with_group_epoch(g.epoch)
                    .with_assignment_epoch(g.assignment_epoch)
                    .with_assignor_name(str_bytes(g.assignor.name()))
                    .with_members(
                        g.members
                            .values()
                            .map(|m| {
                                ConsumerDescribedMember::default()
                                    .with_member_id(str_bytes(m.member_id.clone()))
                                    .with_instance_id(m.instance_id.clone().map(str_bytes))
                                    .with_rack_id(m.rack_id.clone().map(str_bytes))
                                    .with_member_epoch(m.epoch)
                                    .with_client_id(str_bytes(m.client_id.clone()))
                                    .with_client_host(str_bytes(m.client_host.clone()))
                                    .with_subscribed_topic_names(
                                        m.subscribed
                                            .iter()
                                            .map(|t| TopicName(str_bytes(t.clone())))
                                            .collect(),
                                    )
                                    .with_assignment(described(&m.assigned))
                                    .with_target_assignment(described(
                                        &g.target.get(&m.member_id).cloned().unwrap_or_default(),
                                    ))
                                    .with_member_type(1)
                            })
                            .collect(),
                    );
            }
            None => {
                out = out
                    .with_error_code(ResponseError::GroupIdNotFound.code())
                    .with_error_message(Some(str_bytes("no consumer-protocol group with this id")))
                    .with_group_state(str_bytes("Dead"));
            }
        }
        resp.groups.push(out);
    }
    resp
}
