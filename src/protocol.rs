//! The wire protocol, and nothing above it: the API versions this broker advertises,
//! frame parsing and response encoding. Every request and response is encoded by the
//! `kafka-protocol` crate; only the 8 bytes that decide how to decode are read here.
//! Decoding a request and routing it to its handler is the handlers' job.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ResponseKind};
use kafka_protocol::protocol::{Encodable, HeaderVersion};

/// (api key, name, min version, max version) this broker implements fully.
pub(crate) const SUPPORTED: &[(ApiKey, &str, i16, i16)] = &[
    (ApiKey::Produce, "Produce", 3, 9),
    (ApiKey::Fetch, "Fetch", 4, 12),
    (ApiKey::ListOffsets, "ListOffsets", 1, 7),
    (ApiKey::Metadata, "Metadata", 0, 12),
    (ApiKey::ApiVersions, "ApiVersions", 0, 3),
    (ApiKey::CreateTopics, "CreateTopics", 2, 7),
    (ApiKey::DeleteTopics, "DeleteTopics", 1, 6),
    (ApiKey::DeleteRecords, "DeleteRecords", 0, 2),
    (ApiKey::DescribeProducers, "DescribeProducers", 0, 0),
    (ApiKey::InitProducerId, "InitProducerId", 0, 4),
    (ApiKey::AddPartitionsToTxn, "AddPartitionsToTxn", 0, 5),
    (ApiKey::AddOffsetsToTxn, "AddOffsetsToTxn", 0, 4),
    (ApiKey::EndTxn, "EndTxn", 0, 4),
    (ApiKey::TxnOffsetCommit, "TxnOffsetCommit", 0, 4),
    (ApiKey::WriteTxnMarkers, "WriteTxnMarkers", 1, 1),
    (ApiKey::DescribeTransactions, "DescribeTransactions", 0, 0),
    (ApiKey::ListTransactions, "ListTransactions", 0, 1),
    (ApiKey::OffsetForLeaderEpoch, "OffsetForLeaderEpoch", 2, 4),
    (ApiKey::DescribeConfigs, "DescribeConfigs", 1, 4),
    (ApiKey::AlterConfigs, "AlterConfigs", 0, 2),
    (ApiKey::CreatePartitions, "CreatePartitions", 0, 3),
    (
        ApiKey::IncrementalAlterConfigs,
        "IncrementalAlterConfigs",
        0,
        1,
    ),
    (ApiKey::DescribeCluster, "DescribeCluster", 0, 1),
    (ApiKey::FindCoordinator, "FindCoordinator", 0, 4),
    (ApiKey::JoinGroup, "JoinGroup", 0, 9),
    (ApiKey::SyncGroup, "SyncGroup", 0, 5),
    (ApiKey::Heartbeat, "Heartbeat", 0, 4),
    (ApiKey::LeaveGroup, "LeaveGroup", 0, 5),
    (ApiKey::OffsetCommit, "OffsetCommit", 2, 9),
    (ApiKey::OffsetFetch, "OffsetFetch", 1, 9),
    (ApiKey::ListGroups, "ListGroups", 0, 4),
    (ApiKey::DescribeGroups, "DescribeGroups", 0, 5),
    (ApiKey::DeleteGroups, "DeleteGroups", 0, 2),
    (ApiKey::OffsetDelete, "OffsetDelete", 0, 0),
    (
        ApiKey::ConsumerGroupHeartbeat,
        "ConsumerGroupHeartbeat",
        0,
        1,
    ),
    (ApiKey::ConsumerGroupDescribe, "ConsumerGroupDescribe", 0, 1),
];

/// The API's name as a metric label (`Produce`, `Fetch`, ...).
pub(crate) fn api_name(api_key: i16) -> &'static str {
    SUPPORTED
        .iter()
        .find(|(k, ..)| *k as i16 == api_key)
        .map_or("Unsupported", |(_, name, ..)| name)
}

pub(crate) fn supported_range(api_key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED
        .iter()
        .find(|(k, ..)| *k == api_key)
        .map(|&(_, _, min, max)| {
            // Never advertise beyond what the codec knows.
            let codec = api_key.valid_versions();
            (min.max(codec.min), max.min(codec.max))
        })
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("unknown api key {0}")]
    UnknownApiKey(i16),
    #[error("unsupported version {version} of {api:?}")]
    UnsupportedVersion { api: ApiKey, version: i16 },
    #[error("undecodable request: {0}")]
    Decode(String),
}

/// Where a request came from and what it must wait for.
#[derive(Debug)]
pub(crate) struct RequestContext {
    pub peer: std::net::SocketAddr,
    /// When the request's frame was read.
    pub arrived: std::time::Instant,
    /// Set for Produce: the order in which its batches reach the partitions.
    pub order: Option<ProduceOrder>,
}

/// Produce requests of one connection enqueue their batches one after another, in the
/// order they arrived, then wait for their answers concurrently.
#[derive(Debug)]
pub(crate) struct ProduceOrder {
    /// Fires when the previous produce request of the connection has enqueued.
    pub after: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Fire once this request has enqueued (dropping it counts).
    pub done: tokio::sync::oneshot::Sender<()>,
}

/// A request frame with its routing fields read; the body is decoded by the handlers.
#[derive(Debug)]
pub(crate) struct Frame {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
    pub bytes: Bytes,
}

impl Frame {
    pub(crate) fn parse(bytes: Bytes) -> Result<Frame, FrameError> {
        if bytes.len() < 8 {
            return Err(FrameError::Decode(
                "frame shorter than a request header".into(),
            ));
        }
        let api_key = i16::from_be_bytes([bytes[0], bytes[1]]);
        let api_version = i16::from_be_bytes([bytes[2], bytes[3]]);
        let correlation_id = i32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        Ok(Frame {
            api_key,
            api_version,
            correlation_id,
            bytes,
        })
    }
}

/// Encodes a response frame (size, header, body) in one buffer, without copying the body.
pub(crate) fn encode(
    correlation_id: i32,
    api: ApiKey,
    version: i16,
    response: &ResponseKind,
) -> Result<Bytes, FrameError> {
    let header_version = api.response_header_version(version);
    let mut out = BytesMut::with_capacity(64);
    out.put_i32(0);
    let header =
        kafka_protocol::messages::ResponseHeader::default().with_correlation_id(correlation_id);
    header
        .encode(&mut out, header_version)
        .map_err(|e| FrameError::Decode(format!("encoding response header: {e}")))?;
    response
        .encode(&mut out, version)
        .map_err(|e| FrameError::Decode(format!("encoding {api:?} v{version} response: {e}")))?;
    let len = (out.len() - 4) as i32;
    out[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(out.freeze())
}

#[allow(dead_code)]
fn _header_version_is_used<T: HeaderVersion>() {}
