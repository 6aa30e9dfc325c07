//! The SQLite backend of [`MetadataStore`]: the zero-config, embedded metadata store.
//!
//! It owns one SQLite database file and the schema inside it. The file runs in WAL
//! journal mode with `synchronous=FULL`, so a call that returned `Ok` has been fsynced
//! and survives `kill -9` or a power cut. Every trait method is exactly one SQLite
//! transaction, which is what makes the epoch checks and the multi-partition
//! write-ahead commit atomic.
//!
//! rusqlite is blocking, so the one connection lives behind a mutex and every operation
//! runs on tokio's blocking pool (never on a runtime worker). A single connection also
//! serialises all writers inside the process, which is what an embedded, single-broker
//! store needs; `BEGIN IMMEDIATE` and a busy timeout cover other processes opening the
//! same file (backup or inspection tools).
//!
//! Persisted format: the table names, column names and their meaning, the JSON of topic
//! configs (a string-to-string object) and of producer states (the serde form of
//! [`ProducerStateRecord`]), and the counter names are all stored on disk and **must be
//! kept stable**. Any change needs a new schema version and a migration step in
//! [`migrate`]; the `schema_version` table records what a file holds (one row per
//! applied version: a file at version 2 holds the rows 1 and 2).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use uuid::Uuid;

use super::semantics;
use super::PartitionOwner;
use super::{
    BrokerRecord, CommittedOffset, Fence, MetaError, MetaResult, MetadataStore, PartitionKey,
    PartitionState, ProducerStateRecord, SegmentRecord, TopicRecord, WalCommit, WalRangeRecord,
};

/// How long a statement waits for a lock held by another connection to the same file
/// before the operation fails as unavailable (and may be retried).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Prepared statements kept per connection: more than the distinct statements we run,
/// so the hot ones (`commit_wal`'s, `commit_offsets`') are parsed once per connection,
/// not per call.
const STATEMENT_CACHE_CAPACITY: usize = 64;
/// The schema version this code reads and writes.
const SCHEMA_VERSION: i64 = 4;
/// The first producer id handed out. Persisted in the `counters` row below; stable.
const FIRST_PRODUCER_ID: i64 = 1000;
/// Name of the `counters` row that allocates producer ids. Persisted; stable.
const PRODUCER_ID_COUNTER: &str = "producer_id";

/// Schema version 1. Every name here is persisted: keep them stable, add a new version
/// with a migration instead of editing this text.
///
/// Topic ids are 16-byte big-endian UUID blobs. Offsets, epochs and timestamps are
/// integers; sizes are non-negative integers. `epoch_history` holds one row per claimed
/// leader epoch with the high watermark at the time of the claim as its start offset.
const SCHEMA_V1: &str = "
CREATE TABLE topics (
    name        TEXT    NOT NULL PRIMARY KEY,
    id          BLOB    NOT NULL UNIQUE,
    partitions  INTEGER NOT NULL,
    configs     TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL
);
CREATE TABLE partitions (
    topic_id         BLOB    NOT NULL,
    partition        INTEGER NOT NULL,
    leader_epoch     INTEGER NOT NULL,
    log_start_offset INTEGER NOT NULL,
    high_watermark   INTEGER NOT NULL,
    owner_broker     INTEGER,
    PRIMARY KEY (topic_id, partition)
) WITHOUT ROWID;
CREATE TABLE epoch_history (
    topic_id     BLOB    NOT NULL,
    partition    INTEGER NOT NULL,
    epoch        INTEGER NOT NULL,
    start_offset INTEGER NOT NULL,
    PRIMARY KEY (topic_id, partition, epoch)
) WITHOUT ROWID;
CREATE TABLE segments (
    topic_id      BLOB    NOT NULL,
    partition     INTEGER NOT NULL,
    base_offset   INTEGER NOT NULL,
    end_offset    INTEGER NOT NULL,
    object_key    TEXT    NOT NULL,
    size_bytes    INTEGER NOT NULL,
    data_bytes    INTEGER NOT NULL,
    max_timestamp INTEGER NOT NULL,
    created_ms    INTEGER NOT NULL,
    PRIMARY KEY (topic_id, partition, base_offset)
) WITHOUT ROWID;
CREATE TABLE wal_ranges (
    topic_id      BLOB    NOT NULL,
    partition     INTEGER NOT NULL,
    base_offset   INTEGER NOT NULL,
    end_offset    INTEGER NOT NULL,
    object_key    TEXT    NOT NULL,
    position      INTEGER NOT NULL,
    len           INTEGER NOT NULL,
    max_timestamp INTEGER NOT NULL,
    PRIMARY KEY (topic_id, partition, base_offset)
) WITHOUT ROWID;
CREATE INDEX wal_ranges_by_object ON wal_ranges (object_key);
CREATE TABLE wal_objects (
    object_key TEXT    NOT NULL PRIMARY KEY,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE producers (
    topic_id    BLOB    NOT NULL,
    partition   INTEGER NOT NULL,
    producer_id INTEGER NOT NULL,
    state       TEXT    NOT NULL,
    PRIMARY KEY (topic_id, partition, producer_id)
) WITHOUT ROWID;
CREATE TABLE counters (
    name  TEXT    NOT NULL PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE broker_sessions (
    broker_id INTEGER NOT NULL PRIMARY KEY,
    session   INTEGER NOT NULL
);
";

/// Schema version 2: consumer-group committed offsets. Persisted names, keep them stable
/// like [`SCHEMA_V1`]'s.
///
/// One row per (group, topic, partition). Offsets are keyed by topic *name*, as Kafka
/// clients commit them, and are independent of the `topics` table: deleting a topic
/// leaves its offsets (the broker removes them). `leader_epoch` is -1 when unknown;
/// `metadata` is the client's string; `commit_timestamp_ms` drives offset expiry.
const SCHEMA_V2: &str = "
CREATE TABLE group_offsets (
    group_id            TEXT    NOT NULL,
    topic               TEXT    NOT NULL,
    partition           INTEGER NOT NULL,
    offset              INTEGER NOT NULL,
    leader_epoch        INTEGER NOT NULL,
    metadata            TEXT    NOT NULL,
    commit_timestamp_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
) WITHOUT ROWID;
";

/// Schema version 3: broker registrations with their leases (membership). Persisted
/// names, keep them stable like [`SCHEMA_V1`]'s. One row per broker id: the newest
/// session's address, zone and lease expiry (milliseconds since the epoch).
const SCHEMA_V3: &str = "
CREATE TABLE brokers (
    broker_id        INTEGER NOT NULL PRIMARY KEY,
    session          INTEGER NOT NULL,
    host             TEXT    NOT NULL,
    port             INTEGER NOT NULL,
    zone             TEXT,
    lease_expires_ms INTEGER NOT NULL
);
";

/// Schema version 4: a broker can be draining (live, giving its work away, taking none).
/// Write-ahead ranges record their object's size, for readers other than the writer.
const SCHEMA_V4: &str = "
ALTER TABLE brokers ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;
ALTER TABLE wal_ranges ADD COLUMN object_size INTEGER NOT NULL DEFAULT 0;
";

/// The embedded metadata store: one SQLite file (or an in-memory database for tests).
///
/// Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// Where the database lives, for `Debug` and logs; `None` when in memory.
    path: Option<PathBuf>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating it and its parent directory if needed) the database at `path`,
    /// switches it to WAL with `synchronous=FULL` and creates or migrates the schema.
    ///
    /// Blocking file I/O: call it at startup or from `spawn_blocking`.
    pub fn open(path: &Path) -> MetaResult<SqliteStore> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                MetaError::Unavailable(format!(
                    "cannot create metadata directory {}: {e}",
                    parent.display()
                ))
            })?;
        }
        let conn = Connection::open(path).db()?;
        let journal_mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .db()?;
        if !journal_mode.eq_ignore_ascii_case("wal") {
            return Err(MetaError::Unavailable(format!(
                "sqlite file {} refused wal journal mode (got {journal_mode}); \
                 put the metadata file on a local file system",
                path.display()
            )));
        }
        let store = SqliteStore::setup(conn, Some(path.to_path_buf()))?;
        tracing::info!(path = %path.display(), "opened sqlite metadata store");
        Ok(store)
    }

    /// A private in-memory database: nothing survives the store being dropped. For tests.
    pub fn open_in_memory() -> MetaResult<SqliteStore> {
        let conn = Connection::open_in_memory().db()?;
        SqliteStore::setup(conn, None)
    }

    fn setup(mut conn: Connection, path: Option<PathBuf>) -> MetaResult<SqliteStore> {
        // FULL: every commit fsyncs the WAL, so an acknowledged commit is durable.
        conn.pragma_update(None, "synchronous", "FULL").db()?;
        conn.busy_timeout(BUSY_TIMEOUT).db()?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// Runs `op` with the connection on the blocking pool.
    async fn run<T, F>(&self, op: F) -> MetaResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> MetaResult<T> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        let task = tokio::task::spawn_blocking(move || {
            // A panic inside an operation dropped its `Transaction`, which rolled back:
            // the connection is consistent again, so a poisoned lock is safe to reuse.
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            op(&mut conn)
        });
        match task.await {
            Ok(result) => result,
            // A bug: keep it loud instead of turning it into a retriable error.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(MetaError::Unavailable(format!(
                "sqlite metadata task did not run: {e}"
            ))),
        }
    }
}

/// Creates the schema in a new file, or upgrades an older one, in one transaction.
fn migrate(conn: &mut Connection) -> MetaResult<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .db()?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL PRIMARY KEY)",
    )
    .db()?;
    let current: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version",
            [],
            |row| row.get(0),
        )
        .db()?;
    if current > SCHEMA_VERSION {
        return Err(MetaError::Unavailable(format!(
            "metadata schema version {current} is newer than this broker supports \
             ({SCHEMA_VERSION}); upgrade the broker"
        )));
    }
    if current < 1 {
        tx.execute_batch(SCHEMA_V1).db()?;
        tx.execute("INSERT INTO schema_version (version) VALUES (1)", [])
            .db()?;
    }
    if current < 2 {
        tx.execute_batch(SCHEMA_V2).db()?;
        tx.execute("INSERT INTO schema_version (version) VALUES (2)", [])
            .db()?;
        if current == 1 {
            tracing::info!("migrated sqlite metadata schema from version 1 to 2");
        }
    }
    if current < 3 {
        tx.execute_batch(SCHEMA_V3).db()?;
        tx.execute("INSERT INTO schema_version (version) VALUES (3)", [])
            .db()?;
        if current >= 1 {
            tracing::info!(
                from = current,
                "migrated sqlite metadata schema to version 3"
            );
        }
    }
    if current < 4 {
        tx.execute_batch(SCHEMA_V4).db()?;
        tx.execute("INSERT INTO schema_version (version) VALUES (4)", [])
            .db()?;
        if current >= 1 {
            tracing::info!(
                from = current,
                "migrated sqlite metadata schema to version 4"
            );
        }
    }
    // Later versions: `if current < 5 { ... }`, each step in this same transaction.
    tx.commit().db()
}

/// `?`-friendly mapping of rusqlite errors to the coarse public kinds.
trait SqlResultExt<T> {
    fn db(self) -> MetaResult<T>;
}

impl<T> SqlResultExt<T> for rusqlite::Result<T> {
    fn db(self) -> MetaResult<T> {
        self.map_err(|e| match e {
            // A stored value that does not decode: retrying will not help.
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::InvalidColumnType(..) => {
                MetaError::Corrupt(format!("sqlite value does not decode: {e}"))
            }
            other => MetaError::Unavailable(format!("sqlite: {other}")),
        })
    }
}

/// Sizes and positions are `u64` in the API and SQLite integers (`i64`) on disk.
fn u64_to_sql(value: u64, what: &str) -> MetaResult<i64> {
    i64::try_from(value).map_err(|_| {
        MetaError::Corrupt(format!("{what} {value} does not fit in an sqlite integer"))
    })
}

/// Reads a non-negative integer column; a negative value is a decode (corruption) error.
fn get_u64(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let value: i64 = row.get(idx)?;
    u64::try_from(value).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, value))
}

fn decode_uuid(bytes: &[u8]) -> MetaResult<Uuid> {
    Uuid::from_slice(bytes)
        .map_err(|e| MetaError::Corrupt(format!("stored topic id is not a 16-byte uuid: {e}")))
}

fn decode_configs(json: &str) -> MetaResult<BTreeMap<String, String>> {
    serde_json::from_str(json)
        .map_err(|e| MetaError::Corrupt(format!("stored topic configs are not valid json: {e}")))
}

fn encode_json<T: serde::Serialize>(value: &T, what: &str) -> MetaResult<String> {
    serde_json::to_string(value)
        .map_err(|e| MetaError::Unavailable(format!("cannot encode {what} as json: {e}")))
}

/// The raw columns of a `topics` row, decoded outside rusqlite's row callback.
type TopicRow = (String, Vec<u8>, i32, String, i64);

fn topic_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<TopicRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ))
}

fn decode_topic((name, id, partitions, configs, created_ms): TopicRow) -> MetaResult<TopicRecord> {
    Ok(TopicRecord {
        name,
        id: decode_uuid(&id)?,
        partitions,
        configs: decode_configs(&configs)?,
        created_ms,
    })
}

fn find_topic(tx: &Transaction<'_>, name: &str) -> MetaResult<Option<TopicRecord>> {
    let row = tx
        .prepare_cached(
            "SELECT name, id, partitions, configs, created_ms FROM topics WHERE name = ?1",
        )
        .db()?
        .query_row(params![name], topic_from_row)
        .optional()
        .db()?;
    row.map(decode_topic).transpose()
}

/// Inserts partition rows `from..to` of a topic: epoch 0, empty log, no owner.
fn insert_partitions(tx: &Transaction<'_>, topic_id: Uuid, from: i32, to: i32) -> MetaResult<()> {
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO partitions
                 (topic_id, partition, leader_epoch, log_start_offset, high_watermark, owner_broker)
             VALUES (?1, ?2, 0, 0, 0, NULL)",
        )
        .db()?;
    for partition in from..to {
        insert
            .execute(params![topic_id.as_bytes(), partition])
            .db()?;
    }
    Ok(())
}

/// The stored leader epoch of a partition, `None` if the partition does not exist.
fn stored_epoch(tx: &Transaction<'_>, key: PartitionKey) -> MetaResult<Option<i32>> {
    tx.prepare_cached("SELECT leader_epoch FROM partitions WHERE topic_id = ?1 AND partition = ?2")
        .db()?
        .query_row(params![key.topic_id.as_bytes(), key.partition], |row| {
            row.get(0)
        })
        .optional()
        .db()
}

/// The epoch check of single-partition writes.
fn require_epoch(tx: &Transaction<'_>, key: PartitionKey, leader_epoch: i32) -> MetaResult<()> {
    match stored_epoch(tx, key)? {
        None => Err(MetaError::PartitionNotFound),
        Some(stored) if stored != leader_epoch => {
            tracing::debug!(?key, stored, leader_epoch, "fenced partition write");
            Err(MetaError::Fenced(vec![key]))
        }
        Some(_) => Ok(()),
    }
}

/// A fenced write (`semantics`): reads the rows of its fences inside `tx`, plans, and
/// applies the planned writes. Returns how many offsets it deleted.
fn apply_fenced(tx: &Transaction<'_>, op: semantics::Op<'_>) -> MetaResult<usize> {
    let mut rows = semantics::Rows::new();
    {
        let mut read = tx
            .prepare_cached(
                "SELECT leader_epoch, high_watermark, log_start_offset FROM partitions
                 WHERE topic_id = ?1 AND partition = ?2",
            )
            .db()?;
        for key in op.fences() {
            let row = read
                .query_row(params![key.topic_id.as_bytes(), key.partition], |r| {
                    Ok(semantics::PartitionRow {
                        leader_epoch: r.get(0)?,
                        high_watermark: r.get(1)?,
                        log_start_offset: r.get(2)?,
                    })
                })
                .optional()
                .db()?;
            if let Some(row) = row {
                rows.insert(key, row);
            }
        }
    }
    let mut deleted = 0;
    for write in semantics::plan(&rows, op)? {
        deleted += apply_write(tx, write)?;
    }
    Ok(deleted)
}

/// One planned write in SQL; returns the rows an offset deletion removed.
fn apply_write(tx: &Transaction<'_>, write: semantics::Write<'_>) -> MetaResult<usize> {
    use semantics::Write;
    let run = |sql: &str, params: &[&dyn rusqlite::ToSql]| -> MetaResult<usize> {
        tx.prepare_cached(sql).db()?.execute(params).db()
    };
    match write {
        Write::InsertRange { key, range } => run(
            "INSERT INTO wal_ranges (topic_id, partition, base_offset, end_offset,
                 object_key, position, len, max_timestamp, object_size)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                key.topic_id.as_bytes(),
                key.partition,
                range.base_offset,
                range.end_offset,
                range.object_key,
                u64_to_sql(range.position, "wal range position")?,
                u64_to_sql(range.len, "wal range length")?,
                range.max_timestamp,
                u64_to_sql(range.object_size, "wal object size")?
            ],
        )?,
        Write::SetHighWatermark {
            key,
            high_watermark,
        } => run(
            "UPDATE partitions SET high_watermark = ?3 WHERE topic_id = ?1 AND partition = ?2",
            params![key.topic_id.as_bytes(), key.partition, high_watermark],
        )?,
        Write::UpsertProducer { key, state } => run(
            "INSERT INTO producers (topic_id, partition, producer_id, state)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (topic_id, partition, producer_id)
             DO UPDATE SET state = excluded.state",
            params![
                key.topic_id.as_bytes(),
                key.partition,
                state.producer_id,
                encode_json(state, "producer state")?
            ],
        )?,
        Write::RememberWalObject {
            object_key,
            created_ms,
        } => run(
            "INSERT INTO wal_objects (object_key, created_ms) VALUES (?1, ?2)
             ON CONFLICT (object_key) DO NOTHING",
            params![object_key, created_ms],
        )?,
        Write::InsertSegment { key, segment } => run(
            "INSERT INTO segments (topic_id, partition, base_offset, end_offset,
                 object_key, size_bytes, data_bytes, max_timestamp, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                key.topic_id.as_bytes(),
                key.partition,
                segment.base_offset,
                segment.end_offset,
                segment.object_key,
                u64_to_sql(segment.size_bytes, "segment size")?,
                u64_to_sql(segment.data_bytes, "segment data size")?,
                segment.max_timestamp,
                segment.created_ms
            ],
        )?,
        Write::DropRangesThrough { key, end_offset } => run(
            "DELETE FROM wal_ranges WHERE topic_id = ?1 AND partition = ?2 AND end_offset <= ?3",
            params![key.topic_id.as_bytes(), key.partition, end_offset],
        )?,
        Write::SetLogStartOffset {
            key,
            log_start_offset,
        } => run(
            "UPDATE partitions SET log_start_offset = ?3 WHERE topic_id = ?1 AND partition = ?2",
            params![key.topic_id.as_bytes(), key.partition, log_start_offset],
        )?,
        Write::DropSegment { key, base_offset } => run(
            "DELETE FROM segments WHERE topic_id = ?1 AND partition = ?2 AND base_offset = ?3",
            params![key.topic_id.as_bytes(), key.partition, base_offset],
        )?,
        Write::UpsertOffset { group, offset: o } => run(
            "INSERT INTO group_offsets (group_id, topic, partition, offset,
                 leader_epoch, metadata, commit_timestamp_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (group_id, topic, partition) DO UPDATE SET
                 offset = excluded.offset,
                 leader_epoch = excluded.leader_epoch,
                 metadata = excluded.metadata,
                 commit_timestamp_ms = excluded.commit_timestamp_ms",
            params![
                group,
                o.topic,
                o.partition,
                o.offset,
                o.leader_epoch,
                o.metadata,
                o.commit_timestamp_ms
            ],
        )?,
        Write::DeleteOffsets {
            group,
            partition: None,
        } => {
            return run(
                "DELETE FROM group_offsets WHERE group_id = ?1",
                params![group],
            )
        }
        Write::DeleteOffsets {
            group,
            partition: Some((topic, partition)),
        } => {
            return run(
                "DELETE FROM group_offsets WHERE group_id = ?1 AND topic = ?2 AND partition = ?3",
                params![group, topic, partition],
            )
        }
        Write::ExpireOffsets { group, before_ms } => {
            return run(
                "DELETE FROM group_offsets WHERE group_id = ?1 AND commit_timestamp_ms < ?2",
                params![group, before_ms],
            )
        }
    };
    Ok(0)
}

/// Runs a fenced write in one immediate transaction.
fn fenced_tx(conn: &mut Connection, op: semantics::Op<'_>) -> MetaResult<usize> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .db()?;
    let deleted = apply_fenced(&tx, op)?;
    tx.commit().db()?;
    Ok(deleted)
}

/// Reads everything a new owner recovers from; the scalar columns come from the caller.
fn load_partition_state(
    tx: &Transaction<'_>,
    key: PartitionKey,
    leader_epoch: i32,
    log_start_offset: i64,
    high_watermark: i64,
) -> MetaResult<PartitionState> {
    let id = key.topic_id.as_bytes();

    let segments = tx
        .prepare_cached(
            "SELECT base_offset, end_offset, object_key, size_bytes, data_bytes,
                    max_timestamp, created_ms
             FROM segments WHERE topic_id = ?1 AND partition = ?2 ORDER BY base_offset",
        )
        .db()?
        .query_map(params![id, key.partition], |row| {
            Ok(SegmentRecord {
                base_offset: row.get(0)?,
                end_offset: row.get(1)?,
                object_key: row.get(2)?,
                size_bytes: get_u64(row, 3)?,
                data_bytes: get_u64(row, 4)?,
                max_timestamp: row.get(5)?,
                created_ms: row.get(6)?,
            })
        })
        .db()?
        .collect::<rusqlite::Result<Vec<_>>>()
        .db()?;

    let wal_ranges = tx
        .prepare_cached(
            "SELECT base_offset, end_offset, object_key, position, len, max_timestamp,
                    object_size
             FROM wal_ranges WHERE topic_id = ?1 AND partition = ?2 ORDER BY base_offset",
        )
        .db()?
        .query_map(params![id, key.partition], |row| {
            Ok(WalRangeRecord {
                base_offset: row.get(0)?,
                end_offset: row.get(1)?,
                object_key: row.get(2)?,
                position: get_u64(row, 3)?,
                len: get_u64(row, 4)?,
                max_timestamp: row.get(5)?,
                object_size: get_u64(row, 6)?,
            })
        })
        .db()?
        .collect::<rusqlite::Result<Vec<_>>>()
        .db()?;

    let producer_rows = tx
        .prepare_cached(
            "SELECT producer_id, state FROM producers
             WHERE topic_id = ?1 AND partition = ?2 ORDER BY producer_id",
        )
        .db()?
        .query_map(params![id, key.partition], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
        })
        .db()?
        .collect::<rusqlite::Result<Vec<_>>>()
        .db()?;
    let mut producers = Vec::with_capacity(producer_rows.len());
    for (producer_id, json) in producer_rows {
        let state: ProducerStateRecord = serde_json::from_str(&json).map_err(|e| {
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
        producers.push(state);
    }

    let epoch_history = tx
        .prepare_cached(
            "SELECT epoch, start_offset FROM epoch_history
             WHERE topic_id = ?1 AND partition = ?2 ORDER BY epoch",
        )
        .db()?
        .query_map(params![id, key.partition], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .db()?
        .collect::<rusqlite::Result<Vec<_>>>()
        .db()?;

    Ok(PartitionState {
        leader_epoch,
        log_start_offset,
        high_watermark,
        segments,
        wal_ranges,
        producers,
        epoch_history,
    })
}

#[async_trait]
impl MetadataStore for SqliteStore {
    async fn create_topic(&self, topic: &TopicRecord) -> MetaResult<()> {
        let topic = topic.clone();
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            if find_topic(&tx, &topic.name)?.is_some() {
                return Err(MetaError::TopicExists);
            }
            let configs = encode_json(&topic.configs, "topic configs")?;
            tx.prepare_cached(
                "INSERT INTO topics (name, id, partitions, configs, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .db()?
            .execute(params![
                topic.name,
                topic.id.as_bytes(),
                topic.partitions,
                configs,
                topic.created_ms
            ])
            .db()?;
            insert_partitions(&tx, topic.id, 0, topic.partitions)?;
            tx.commit().db()
        })
        .await
    }

    async fn delete_topic(&self, name: &str) -> MetaResult<TopicRecord> {
        let name = name.to_owned();
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let topic = find_topic(&tx, &name)?.ok_or(MetaError::TopicNotFound)?;
            let id = topic.id.as_bytes();
            // wal_objects rows stay: they become unreferenced once no range points at
            // them, and garbage collection deletes the objects and then the rows.
            // group_offsets rows stay too: committed offsets are the broker's to
            // remove (the store keys them by topic name, independent of topics).
            for table in [
                "partitions",
                "epoch_history",
                "segments",
                "wal_ranges",
                "producers",
            ] {
                tx.prepare_cached(&format!("DELETE FROM {table} WHERE topic_id = ?1"))
                    .db()?
                    .execute(params![id])
                    .db()?;
            }
            tx.prepare_cached("DELETE FROM topics WHERE name = ?1")
                .db()?
                .execute(params![name])
                .db()?;
            tx.commit().db()?;
            Ok(topic)
        })
        .await
    }

    async fn list_topics(&self) -> MetaResult<Vec<TopicRecord>> {
        self.run(|conn| {
            let tx = conn.transaction().db()?;
            let rows = tx
                .prepare_cached(
                    "SELECT name, id, partitions, configs, created_ms FROM topics ORDER BY name",
                )
                .db()?
                .query_map([], topic_from_row)
                .db()?
                .collect::<rusqlite::Result<Vec<_>>>()
                .db()?;
            rows.into_iter().map(decode_topic).collect()
        })
        .await
    }

    async fn set_topic_configs(
        &self,
        name: &str,
        configs: &BTreeMap<String, String>,
    ) -> MetaResult<()> {
        let name = name.to_owned();
        let configs = encode_json(configs, "topic configs")?;
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let changed = tx
                .prepare_cached("UPDATE topics SET configs = ?2 WHERE name = ?1")
                .db()?
                .execute(params![name, configs])
                .db()?;
            if changed == 0 {
                return Err(MetaError::TopicNotFound);
            }
            tx.commit().db()
        })
        .await
    }

    /// A count at or below the current one changes nothing and returns `Ok` (callers
    /// validate requests before calling).
    async fn set_partition_count(&self, name: &str, count: i32) -> MetaResult<()> {
        let name = name.to_owned();
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let topic = find_topic(&tx, &name)?.ok_or(MetaError::TopicNotFound)?;
            if count <= topic.partitions {
                return Ok(());
            }
            insert_partitions(&tx, topic.id, topic.partitions, count)?;
            tx.prepare_cached("UPDATE topics SET partitions = ?2 WHERE name = ?1")
                .db()?
                .execute(params![name, count])
                .db()?;
            tx.commit().db()
        })
        .await
    }

    async fn claim_partition(
        &self,
        key: PartitionKey,
        broker_id: i32,
    ) -> MetaResult<PartitionState> {
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let id = key.topic_id.as_bytes();
            let (epoch, log_start_offset, high_watermark): (i32, i64, i64) = tx
                .prepare_cached(
                    "SELECT leader_epoch, log_start_offset, high_watermark FROM partitions
                     WHERE topic_id = ?1 AND partition = ?2",
                )
                .db()?
                .query_row(params![id, key.partition], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .optional()
                .db()?
                .ok_or(MetaError::PartitionNotFound)?;
            let new_epoch = epoch.checked_add(1).ok_or_else(|| {
                MetaError::Corrupt(format!("leader epoch of {key:?} cannot grow past {epoch}"))
            })?;
            tx.prepare_cached(
                "UPDATE partitions SET leader_epoch = ?3, owner_broker = ?4
                 WHERE topic_id = ?1 AND partition = ?2",
            )
            .db()?
            .execute(params![id, key.partition, new_epoch, broker_id])
            .db()?;
            tx.prepare_cached(
                "INSERT INTO epoch_history (topic_id, partition, epoch, start_offset)
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .db()?
            .execute(params![id, key.partition, new_epoch, high_watermark])
            .db()?;
            let state =
                load_partition_state(&tx, key, new_epoch, log_start_offset, high_watermark)?;
            tx.commit().db()?;
            tracing::debug!(
                ?key,
                broker_id,
                leader_epoch = new_epoch,
                "claimed partition"
            );
            Ok(state)
        })
        .await
    }

    async fn read_partition(&self, key: PartitionKey) -> MetaResult<PartitionState> {
        self.run(move |conn| {
            let tx = conn.transaction().db()?;
            let (epoch, log_start_offset, high_watermark): (i32, i64, i64) = tx
                .prepare_cached(
                    "SELECT leader_epoch, log_start_offset, high_watermark FROM partitions
                     WHERE topic_id = ?1 AND partition = ?2",
                )
                .db()?
                .query_row(params![key.topic_id.as_bytes(), key.partition], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .optional()
                .db()?
                .ok_or(MetaError::PartitionNotFound)?;
            load_partition_state(&tx, key, epoch, log_start_offset, high_watermark)
        })
        .await
    }

    async fn release_partition(&self, key: PartitionKey, leader_epoch: i32) -> MetaResult<()> {
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            require_epoch(&tx, key, leader_epoch)?;
            tx.prepare_cached(
                "UPDATE partitions SET owner_broker = NULL WHERE topic_id = ?1 AND partition = ?2",
            )
            .db()?
            .execute(params![key.topic_id.as_bytes(), key.partition])
            .db()?;
            tx.commit().db()
        })
        .await
    }

    async fn partition_owners(&self) -> MetaResult<Vec<PartitionOwner>> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT topic_id, partition, leader_epoch, owner_broker FROM partitions
                     ORDER BY topic_id, partition",
                )
                .db()?;
            let rows = stmt
                .query_map([], |row| {
                    Ok((
                        row.get::<_, Vec<u8>>(0)?,
                        row.get::<_, i32>(1)?,
                        row.get::<_, i32>(2)?,
                        row.get::<_, Option<i32>>(3)?,
                    ))
                })
                .db()?;
            let mut owners = Vec::new();
            for row in rows {
                let (id, partition, leader_epoch, owner) = row.db()?;
                owners.push(PartitionOwner {
                    key: PartitionKey {
                        topic_id: decode_uuid(&id)?,
                        partition,
                    },
                    leader_epoch,
                    owner,
                });
            }
            Ok(owners)
        })
        .await
    }

    /// A partition that no longer exists (its topic was deleted) is reported as fenced
    /// with the stale ones: its owner has lost it for good, and the rest of the commit
    /// can be retried without it.
    async fn commit_wal(&self, commit: &WalCommit) -> MetaResult<()> {
        let commit = commit.clone();
        self.run(move |conn| fenced_tx(conn, semantics::Op::CommitWal(&commit)).map(|_| ()))
            .await
    }

    async fn commit_segment(
        &self,
        key: PartitionKey,
        leader_epoch: i32,
        segment: &SegmentRecord,
    ) -> MetaResult<()> {
        let segment = segment.clone();
        self.run(move |conn| {
            let op = semantics::Op::CommitSegment {
                key,
                leader_epoch,
                segment: &segment,
            };
            fenced_tx(conn, op).map(|_| ())
        })
        .await
    }

    async fn trim_log(
        &self,
        key: PartitionKey,
        leader_epoch: i32,
        log_start_offset: i64,
        drop_segment_base_offsets: &[i64],
    ) -> MetaResult<()> {
        let drop = drop_segment_base_offsets.to_vec();
        self.run(move |conn| {
            let op = semantics::Op::TrimLog {
                key,
                leader_epoch,
                log_start_offset,
                drop_segment_base_offsets: &drop,
            };
            fenced_tx(conn, op).map(|_| ())
        })
        .await
    }

    async fn unreferenced_wal_objects(&self) -> MetaResult<Vec<String>> {
        self.run(|conn| {
            let tx = conn.transaction().db()?;
            let keys = tx
                .prepare_cached(
                    "SELECT object_key FROM wal_objects AS o
                     WHERE NOT EXISTS (SELECT 1 FROM wal_ranges AS r
                                       WHERE r.object_key = o.object_key)
                     ORDER BY created_ms, object_key",
                )
                .db()?
                .query_map([], |row| row.get(0))
                .db()?
                .collect::<rusqlite::Result<Vec<String>>>()
                .db()?;
            Ok(keys)
        })
        .await
    }

    async fn known_objects(&self) -> MetaResult<Vec<String>> {
        self.run(|conn| {
            let tx = conn.transaction().db()?;
            let keys = tx
                .prepare_cached(
                    "SELECT object_key FROM segments
                     UNION SELECT object_key FROM wal_objects",
                )
                .db()?
                .query_map([], |row| row.get(0))
                .db()?
                .collect::<rusqlite::Result<Vec<String>>>()
                .db()?;
            Ok(keys)
        })
        .await
    }

    async fn heartbeat_broker(&self, broker: &BrokerRecord) -> MetaResult<()> {
        let b = broker.clone();
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let changed = tx
                .prepare_cached(
                    "INSERT INTO brokers (broker_id, session, host, port, zone, lease_expires_ms,
                                          draining)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (broker_id) DO UPDATE SET
                         session = excluded.session, host = excluded.host,
                         port = excluded.port, zone = excluded.zone,
                         lease_expires_ms = excluded.lease_expires_ms,
                         draining = excluded.draining
                     WHERE brokers.session <= excluded.session",
                )
                .db()?
                .execute(params![
                    b.broker_id,
                    b.session,
                    b.host,
                    b.port,
                    b.zone,
                    b.lease_expires_ms,
                    b.draining
                ])
                .db()?;
            if changed == 0 {
                return Err(MetaError::Superseded);
            }
            tx.commit().db()
        })
        .await
    }

    async fn live_brokers(&self, now_ms: i64) -> MetaResult<Vec<BrokerRecord>> {
        self.run(move |conn| {
            let tx = conn.transaction().db()?;
            let brokers = tx
                .prepare_cached(
                    "SELECT broker_id, session, host, port, zone, lease_expires_ms, draining
                     FROM brokers WHERE lease_expires_ms > ?1 ORDER BY broker_id",
                )
                .db()?
                .query_map(params![now_ms], |row| {
                    Ok(BrokerRecord {
                        broker_id: row.get(0)?,
                        session: row.get(1)?,
                        host: row.get(2)?,
                        port: row.get(3)?,
                        zone: row.get(4)?,
                        lease_expires_ms: row.get(5)?,
                        draining: row.get(6)?,
                    })
                })
                .db()?
                .collect::<rusqlite::Result<Vec<_>>>()
                .db()?;
            Ok(brokers)
        })
        .await
    }

    async fn deregister_broker(&self, broker_id: i32, session: i64) -> MetaResult<()> {
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            tx.prepare_cached("DELETE FROM brokers WHERE broker_id = ?1 AND session = ?2")
                .db()?
                .execute(params![broker_id, session])
                .db()?;
            tx.commit().db()
        })
        .await
    }

    async fn forget_wal_objects(&self, keys: &[String]) -> MetaResult<()> {
        let keys = keys.to_vec();
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let mut delete = tx
                .prepare_cached("DELETE FROM wal_objects WHERE object_key = ?1")
                .db()?;
            for key in &keys {
                delete.execute(params![key]).db()?;
            }
            drop(delete);
            tx.commit().db()
        })
        .await
    }

    async fn next_producer_id(&self) -> MetaResult<i64> {
        self.run(|conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let id = tx
                .prepare_cached(
                    "INSERT INTO counters (name, value) VALUES (?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET value = value + 1
                     RETURNING value",
                )
                .db()?
                .query_row(params![PRODUCER_ID_COUNTER, FIRST_PRODUCER_ID], |row| {
                    row.get(0)
                })
                .db()?;
            tx.commit().db()?;
            Ok(id)
        })
        .await
    }

    async fn commit_offsets(
        &self,
        group: &str,
        offsets: &[CommittedOffset],
        fence: Option<Fence>,
    ) -> MetaResult<()> {
        let group = group.to_owned();
        let offsets = offsets.to_vec();
        self.run(move |conn| {
            let op = semantics::Op::CommitOffsets {
                group: &group,
                offsets: &offsets,
                fence,
            };
            fenced_tx(conn, op).map(|_| ())
        })
        .await
    }

    async fn fetch_offsets(&self, group: &str) -> MetaResult<Vec<CommittedOffset>> {
        let group = group.to_owned();
        self.run(move |conn| {
            let tx = conn.transaction().db()?;
            let offsets = tx
                .prepare_cached(
                    "SELECT topic, partition, offset, leader_epoch, metadata, commit_timestamp_ms
                     FROM group_offsets WHERE group_id = ?1 ORDER BY topic, partition",
                )
                .db()?
                .query_map(params![group], |row| {
                    Ok(CommittedOffset {
                        topic: row.get(0)?,
                        partition: row.get(1)?,
                        offset: row.get(2)?,
                        leader_epoch: row.get(3)?,
                        metadata: row.get(4)?,
                        commit_timestamp_ms: row.get(5)?,
                    })
                })
                .db()?
                .collect::<rusqlite::Result<Vec<_>>>()
                .db()?;
            Ok(offsets)
        })
        .await
    }

    async fn delete_offsets(
        &self,
        group: &str,
        partitions: Option<&[(String, i32)]>,
        fence: Option<Fence>,
    ) -> MetaResult<usize> {
        let group = group.to_owned();
        let partitions = partitions.map(<[(String, i32)]>::to_vec);
        self.run(move |conn| {
            let op = semantics::Op::DeleteOffsets {
                group: &group,
                partitions: partitions.as_deref(),
                fence,
            };
            fenced_tx(conn, op)
        })
        .await
    }

    async fn offset_groups(&self) -> MetaResult<Vec<String>> {
        self.run(|conn| {
            let tx = conn.transaction().db()?;
            let groups = tx
                .prepare_cached("SELECT DISTINCT group_id FROM group_offsets ORDER BY group_id")
                .db()?
                .query_map([], |row| row.get(0))
                .db()?
                .collect::<rusqlite::Result<Vec<String>>>()
                .db()?;
            Ok(groups)
        })
        .await
    }

    async fn expire_offsets(
        &self,
        groups: &[String],
        before_ms: i64,
        fence: Option<Fence>,
    ) -> MetaResult<usize> {
        let groups = groups.to_vec();
        self.run(move |conn| {
            let op = semantics::Op::ExpireOffsets {
                groups: &groups,
                before_ms,
                fence,
            };
            fenced_tx(conn, op)
        })
        .await
    }

    async fn start_broker_session(&self, broker_id: i32) -> MetaResult<i64> {
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let session = tx
                .prepare_cached(
                    "INSERT INTO broker_sessions (broker_id, session) VALUES (?1, 1)
                     ON CONFLICT (broker_id) DO UPDATE SET session = session + 1
                     RETURNING session",
                )
                .db()?
                .query_row(params![broker_id], |row| row.get(0))
                .db()?;
            tx.commit().db()?;
            Ok(session)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::conformance::{self, metadata_store_conformance};
    use crate::metadata::{PartitionCommit, ProducerBatch};

    metadata_store_conformance!(SqliteStore::open_in_memory().expect("open in-memory store"));

    fn temp_db() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("nested").join("dir").join("metadata.db");
        (dir, path)
    }

    fn raw(path: &Path) -> Connection {
        Connection::open(path).expect("open the file directly")
    }

    fn schema_versions(conn: &Connection) -> Vec<i64> {
        conn.prepare("SELECT version FROM schema_version ORDER BY version")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<rusqlite::Result<_>>()
            .expect("versions")
    }

    /// Writes a file as a version-1 broker left it: WAL mode, the version-1 schema
    /// (`SCHEMA_V1` is frozen, so it is the shipped text) and one topic with its
    /// partition rows.
    fn write_version_1_file(path: &Path, topic: &TopicRecord) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("create dir");
        let mut conn = raw(path);
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .expect("wal");
        assert_eq!(mode, "wal");
        let tx = conn.transaction().expect("begin");
        tx.execute_batch("CREATE TABLE schema_version (version INTEGER NOT NULL PRIMARY KEY)")
            .expect("version table");
        tx.execute_batch(SCHEMA_V1).expect("version 1 schema");
        tx.execute("INSERT INTO schema_version (version) VALUES (1)", [])
            .expect("version row");
        tx.execute(
            "INSERT INTO topics (name, id, partitions, configs, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                topic.name,
                topic.id.as_bytes(),
                topic.partitions,
                encode_json(&topic.configs, "configs").expect("json"),
                topic.created_ms
            ],
        )
        .expect("topic row");
        for partition in 0..topic.partitions {
            tx.execute(
                "INSERT INTO partitions (topic_id, partition, leader_epoch,
                     log_start_offset, high_watermark, owner_broker)
                 VALUES (?1, ?2, 0, 0, 0, NULL)",
                params![topic.id.as_bytes(), partition],
            )
            .expect("partition row");
        }
        tx.commit().expect("commit");
    }

    #[tokio::test]
    async fn conformance_suite_on_one_file_store() {
        let (_dir, path) = temp_db();
        let store = SqliteStore::open(&path).expect("open store");
        conformance::run_all(&store).await;
    }

    #[tokio::test]
    async fn open_creates_the_file_in_wal_mode_at_the_current_schema_version() {
        let (_dir, path) = temp_db();
        let store = SqliteStore::open(&path).expect("open store");
        assert!(
            path.exists(),
            "database file and parent directories created"
        );
        let conn = raw(&path);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("journal mode");
        assert_eq!(mode, "wal");
        assert_eq!(schema_versions(&conn), vec![1, 2, 3, 4]);
        assert_eq!(SCHEMA_VERSION, 4);
        drop(store);
        // Opening again finds the schema in place and changes nothing.
        SqliteStore::open(&path).expect("reopen store");
        assert_eq!(schema_versions(&conn), vec![1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn migrates_a_version_1_file_to_the_current_version() {
        let (_dir, path) = temp_db();
        let topic = TopicRecord {
            name: "orders".to_owned(),
            id: crate::clock::unique_id(),
            partitions: 2,
            configs: BTreeMap::from([("retention.ms".to_owned(), "1000".to_owned())]),
            created_ms: 42,
        };
        write_version_1_file(&path, &topic);
        assert_eq!(schema_versions(&raw(&path)), vec![1]);

        let offsets = vec![
            CommittedOffset {
                topic: "orders".to_owned(),
                partition: 0,
                offset: 17,
                leader_epoch: 1,
                metadata: "m".to_owned(),
                commit_timestamp_ms: 1_700_000_000_000,
            },
            CommittedOffset {
                topic: "orders".to_owned(),
                partition: 1,
                offset: 3,
                leader_epoch: -1,
                metadata: String::new(),
                commit_timestamp_ms: 1_700_000_000_001,
            },
        ];
        {
            let store = SqliteStore::open(&path).expect("open the version 1 file");
            assert_eq!(schema_versions(&raw(&path)), vec![1, 2, 3, 4]);
            assert_eq!(
                store.list_topics().await.expect("list"),
                vec![topic.clone()],
                "version 1 data is kept"
            );
            let key = PartitionKey {
                topic_id: topic.id,
                partition: 1,
            };
            assert_eq!(
                store
                    .claim_partition(key, 1)
                    .await
                    .expect("claim")
                    .leader_epoch,
                1
            );
            store
                .commit_offsets("group", &offsets, None)
                .await
                .expect("commit offsets after the migration");
            assert_eq!(store.fetch_offsets("group").await.expect("fetch"), offsets);
        }

        let store = SqliteStore::open(&path).expect("reopen the migrated file");
        assert_eq!(
            schema_versions(&raw(&path)),
            vec![1, 2, 3, 4],
            "migrated once"
        );
        assert_eq!(
            store.fetch_offsets("group").await.expect("fetch"),
            offsets,
            "offsets survive reopening"
        );
        assert_eq!(
            store.offset_groups().await.expect("groups"),
            vec!["group".to_owned()]
        );
    }

    #[tokio::test]
    async fn a_failed_migration_leaves_the_file_at_its_version() {
        let (_dir, path) = temp_db();
        let topic = TopicRecord {
            name: "t".to_owned(),
            id: crate::clock::unique_id(),
            partitions: 1,
            configs: BTreeMap::new(),
            created_ms: 0,
        };
        write_version_1_file(&path, &topic);
        // Something the version 2 step cannot create over.
        raw(&path)
            .execute_batch("CREATE TABLE group_offsets (x INTEGER)")
            .expect("squat the table name");
        let result = SqliteStore::open(&path);
        assert!(
            matches!(result, Err(MetaError::Unavailable(_))),
            "{result:?}"
        );
        assert_eq!(
            schema_versions(&raw(&path)),
            vec![1],
            "the failed step rolled back as a whole"
        );
    }

    #[tokio::test]
    async fn counters_start_at_documented_values() {
        let store = SqliteStore::open_in_memory().expect("open store");
        assert_eq!(store.next_producer_id().await.expect("id"), 1000);
        assert_eq!(store.next_producer_id().await.expect("id"), 1001);
        assert_eq!(store.start_broker_session(3).await.expect("session"), 1);
        assert_eq!(store.start_broker_session(3).await.expect("session"), 2);
        assert_eq!(store.start_broker_session(4).await.expect("session"), 1);
    }

    #[tokio::test]
    async fn state_survives_reopening_the_file() {
        let (_dir, path) = temp_db();
        let topic = TopicRecord {
            name: "orders".to_owned(),
            id: crate::clock::unique_id(),
            partitions: 2,
            configs: BTreeMap::from([("retention.ms".to_owned(), "1000".to_owned())]),
            created_ms: 42,
        };
        let key = PartitionKey {
            topic_id: topic.id,
            partition: 1,
        };
        let producer = ProducerStateRecord {
            producer_id: 1000,
            epoch: 0,
            batches: vec![ProducerBatch {
                first_seq: 0,
                last_seq: 9,
                base_offset: 10,
                last_offset: 19,
                timestamp: 7,
            }],
            last_update_ms: 8,
        };
        let range = |base: i64, end: i64, object: &str| WalRangeRecord {
            base_offset: base,
            end_offset: end,
            object_key: object.to_owned(),
            position: 0,
            len: 64,
            max_timestamp: 7,
            object_size: 1 << 20,
        };
        let segment = SegmentRecord {
            base_offset: 0,
            end_offset: 10,
            object_key: "seg-0".to_owned(),
            size_bytes: 1 << 40,
            data_bytes: 1 << 39,
            max_timestamp: 5,
            created_ms: 9,
        };

        {
            let store = SqliteStore::open(&path).expect("open store");
            store.create_topic(&topic).await.expect("create");
            assert_eq!(store.next_producer_id().await.expect("id"), 1000);
            assert_eq!(store.start_broker_session(1).await.expect("session"), 1);
            let epoch = store
                .claim_partition(key, 1)
                .await
                .expect("claim")
                .leader_epoch;
            for (object, base, end) in [("wal-a", 0, 10), ("wal-b", 10, 20)] {
                let commit = WalCommit {
                    object_key: object.to_owned(),
                    created_ms: 3,
                    partitions: vec![PartitionCommit {
                        key,
                        leader_epoch: epoch,
                        range: range(base, end, object),
                        producers: vec![producer.clone()],
                    }],
                };
                store.commit_wal(&commit).await.expect("commit");
            }
            store
                .commit_segment(key, epoch, &segment)
                .await
                .expect("segment");
            store.trim_log(key, epoch, 3, &[]).await.expect("trim");
            // Dropped without any shutdown step, like a killed process.
        }

        let store = SqliteStore::open(&path).expect("reopen store");
        assert_eq!(store.list_topics().await.expect("list"), vec![topic]);
        let state = store.claim_partition(key, 2).await.expect("claim again");
        assert_eq!(
            state,
            PartitionState {
                leader_epoch: 2,
                log_start_offset: 3,
                high_watermark: 20,
                segments: vec![segment],
                wal_ranges: vec![range(10, 20, "wal-b")],
                producers: vec![producer],
                epoch_history: vec![(1, 0), (2, 20)],
            }
        );
        assert_eq!(
            store.unreferenced_wal_objects().await.expect("garbage"),
            vec!["wal-a".to_owned()]
        );
        assert_eq!(store.next_producer_id().await.expect("id"), 1001);
        assert_eq!(store.start_broker_session(1).await.expect("session"), 2);
    }

    /// Set for the child process of `commits_survive_a_crash`: the database to use.
    const CRASH_DB_ENV: &str = "STRATA_SQLITE_CRASH_TEST_DB";

    /// The child half of `commits_survive_a_crash`: commits, then dies without any
    /// cleanup (no connection close, no checkpoint), like `kill -9`.
    #[tokio::test]
    #[ignore = "run as a child process by commits_survive_a_crash"]
    async fn crash_child() {
        let Some(path) = std::env::var_os(CRASH_DB_ENV) else {
            return;
        };
        let store = SqliteStore::open(Path::new(&path)).expect("open store");
        let topic = TopicRecord {
            name: "crash".to_owned(),
            id: crate::clock::unique_id(),
            partitions: 1,
            configs: BTreeMap::new(),
            created_ms: 0,
        };
        store.create_topic(&topic).await.expect("create");
        let key = PartitionKey {
            topic_id: topic.id,
            partition: 0,
        };
        let epoch = store
            .claim_partition(key, 1)
            .await
            .expect("claim")
            .leader_epoch;
        let commit = WalCommit {
            object_key: "wal-crash".to_owned(),
            created_ms: 1,
            partitions: vec![PartitionCommit {
                key,
                leader_epoch: epoch,
                range: WalRangeRecord {
                    base_offset: 0,
                    end_offset: 7,
                    object_key: "wal-crash".to_owned(),
                    position: 0,
                    len: 10,
                    max_timestamp: 1,
                    object_size: 1 << 20,
                },
                producers: vec![],
            }],
        };
        store.commit_wal(&commit).await.expect("commit");
        std::process::abort();
    }

    #[test]
    fn commits_survive_a_crash() {
        let (_dir, path) = temp_db();
        // Test names omit the crate name that `module_path!` starts with.
        let module = module_path!()
            .split_once("::")
            .map_or(module_path!(), |(_, rest)| rest);
        let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", &format!("{module}::crash_child")])
            .args(["--include-ignored", "--test-threads=1", "--quiet"])
            .env(CRASH_DB_ENV, &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run the crashing child");
        assert!(
            !status.success(),
            "the child must die by abort, got {status}"
        );
        assert!(
            path.with_extension("db-wal").exists(),
            "the commit is still in the write-ahead log, not checkpointed"
        );

        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let store = SqliteStore::open(&path).expect("reopen after the crash");
            let topics = store.list_topics().await.expect("list");
            assert_eq!(topics.len(), 1, "the child created its topic");
            let key = PartitionKey {
                topic_id: topics[0].id,
                partition: 0,
            };
            let state = store.claim_partition(key, 2).await.expect("claim");
            assert_eq!(state.high_watermark, 7, "the acknowledged commit survived");
            assert_eq!(state.epoch_history, vec![(1, 0), (2, 7)]);
        });
    }

    #[tokio::test]
    async fn refuses_a_newer_schema() {
        let (_dir, path) = temp_db();
        drop(SqliteStore::open(&path).expect("open store"));
        raw(&path)
            .execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                params![SCHEMA_VERSION + 1],
            )
            .expect("pretend a newer broker migrated the file");
        match SqliteStore::open(&path) {
            Err(MetaError::Unavailable(msg)) => assert!(msg.contains("upgrade"), "{msg}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn undecodable_rows_are_corrupt() {
        let (_dir, path) = temp_db();
        let store = SqliteStore::open(&path).expect("open store");
        let topic = TopicRecord {
            name: "t".to_owned(),
            id: crate::clock::unique_id(),
            partitions: 1,
            configs: BTreeMap::new(),
            created_ms: 0,
        };
        store.create_topic(&topic).await.expect("create");
        let key = PartitionKey {
            topic_id: topic.id,
            partition: 0,
        };
        let conn = raw(&path);
        conn.execute(
            "INSERT INTO producers (topic_id, partition, producer_id, state)
             VALUES (?1, 0, 5, 'not json')",
            params![topic.id.as_bytes()],
        )
        .expect("write a broken producer row");
        let result = store.claim_partition(key, 1).await;
        assert!(matches!(result, Err(MetaError::Corrupt(_))), "{result:?}");

        conn.execute("UPDATE topics SET configs = '[1]'", [])
            .expect("write broken configs");
        let result = store.list_topics().await;
        assert!(matches!(result, Err(MetaError::Corrupt(_))), "{result:?}");
    }

    /// Pins the persisted JSON of producer states: changing it needs a migration.
    #[test]
    fn producer_state_json_is_stable() {
        let golden = r#"{"producer_id":1000,"epoch":2,"batches":[{"first_seq":0,"last_seq":4,"base_offset":10,"last_offset":14,"timestamp":1700000000000}],"last_update_ms":1700000000001}"#;
        let state = ProducerStateRecord {
            producer_id: 1000,
            epoch: 2,
            batches: vec![ProducerBatch {
                first_seq: 0,
                last_seq: 4,
                base_offset: 10,
                last_offset: 14,
                timestamp: 1_700_000_000_000,
            }],
            last_update_ms: 1_700_000_000_001,
        };
        assert_eq!(
            encode_json(&state, "producer state").expect("encode"),
            golden
        );
        let decoded: ProducerStateRecord = serde_json::from_str(golden).expect("decode");
        assert_eq!(decoded, state);
    }
}
