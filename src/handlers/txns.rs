//! Transactions: InitProducerId with a transactional id, AddPartitionsToTxn,
//! AddOffsetsToTxn, EndTxn and TxnOffsetCommit from producers; WriteTxnMarkers from
//! coordinators; DescribeTransactions and ListTransactions from admin tools. The
//! coordinator's decisions are `txn`'s; this maps requests onto them and its errors onto
//! Kafka's codes, version by version.

use std::sync::Arc;

use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnResult, AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::describe_transactions_response::{TopicData, TransactionState};
use kafka_protocol::messages::list_transactions_response::TransactionState as ListedState;
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::write_txn_markers_response::{
    WritableTxnMarkerPartitionResult, WritableTxnMarkerResult, WritableTxnMarkerTopicResult,
};
use kafka_protocol::messages::{
    AddOffsetsToTxnRequest, AddOffsetsToTxnResponse, AddPartitionsToTxnRequest,
    AddPartitionsToTxnResponse, DescribeTransactionsRequest, DescribeTransactionsResponse,
    EndTxnRequest, EndTxnResponse, InitProducerIdRequest, InitProducerIdResponse,
    ListTransactionsRequest, ListTransactionsResponse, ProducerId, TopicName, TransactionalId,
    TxnOffsetCommitRequest, TxnOffsetCommitResponse, WriteTxnMarkersRequest,
    WriteTxnMarkersResponse,
};
use kafka_protocol::ResponseError;

use super::{commits, str_bytes};
use crate::broker::{Broker, MarkerWriteError};
use crate::clock::now_ms;
use crate::log::marker::Marker;
use crate::metadata::{MetaError, TxnRecord};
use crate::txn::machine::{Producer, TxnError};
use crate::txn::CallError;

/// The first version of each API whose clients know PRODUCER_FENCED; older ones get
/// INVALID_PRODUCER_EPOCH, as Kafka answers them.
const FENCED_SINCE_INIT: i16 = 4;
const FENCED_SINCE: i16 = 2;

/// A coordinator's refusal as the Kafka error of an API at `version`, where
/// PRODUCER_FENCED is known from `fenced_since` on.
pub(crate) fn call_error(e: &CallError, version: i16, fenced_since: i16) -> ResponseError {
    match e {
        CallError::NotCoordinator => ResponseError::NotCoordinator,
        CallError::Store(MetaError::Fenced(_)) => ResponseError::NotCoordinator,
        CallError::Store(_) => ResponseError::CoordinatorNotAvailable,
        CallError::TooManyOpen => ResponseError::CoordinatorLoadInProgress,
        CallError::Txn(t) => match t {
            TxnError::ConcurrentTransactions => ResponseError::ConcurrentTransactions,
            TxnError::ProducerFenced if version >= fenced_since => ResponseError::ProducerFenced,
            TxnError::ProducerFenced => ResponseError::InvalidProducerEpoch,
            TxnError::InvalidProducerIdMapping => ResponseError::InvalidProducerIdMapping,
            TxnError::InvalidTxnState => ResponseError::InvalidTxnState,
            TxnError::InvalidTransactionTimeout => ResponseError::InvalidTransactionTimeout,
        },
    }
}

fn code(r: Result<(), ResponseError>) -> i16 {
    r.err().map_or(0, |e| e.code())
}

fn producer(producer_id: ProducerId, epoch: i16) -> Producer {
    Producer {
        producer_id: producer_id.0,
        epoch,
    }
}

/// InitProducerId for a transactional producer.
pub(crate) async fn init_transactional(
    broker: &Arc<Broker>,
    id: &TransactionalId,
    req: &InitProducerIdRequest,
    version: i16,
) -> InitProducerIdResponse {
    let fail = |e: ResponseError| {
        InitProducerIdResponse::default()
            .with_error_code(e.code())
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1)
    };
    if id.0.is_empty() || (req.producer_id.0 < 0) != (req.producer_epoch < 0) {
        return fail(ResponseError::InvalidRequest);
    }
    let expected = (req.producer_id.0 >= 0).then(|| producer(req.producer_id, req.producer_epoch));
    match broker
        .txns
        .init_producer_id(&id.0, expected, req.transaction_timeout_ms)
        .await
    {
        Ok((pid, epoch)) => InitProducerIdResponse::default()
            .with_producer_id(ProducerId(pid))
            .with_producer_epoch(epoch),
        Err(e) => fail(call_error(&e, version, FENCED_SINCE_INIT)),
    }
}

/// The partitions of a request as (topic, partition), with each one's own error: the
/// topic or partition does not exist here.
fn named_partitions(
    broker: &Broker,
    topics: &[AddPartitionsToTxnTopic],
) -> Vec<(String, i32, Option<ResponseError>)> {
    topics
        .iter()
        .flat_map(|t| {
            let topic = broker.topic(&t.name.0);
            t.partitions.iter().map(move |&p| {
                let exists = topic
                    .as_ref()
                    .is_some_and(|t| p >= 0 && p < t.partition_count());
                let error = (!exists).then_some(ResponseError::UnknownTopicOrPartition);
                (t.name.0.to_string(), p, error)
            })
        })
        .collect()
}

/// Per-topic results: each partition's code.
fn topic_results(results: Vec<(String, i32, i16)>) -> Vec<AddPartitionsToTxnTopicResult> {
    let mut by_topic: std::collections::BTreeMap<String, Vec<AddPartitionsToTxnPartitionResult>> =
        std::collections::BTreeMap::new();
    for (topic, p, code) in results {
        by_topic.entry(topic).or_default().push(
            AddPartitionsToTxnPartitionResult::default()
                .with_partition_index(p)
                .with_partition_error_code(code),
        );
    }
    by_topic
        .into_iter()
        .map(|(name, parts)| {
            AddPartitionsToTxnTopicResult::default()
                .with_name(TopicName(str_bytes(name)))
                .with_results_by_partition(parts)
        })
        .collect()
}

/// One transaction's AddPartitionsToTxn: adds the partitions (or only checks them,
/// `verify_only`), every partition answered.
async fn add_partitions_one(
    broker: &Arc<Broker>,
    id: &str,
    p: Producer,
    topics: &[AddPartitionsToTxnTopic],
    verify_only: bool,
    version: i16,
) -> Vec<(String, i32, i16)> {
    let named = named_partitions(broker, topics);
    // A partition that does not exist fails alone; the others are not attempted.
    if named.iter().any(|(_, _, e)| e.is_some()) {
        return named
            .into_iter()
            .map(|(t, p, e)| {
                let e = e.unwrap_or(ResponseError::OperationNotAttempted);
                (t, p, e.code())
            })
            .collect();
    }
    let partitions: Vec<(String, i32)> = named.iter().map(|(t, p, _)| (t.clone(), *p)).collect();
    let answer: Vec<i16> = if verify_only {
        match broker.txns.verify(id, p, &partitions).await {
            Ok(included) => included
                .into_iter()
                .map(|yes| {
                    code(if yes {
                        Ok(())
                    } else {
                        Err(ResponseError::TransactionAbortable)
                    })
                })
                .collect(),
            Err(e) => vec![call_error(&e, version, FENCED_SINCE).code(); partitions.len()],
        }
    } else {
        let r = broker
            .txns
            .add(id, p, &partitions, &[])
            .await
            .map_err(|e| call_error(&e, version, FENCED_SINCE));
        vec![code(r); partitions.len()]
    };
    partitions
        .into_iter()
        .zip(answer)
        .map(|((t, p), c)| (t, p, c))
        .collect()
}

pub(crate) async fn add_partitions(
    broker: &Arc<Broker>,
    req: AddPartitionsToTxnRequest,
    version: i16,
) -> AddPartitionsToTxnResponse {
    let mut resp = AddPartitionsToTxnResponse::default();
    if version < 4 {
        let p = producer(
            req.v3_and_below_producer_id,
            req.v3_and_below_producer_epoch,
        );
        let results = add_partitions_one(
            broker,
            &req.v3_and_below_transactional_id.0,
            p,
            &req.v3_and_below_topics,
            false,
            version,
        )
        .await;
        resp.results_by_topic_v3_and_below = topic_results(results);
        return resp;
    }
    for t in &req.transactions {
        let p = producer(t.producer_id, t.producer_epoch);
        let results = add_partitions_one(
            broker,
            &t.transactional_id.0,
            p,
            &t.topics,
            t.verify_only,
            version,
        )
        .await;
        resp.results_by_transaction.push(
            AddPartitionsToTxnResult::default()
                .with_transactional_id(t.transactional_id.clone())
                .with_topic_results(topic_results(results)),
        );
    }
    resp
}

pub(crate) async fn add_offsets(
    broker: &Arc<Broker>,
    req: AddOffsetsToTxnRequest,
    version: i16,
) -> AddOffsetsToTxnResponse {
    let r = if req.group_id.0.is_empty() {
        Err(ResponseError::InvalidGroupId)
    } else {
        broker
            .txns
            .add(
                &req.transactional_id.0,
                producer(req.producer_id, req.producer_epoch),
                &[],
                &[req.group_id.0.to_string()],
            )
            .await
            .map_err(|e| call_error(&e, version, FENCED_SINCE))
    };
    AddOffsetsToTxnResponse::default().with_error_code(code(r))
}

pub(crate) async fn end_txn(
    broker: &Arc<Broker>,
    req: EndTxnRequest,
    version: i16,
) -> EndTxnResponse {
    let r = broker
        .txns
        .end(
            &req.transactional_id.0,
            producer(req.producer_id, req.producer_epoch),
            req.committed,
        )
        .await
        .map_err(|e| call_error(&e, version, FENCED_SINCE));
    EndTxnResponse::default()
        .with_error_code(code(r))
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1)
}

/// TxnOffsetCommit: the group's coordinator stores the offsets pending until the
/// producer's transaction commits.
pub(crate) async fn txn_offset_commit(
    broker: &Arc<Broker>,
    req: TxnOffsetCommitRequest,
) -> TxnOffsetCommitResponse {
    let checked = commits::check_offsets(broker, commits::offsets_in!(req.topics));
    let member = (
        req.member_id.to_string(),
        req.group_instance_id.as_ref().map(|s| s.to_string()),
        req.generation_id,
    );
    let group_error = commits::commit_checked(
        broker,
        &req.group_id.0,
        member,
        Some(req.producer_id.0),
        &checked,
    )
    .await;
    let topics = commits::commit_topics!(
        checked,
        group_error,
        TxnOffsetCommitResponseTopic,
        TxnOffsetCommitResponsePartition
    );
    TxnOffsetCommitResponse::default().with_topics(topics)
}

/// WriteTxnMarkers: a coordinator's markers for partitions this broker owns.
pub(crate) async fn write_markers(
    broker: &Arc<Broker>,
    req: WriteTxnMarkersRequest,
) -> WriteTxnMarkersResponse {
    let mut results = Vec::with_capacity(req.markers.len());
    for m in req.markers {
        let marker = Marker {
            producer_id: m.producer_id.0,
            producer_epoch: m.producer_epoch,
            commit: m.transaction_result,
            coordinator_epoch: m.coordinator_epoch,
        };
        let mut topics = Vec::with_capacity(m.topics.len());
        for t in m.topics {
            let mut parts = Vec::with_capacity(t.partition_indexes.len());
            for p in t.partition_indexes {
                let r = broker
                    .write_marker(&t.name.0, p, marker)
                    .await
                    .map_err(|e| match e {
                        MarkerWriteError::NotServed(e) => e,
                        MarkerWriteError::Refused(e) => super::errors::append_error(&e),
                    });
                parts.push(
                    WritableTxnMarkerPartitionResult::default()
                        .with_partition_index(p)
                        .with_error_code(code(r)),
                );
            }
            topics.push(
                WritableTxnMarkerTopicResult::default()
                    .with_name(t.name)
                    .with_partitions(parts),
            );
        }
        results.push(
            WritableTxnMarkerResult::default()
                .with_producer_id(m.producer_id)
                .with_topics(topics),
        );
    }
    WriteTxnMarkersResponse::default().with_markers(results)
}

/// A record's partitions, by topic.
fn topics_of(record: &TxnRecord) -> Vec<TopicData> {
    let mut by_topic: std::collections::BTreeMap<&str, Vec<i32>> =
        std::collections::BTreeMap::new();
    for (t, p) in &record.partitions {
        by_topic.entry(t).or_default().push(*p);
    }
    by_topic
        .into_iter()
        .map(|(t, ps)| {
            TopicData::default()
                .with_topic(TopicName(str_bytes(t.to_owned())))
                .with_partitions(ps)
        })
        .collect()
}

pub(crate) async fn describe_transactions(
    broker: &Arc<Broker>,
    req: DescribeTransactionsRequest,
) -> DescribeTransactionsResponse {
    let mut states = Vec::with_capacity(req.transactional_ids.len());
    for id in req.transactional_ids {
        let entry = TransactionState::default()
            .with_transactional_id(id.clone())
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1)
            .with_transaction_start_time_ms(-1);
        let entry = match broker.txns.describe(&id.0).await {
            Ok(Some(r)) => entry
                .with_transaction_state(str_bytes(r.state.name().to_owned()))
                .with_transaction_timeout_ms(r.timeout_ms)
                .with_transaction_start_time_ms(r.start_ms)
                .with_producer_id(ProducerId(r.producer_id))
                .with_producer_epoch(r.producer_epoch)
                .with_topics(topics_of(&r)),
            Ok(None) => entry.with_error_code(ResponseError::TransactionalIdNotFound.code()),
            Err(e) => entry.with_error_code(call_error(&e, 0, 0).code()),
        };
        states.push(entry);
    }
    DescribeTransactionsResponse::default().with_transaction_states(states)
}

/// The state names ListTransactions filters on.
const STATE_NAMES: [&str; 6] = [
    "Empty",
    "Ongoing",
    "PrepareCommit",
    "PrepareAbort",
    "CompleteCommit",
    "CompleteAbort",
];

pub(crate) async fn list_transactions(
    broker: &Arc<Broker>,
    req: ListTransactionsRequest,
) -> ListTransactionsResponse {
    let unknown: Vec<_> = req
        .state_filters
        .iter()
        .filter(|s| !STATE_NAMES.contains(&s.as_str()))
        .cloned()
        .collect();
    let now = now_ms();
    let states = broker
        .txns
        .list()
        .await
        .into_iter()
        .filter(|r| {
            req.state_filters.is_empty()
                || req
                    .state_filters
                    .iter()
                    .any(|s| s.as_str() == r.state.name())
        })
        .filter(|r| {
            req.producer_id_filters.is_empty()
                || req.producer_id_filters.contains(&ProducerId(r.producer_id))
        })
        .filter(|r| {
            req.duration_filter < 0 || (r.start_ms >= 0 && now - r.start_ms > req.duration_filter)
        })
        .map(|r| {
            ListedState::default()
                .with_transactional_id(TransactionalId(str_bytes(r.transactional_id)))
                .with_producer_id(ProducerId(r.producer_id))
                .with_transaction_state(str_bytes(r.state.name().to_owned()))
        })
        .collect();
    ListTransactionsResponse::default()
        .with_unknown_state_filters(unknown)
        .with_transaction_states(states)
}

/// The verify-only AddPartitionsToTxn (v4) to the broker coordinating `id`: whether
/// the producer's open transaction includes the partition.
pub(crate) async fn verify_remote(
    broker: &Arc<Broker>,
    id: &str,
    p: Producer,
    partition: &(String, i32),
) -> Result<bool, ResponseError> {
    use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTransaction;
    let coordinator = broker
        .ownership
        .txn_coordinator(id)
        .filter(|b| b.broker_id != broker.config.broker_id)
        .ok_or(ResponseError::CoordinatorNotAvailable)?;
    let req = AddPartitionsToTxnRequest::default().with_transactions(vec![
        AddPartitionsToTxnTransaction::default()
            .with_transactional_id(TransactionalId(str_bytes(id.to_owned())))
            .with_producer_id(ProducerId(p.producer_id))
            .with_producer_epoch(p.epoch)
            .with_verify_only(true)
            .with_topics(vec![AddPartitionsToTxnTopic::default()
                .with_name(TopicName(str_bytes(partition.0.clone())))
                .with_partitions(vec![partition.1])]),
    ]);
    let addr = format!("{}:{}", coordinator.host, coordinator.port);
    let conn = crate::client::Conn::connect(&addr)
        .await
        .map_err(|_| ResponseError::NetworkException)?;
    let resp = conn
        .call(&req, 4)
        .await
        .map_err(|_| ResponseError::NetworkException)?;
    if let Some(e) = ResponseError::try_from_code(resp.error_code) {
        return Err(e);
    }
    let code = resp
        .results_by_transaction
        .iter()
        .flat_map(|t| &t.topic_results)
        .flat_map(|t| &t.results_by_partition)
        .find(|r| r.partition_index == partition.1)
        .map_or(ResponseError::UnknownServerError.code(), |r| {
            r.partition_error_code
        });
    match ResponseError::try_from_code(code) {
        None => Ok(true),
        Some(ResponseError::TransactionAbortable) => Ok(false),
        Some(e) => Err(e),
    }
}
