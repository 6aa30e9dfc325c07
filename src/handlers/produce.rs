//! Produce and InitProducerId.
//!
//! The produce path reads only batch headers (and checks CRCs) here, on the connection's
//! task, then hands the batches as bytes to each partition's owner task and waits for
//! the answer the requested `acks` calls for.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use kafka_protocol::messages::produce_response::{
    BatchIndexAndErrorMessage, PartitionProduceResponse, TopicProduceResponse,
};
use kafka_protocol::messages::{
    InitProducerIdRequest, InitProducerIdResponse, ProduceRequest, ProduceResponse, ProducerId,
    TopicName,
};
use kafka_protocol::ResponseError;
use tokio::sync::oneshot;

use super::{errors, str_bytes};
use crate::broker::Broker;
use crate::log::batch::validate_record_set;
use crate::log::batch::ValidBatch;
use crate::log::codec::Codec;
use crate::log::partition::{AppendError, AppendOk, PartitionCmd, PartitionHandle};
use crate::log::records::{self, RecordsError};
use crate::protocol::ProduceOrder;
use crate::wal::ReserveError;

/// Longest an `acks=all` produce waits, whatever timeout the client asks for.
const MAX_PRODUCE_TIMEOUT: Duration = Duration::from_secs(300);

/// One partition of a produce request on its way: refused at once, or queued to its
/// owner with the channel its answer comes back on.
enum Prepared {
    Refused(PartitionProduceResponse),
    Ready(i32, PartitionHandle, Vec<ValidBatch>),
    /// For a compacted topic: its records' keys to check before it is `Ready`.
    CheckKeys(i32, PartitionHandle, Vec<ValidBatch>),
    /// Waiting for the owner's answer; (bytes, records) are counted once it succeeds.
    Queued(
        i32,
        oneshot::Receiver<Result<AppendOk, AppendError>>,
        (u64, u64),
    ),
}

fn refused(index: i32, e: ResponseError, msg: Option<String>) -> PartitionProduceResponse {
    PartitionProduceResponse::default()
        .with_index(index)
        .with_error_code(e.code())
        .with_base_offset(-1)
        .with_log_append_time_ms(-1)
        .with_log_start_offset(-1)
        .with_error_message(msg.map(str_bytes))
}

/// The index (within its batch) of every record without a key, which a compacted topic
/// cannot take.
fn keyless_records(batches: &[ValidBatch], limit: usize) -> Result<Vec<i32>, RecordsError> {
    let mut keyless = Vec::new();
    for b in batches.iter().filter(|b| !b.header.is_control()) {
        let records = records::split(&b.bytes, &b.header, limit)?;
        keyless.extend(
            records
                .iter()
                .enumerate()
                .filter(|(_, r)| r.key.is_none())
                .map(|(i, _)| i as i32),
        );
    }
    Ok(keyless)
}

/// `Ready` when every record of `batches` has a key; otherwise the refusal.
async fn check_keys(
    index: i32,
    handle: PartitionHandle,
    batches: Vec<ValidBatch>,
    topic: &str,
    limit: usize,
) -> Prepared {
    let compressed = batches
        .iter()
        .any(|b| !matches!(Codec::of(b.header.attributes), Ok(Codec::None)));
    let (batches, found) = if compressed {
        match tokio::task::spawn_blocking(move || {
            let found = keyless_records(&batches, limit);
            (batches, found)
        })
        .await
        {
            Ok(done) => done,
            Err(e) => {
                let msg = Some(format!("checking record keys failed: {e}"));
                return Prepared::Refused(refused(index, ResponseError::UnknownServerError, msg));
            }
        }
    } else {
        let found = keyless_records(&batches, limit);
        (batches, found)
    };
    match found {
        Ok(keyless) if keyless.is_empty() => Prepared::Ready(index, handle, batches),
        Ok(keyless) => Prepared::Refused(keyless_refusal(index, topic, &keyless)),
        Err(e) => Prepared::Refused(refused(
            index,
            ResponseError::CorruptMessage,
            Some(e.to_string()),
        )),
    }
}

/// Kafka's answer to keyless records on a compacted topic: INVALID_RECORD, one record
/// error per record (the first three in the message), nothing of the batch appended.
fn keyless_refusal(index: i32, topic: &str, keyless: &[i32]) -> PartitionProduceResponse {
    let why = format!(
        "Compacted topic cannot accept message without key in topic partition {topic}-{index}."
    );
    let shown: Vec<String> = keyless
        .iter()
        .take(3)
        .map(|i| format!("RecordError(batchIndex={i}, message='{why}')"))
        .collect();
    let message = format!(
        "One or more records have been rejected due to {} record errors in total, and only showing the first three errors at most: [{}]",
        keyless.len(),
        shown.join(", ")
    );
    refused(index, ResponseError::InvalidRecord, Some(message)).with_record_errors(
        keyless
            .iter()
            .map(|&i| {
                BatchIndexAndErrorMessage::default()
                    .with_batch_index(i)
                    .with_batch_index_error_message(Some(str_bytes(why.clone())))
            })
            .collect(),
    )
}

pub(crate) async fn produce(
    broker: &Arc<Broker>,
    req: ProduceRequest,
    _version: i16,
    arrived: std::time::Instant,
    mut order: Option<ProduceOrder>,
) -> Option<ProduceResponse> {
    let acks = req.acks;
    let timeout = Duration::from_millis(req.timeout_ms.max(0) as u64).min(MAX_PRODUCE_TIMEOUT);
    let transactional = req.transactional_id.is_some();
    let req_txn_id = req.transactional_id.as_ref().map(|t| t.0.to_string());
    // 1. Check every partition's batches (headers and CRCs) — concurrently with other
    //    requests of the connection.
    let mut topics: Vec<(TopicName, Vec<Prepared>)> = Vec::with_capacity(req.topic_data.len());
    for td in req.topic_data {
        let topic = match broker.topic(&td.name.0) {
            Some(t) => Some(t),
            None if broker.config.auto_create_topics => {
                broker.controller.auto_create(&td.name.0).await.ok()
            }
            None => None,
        };
        let parts = td
            .partition_data
            .into_iter()
            .map(|pd| {
                let index = pd.index;
                if !matches!(acks, -1..=1) {
                    return Prepared::Refused(refused(
                        index,
                        ResponseError::InvalidRequiredAcks,
                        None,
                    ));
                }
                let (t, handle) = match topic.as_ref().map(|t| (t, t.partition(index))) {
                    Some((t, Ok(h))) => (t, h),
                    Some((_, Err(e))) => return Prepared::Refused(refused(index, e, None)),
                    None => {
                        return Prepared::Refused(refused(
                            index,
                            ResponseError::UnknownTopicOrPartition,
                            None,
                        ))
                    }
                };
                let Some(records) = pd.records else {
                    return Prepared::Refused(refused(
                        index,
                        ResponseError::CorruptMessage,
                        Some("no records".into()),
                    ));
                };
                match validate_record_set(&records, t.config.max_message_bytes) {
                    Err(e) => Prepared::Refused(refused(
                        index,
                        errors::batch_error(&e),
                        Some(e.to_string()),
                    )),
                    Ok(b) if b.iter().any(|b| b.header.is_control()) => Prepared::Refused(refused(
                        index,
                        ResponseError::InvalidRecord,
                        Some("control batches are written by transaction coordinators only".into()),
                    )),
                    Ok(b) if !transactional && b.iter().any(|b| b.header.is_transactional()) => {
                        Prepared::Refused(refused(
                            index,
                            ResponseError::TransactionalIdAuthorizationFailed,
                            Some(
                                "transactional batches need the request's transactional id".into(),
                            ),
                        ))
                    }
                    Ok(b) if t.config.cleanup.compact => {
                        Prepared::CheckKeys(index, handle.clone(), b)
                    }
                    Ok(b) => Prepared::Ready(index, handle.clone(), b),
                }
            })
            .collect();
        topics.push((td.name, parts));
    }
    // 1b. A compacted topic takes only records with keys: compressed batches are
    //     decompressed to look, on the blocking pool.
    let limit = broker.config.batch_decompressed_max_bytes;
    for (name, parts) in &mut topics {
        for p in parts.iter_mut() {
            if let Prepared::CheckKeys(..) = p {
                let Prepared::CheckKeys(index, handle, batches) =
                    std::mem::replace(p, Prepared::Refused(Default::default()))
                else {
                    continue;
                };
                *p = check_keys(index, handle, batches, &name.0, limit).await;
            }
        }
    }
    // 2. Hand the batches to the partitions in the order the requests arrived.
    if let Some(after) = order.as_mut().and_then(|o| o.after.take()) {
        let _ = after.await;
    }
    for (_, parts) in &mut topics {
        for p in parts.iter_mut() {
            if let Prepared::Ready(..) = p {
                let Prepared::Ready(index, handle, batches) =
                    std::mem::replace(p, Prepared::Refused(Default::default()))
                else {
                    continue;
                };
                // KIP-890: a producer's first transactional batch here must be in its
                // transaction, as its coordinator says.
                let verified = match req_txn_id.as_deref() {
                    Some(id) => match verify_in_txn(broker, id, &handle, &batches).await {
                        Ok(v) => v,
                        Err(e) => {
                            *p = Prepared::Refused(refused(index, e, None));
                            continue;
                        }
                    },
                    None => None,
                };
                let counts = batches.iter().fold((0u64, 0u64), |(b, r), v| {
                    (
                        b + v.bytes.len() as u64,
                        r + v.header.record_count.max(0) as u64,
                    )
                });
                // Room in the flusher's queue first: the owner never waits for it.
                // An `acks=0/1` request's timeout does not apply to it (as in Kafka);
                // its wait is bounded all the same.
                let shared = handle.shared.clone();
                let reserve = broker
                    .log
                    .flusher
                    .reserve(counts.0 as usize, || shared.is_serving());
                let room_timeout = if acks == -1 {
                    timeout
                } else {
                    MAX_PRODUCE_TIMEOUT
                };
                let queue_bytes = match tokio::time::timeout(room_timeout, reserve).await {
                    Ok(Ok(bytes)) => Ok(bytes),
                    Ok(Err(ReserveError::NotServing)) => Err(ResponseError::NotLeaderOrFollower),
                    Ok(Err(ReserveError::Closed)) => {
                        Err(errors::append_error(&AppendError::NotDurable))
                    }
                    Err(_) => Err(ResponseError::RequestTimedOut),
                };
                let queue_bytes = match queue_bytes {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        *p = Prepared::Refused(refused(index, e, None));
                        continue;
                    }
                };
                let (tx, rx) = oneshot::channel();
                let cmd = PartitionCmd::Append {
                    batches,
                    acks,
                    arrived,
                    queue_bytes: Some(queue_bytes),
                    verified,
                    reply: tx,
                };
                *p = if handle.cmd.send(cmd).await.is_ok() {
                    Prepared::Queued(index, rx, counts)
                } else {
                    Prepared::Refused(refused(index, ResponseError::NotLeaderOrFollower, None))
                };
            }
        }
    }
    if let Some(o) = order {
        let _ = o.done.send(());
    }
    // 3. Wait for the answers `acks` asks for.
    let mut responses = Vec::with_capacity(topics.len());
    let mut durable_at: Option<std::time::Instant> = None;
    for (name, parts) in topics {
        let name = &name;
        let answers = join_all(parts.into_iter().map(|p| async move {
            match p {
                Prepared::Refused(r) => (r, None),
                // Every one was sent or resolved above.
                Prepared::Ready(index, ..) | Prepared::CheckKeys(index, ..) => (
                    refused(index, ResponseError::UnknownServerError, None),
                    None,
                ),
                Prepared::Queued(index, rx, (bytes, records)) => {
                    match tokio::time::timeout(timeout, rx).await {
                        Ok(Ok(Ok(ok))) => {
                            let m = crate::metrics::metrics();
                            m.bytes_in
                                .with_label_values(&[name.0.as_str()])
                                .inc_by(bytes);
                            m.messages_in
                                .with_label_values(&[name.0.as_str()])
                                .inc_by(records);
                            if m.partition_labels() {
                                m.partition_bytes_in
                                    .with_label_values(&[name.0.as_str(), &index.to_string()])
                                    .inc_by(bytes);
                            }
                            let answer = PartitionProduceResponse::default()
                                .with_index(index)
                                .with_base_offset(ok.base_offset)
                                .with_log_append_time_ms(-1)
                                .with_log_start_offset(ok.log_start_offset);
                            (answer, ok.durable_at)
                        }
                        Ok(Ok(Err(e))) => (
                            refused(index, errors::append_error(&e), Some(e.to_string())),
                            None,
                        ),
                        Ok(Err(_)) => (
                            refused(index, ResponseError::NotLeaderOrFollower, None),
                            None,
                        ),
                        Err(_) => (refused(index, ResponseError::RequestTimedOut, None), None),
                    }
                }
            }
        }))
        .await;
        let (answers, durable): (Vec<_>, Vec<_>) = answers.into_iter().unzip();
        durable_at = durable.into_iter().flatten().chain(durable_at).max();
        let m = crate::metrics::metrics();
        for a in answers.iter().filter(|a| a.error_code != 0) {
            let error = ResponseError::try_from_code(a.error_code)
                .map_or_else(|| "unknown".to_string(), |e| format!("{e:?}"));
            m.partition_errors
                .with_label_values(&["Produce", &error])
                .inc();
        }
        responses.push(
            TopicProduceResponse::default()
                .with_name(name.clone())
                .with_partition_responses(answers),
        );
    }
    if let Some(at) = durable_at {
        crate::metrics::metrics()
            .produce_stage_seconds
            .with_label_values(&[crate::metrics::stage::RESPONSE])
            .observe(at.elapsed().as_secs_f64());
    }
    if acks == 0 {
        return None;
    }
    Some(ProduceResponse::default().with_responses(responses))
}

/// For a producer's transactional batches to a partition where its transaction is not
/// open yet: asks the transactional id's coordinator whether the partition was added
/// (in process, or the verify-only AddPartitionsToTxn to the coordinating broker).
/// `Ok(Some(generation))`: verified as of the partition's marker generation read before
/// asking (its owner refuses the batch if a marker of the producer came since);
/// `Ok(None)`: nothing to verify.
async fn verify_in_txn(
    broker: &Arc<Broker>,
    id: &str,
    handle: &PartitionHandle,
    batches: &[ValidBatch],
) -> Result<Option<u64>, ResponseError> {
    let Some(first) = batches.iter().find(|b| b.header.is_transactional()) else {
        return Ok(None);
    };
    let pid = first.header.producer_id;
    let shared = &handle.shared;
    if shared.txn_open(pid) {
        return Ok(None);
    }
    let generation = shared.marker_generation();
    let p = crate::txn::machine::Producer {
        producer_id: pid,
        epoch: first.header.producer_epoch,
    };
    let partition = (handle.topic.to_string(), handle.partition);
    let included = if broker.ownership.txn_fence(id).is_some() {
        broker
            .txns
            .verify(id, p, std::slice::from_ref(&partition))
            .await
            .map(|v| v.first().copied().unwrap_or(false))
            .map_err(|e| super::txns::call_error(&e, 0, i16::MAX))
    } else {
        super::txns::verify_remote(broker, id, p, &partition).await
    };
    match included {
        Ok(true) => Ok(Some(generation)),
        Ok(false) => Err(ResponseError::InvalidTxnState),
        // A fenced producer hears it as Kafka's leaders answer: INVALID_PRODUCER_EPOCH.
        Err(
            ResponseError::InvalidProducerEpoch
            | ResponseError::ProducerFenced
            | ResponseError::InvalidProducerIdMapping,
        ) => Err(ResponseError::InvalidProducerEpoch),
        // The coordinator is busy or elsewhere now: retriable for the producer.
        Err(_) => Err(ResponseError::NotEnoughReplicas),
    }
}

pub(crate) async fn init_producer_id(
    broker: &Arc<Broker>,
    req: InitProducerIdRequest,
    version: i16,
) -> InitProducerIdResponse {
    let resp = InitProducerIdResponse::default();
    if let Some(id) = req.transactional_id.as_ref() {
        return super::txns::init_transactional(broker, id, &req, version).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::batch::{validate_record_set, BatchHeader};
    use crate::log::codec::Codec;
    use crate::log::records::tests::{keyed_batch, Spec};

    /// Keyless records are found inside compressed batches, by their index in the
    /// batch, and refused as Kafka refuses them: INVALID_RECORD with one record error
    /// each.
    #[test]
    fn keyless_records_are_refused_with_their_indexes() {
        let keyed: Spec = (Some(b"k".to_vec()), Some(b"v".to_vec()), 0, 0);
        let keyless: Spec = (None, Some(b"v".to_vec()), 0, 0);
        let batch = keyed_batch(
            0,
            &[keyed.clone(), keyless.clone(), keyed, keyless],
            &[0, 1, 2, 3],
            3,
            Codec::Zstd,
        );
        assert!(BatchHeader::parse(&batch).is_ok());
        let batches = validate_record_set(&batch, 1 << 20).expect("valid");
        assert_eq!(keyless_records(&batches, 1 << 20), Ok(vec![1, 3]));
        assert!(
            keyless_records(&batches, 8).is_err(),
            "bounded decompression"
        );

        let answer = keyless_refusal(2, "t", &[1, 3]);
        assert_eq!(answer.error_code, ResponseError::InvalidRecord.code());
        let indexes: Vec<i32> = answer.record_errors.iter().map(|e| e.batch_index).collect();
        assert_eq!(indexes, vec![1, 3]);
        let message = answer.error_message.expect("message");
        assert!(message.contains("due to 2 record errors"), "{message}");
        assert!(message.contains("topic partition t-2"), "{message}");
    }
}
