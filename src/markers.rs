//! Markers sent to other brokers: a transaction coordinator whose marker goes to a
//! partition another broker owns sends it as a WriteTxnMarkers request (what Kafka's
//! coordinators send to partition leaders), and the answer tells it whether to retry.
//! The owner writes the marker like an `acks=all` batch, so a marker counts as written
//! once it is committed.

use kafka_protocol::messages::write_txn_markers_request::{
    WritableTxnMarker, WritableTxnMarkerTopic,
};
use kafka_protocol::messages::{ProducerId, TopicName, WriteTxnMarkersRequest};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use crate::log::marker::Marker;
use crate::txn::MarkerOutcome;

/// What a partition's answer to a marker means for the coordinator.
pub(crate) fn outcome(answer: Result<(), ResponseError>) -> MarkerOutcome {
    match answer {
        Ok(()) => MarkerOutcome::Written,
        Err(
            e @ (ResponseError::InvalidProducerEpoch
            | ResponseError::TransactionCoordinatorFenced
            | ResponseError::UnsupportedForMessageFormat),
        ) => MarkerOutcome::Skip(format!("{e:?}")),
        Err(e) => MarkerOutcome::Retry(format!("{e:?}")),
    }
}

/// Sends one marker to the broker at `addr` (WriteTxnMarkers v1).
pub(crate) async fn write_remote(
    addr: &str,
    topic: &str,
    partition: i32,
    marker: Marker,
) -> Result<(), ResponseError> {
    let req = WriteTxnMarkersRequest::default().with_markers(vec![WritableTxnMarker::default()
        .with_producer_id(ProducerId(marker.producer_id))
        .with_producer_epoch(marker.producer_epoch)
        .with_transaction_result(marker.commit)
        .with_coordinator_epoch(marker.coordinator_epoch)
        .with_topics(vec![WritableTxnMarkerTopic::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_owned())))
            .with_partition_indexes(vec![partition])])]);
    let conn = crate::client::Conn::connect(addr)
        .await
        .map_err(|_| ResponseError::NetworkException)?;
    let resp = conn
        .call(&req, 1)
        .await
        .map_err(|_| ResponseError::NetworkException)?;
    let code = resp
        .markers
        .iter()
        .flat_map(|m| &m.topics)
        .flat_map(|t| &t.partitions)
        .find(|p| p.partition_index == partition)
        .map_or(ResponseError::UnknownServerError.code(), |p| p.error_code);
    match ResponseError::try_from_code(code) {
        None => Ok(()),
        Some(e) => Err(e),
    }
}
