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
use kafka_protocol::protocol::{Decodable, StrBytes};
use kafka_protocol::ResponseError;

use super::str_bytes;
use crate::broker::Broker;
use crate::clock::now_ms;
use crate::group::CommitError;
use crate::metadata::CommittedOffset;

/// A partition of a commit: the offset to store, or its own error.
pub(crate) type PartitionCheck = (i32, Result<CommittedOffset, ResponseError>);

/// One partition of a commit request as sent: (partition, offset, leader epoch,
/// metadata).
pub(crate) type OffsetIn<'a> = (i32, i64, i32, Option<&'a StrBytes>);

/// Checks each partition of a commit (it exists, its metadata fits); the offsets that
/// pass are stamped with the commit time.
pub(crate) fn check_offsets<'a>(
    broker: &Broker,
    topics: impl IntoIterator<Item = (&'a TopicName, Vec<OffsetIn<'a>>)>,
) -> Vec<(TopicName, Vec<PartitionCheck>)> {
    let max_metadata = broker.groups.config.offset_metadata_max_bytes;
    let now = now_ms();
    topics
        .into_iter()
        .map(|(name, parts)| {
            let topic = broker.topic(&name.0);
            let parts = parts
                .into_iter()
                .map(|(partition, offset, leader_epoch, metadata)| {
                    let exists = topic
                        .as_ref()
                        .is_some_and(|t| partition >= 0 && partition < t.partition_count());
                    let metadata = metadata.map(|m| m.to_string()).unwrap_or_default();
                    let r = if !exists {
                        Err(ResponseError::UnknownTopicOrPartition)
                    } else if metadata.len() > max_metadata {
                        Err(ResponseError::OffsetMetadataTooLarge)
                    } else {
                        Ok(CommittedOffset {
                            topic: name.0.to_string(),
                            partition,
                            offset,
                            leader_epoch,
                            metadata,
                            commit_timestamp_ms: now,
                        })
                    };
                    (partition, r)
                })
                .collect();
            (name.clone(), parts)
        })
        .collect()
}

/// Hands the offsets that passed their checks to the group's coordinator (with a
/// producer: pending in its transaction); the error every such partition answers.
pub(crate) async fn commit_checked(
    broker: &Broker,
    group: &str,
    member: (String, Option<String>, i32),
    producer_id: Option<i64>,
    checked: &[(TopicName, Vec<PartitionCheck>)],
) -> Option<ResponseError> {
    let offsets: Vec<CommittedOffset> = checked
        .iter()
        .flat_map(|(_, ps)| ps.iter().filter_map(|(_, r)| r.as_ref().ok().cloned()))
        .collect();
    if group.is_empty() {
        return Some(ResponseError::InvalidGroupId);
    }
    if offsets.is_empty() {
        return None;
    }
    let (member_id, instance_id, generation) = member;
    match broker
        .groups
        .commit(
            group,
            member_id,
            instance_id,
            generation,
            offsets,
            producer_id,
        )
        .await
    {
        Ok(()) => None,
        Err(CommitError::Group(e)) | Err(CommitError::Store(e)) => Some(e),
    }
}

/// Each partition's answer: its own error, else the commit's.
pub(crate) fn partition_errors(
    checked: Vec<(TopicName, Vec<PartitionCheck>)>,
    group_error: Option<ResponseError>,
) -> impl Iterator<Item = (TopicName, Vec<(i32, i16)>)> {
    checked.into_iter().map(move |(name, parts)| {
        let codes = parts
            .into_iter()
            .map(|(p, r)| (p, r.err().or(group_error).map_or(0, |e| e.code())))
            .collect();
        (name, codes)
    })
}

/// The partitions of a commit request's topics as [`check_offsets`] takes them
/// (OffsetCommit's and TxnOffsetCommit's generated types differ, their fields not).
macro_rules! offsets_in {
    ($topics:expr) => {
        $topics.iter().map(|t| {
            let parts = t
                .partitions
                .iter()
                .map(|p| {
                    (
                        p.partition_index,
                        p.committed_offset,
                        p.committed_leader_epoch,
                        p.committed_metadata.as_ref(),
                    )
                })
                .collect();
            (&t.name, parts)
        })
    };
}

/// A commit response's topics: each partition's code, in the API's generated types.
macro_rules! commit_topics {
    ($checked:expr, $error:expr, $topic:ident, $partition:ident) => {
        $crate::handlers::commits::partition_errors($checked, $error)
            .map(|(name, codes)| {
                $topic::default().with_name(name).with_partitions(
                    codes
                        .into_iter()
                        .map(|(p, code)| {
                            $partition::default()
                                .with_partition_index(p)
                                .with_error_code(code)
                        })
                        .collect(),
                )
            })
            .collect()
    };
}
pub(crate) use {commit_topics, offsets_in};

pub(crate) async fn offset_commit(
    broker: &Arc<Broker>,
    req: OffsetCommitRequest,
) -> OffsetCommitResponse {
    let checked = check_offsets(broker, offsets_in!(req.topics));
    let member = (
        req.member_id.to_string(),
        req.group_instance_id.as_ref().map(|s| s.to_string()),
        req.generation_id_or_member_epoch,
    );
    let group_error = commit_checked(broker, &req.group_id.0, member, None, &checked).await;
    let topics = commit_topics!(
        checked,
        group_error,
        OffsetCommitResponseTopic,
        OffsetCommitResponsePartition
    );
    OffsetCommitResponse::default().with_topics(topics)
}

/// One partition's answer: (partition, offset, leader epoch, metadata, error code).
type FetchedOffset = (i32, i64, i32, String, i16);

/// The committed offsets of one group for the requested partitions (None = all). With
/// `require_stable` (KIP-447), a partition with an offset committed in a transaction
/// not yet ended answers UNSTABLE_OFFSET_COMMIT, and the consumer asks again.
async fn group_offsets(
    broker: &Arc<Broker>,
    group: &str,
    wanted: Option<Vec<(String, Vec<i32>)>>,
    require_stable: bool,
) -> Result<Vec<(String, Vec<FetchedOffset>)>, ResponseError> {
    broker.groups.check_coordinator(group)?;
    let stored = broker
        .meta
        .fetch_offsets(group)
        .await
        .map_err(|_| ResponseError::CoordinatorLoadInProgress)?;
    let pending: HashSet<(String, i32)> = if require_stable {
        broker
            .meta
            .pending_txn_offsets(group)
            .await
            .map_err(|_| ResponseError::CoordinatorLoadInProgress)?
            .into_iter()
            .map(|p| (p.offset.topic, p.offset.partition))
            .collect()
    } else {
        HashSet::new()
    };
    let unstable = |topic: &str, p: i32| pending.contains(&(topic.to_owned(), p));
    let answer = |topic: &str, p: i32, o: Option<&CommittedOffset>| -> FetchedOffset {
        if unstable(topic, p) {
            return (
                p,
                -1,
                -1,
                String::new(),
                ResponseError::UnstableOffsetCommit.code(),
            );
        }
        match o {
            Some(o) => (p, o.offset, o.leader_epoch, o.metadata.clone(), 0),
            None => (p, -1, -1, String::new(), 0),
        }
    };
    let mut by_topic: BTreeMap<String, Vec<FetchedOffset>> = BTreeMap::new();
    match wanted {
        None => {
            for o in &stored {
                by_topic.entry(o.topic.clone()).or_default().push(answer(
                    &o.topic,
                    o.partition,
                    Some(o),
                ));
            }
            for (topic, p) in &pending {
                if !stored
                    .iter()
                    .any(|o| &o.topic == topic && o.partition == *p)
                {
                    by_topic
                        .entry(topic.clone())
                        .or_default()
                        .push(answer(topic, *p, None));
                }
            }
            for parts in by_topic.values_mut() {
                parts.sort_by_key(|p| p.0);
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
                        .map(|p| answer(&topic, p, by_partition.get(&(topic.as_str(), p)).copied()))
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
                            .map(|(p, o, e, m, code)| {
                                $partition::default()
                                    .with_partition_index(p)
                                    .with_committed_offset(o)
                                    .with_committed_leader_epoch(e)
                                    .with_metadata(Some(str_bytes(m)))
                                    .with_error_code(code)
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
            match group_offsets(broker, &g.group_id.0, wanted, req.require_stable).await {
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
    match group_offsets(broker, &req.group_id.0, wanted, req.require_stable).await {
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
