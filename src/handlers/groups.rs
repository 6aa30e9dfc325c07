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

use super::metadata::host_port;
use super::str_bytes;
use crate::broker::Broker;
use crate::group::classic::GroupState;
use crate::group::classic::{Event, JoinRequest, Reply, SyncRequest};

const KEY_TYPE_GROUP: i8 = 0;

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

pub fn find_coordinator(
    broker: &Arc<Broker>,
    req: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let (host, port) = host_port(&broker.config.advertise);
    let answer = |key: &StrBytes| -> (i16, Option<StrBytes>) {
        if req.key_type != KEY_TYPE_GROUP {
            (
                ResponseError::CoordinatorNotAvailable.code(),
                Some(str_bytes("transactions are not supported yet")),
            )
        } else if key.is_empty() {
            (ResponseError::InvalidGroupId.code(), None)
        } else {
            (0, None)
        }
    };
    let mut resp = FindCoordinatorResponse::default();
    if version >= 4 {
        resp.coordinators = req
            .coordinator_keys
            .iter()
            .map(|k| {
                let (error_code, error_message) = answer(k);
                CoordinatorEntry::default()
                    .with_key(k.clone())
                    .with_node_id(BrokerId(if error_code == 0 {
                        broker.config.broker_id
                    } else {
                        -1
                    }))
                    .with_host(str_bytes(if error_code == 0 {
                        host.clone()
                    } else {
                        String::new()
                    }))
                    .with_port(if error_code == 0 { port } else { -1 })
                    .with_error_code(error_code)
                    .with_error_message(error_message)
            })
            .collect();
        return resp;
    }
    let (error_code, error_message) = answer(&req.key);
    resp.error_code = error_code;
    resp.error_message = error_message;
    if error_code == 0 {
        resp.node_id = BrokerId(broker.config.broker_id);
        resp.host = str_bytes(host);
        resp.port = port;
    } else {
        resp.node_id = BrokerId(-1);
        resp.port = -1;
    }
    resp
}

pub async fn join_group(
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
        new_member_id: format!("{prefix}-{}", uuid::Uuid::new_v4()),
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

pub async fn sync_group(broker: &Arc<Broker>, req: SyncGroupRequest) -> SyncGroupResponse {
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

pub async fn heartbeat(broker: &Arc<Broker>, req: HeartbeatRequest) -> HeartbeatResponse {
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

pub async fn leave_group(
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
pub async fn list_groups(broker: &Arc<Broker>, req: ListGroupsRequest) -> ListGroupsResponse {
    let mut resp = ListGroupsResponse::default();
    let mut seen = std::collections::BTreeMap::new();
    for g in broker.groups.live_groups() {
        if let Some(s) = broker.groups.describe(&g).await {
            if s.state != GroupState::Dead {
                seen.insert(g, (s.state.name(), s.protocol_type));
            }
        }
    }
    match broker.meta.offset_groups().await {
        Ok(groups) => {
            for g in groups {
                seen.entry(g).or_insert(("Empty", "consumer".to_string()));
            }
        }
        Err(_) => resp.error_code = ResponseError::CoordinatorLoadInProgress.code(),
    }
    resp.groups = seen
        .into_iter()
        .filter(|(_, (state, _))| {
            req.states_filter.is_empty()
                || req
                    .states_filter
                    .iter()
                    .any(|f| f.as_str().eq_ignore_ascii_case(state))
        })
        .map(|(id, (state, protocol_type))| {
            ListedGroup::default()
                .with_group_id(GroupId(str_bytes(id)))
                .with_protocol_type(str_bytes(protocol_type))
                .with_group_state(str_bytes(state))
                .with_group_type(str_bytes("classic"))
        })
        .collect();
    resp
}

pub async fn describe_groups(
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
        match broker.groups.describe(&id.0).await {
            Some(s) => {
                g = g
                    .with_group_state(str_bytes(s.state.name()))
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

pub async fn delete_groups(broker: &Arc<Broker>, req: DeleteGroupsRequest) -> DeleteGroupsResponse {
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
