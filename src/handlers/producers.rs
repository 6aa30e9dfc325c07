//! DescribeProducers: the producers a partition's owner knows, as `kafka-transactions.sh
//! describe-producers` and admin clients ask for them when looking for a producer that
//! holds a partition up. Answered from the owner task's committed producer state; other
//! brokers answer NOT_LEADER_OR_FOLLOWER, as a Kafka follower does.

use std::sync::Arc;

use futures::future::join_all;
use kafka_protocol::messages::describe_producers_response::{
    PartitionResponse, ProducerState, TopicResponse,
};
use kafka_protocol::messages::{DescribeProducersRequest, DescribeProducersResponse, ProducerId};

use crate::broker::Broker;
use crate::log::partition::PartitionCmd;
use crate::metadata::ProducerStateRecord;

pub(crate) async fn describe_producers(
    broker: &Arc<Broker>,
    req: DescribeProducersRequest,
) -> DescribeProducersResponse {
    let mut resp = DescribeProducersResponse::default();
    for t in req.topics {
        let topic = broker.topic(&t.name.0);
        let parts = t.partition_indexes.into_iter().map(|index| {
            let topic = topic.clone();
            async move {
                let out = PartitionResponse::default().with_partition_index(index);
                let asked =
                    super::ask_owner(topic.as_ref(), index, PartitionCmd::DescribeProducers);
                match asked.await {
                    Ok(producers) => {
                        out.with_active_producers(producers.iter().map(producer_state).collect())
                    }
                    Err(e) => out.with_error_code(e.code()),
                }
            }
        });
        let partitions = join_all(parts).await;
        resp.topics.push(
            TopicResponse::default()
                .with_name(t.name)
                .with_partitions(partitions),
        );
    }
    resp
}

/// One producer as DescribeProducers shows it: its epoch, the last sequence and
/// timestamp of its newest batch, the coordinator epoch of its last marker here, and
/// the first offset of its open transaction (-1: none), the one holding the last stable
/// offset when it is the oldest.
fn producer_state(p: &ProducerStateRecord) -> ProducerState {
    let last = p.batches.iter().max_by_key(|b| b.last_offset);
    ProducerState::default()
        .with_producer_id(ProducerId(p.producer_id))
        .with_producer_epoch(i32::from(p.epoch))
        .with_last_sequence(last.map_or(-1, |b| b.last_seq))
        .with_last_timestamp(last.map_or(-1, |b| b.timestamp))
        .with_coordinator_epoch(p.coordinator_epoch)
        .with_current_txn_start_offset(p.txn_first_offset)
}
