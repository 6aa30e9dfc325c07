//! Produce and InitProducerId.
//!
//! The produce path reads only batch headers (and checks CRCs) here, on the connection's
//! task, then hands the batches as bytes to each partition's owner task and waits for
//! the answer the requested `acks` calls for.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    InitProducerIdRequest, InitProducerIdResponse, ProduceRequest, ProduceResponse, ProducerId,
};
use kafka_protocol::ResponseError;
use tokio::sync::oneshot;

use super::{errors, str_bytes};
use crate::broker::Broker;
use crate::log::batch::validate_record_set;
use crate::log::partition::PartitionCmd;

/// Longest an `acks=all` produce waits, whatever timeout the client asks for.
const MAX_PRODUCE_TIMEOUT: Duration = Duration::from_secs(300);

pub async fn produce(
    broker: &Arc<Broker>,
    req: ProduceRequest,
    _version: i16,
) -> Option<ProduceResponse> {
    let acks = req.acks;
    let timeout = Duration::from_millis(req.timeout_ms.max(0) as u64).min(MAX_PRODUCE_TIMEOUT);
    let transactional = req.transactional_id.is_some();
    let mut topics = Vec::with_capacity(req.topic_data.len());
    for td in req.topic_data {
        let name = td.name.clone();
        let topic = match broker.topic(&name.0) {
            Some(t) => Some(t),
            None if broker.config.auto_create_topics => broker.auto_create(&name.0).await.ok(),
            None => None,
        };
        let parts = td.partition_data.into_iter().map(|pd| {
            let topic = topic.clone();
            async move {
                let fail = |e: ResponseError, msg: Option<String>| {
                    PartitionProduceResponse::default()
                        .with_index(pd.index)
                        .with_error_code(e.code())
                        .with_base_offset(-1)
                        .with_log_append_time_ms(-1)
                        .with_log_start_offset(-1)
                        .with_error_message(msg.map(str_bytes))
                };
                if !matches!(acks, -1..=1) {
                    return fail(ResponseError::InvalidRequiredAcks, None);
                }
                if transactional {
                    return fail(
                        ResponseError::TransactionalIdAuthorizationFailed,
                        Some("transactions are not supported yet".into()),
                    );
                }
                let Some(handle) = topic.as_ref().and_then(|t| {
                    usize::try_from(pd.index)
                        .ok()
                        .and_then(|i| t.partitions.get(i))
                }) else {
                    return fail(ResponseError::UnknownTopicOrPartition, None);
                };
                let Some(records) = pd.records else {
                    return fail(ResponseError::CorruptMessage, Some("no records".into()));
                };
                let max = topic
                    .as_ref()
                    .map_or(1 << 20, |t| t.config.max_message_bytes);
                let batches = match validate_record_set(&records, max) {
                    Ok(b) => b,
                    Err(e) => return fail(errors::batch_error(&e), Some(e.to_string())),
                };
                if batches
                    .iter()
                    .any(|b| b.header.is_transactional() || b.header.is_control())
                {
                    return fail(
                        ResponseError::TransactionalIdAuthorizationFailed,
                        Some("transactional batches are not supported yet".into()),
                    );
                }
                let (tx, rx) = oneshot::channel();
                let cmd = PartitionCmd::Append {
                    batches,
                    acks,
                    reply: tx,
                };
                if handle.cmd.send(cmd).await.is_err() {
                    return fail(ResponseError::NotLeaderOrFollower, None);
                }
                let answer = match tokio::time::timeout(timeout, rx).await {
                    Ok(Ok(a)) => a,
                    Ok(Err(_)) => return fail(ResponseError::NotLeaderOrFollower, None),
                    Err(_) => return fail(ResponseError::RequestTimedOut, None),
                };
                match answer {
                    Ok(ok) => PartitionProduceResponse::default()
                        .with_index(pd.index)
                        .with_base_offset(ok.base_offset)
                        .with_log_append_time_ms(-1)
                        .with_log_start_offset(ok.log_start_offset),
                    Err(e) => fail(errors::append_error(&e), Some(e.to_string())),
                }
            }
        });
        let responses = join_all(parts).await;
        topics.push(
            TopicProduceResponse::default()
                .with_name(name)
                .with_partition_responses(responses),
        );
    }
    if acks == 0 {
        return None;
    }
    Some(ProduceResponse::default().with_responses(topics))
}

pub async fn init_producer_id(
    broker: &Arc<Broker>,
    req: InitProducerIdRequest,
) -> InitProducerIdResponse {
    let resp = InitProducerIdResponse::default();
    if req.transactional_id.is_some() {
        return resp
            .with_error_code(ResponseError::TransactionalIdAuthorizationFailed.code())
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
    }
    // KIP-360: an idempotent producer may ask to bump its own epoch after an error.
    if req.producer_id.0 >= 0 && req.producer_epoch >= 0 && req.producer_epoch < i16::MAX - 1 {
        return resp
            .with_producer_id(req.producer_id)
            .with_producer_epoch(req.producer_epoch + 1);
    }
    match broker.meta.next_producer_id().await {
        Ok(id) => resp.with_producer_id(ProducerId(id)).with_producer_epoch(0),
        Err(e) => resp
            .with_error_code(errors::meta_error(&e).code())
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1),
    }
}
