//! Fetch: whole stored batches from each partition, up to the high watermark, within the
//! request's byte limits; waits on the high watermarks (never polls) until `min_bytes`
//! are there or `max_wait_ms` passes. Fetch sessions are not kept: every response
//! carries session id 0, which tells clients to send full requests.
//!
//! KIP-392: a client naming its zone (`rack_id`) is sent to a broker of that zone
//! (`preferred_read_replica`), and a broker serves clients of its own zone the
//! partitions other brokers own from object storage (`log::zone`).

use std::sync::Arc;
use std::time::Duration;

use futures::future::select_all;
use kafka_protocol::messages::fetch_response::{
    AbortedTransaction, FetchableTopicResponse, PartitionData,
};
use kafka_protocol::messages::{BrokerId, FetchRequest, FetchResponse, ProducerId};
use kafka_protocol::ResponseError;

use super::errors;
use crate::broker::Broker;
use crate::log::partition::PartitionShared;
use crate::log::read;
use crate::ownership::rendezvous;

const MAX_WAIT: Duration = Duration::from_secs(300);

pub(crate) async fn fetch(broker: &Arc<Broker>, req: FetchRequest, version: i16) -> FetchResponse {
    let resp = fetch_until_ready(broker, req, version).await;
    let m = crate::metrics::metrics();
    // Bytes out count every answer, zone-local ones included.
    for t in &resp.responses {
        let bytes: usize = t
            .partitions
            .iter()
            .filter_map(|p| p.records.as_ref())
            .map(|r| r.len())
            .sum();
        if bytes > 0 {
            m.bytes_out
                .with_label_values(&[t.topic.0.as_str()])
                .inc_by(bytes as u64);
        }
        if m.partition_labels() {
            for p in &t.partitions {
                if let Some(r) = p.records.as_ref().filter(|r| !r.is_empty()) {
                    m.partition_bytes_out
                        .with_label_values(&[t.topic.0.as_str(), &p.partition_index.to_string()])
                        .inc_by(r.len() as u64);
                }
            }
        }
        for p in t.partitions.iter().filter(|p| p.error_code != 0) {
            let error = ResponseError::try_from_code(p.error_code)
                .map_or_else(|| "unknown".to_string(), |e| format!("{e:?}"));
            m.partition_errors
                .with_label_values(&["Fetch", &error])
                .inc();
        }
    }
    resp
}

/// The live brokers of the client's zone (`client.rack`) when it is not this broker's
/// (KIP-392): its readers are sent there. Read once per request.
fn zone_replicas(broker: &Broker, rack: Option<&str>) -> Vec<i32> {
    let Some(rack) = rack.filter(|r| broker.config.zone.as_deref() != Some(*r)) else {
        return Vec::new();
    };
    broker
        .membership
        .live()
        .into_iter()
        .filter(|b| !b.draining && b.zone.as_deref() == Some(rack))
        .map(|b| b.broker_id)
        .collect()
}

/// A partition's answer with the records read (cut to what a `read_committed`
/// consumer may see: see [`read::ReadResult::committed_only`]).
fn answered(data: PartitionData, r: read::ReadResult) -> PartitionData {
    data.with_high_watermark(r.high_watermark)
        .with_last_stable_offset(r.last_stable_offset)
        .with_log_start_offset(r.log_start_offset)
        .with_records(Some(r.records))
}

/// The read as the consumer's isolation level lets it see it, with the aborted
/// transactions a `read_committed` consumer needs (none listed otherwise).
fn isolated(data: PartitionData, r: read::ReadResult, read_committed: bool) -> PartitionData {
    if !read_committed {
        return answered(data, r);
    }
    let (r, aborted) = r.committed_only();
    let aborted = aborted
        .iter()
        .map(|a| {
            AbortedTransaction::default()
                .with_producer_id(ProducerId(a.producer_id))
                .with_first_offset(a.first_offset)
        })
        .collect();
    answered(data, r).with_aborted_transactions(Some(aborted))
}

/// A partition's answer without records: its high watermark, last stable offset and
/// log start offset.
fn offsets_of(data: PartitionData, shared: &PartitionShared) -> PartitionData {
    let hw = shared.high_watermark();
    let (lso, log_start) = {
        let view = shared.view();
        (
            view.last_stable_offset.min(hw),
            view.segments.log_start_offset(),
        )
    };
    data.with_high_watermark(hw)
        .with_last_stable_offset(lso)
        .with_log_start_offset(log_start)
}

/// The first partition with data may exceed the limits by one batch (KIP-74).
fn budget(max_bytes: usize, total: usize, partition_max_bytes: i32) -> usize {
    let budget = (max_bytes.saturating_sub(total)).min(partition_max_bytes.max(0) as usize);
    if total == 0 {
        budget.max(1)
    } else {
        budget
    }
}

async fn fetch_until_ready(broker: &Arc<Broker>, req: FetchRequest, version: i16) -> FetchResponse {
    let mut resp = FetchResponse::default();
    if req.session_id != 0 {
        resp.error_code = ResponseError::FetchSessionIdNotFound.code();
        return resp;
    }
    let deadline = crate::clock::instant()
        + Duration::from_millis(req.max_wait_ms.max(0) as u64).min(MAX_WAIT);
    let min_bytes = req.min_bytes.max(0) as usize;
    let asked = if req.max_bytes <= 0 {
        usize::MAX
    } else {
        req.max_bytes as usize
    };
    let max_bytes = asked.min(broker.config.fetch_max_bytes);
    // KIP-392: the client's zone, when it sent one.
    let rack = Some(req.rack_id.as_str()).filter(|r| version >= 11 && !r.is_empty());
    let in_my_zone = rack.is_some() && rack == broker.config.zone.as_deref();
    let replicas = zone_replicas(broker, rack);
    let read_committed = req.isolation_level == 1;
    let m = crate::metrics::metrics();
    loop {
        // Subscribe before reading so a commit between the read and the wait wakes us.
        let mut watchers = Vec::new();
        let mut total = 0usize;
        let mut any_error = false;
        // Answer at once: a client was sent to a replica in its zone.
        let mut redirected = false;
        // Partitions read for this zone from manifests: re-read them while waiting.
        let mut zone_reads = false;
        let mut topics = Vec::with_capacity(req.topics.len());
        for t in &req.topics {
            let topic = broker.topic(&t.topic.0);
            let mut parts = Vec::with_capacity(t.partitions.len());
            for p in &t.partitions {
                let mut data = PartitionData::default()
                    .with_partition_index(p.partition)
                    .with_high_watermark(-1)
                    .with_last_stable_offset(-1)
                    .with_log_start_offset(-1)
                    .with_preferred_read_replica(BrokerId(-1));
                let handle = match crate::broker::serve(topic.as_ref(), p.partition) {
                    Ok(h) => h,
                    Err(ResponseError::NotLeaderOrFollower) if in_my_zone => {
                        // Another broker owns it; serve this zone's client from storage.
                        let Some(t) = topic.as_ref() else { continue };
                        zone_reads = true;
                        let budget = budget(max_bytes, total, p.partition_max_bytes);
                        let read = broker.zone_reads.read(
                            t.key(p.partition),
                            &broker.blocks,
                            &broker.indexes,
                            p.fetch_offset,
                            budget as u64,
                        );
                        match read.await {
                            Ok(r) => {
                                data = isolated(data, r, read_committed);
                                let n = data.records.as_ref().map_or(0, |r| r.len());
                                total += n;
                                if n > 0 {
                                    m.zone_fetch_bytes
                                        .with_label_values(&[t.name.as_ref()])
                                        .inc_by(n as u64);
                                }
                            }
                            Err(e) => {
                                any_error = true;
                                data = data.with_error_code(errors::zone_read_error(&e).code());
                            }
                        }
                        parts.push(data);
                        continue;
                    }
                    Err(e) => {
                        any_error = true;
                        parts.push(data.with_error_code(e.code()));
                        continue;
                    }
                };
                let shared = &handle.shared;
                if p.current_leader_epoch >= 0 && p.current_leader_epoch != shared.leader_epoch {
                    any_error = true;
                    let e = if p.current_leader_epoch < shared.leader_epoch {
                        ResponseError::FencedLeaderEpoch
                    } else {
                        ResponseError::UnknownLeaderEpoch
                    };
                    parts.push(data.with_error_code(e.code()));
                    continue;
                }
                if let Some(replica) = rendezvous(&shared.key, replicas.iter().copied()) {
                    // KIP-392: no records; the client fetches from the replica in its zone.
                    redirected = true;
                    m.preferred_replica_redirects
                        .with_label_values(&[t.topic.0.as_str()])
                        .inc();
                    parts.push(
                        offsets_of(data, shared).with_preferred_read_replica(BrokerId(replica)),
                    );
                    continue;
                }
                watchers.push(shared.hw.subscribe());
                let budget = budget(max_bytes, total, p.partition_max_bytes);
                if budget == 0 {
                    parts.push(offsets_of(data, shared));
                    continue;
                }
                match read::read(
                    shared,
                    &broker.blocks,
                    &broker.indexes,
                    p.fetch_offset,
                    budget as u64,
                )
                .await
                {
                    Ok(r) => {
                        data = isolated(data, r, read_committed);
                        total += data.records.as_ref().map_or(0, |r| r.len());
                    }
                    Err(e) => {
                        any_error = true;
                        data =
                            offsets_of(data, shared).with_error_code(errors::read_error(&e).code());
                    }
                }
                parts.push(data);
            }
            topics.push(
                FetchableTopicResponse::default()
                    .with_topic(t.topic.clone())
                    .with_topic_id(t.topic_id)
                    .with_partitions(parts),
            );
        }
        resp.responses = topics;
        let nothing_to_wait_on = watchers.is_empty() && !zone_reads;
        if total >= min_bytes
            || any_error
            || redirected
            || nothing_to_wait_on
            || crate::clock::instant() >= deadline
        {
            return resp;
        }
        // Zone-local reads have no watch to wait on: look again every refresh interval.
        let wake = if zone_reads {
            deadline.min(crate::clock::instant() + broker.zone_reads.refresh_interval())
        } else {
            deadline
        };
        if watchers.is_empty() {
            crate::clock::sleep_until(Some(wake)).await;
        } else {
            let changed = select_all(watchers.iter_mut().map(|w| Box::pin(w.changed())));
            if tokio::time::timeout_at(wake.into(), changed).await.is_err() && wake == deadline {
                return resp;
            }
        }
    }
}
