//! The scrape: refreshes the metrics that are computed when Prometheus asks (partitions
//! owned, coordinator slots, groups, consumer-group lag, open transactions) and renders the registry. It
//! lives on the HTTP side so that `crate::metrics` stays a leaf every layer can use.

use prometheus::{Encoder, TextEncoder};

use crate::broker::Broker;
use crate::clock::now_ms;
use crate::metrics::{metrics, Metrics};

/// Longest a scrape waits for the committed offsets behind consumer-group lag.
const LAG_REFRESH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Refreshes the scrape-time metrics and renders the registry in the text format.
pub(crate) async fn render(broker: &Broker) -> String {
    let m = metrics();
    m.uptime_seconds.set(m.started.elapsed().as_secs() as i64);
    m.partitions.set(broker.local_partition_count() as i64);
    m.coordinator_slots
        .set(broker.ownership.held_slots().len() as i64);
    m.groups.set(broker.groups.live_groups().len() as i64);
    for (queue, depth, capacity) in broker.queue_depths() {
        m.queue_depth.with_label_values(&[queue]).set(depth as i64);
        m.queue_capacity
            .with_label_values(&[queue])
            .set(capacity as i64);
    }
    refresh_compaction(broker, m);
    refresh_lso_lag(broker, m);
    if tokio::time::timeout(LAG_REFRESH_TIMEOUT, refresh_txns(broker, m))
        .await
        .is_err()
    {
        tracing::debug!("transaction gauges left out of this scrape: the coordinator is busy");
    }
    m.cache_entries
        .with_label_values(&["segment_index"])
        .set(broker.indexes.entries() as i64);
    m.cache_entries
        .with_label_values(&["zone_manifest"])
        .set(broker.zone_reads.entries() as i64);
    // Lag needs the metadata store; a scrape must answer when it does not (that is when
    // operators look), so lag is left out of a scrape that would wait longer.
    if tokio::time::timeout(LAG_REFRESH_TIMEOUT, refresh_group_lag(broker, m))
        .await
        .is_err()
    {
        tracing::debug!("consumer-group lag left out of this scrape: the metadata store is slow");
    }
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&m.registry.gather(), &mut out) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The compaction gauges of the compacted partitions this broker owns, from their views.
fn refresh_compaction(broker: &Broker, m: &Metrics) {
    let gauges = [
        &m.compaction_dirty_ratio,
        &m.compaction_lag_seconds,
        &m.compaction_max_lag_seconds,
    ];
    for g in gauges {
        g.reset();
    }
    let now = now_ms();
    for topic in broker.topics() {
        if !topic.config.cleanup.compact {
            continue;
        }
        for p in topic.local_partitions() {
            let (ratio, oldest_dirty) = {
                let view = p.shared.view();
                let remote = view.segments.remote();
                let oldest = remote
                    .iter()
                    .find(|s| s.compacted_ms == 0)
                    .map(|s| s.max_timestamp);
                (crate::log::compact::plan::dirt(remote).ratio(), oldest)
            };
            let labels = [topic.name.as_ref(), &p.partition.to_string()];
            let lag = oldest_dirty.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
            m.compaction_dirty_ratio
                .with_label_values(&labels)
                .set(ratio);
            m.compaction_lag_seconds.with_label_values(&labels).set(lag);
            m.compaction_max_lag_seconds
                .with_label_values(&labels)
                .set(topic.config.max_compaction_lag_ms as f64 / 1000.0);
        }
    }
}

/// How far open transactions hold each owned partition's last stable offset behind its
/// high watermark (only partitions held up get a series).
fn refresh_lso_lag(broker: &Broker, m: &Metrics) {
    m.lso_lag.reset();
    for topic in broker.topics() {
        for p in topic.local_partitions() {
            let lag = p.shared.high_watermark() - p.shared.last_stable_offset();
            if lag > 0 {
                m.lso_lag
                    .with_label_values(&[topic.name.as_ref(), &p.partition.to_string()])
                    .set(lag);
            }
        }
    }
}

/// Open transactions on this broker's coordinator and the age of the oldest.
async fn refresh_txns(broker: &Broker, m: &Metrics) {
    let now = now_ms();
    let open: Vec<i64> = broker
        .txns
        .list()
        .await
        .into_iter()
        .filter(|r| r.state == crate::metadata::TxnState::Ongoing)
        .map(|r| r.start_ms)
        .collect();
    m.txn_open.set(open.len() as i64);
    let oldest = open
        .iter()
        .map(|s| (now - s).max(0) / 1000)
        .max()
        .unwrap_or(0);
    m.txn_oldest_open_seconds.set(oldest);
}

async fn refresh_group_lag(broker: &Broker, m: &Metrics) {
    for g in [
        &m.group_lag,
        &m.group_lag_sum,
        &m.group_current_offset,
        &m.group_current_offset_sum,
        &m.group_members,
    ] {
        g.reset();
    }
    m.group_lag_seconds.reset();
    let Ok(groups) = broker.meta.offset_groups().await else {
        return;
    };
    let mut names: std::collections::BTreeSet<String> = groups.into_iter().collect();
    names.extend(broker.groups.live_groups());
    let now = now_ms();
    for group in names {
        let members = broker
            .groups
            .describe(&group)
            .await
            .map_or(0, |s| s.members.len());
        m.group_members
            .with_label_values(&[&group])
            .set(members as i64);
        let Ok(offsets) = broker.meta.fetch_offsets(&group).await else {
            continue;
        };
        for o in offsets {
            let Some(part) = broker.local_partition(&o.topic, o.partition) else {
                continue;
            };
            let hw = part.shared.high_watermark();
            let lag = (hw - o.offset).max(0);
            let p = o.partition.to_string();
            let labels = [group.as_str(), o.topic.as_str(), p.as_str()];
            m.group_lag.with_label_values(&labels).set(lag);
            m.group_current_offset
                .with_label_values(&labels)
                .set(o.offset);
            m.group_lag_sum
                .with_label_values(&[&group, &o.topic])
                .add(lag);
            m.group_current_offset_sum
                .with_label_values(&[&group, &o.topic])
                .add(o.offset);
            let age = if lag == 0 {
                0.0
            } else {
                batch_timestamp(&part.shared, o.offset)
                    .map_or(0.0, |ts| ((now - ts).max(0) as f64) / 1000.0)
            };
            m.group_lag_seconds.with_label_values(&labels).set(age);
        }
    }
}

/// Max timestamp of the stored batch holding `offset` (from the local index, or the
/// sealed segment's maximum for older data).
fn batch_timestamp(part: &crate::log::partition::PartitionShared, offset: i64) -> Option<i64> {
    let view = part.view.read().ok()?;
    for seg in view.segments.local() {
        let i = seg.entries.partition_point(|e| e.last_offset < offset);
        if let Some(e) = seg
            .entries
            .get(i)
            .filter(|e| e.base_offset <= offset || i == 0)
        {
            if offset >= seg.base_offset {
                return Some(e.max_timestamp);
            }
        }
    }
    view.segments
        .remote()
        .iter()
        .find(|s| offset >= s.base_offset && offset < s.end_offset)
        .map(|s| s.max_timestamp)
        .or_else(|| {
            view.segments
                .wal()
                .iter()
                .find(|r| offset >= r.base_offset && offset < r.end_offset)
                .map(|r| r.max_timestamp)
        })
}
