//! The rows of the metadata tables, as the SQLite and PostgreSQL backends read them.
//!
//! Both backends store the same tables with the same column names, so each table's row
//! is decoded in exactly one function here ([`topic`], [`partition`], [`segment`], ...),
//! whichever backend read it: a backend only says how it reads one column of each type
//! ([`StoredRow`]). Every query that reads a table selects that table's column list
//! (`rows::topic_columns!()` lists the columns [`topic`] decodes, in its order), so a
//! query and its decoder cannot disagree. The lists are macros expanding to string
//! literals so that `concat!` builds each query at compile time (the PostgreSQL backend
//! caches prepared statements by their `&'static str`). Topic configs and producer
//! states are JSON text, byte for byte the same in both; [`encode_json`],
//! [`topic_configs`] and [`producer_state`] are their only encoder and decoders.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::semantics::{PartitionRow, WalObject};
use super::{
    AbortedTxnRecord, BrokerRecord, CommittedOffset, MetaError, MetaResult, PartitionKey,
    ProducerStateRecord, SegmentRecord, TopicRecord, TxnOffsetRecord, TxnRecord, WalRangeRecord,
};

/// `topics`, as [`topic`] decodes it.
macro_rules! topic_columns {
    () => {
        "name, id, partitions, configs, created_ms"
    };
}

/// `partitions`, as [`partition`] decodes it: the key, then the scalar columns.
macro_rules! partition_columns {
    () => {
        "topic_id, partition, leader_epoch, high_watermark, log_start_offset, owner_broker"
    };
}

/// `segments` (of one partition), as [`segment`] decodes it.
macro_rules! segment_columns {
    () => {
        "base_offset, end_offset, object_key, size_bytes, data_bytes, max_timestamp, created_ms, compacted_ms"
    };
}

/// `wal_ranges` (of one partition), as [`wal_range`] decodes it.
macro_rules! wal_range_columns {
    () => {
        "base_offset, end_offset, object_key, position, len, max_timestamp, object_size"
    };
}

/// `wal_objects`, with whether a range still references each, as `wal_object`
/// decodes it.
macro_rules! wal_object_columns {
    () => {
        "object_key, created_ms,
         EXISTS (SELECT 1 FROM wal_ranges WHERE wal_ranges.object_key = wal_objects.object_key)"
    };
}

/// `producers` (of one partition), as [`producer`] decodes it.
macro_rules! producer_columns {
    () => {
        "producer_id, state"
    };
}

/// `epoch_history` (of one partition), as [`epoch`] decodes it.
macro_rules! epoch_columns {
    () => {
        "epoch, start_offset"
    };
}

/// `brokers`, as [`broker`] decodes it.
macro_rules! broker_columns {
    () => {
        "broker_id, session, host, port, zone, lease_expires_ms, draining"
    };
}

/// `group_offsets` (of one group), as [`offset`] decodes it. `offset` is quoted: a
/// keyword in PostgreSQL, and a plain identifier in SQLite either way.
macro_rules! offset_columns {
    () => {
        r#"topic, partition, "offset", leader_epoch, metadata, commit_timestamp_ms"#
    };
}

/// `txn_offsets` (of one group), as [`txn_offset`] decodes it: the producer, then the
/// columns [`offset`] decodes.
macro_rules! txn_offset_columns {
    () => {
        r#"producer_id, topic, partition, "offset", leader_epoch, metadata, commit_timestamp_ms"#
    };
}

/// `aborted_txns` (of one partition), as [`aborted_txn`] decodes it.
macro_rules! aborted_txn_columns {
    () => {
        "producer_id, first_offset, last_offset"
    };
}

/// `transactions`, as [`txn`] decodes it.
macro_rules! txn_columns {
    () => {
        "transactional_id, state"
    };
}

pub(crate) use {
    aborted_txn_columns, broker_columns, epoch_columns, offset_columns, partition_columns,
    producer_columns, segment_columns, topic_columns, txn_columns, txn_offset_columns,
    wal_object_columns, wal_range_columns,
};

/// One stored row, as a backend reads its columns. A value that does not decode (a type
/// or range the column must not hold) is `Corrupt`.
pub(crate) trait StoredRow {
    fn int(&self, idx: usize) -> MetaResult<i32>;
    fn opt_int(&self, idx: usize) -> MetaResult<Option<i32>>;
    fn bigint(&self, idx: usize) -> MetaResult<i64>;
    fn text(&self, idx: usize) -> MetaResult<String>;
    fn opt_text(&self, idx: usize) -> MetaResult<Option<String>>;
    fn flag(&self, idx: usize) -> MetaResult<bool>;
    /// A topic id.
    fn uuid(&self, idx: usize) -> MetaResult<Uuid>;
}

/// A size or position: stored signed, never negative.
fn size(row: &dyn StoredRow, idx: usize) -> MetaResult<u64> {
    let value = row.bigint(idx)?;
    u64::try_from(value).map_err(|_| {
        MetaError::Corrupt(format!(
            "stored value {value} in column {idx} must not be negative"
        ))
    })
}

/// `topics`.
pub(crate) fn topic(row: &dyn StoredRow) -> MetaResult<TopicRecord> {
    Ok(TopicRecord {
        name: row.text(0)?,
        id: row.uuid(1)?,
        partitions: row.int(2)?,
        configs: topic_configs(&row.text(3)?)?,
        created_ms: row.bigint(4)?,
    })
}

/// `partitions`: the key and the scalar columns.
pub(crate) fn partition(row: &dyn StoredRow) -> MetaResult<(PartitionKey, PartitionRow)> {
    let key = PartitionKey {
        topic_id: row.uuid(0)?,
        partition: row.int(1)?,
    };
    let stored = PartitionRow {
        leader_epoch: row.int(2)?,
        high_watermark: row.bigint(3)?,
        log_start_offset: row.bigint(4)?,
        owner: row.opt_int(5)?,
    };
    Ok((key, stored))
}

/// `segments` (of one partition).
pub(crate) fn segment(row: &dyn StoredRow) -> MetaResult<SegmentRecord> {
    Ok(SegmentRecord {
        base_offset: row.bigint(0)?,
        end_offset: row.bigint(1)?,
        object_key: row.text(2)?,
        size_bytes: size(row, 3)?,
        data_bytes: size(row, 4)?,
        max_timestamp: row.bigint(5)?,
        created_ms: row.bigint(6)?,
        compacted_ms: row.bigint(7)?,
    })
}

/// `wal_ranges` (of one partition).
pub(crate) fn wal_range(row: &dyn StoredRow) -> MetaResult<WalRangeRecord> {
    Ok(WalRangeRecord {
        base_offset: row.bigint(0)?,
        end_offset: row.bigint(1)?,
        object_key: row.text(2)?,
        position: size(row, 3)?,
        len: size(row, 4)?,
        max_timestamp: row.bigint(5)?,
        object_size: size(row, 6)?,
    })
}

/// `wal_objects`, with whether a range still references each.
pub(crate) fn wal_object(row: &dyn StoredRow) -> MetaResult<WalObject> {
    Ok(WalObject {
        object_key: row.text(0)?,
        created_ms: row.bigint(1)?,
        referenced: row.flag(2)?,
    })
}

/// `producers` (of one partition): the JSON state, which must be the row's producer's.
pub(crate) fn producer(row: &dyn StoredRow) -> MetaResult<ProducerStateRecord> {
    producer_state(row.bigint(0)?, &row.text(1)?)
}

/// `epoch_history` (of one partition): (epoch, start offset).
pub(crate) fn epoch(row: &dyn StoredRow) -> MetaResult<(i32, i64)> {
    Ok((row.int(0)?, row.bigint(1)?))
}

/// `brokers`.
pub(crate) fn broker(row: &dyn StoredRow) -> MetaResult<BrokerRecord> {
    Ok(BrokerRecord {
        broker_id: row.int(0)?,
        session: row.bigint(1)?,
        host: row.text(2)?,
        port: row.int(3)?,
        zone: row.opt_text(4)?,
        lease_expires_ms: row.bigint(5)?,
        draining: row.flag(6)?,
    })
}

/// `group_offsets` (of one group).
pub(crate) fn offset(row: &dyn StoredRow) -> MetaResult<CommittedOffset> {
    Ok(CommittedOffset {
        topic: row.text(0)?,
        partition: row.int(1)?,
        offset: row.bigint(2)?,
        leader_epoch: row.int(3)?,
        metadata: row.text(4)?,
        commit_timestamp_ms: row.bigint(5)?,
    })
}

/// `txn_offsets` (of one group).
pub(crate) fn txn_offset(row: &dyn StoredRow) -> MetaResult<TxnOffsetRecord> {
    Ok(TxnOffsetRecord {
        producer_id: row.bigint(0)?,
        offset: CommittedOffset {
            topic: row.text(1)?,
            partition: row.int(2)?,
            offset: row.bigint(3)?,
            leader_epoch: row.int(4)?,
            metadata: row.text(5)?,
            commit_timestamp_ms: row.bigint(6)?,
        },
    })
}

/// `aborted_txns` (of one partition).
pub(crate) fn aborted_txn(row: &dyn StoredRow) -> MetaResult<AbortedTxnRecord> {
    Ok(AbortedTxnRecord {
        producer_id: row.bigint(0)?,
        first_offset: row.bigint(1)?,
        last_offset: row.bigint(2)?,
    })
}

/// `transactions`: the JSON record, which must be the row's transactional id's.
pub(crate) fn txn(row: &dyn StoredRow) -> MetaResult<TxnRecord> {
    let id = row.text(0)?;
    let record: TxnRecord = serde_json::from_str(&row.text(1)?).map_err(|e| {
        MetaError::Corrupt(format!(
            "stored state of transactional id {id:?} is not valid json: {e}"
        ))
    })?;
    if record.transactional_id != id {
        return Err(MetaError::Corrupt(format!(
            "transaction row {id:?} holds the state of {:?}",
            record.transactional_id
        )));
    }
    Ok(record)
}

/// A one-column number: a counter row's value (`counters.value`,
/// `broker_sessions.session`) or the schema version (`schema_version`, its highest).
pub(crate) fn number(row: &dyn StoredRow) -> MetaResult<i64> {
    row.bigint(0)
}

/// A one-column answer of keys or names (object keys, group ids).
pub(crate) fn name(row: &dyn StoredRow) -> MetaResult<String> {
    row.text(0)
}

/// The stored JSON of a topic config map or a producer state.
pub(crate) fn encode_json<T: serde::Serialize>(value: &T, what: &str) -> MetaResult<String> {
    serde_json::to_string(value)
        .map_err(|e| MetaError::Unavailable(format!("cannot encode {what} as json: {e}")))
}

/// A topic's stored configs: a JSON object of strings.
pub(crate) fn topic_configs(json: &str) -> MetaResult<BTreeMap<String, String>> {
    serde_json::from_str(json)
        .map_err(|e| MetaError::Corrupt(format!("stored topic configs are not valid json: {e}")))
}

/// A producer's stored state (the serde form of [`ProducerStateRecord`]), which must be
/// the state of the producer its row is keyed by.
pub(crate) fn producer_state(producer_id: i64, json: &str) -> MetaResult<ProducerStateRecord> {
    let state: ProducerStateRecord = serde_json::from_str(json).map_err(|e| {
        MetaError::Corrupt(format!(
            "stored state of producer {producer_id} is not valid json: {e}"
        ))
    })?;
    if state.producer_id != producer_id {
        return Err(MetaError::Corrupt(format!(
            "producer row {producer_id} holds the state of producer {}",
            state.producer_id
        )));
    }
    Ok(state)
}
