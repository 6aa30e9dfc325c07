//! Request handlers, one file per API family. Each takes the decoded request and
//! returns the response; errors reach clients as Kafka error codes (see [`errors`]).

pub(crate) mod api_versions;
pub(crate) mod commits;
pub(crate) mod configs;
pub(crate) mod errors;
pub(crate) mod fetch;
pub(crate) mod groups;
pub(crate) mod metadata;
pub(crate) mod offsets;
pub(crate) mod produce;
pub(crate) mod producers;
pub(crate) mod topics;
pub(crate) mod txns;

use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseKind};
use kafka_protocol::protocol::{Decodable, StrBytes};

use crate::broker::Broker;
use crate::protocol::{self, Frame, FrameError, RequestContext};

/// Handles one request. `Ok(None)` sends nothing (acks=0 produce); `Err` closes the
/// connection (the caller logs the reason with the peer).
pub(crate) async fn handle(
    broker: &Arc<Broker>,
    ctx: RequestContext,
    frame: Frame,
) -> Result<Option<Bytes>, FrameError> {
    let api =
        ApiKey::try_from(frame.api_key).map_err(|_| FrameError::UnknownApiKey(frame.api_key))?;
    let range = protocol::supported_range(api);
    let in_range = range.is_some_and(|(min, max)| (min..=max).contains(&frame.api_version));
    if !in_range {
        if api == ApiKey::ApiVersions {
            // KIP-511: answer an unknown ApiVersions version with v0 and the list, so the
            // client can retry with a version both sides know.
            let mut resp = api_versions::response();
            resp.error_code = kafka_protocol::ResponseError::UnsupportedVersion.code();
            return protocol::encode(
                frame.correlation_id,
                ApiKey::ApiVersions,
                0,
                &ResponseKind::ApiVersions(resp),
            )
            .map(Some);
        }
        return Err(FrameError::UnsupportedVersion {
            api,
            version: frame.api_version,
        });
    }
    let mut body = frame.bytes.clone();
    let header_version = api.request_header_version(frame.api_version);
    let header = RequestHeader::decode(&mut body, header_version)
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    let request = RequestKind::decode(api, &mut body, frame.api_version)
        .map_err(|e| FrameError::Decode(format!("{api:?} v{}: {e}", frame.api_version)))?;
    let response = dispatch(broker, &header, ctx, request).await;
    match response {
        Some(r) => protocol::encode(frame.correlation_id, api, frame.api_version, &r).map(Some),
        None => Ok(None),
    }
}

/// Routes a decoded request. `None` means no response is sent (acks=0 produce).
pub(crate) async fn dispatch(
    broker: &Arc<Broker>,
    header: &RequestHeader,
    ctx: crate::protocol::RequestContext,
    request: RequestKind,
) -> Option<ResponseKind> {
    let peer = ctx.peer;
    let v = header.request_api_version;
    let client_id = header
        .client_id
        .as_ref()
        .map(|c| c.to_string())
        .unwrap_or_default();
    let client_host = format!("/{}", peer.ip());
    Some(match request {
        RequestKind::ApiVersions(_) => ResponseKind::ApiVersions(api_versions::response()),
        RequestKind::Metadata(r) => ResponseKind::Metadata(metadata::metadata(broker, r, v).await),
        RequestKind::DescribeCluster(r) => {
            ResponseKind::DescribeCluster(metadata::describe_cluster(broker, r))
        }
        RequestKind::CreateTopics(r) => {
            ResponseKind::CreateTopics(topics::create_topics(broker, r, v).await)
        }
        RequestKind::DeleteTopics(r) => {
            ResponseKind::DeleteTopics(topics::delete_topics(broker, r, v).await)
        }
        RequestKind::CreatePartitions(r) => {
            ResponseKind::CreatePartitions(topics::create_partitions(broker, r).await)
        }
        RequestKind::Produce(r) => {
            return produce::produce(broker, r, v, ctx.arrived, ctx.order)
                .await
                .map(ResponseKind::Produce)
        }
        RequestKind::Fetch(r) => ResponseKind::Fetch(fetch::fetch(broker, r, v).await),
        RequestKind::ListOffsets(r) => {
            ResponseKind::ListOffsets(offsets::list_offsets(broker, r).await)
        }
        RequestKind::OffsetForLeaderEpoch(r) => {
            ResponseKind::OffsetForLeaderEpoch(offsets::offset_for_leader_epoch(broker, r))
        }
        RequestKind::DeleteRecords(r) => {
            ResponseKind::DeleteRecords(offsets::delete_records(broker, r).await)
        }
        RequestKind::DescribeProducers(r) => {
            ResponseKind::DescribeProducers(producers::describe_producers(broker, r).await)
        }
        RequestKind::InitProducerId(r) => {
            ResponseKind::InitProducerId(produce::init_producer_id(broker, r, v).await)
        }
        RequestKind::AddPartitionsToTxn(r) => {
            ResponseKind::AddPartitionsToTxn(txns::add_partitions(broker, r, v).await)
        }
        RequestKind::AddOffsetsToTxn(r) => {
            ResponseKind::AddOffsetsToTxn(txns::add_offsets(broker, r, v).await)
        }
        RequestKind::EndTxn(r) => ResponseKind::EndTxn(txns::end_txn(broker, r, v).await),
        RequestKind::TxnOffsetCommit(r) => {
            ResponseKind::TxnOffsetCommit(txns::txn_offset_commit(broker, r).await)
        }
        RequestKind::WriteTxnMarkers(r) => {
            ResponseKind::WriteTxnMarkers(txns::write_markers(broker, r).await)
        }
        RequestKind::DescribeTransactions(r) => {
            ResponseKind::DescribeTransactions(txns::describe_transactions(broker, r).await)
        }
        RequestKind::ListTransactions(r) => {
            ResponseKind::ListTransactions(txns::list_transactions(broker, r).await)
        }
        RequestKind::DescribeConfigs(r) => {
            ResponseKind::DescribeConfigs(configs::describe_configs(broker, r, v))
        }
        RequestKind::AlterConfigs(r) => {
            ResponseKind::AlterConfigs(configs::alter_configs(broker, r).await)
        }
        RequestKind::IncrementalAlterConfigs(r) => ResponseKind::IncrementalAlterConfigs(
            configs::incremental_alter_configs(broker, r).await,
        ),
        RequestKind::FindCoordinator(r) => {
            ResponseKind::FindCoordinator(groups::find_coordinator(broker, r, v))
        }
        RequestKind::JoinGroup(r) => ResponseKind::JoinGroup(
            groups::join_group(broker, r, v, &client_id, &client_host).await,
        ),
        RequestKind::SyncGroup(r) => ResponseKind::SyncGroup(groups::sync_group(broker, r).await),
        RequestKind::Heartbeat(r) => ResponseKind::Heartbeat(groups::heartbeat(broker, r).await),
        RequestKind::LeaveGroup(r) => {
            ResponseKind::LeaveGroup(groups::leave_group(broker, r, v).await)
        }
        RequestKind::ListGroups(r) => {
            ResponseKind::ListGroups(groups::list_groups(broker, r).await)
        }
        RequestKind::DescribeGroups(r) => {
            ResponseKind::DescribeGroups(groups::describe_groups(broker, r).await)
        }
        RequestKind::DeleteGroups(r) => {
            ResponseKind::DeleteGroups(groups::delete_groups(broker, r).await)
        }
        RequestKind::OffsetCommit(r) => {
            ResponseKind::OffsetCommit(commits::offset_commit(broker, r).await)
        }
        RequestKind::OffsetFetch(r) => {
            ResponseKind::OffsetFetch(commits::offset_fetch(broker, r, v).await)
        }
        RequestKind::ConsumerGroupHeartbeat(r) => ResponseKind::ConsumerGroupHeartbeat(
            groups::consumer_group_heartbeat(broker, r, &client_id, &client_host).await,
        ),
        RequestKind::ConsumerGroupDescribe(r) => {
            ResponseKind::ConsumerGroupDescribe(groups::consumer_group_describe(broker, r).await)
        }
        RequestKind::OffsetDelete(r) => {
            ResponseKind::OffsetDelete(commits::offset_delete(broker, r).await)
        }
        // Only the APIs in `protocol::SUPPORTED` reach dispatch.
        other => unreachable_api(other),
    })
}

fn unreachable_api(request: RequestKind) -> ResponseKind {
    // `protocol::handle` refuses every API outside `SUPPORTED` before decoding, so this
    // cannot happen; answering ApiVersions keeps the connection sane if it ever does.
    tracing::error!(request = ?std::mem::discriminant(&request), "request for an unsupported api reached dispatch");
    let mut r = api_versions::response();
    r.error_code = kafka_protocol::ResponseError::UnsupportedVersion.code();
    ResponseKind::ApiVersions(r)
}

pub(crate) fn str_bytes(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

/// Sends a command to the owner task of a partition this broker serves and awaits its
/// reply: NOT_LEADER_OR_FOLLOWER when the task is gone (the partition moved).
pub(crate) async fn ask_owner<T>(
    topic: Option<&std::sync::Arc<crate::broker::Topic>>,
    index: i32,
    cmd: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> crate::log::partition::PartitionCmd,
) -> Result<T, kafka_protocol::ResponseError> {
    let handle = crate::broker::serve(topic, index)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    handle
        .cmd
        .send(cmd(tx))
        .await
        .map_err(|_| kafka_protocol::ResponseError::NotLeaderOrFollower)?;
    rx.await
        .map_err(|_| kafka_protocol::ResponseError::NotLeaderOrFollower)
}
