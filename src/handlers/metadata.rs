//! Metadata and DescribeCluster: this broker, its topics and their partitions (with
//! topic ids and leader epochs), and topic auto-creation.

use std::sync::Arc;

use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, DescribeClusterRequest, DescribeClusterResponse, MetadataRequest, MetadataResponse,
    TopicName,
};
use kafka_protocol::ResponseError;
use uuid::Uuid;

use super::{errors, str_bytes};
use crate::broker::{Broker, Topic, TopicError};
use crate::metadata::BrokerRecord;

/// ACL operations a client may perform on a topic (no ACLs yet: all of them).
/// Bits: READ 3, WRITE 4, CREATE 5, DELETE 6, ALTER 7, DESCRIBE 8, DESCRIBE_CONFIGS 10, ALTER_CONFIGS 11.
const TOPIC_OPERATIONS: i32 =
    (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 10) | (1 << 11);
/// Bits: DESCRIBE 8, ALTER 7, CREATE 5, CLUSTER_ACTION 9, DESCRIBE_CONFIGS 10, ALTER_CONFIGS 11, IDEMPOTENT_WRITE 12.
const CLUSTER_OPERATIONS: i32 =
    (1 << 5) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12);
const OPERATIONS_NOT_REQUESTED: i32 = i32::MIN;

pub(crate) async fn metadata(
    broker: &Arc<Broker>,
    req: MetadataRequest,
    version: i16,
) -> MetadataResponse {
    let mut resp = MetadataResponse::default();
    // Read once: the brokers listed and the leaders named come from the same list.
    let live = broker.membership.live();
    resp.brokers = live
        .iter()
        .map(|b| {
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(b.broker_id))
                .with_host(str_bytes(b.host.clone()))
                .with_port(b.port)
                .with_rack(b.zone.clone().map(str_bytes))
        })
        .collect();
    resp.cluster_id = Some(str_bytes(broker.config.cluster_id.clone()));
    resp.controller_id = BrokerId(broker.config.broker_id);
    resp.cluster_authorized_operations = if req.include_cluster_authorized_operations {
        CLUSTER_OPERATIONS
    } else {
        OPERATIONS_NOT_REQUESTED
    };
    let topic_ops = if req.include_topic_authorized_operations {
        TOPIC_OPERATIONS
    } else {
        OPERATIONS_NOT_REQUESTED
    };
    // v0: an empty list means all topics; v1+: null means all, empty means none.
    let requested = match req.topics {
        None => None,
        Some(t) if t.is_empty() && version == 0 => None,
        Some(t) => Some(t),
    };
    let allow_auto =
        broker.config.auto_create_topics && (version < 4 || req.allow_auto_topic_creation);
    match requested {
        None => {
            resp.topics = broker
                .topics()
                .iter()
                .map(|t| describe(broker, &live, t, topic_ops))
                .collect();
        }
        Some(topics) => {
            for rt in topics {
                let entry = match rt.name.as_ref().map(|n| n.0.to_string()) {
                    Some(name) => match broker.topic(&name) {
                        Some(t) => describe(broker, &live, &t, topic_ops),
                        None if allow_auto => match broker.controller.auto_create(&name).await {
                            Ok(t) => describe(broker, &live, &t, topic_ops),
                            Err(e) => missing(Some(name), Uuid::nil(), errors::topic_error(&e)),
                        },
                        None => {
                            let error = match crate::broker::validate_topic_name(&name) {
                                Err(TopicError::InvalidTopic(_)) => {
                                    ResponseError::InvalidTopicException
                                }
                                _ => ResponseError::UnknownTopicOrPartition,
                            };
                            missing(Some(name), Uuid::nil(), error)
                        }
                    },
                    None => {
                        let id = rt.topic_id;
                        match broker.topic_by_id(&id) {
                            Some(t) => describe(broker, &live, &t, topic_ops),
                            None => missing(None, id, ResponseError::UnknownTopicId),
                        }
                    }
                };
                resp.topics.push(entry);
            }
        }
    }
    resp
}

fn missing(name: Option<String>, id: Uuid, error: ResponseError) -> MetadataResponseTopic {
    MetadataResponseTopic::default()
        .with_error_code(error.code())
        .with_name(name.map(|n| TopicName(str_bytes(n))))
        .with_topic_id(id)
        .with_topic_authorized_operations(OPERATIONS_NOT_REQUESTED)
}

/// Each partition's leader is this broker while it serves the partition, otherwise
/// the owner (or assigned broker) the ownership view names, with its leader epoch.
fn describe(broker: &Broker, live: &[BrokerRecord], t: &Topic, ops: i32) -> MetadataResponseTopic {
    let me = broker.config.broker_id;
    MetadataResponseTopic::default()
        .with_name(Some(TopicName(str_bytes(t.name.to_string()))))
        .with_topic_id(t.id)
        .with_topic_authorized_operations(ops)
        .with_partitions(
            (0..t.partition_count())
                .map(|i| {
                    let (leader, epoch) = match t.partition(i) {
                        Ok(h) => (me, h.shared.leader_epoch),
                        Err(_) => {
                            let l = broker.ownership.leader(live, &t.key(i));
                            let id = l.broker_id.unwrap_or(-1);
                            (if id == me { -1 } else { id }, l.leader_epoch)
                        }
                    };
                    let leader = BrokerId(leader);
                    MetadataResponsePartition::default()
                        .with_error_code(if leader.0 < 0 {
                            ResponseError::LeaderNotAvailable.code()
                        } else {
                            0
                        })
                        .with_partition_index(i)
                        .with_leader_id(leader)
                        .with_leader_epoch(epoch)
                        .with_replica_nodes(vec![leader])
                        .with_isr_nodes(vec![leader])
                })
                .collect(),
        )
}

pub(crate) fn describe_cluster(
    broker: &Arc<Broker>,
    req: DescribeClusterRequest,
) -> DescribeClusterResponse {
    let mut resp = DescribeClusterResponse::default();
    resp.cluster_id = str_bytes(broker.config.cluster_id.clone());
    resp.controller_id = BrokerId(broker.config.broker_id);
    resp.endpoint_type = 1;
    resp.cluster_authorized_operations = if req.include_cluster_authorized_operations {
        CLUSTER_OPERATIONS
    } else {
        OPERATIONS_NOT_REQUESTED
    };
    resp.brokers = broker
        .membership
        .live()
        .into_iter()
        .map(|b| {
            DescribeClusterBroker::default()
                .with_broker_id(BrokerId(b.broker_id))
                .with_host(str_bytes(b.host))
                .with_port(b.port)
                .with_rack(b.zone.map(str_bytes))
        })
        .collect();
    resp
}
