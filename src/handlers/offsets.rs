//! ListOffsets, OffsetForLeaderEpoch and DeleteRecords.

use std::sync::Arc;

use futures::future::join_all;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderTopicResult,
};
use kafka_protocol::messages::{
    DeleteRecordsRequest, DeleteRecordsResponse, ListOffsetsRequest, ListOffsetsResponse,
    OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse,
};
use kafka_protocol::ResponseError;

use super::errors;
use crate::broker::Broker;
use crate::log::partition::{PartitionCmd, PartitionShared};
use crate::log::read;

const LATEST: i64 = -1;
const EARLIEST: i64 = -2;
const MAX_TIMESTAMP: i64 = -3;

fn epoch_error(shared: &PartitionShared, current: i32) -> Option<ResponseError> {
    if current < 0 || current == shared.leader_epoch {
        None
    } else if current < shared.leader_epoch {
        Some(ResponseError::FencedLeaderEpoch)
    } else {
        Some(ResponseError::UnknownLeaderEpoch)
    }
}

pub(crate) async fn list_offsets(
    broker: &Arc<Broker>,
    req: ListOffsetsRequest,
) -> ListOffsetsResponse {
    let mut topics = Vec::with_capacity(req.topics.len());
    // read_committed: the end is the last stable offset, and a timestamp's offset
    // counts only below it.
    let committed = req.isolation_level == 1;
    for t in req.topics {
        let topic = broker.topic(&t.name.0);
        let parts = t.partitions.into_iter().map(|p| {
            let topic = topic.clone();
            async move {
                let out = ListOffsetsPartitionResponse::default()
                    .with_partition_index(p.partition_index)
                    .with_timestamp(-1)
                    .with_offset(-1)
                    .with_leader_epoch(-1);
                let handle = match crate::broker::serve(topic.as_ref(), p.partition_index) {
                    Ok(h) => h,
                    Err(e) => return out.with_error_code(e.code()),
                };
                let shared = &handle.shared;
                if let Some(e) = epoch_error(shared, p.current_leader_epoch) {
                    return out.with_error_code(e.code());
                }
                let out = out.with_leader_epoch(shared.leader_epoch);
                let end = if committed {
                    shared.last_stable_offset()
                } else {
                    shared.high_watermark()
                };
                let found = match p.timestamp {
                    LATEST => Ok(Some((end, -1))),
                    EARLIEST => Ok(Some((shared.log_start_offset(), -1))),
                    MAX_TIMESTAMP => {
                        read::max_timestamp(shared, &broker.blocks, &broker.indexes).await
                    }
                    ts if ts >= 0 => {
                        read::offset_for_timestamp(shared, &broker.blocks, &broker.indexes, ts)
                            .await
                    }
                    _ => return out.with_error_code(ResponseError::InvalidRequest.code()),
                };
                match found {
                    Ok(Some((offset, _))) if p.timestamp >= 0 && offset >= end => out,
                    Ok(Some((offset, ts))) => out.with_offset(offset).with_timestamp(ts),
                    Ok(None) => out,
                    Err(e) => out.with_error_code(errors::read_error(&e).code()),
                }
            }
        });
        let partitions = join_all(parts).await;
        topics.push(
            ListOffsetsTopicResponse::default()
                .with_name(t.name)
                .with_partitions(partitions),
        );
    }
    ListOffsetsResponse::default().with_topics(topics)
}

/// The end offset of the largest epoch at or below `requested`: the start of the next
/// epoch, or the high watermark for the current one.
pub(crate) fn epoch_end(history: &[(i32, i64)], high_watermark: i64, requested: i32) -> (i32, i64) {
    let Some(i) = history.iter().rposition(|(e, _)| *e <= requested) else {
        return (-1, -1);
    };
    let end = history
        .get(i + 1)
        .map_or(high_watermark, |(_, start)| *start);
    (history[i].0, end)
}

pub(crate) fn offset_for_leader_epoch(
    broker: &Arc<Broker>,
    req: OffsetForLeaderEpochRequest,
) -> OffsetForLeaderEpochResponse {
    let mut resp = OffsetForLeaderEpochResponse::default();
    for t in req.topics {
        let topic = broker.topic(&t.topic.0);
        let mut result = OffsetForLeaderTopicResult::default().with_topic(t.topic.clone());
        for p in t.partitions {
            let out = EpochEndOffset::default()
                .with_partition(p.partition)
                .with_leader_epoch(-1)
                .with_end_offset(-1);
            let handle = match crate::broker::serve(topic.as_ref(), p.partition) {
                Ok(h) => h,
                Err(e) => {
                    result.partitions.push(out.with_error_code(e.code()));
                    continue;
                }
            };
            let shared = &handle.shared;
            if let Some(e) = epoch_error(shared, p.current_leader_epoch) {
                result.partitions.push(out.with_error_code(e.code()));
                continue;
            }
            let history = shared
                .view
                .read()
                .expect("partition view lock poisoned")
                .epoch_history
                .clone();
            let (epoch, end) = epoch_end(&history, shared.high_watermark(), p.leader_epoch);
            result
                .partitions
                .push(out.with_leader_epoch(epoch).with_end_offset(end));
        }
        resp.topics.push(result);
    }
    resp
}

pub(crate) async fn delete_records(
    broker: &Arc<Broker>,
    req: DeleteRecordsRequest,
) -> DeleteRecordsResponse {
    let mut resp = DeleteRecordsResponse::default();
    for t in req.topics {
        let topic = broker.topic(&t.name.0);
        let parts = t.partitions.into_iter().map(|p| {
            let topic = topic.clone();
            async move {
                let out = DeleteRecordsPartitionResult::default()
                    .with_partition_index(p.partition_index)
                    .with_low_watermark(-1);
                let asked = super::ask_owner(topic.as_ref(), p.partition_index, |reply| {
                    PartitionCmd::DeleteRecords {
                        offset: p.offset,
                        reply,
                    }
                });
                match asked.await {
                    Ok(Ok(low)) => out.with_low_watermark(low),
                    Ok(Err(e)) => out.with_error_code(errors::delete_records_error(&e).code()),
                    Err(e) => out.with_error_code(e.code()),
                }
            }
        });
        let partitions = join_all(parts).await;
        resp.topics.push(
            DeleteRecordsTopicResult::default()
                .with_name(t.name)
                .with_partitions(partitions),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::epoch_end;

    #[test]
    fn epoch_end_offsets() {
        let h = [(1, 0), (2, 0), (3, 100)];
        assert_eq!(epoch_end(&h, 150, 3), (3, 150));
        assert_eq!(epoch_end(&h, 150, 7), (3, 150));
        assert_eq!(epoch_end(&h, 150, 2), (2, 100));
        assert_eq!(epoch_end(&h, 150, 1), (1, 0));
        assert_eq!(epoch_end(&h, 150, 0), (-1, -1));
    }
}
