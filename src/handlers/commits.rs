//! OffsetCommit, OffsetFetch and OffsetDelete: consumer groups' committed offsets.
//! Commits are validated by the group's task (generation, member, instance fencing)
//! and stored in the metadata store; fetches read the store.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use bytes::Buf;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{
    ConsumerProtocolSubscription, OffsetCommitRequest, OffsetCommitResponse, OffsetDeleteRequest,
    OffsetDeleteResponse, OffsetFetchRequest, OffsetFetchResponse, TopicName,
};
use kafka_protocol::protocol::Decodable;
use kafka_protocol::ResponseError;

use super::str_bytes;
use crate::broker::Broker;
use crate::clock::now_ms;
use crate::group::CommitError;
use crate::metadata::CommittedOffset;

/// A partition of a commit: the offset to store, or its own error.
type PartitionCheck = (i32, Result<CommittedOffset, ResponseError>);

pub(crate) async fn offset_commit(
    broker: &Arc<Broker>,
    req: OffsetCommitRequest,
) -> OffsetCommitResponse {
    let max_metadata = broker.groups.config.offset_metadata_max_bytes;
    let now = now_ms();
    // Per (topic, partition): Ok(offset to store) or the partition's own error.
    let mut checked: Vec<(TopicName, Vec<PartitionCheck>)> = Vec::new();
    for t in &req.topics {
        let topic = broker.topic(&t.name.0);
        let parts = t
            .partitions
            .iter()
            .map(|p| {
                let exists = topic.as_ref().is_some_and(|t| {
                    p.partition_index >= 0 && (p.partition_index as usize) < t.partitions.len()
                });
                let metadata = p
                    .committed_metadata
                    .as_ref()
                    .map(|m| m.to_string())
                    .unwrap_or_default();
                let r = if !exists {
                    Err(ResponseError::UnknownTopicOrPartition)
                } else if metadata.len() > max_metadata {
                    Err(ResponseError::OffsetMetadataTooLarge)
                } else {
                    Ok(CommittedOffset {
                        topic: t.name.0.to_string(),
                        partition: p.partition_index,
                        offset: p.committed_offset,
                        leader_epoch: p.committed_leader_epoch,
                        metadata,
                        commit_timestamp_ms: now,
                    })
                };
                (p.partition_index, r)
            })
            .collect();
        checked.push((t.name.clone(), parts));
    }
    let offsets: Vec<CommittedOffset> = checked
        .iter()
        .flat_map(|(_, ps)| ps.iter().filter_map(|(_, r)| r.as_ref().ok().cloned()))
        .collect();
    let group_error = if req.group_id.0.is_empty() {
        Some(ResponseError::InvalidGroupId)
    } else if offsets.is_empty() {
        None
    } else {
        let result = broker
            .groups
            .commit(
                &req.group_id.0,
                req.member_id.to_string(),
                req.group_instance_id.as_ref().map(|s| s.to_string()),
                req.generation_id_or_member_epoch,
                offsets,
            )
            .await;
        match result {
            Ok(()) => None,
            Err(CommitError::Group(e)) | Err(CommitError::Store(e)) => Some(e),
        }
    };
    let topics = checked
        .into_iter()
        .map(|(name, parts)| {
            OffsetCommitResponseTopic::default()
                .with_name(name)
                .with_partitions(
                    parts
                        .into_iter()
                        .map(|(p, r)| {
                            let e = match r {
                                Err(e) => Some(e),
                                Ok(_) => group_error,
                            };
                            OffsetCommitResponsePartition::default()
                                .with_partition_index(p)
                                .with_error_code(e.map_or(0, |e| e.code()))
                        })
                        .collect(),
                )
        })
        .collect();
    OffsetCommitResponse::default().with_topics(topics)
}

/// The committed offsets of one group for the requested partitions (None = all).
async fn group_offsets(
    broker: &Arc<Broker>,
    group: &str,
    wanted: Option<Vec<(String, Vec<i32>)>>,
) -> Result<Vec<(String, Vec<(i32, i64, i32, String)>)>, ResponseError> {
    broker.groups.check_coordinator(group)?;
    let stored = broker
        .meta
        .fetch_offsets(group)
        .await
        .map_err(|_| ResponseError::CoordinatorLoadInProgress)?;
    let mut by_topic: BTreeMap<String, Vec<(i32, i64, i32, String)>> = BTreeMap::new();
    match wanted {
        None => {
            for o in stored {
                by_topic.entry(o.topic).or_default().push((
                    o.partition,
                    o.offset,
                    o.leader_epoch,
                    o.metadata,
                ));
            }
            Ok(by_topic.into_iter().collect())
        }
        Some(topics) => {
            // One lookup per requested partition, not a scan of every stored offset.
            let by_partition: std::collections::HashMap<(&str, i32), &CommittedOffset> = stored
                .iter()
                .map(|o| ((o.topic.as_str(), o.partition), o))
                .collect();
            Ok(topics
                .into_iter()
                .map(|(topic, partitions)| {
                    let parts = partitions
                        .into_iter()
                        .map(|p| match by_partition.get(&(topic.as_str(), p)) {
                            Some(o) => (p, o.offset, o.leader_epoch, o.metadata.clone()),
                            None => (p, -1, -1, String::new()),
                        })
                        .collect();
                    (topic, parts)
                })
                .collect())
        }
    }
}

/// Builds OffsetFetch topic results; v8+ and older versions use generated types of
/// different names but the same fields.
macro_rules! offset_topics {
    ($topics:expr, $topic:ident, $partition:ident) => {
        $topics
            .into_iter()
            .map(|(name, parts)| {
                $topic::default()
                    .with_name(TopicName(str_bytes(name)))
                    .with_partitions(
                        parts
                            .into_iter()
                            .map(|(p, o, e, m)| {
                                $partition::default()
                                    .with_partition_index(p)
                                    .with_committed_offset(o)
                                    .with_committed_leader_epoch(e)
                                    .with_metadata(Some(str_bytes(m)))
                            })
                            .collect(),
                    )
            })
            .collect()
    };
}

pub(crate) async fn offset_fetch(
    broker: &Arc<Broker>,
    req: OffsetFetchRequest,
    version: i16,
) -> OffsetFetchResponse {
    let mut resp = OffsetFetchResponse::default();
    if version >= 8 {
        for g in req.groups {
            let wanted = g.topics.map(|ts| {
                ts.into_iter()
                    .map(|t| (t.name.0.to_string(), t.partition_indexes))
                    .collect()
            });
            let mut out = OffsetFetchResponseGroup::default().with_group_id(g.group_id.clone());
            // v9: a consumer-protocol member proves its epoch (STALE_MEMBER_EPOCH otherwise).
            if let Some(member) = g.member_id.as_ref().filter(|m| !m.is_empty()) {
                if let Err(e) = broker
                    .groups
                    .check_member_epoch(&g.group_id.0, member, g.member_epoch)
                    .await
                {
                    out.error_code = e.code();
                    resp.groups.push(out);
                    continue;
                }
            }
            match group_offsets(broker, &g.group_id.0, wanted).await {
                Ok(topics) => {
                    out.topics = offset_topics!(
                        topics,
                        OffsetFetchResponseTopics,
                        OffsetFetchResponsePartitions
                    );
                }
                Err(e) => out.error_code = e.code(),
            }
            resp.groups.push(out);
        }
        return resp;
    }
    let wanted = req.topics.map(|ts| {
        ts.into_iter()
            .map(|t| (t.name.0.to_string(), t.partition_indexes))
            .collect()
    });
    match group_offsets(broker, &req.group_id.0, wanted).await {
        Ok(topics) => {
            resp.topics = offset_topics!(
                topics,
                OffsetFetchResponseTopic,
                OffsetFetchResponsePartition
            );
        }
        Err(e) => resp.error_code = e.code(),
    }
    resp
}

/// Topics the group's live consumer members subscribe to.
fn subscribed_topics(members: &[crate::group::MemberSummary]) -> HashSet<String> {
    let mut topics = HashSet::new();
    for m in members {
        let mut buf = m.metadata.clone();
        if buf.remaining() < 2 {
            continue;
        }
        let version = buf.get_i16();
        if let Ok(sub) = ConsumerProtocolSubscription::decode(&mut buf, version.clamp(0, 3)) {
            topics.extend(sub.topics.iter().map(|t| t.to_string()));
        }
    }
    topics
}

pub(crate) async fn offset_delete(
    broker: &Arc<Broker>,
    req: OffsetDeleteRequest,
) -> OffsetDeleteResponse {
    let mut resp = OffsetDeleteResponse::default();
    if let Err(e) = broker.groups.check_coordinator(&req.group_id.0) {
        resp.error_code = e.code();
        return resp;
    }
    let live = broker.groups.describe(&req.group_id.0).await;
    let subscribed = live
        .as_ref()
        .filter(|s| s.protocol_type == "consumer")
        .map(|s| subscribed_topics(&s.members))
        .unwrap_or_default();
    let has_offsets = broker
        .meta
        .fetch_offsets(&req.group_id.0)
        .await
        .map(|o| !o.is_empty())
        .unwrap_or(false);
    if live.as_ref().is_none_or(|s| s.members.is_empty()) && !has_offsets {
        resp.error_code = ResponseError::GroupIdNotFound.code();
        return resp;
    }
    for t in req.topics {
        let name = t.name.0.to_string();
        let mut out = OffsetDeleteResponseTopic::default().with_name(t.name.clone());
        if subscribed.contains(&name) {
            out.partitions = t
                .partitions
                .iter()
                .map(|p| {
                    OffsetDeleteResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(ResponseError::GroupSubscribedToTopic.code())
                })
                .collect();
        } else {
            let pairs: Vec<(String, i32)> = t
                .partitions
                .iter()
                .map(|p| (name.clone(), p.partition_index))
                .collect();
            // Under the coordinator's lease: NOT_COORDINATOR once it moved.
            let error = broker
                .groups
                .delete_offsets(&req.group_id.0, Some(&pairs))
                .await
                .err();
            out.partitions = t
                .partitions
                .iter()
                .map(|p| {
                    OffsetDeleteResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(error.map_or(0, |e| e.code()))
                })
                .collect();
        }
        resp.topics.push(out);
    }
    resp
}
