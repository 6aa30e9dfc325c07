//! The SQLite backend of [`MetadataStore`]: the zero-config, embedded metadata store.
//!
//! It owns one SQLite database file and the schema inside it. The file runs in WAL
//! journal mode with `synchronous=FULL`, so a call that returned `Ok` has been fsynced
//! and survives `kill -9` or a power cut; next to a `file://` object store that does not
//! fsync its objects either (`object-store.fsync=false`: a power cut may lose them
//! anyway) it runs with `synchronous=NORMAL`, which survives `kill -9` but not a power
//! cut, and spares each write-ahead commit its fsync. Every trait method is exactly one SQLite
//! transaction, which is what makes the epoch checks and the multi-partition
//! write-ahead commit atomic.
//!
//! What an operation decides is [`semantics`]'s: this backend reads rows inside the
//! transaction, each table's by the one decoder [`rows`] has for it (shared with
//! PostgreSQL), and stores what the semantics answer.
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
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, Transaction, TransactionBehavior};
use uuid::Uuid;

use super::PartitionOwner;
use super::{rows, semantics};
use super::{
    BrokerRecord, CommittedOffset, Fence, MetaError, MetaResult, MetadataStore, PartitionKey,
    PartitionState, SegmentRecord, TopicRecord, TxnOffsetRecord, TxnRecord, WalCommit,
};

/// How long a statement waits for a lock held by another connection to the same file
/// before the operation fails as unavailable (and may be retried).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Prepared statements kept per connection: more than the distinct statements we run,
/// so the hot ones (`commit_wal`'s, `commit_offsets`') are parsed once per connection,
/// not per call.
const STATEMENT_CACHE_CAPACITY: usize = 64;
/// The schema version this code reads and writes.
const SCHEMA_VERSION: i64 = 6;
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

/// Schema version 5: a segment records when compaction wrote it (0: never).
const SCHEMA_V5: &str = "
ALTER TABLE segments ADD COLUMN compacted_ms INTEGER NOT NULL DEFAULT 0;
";

/// Schema version 6: transactions. Persisted names, keep them stable like
/// [`SCHEMA_V1`]'s.
///
/// `aborted_txns`: one row per aborted transaction of a partition, keyed by its abort
/// marker's offset, with the producer and the transaction's first offset.
/// `transactions`: one row per transactional id, its whole state as JSON (the serde form
/// of [`super::TxnRecord`]). `txn_offsets`: offsets a group committed inside a
/// producer's transaction, one row per (group, topic, partition, producer), the columns
/// of `group_offsets` otherwise; they move there when the transaction commits.
const SCHEMA_V6: &str = "
CREATE TABLE aborted_txns (
    topic_id     BLOB    NOT NULL,
    partition    INTEGER NOT NULL,
    last_offset  INTEGER NOT NULL,
    producer_id  INTEGER NOT NULL,
    first_offset INTEGER NOT NULL,
    PRIMARY KEY (topic_id, partition, last_offset)
) WITHOUT ROWID;
CREATE TABLE transactions (
    transactional_id TEXT NOT NULL PRIMARY KEY,
    state            TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE txn_offsets (
    group_id            TEXT    NOT NULL,
    topic               TEXT    NOT NULL,
    partition           INTEGER NOT NULL,
    producer_id         INTEGER NOT NULL,
    offset              INTEGER NOT NULL,
    leader_epoch        INTEGER NOT NULL,
    metadata            TEXT    NOT NULL,
    commit_timestamp_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, topic, partition, producer_id)
) WITHOUT ROWID;
";

/// The embedded metadata store: one SQLite file (or an in-memory database for tests).
///
/// Cloning is cheap and shares the connection.
#[derive(Clone)]
pub(crate) struct SqliteStore {
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
    #[cfg(test)]
    pub(crate) fn open(path: &Path) -> MetaResult<SqliteStore> {
        SqliteStore::open_with(path, true)
    }

    /// [`SqliteStore::open`], choosing whether every commit is fsynced (`synced`:
    /// `synchronous=FULL`) or only survives a process crash (`NORMAL`).
    pub(crate) fn open_with(path: &Path, synced: bool) -> MetaResult<SqliteStore> {
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
        let store = SqliteStore::setup(conn, Some(path.to_path_buf()), synced)?;
        tracing::info!(path = %path.display(), synced, "opened sqlite metadata store");
        Ok(store)
    }

    #[cfg(test)]
    /// A private in-memory database: nothing survives the store being dropped. For tests.
    pub(crate) fn open_in_memory() -> MetaResult<SqliteStore> {
        let conn = Connection::open_in_memory().db()?;
        SqliteStore::setup(conn, None, true)
    }

    fn setup(mut conn: Connection, path: Option<PathBuf>, synced: bool) -> MetaResult<SqliteStore> {
        // FULL: every commit fsyncs the WAL, so an acknowledged commit is durable.
        let level = if synced { "FULL" } else { "NORMAL" };
        conn.pragma_update(None, "synchronous", level).db()?;
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
    let current = query_opt(
        &tx,
        "SELECT COALESCE(MAX(version), 0) FROM schema_version",
        [],
        rows::number,
    )?
    .ok_or_else(|| MetaError::Unavailable("sqlite answered no schema version".to_owned()))?;
    if current > SCHEMA_VERSION {
        return Err(MetaError::Unavailable(format!(
            "metadata schema version {current} is newer than this broker supports \
             ({SCHEMA_VERSION}); upgrade the broker"
        )));
    }
    // Each version's step, in order, in this same transaction; a later version is one
    // more entry.
    let steps: [(i64, &str); 6] = [
        (1, SCHEMA_V1),
        (2, SCHEMA_V2),
        (3, SCHEMA_V3),
        (4, SCHEMA_V4),
        (5, SCHEMA_V5),
        (6, SCHEMA_V6),
    ];
    for (version, sql) in steps.into_iter().filter(|(v, _)| *v > current) {
        tx.execute_batch(sql).db()?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            params![version],
        )
        .db()?;
        if current >= 1 {
            tracing::info!(
                from = current,
                to = version,
                "migrated sqlite metadata schema"
            );
        }
    }
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

/// Runs a query and decodes every row with its table's decoder (see [`rows`]).
fn query_all<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    decode: fn(&dyn rows::StoredRow) -> MetaResult<T>,
) -> MetaResult<Vec<T>> {
    let mut statement = conn.prepare_cached(sql).db()?;
    let mut rows = statement.query(params).db()?;
    let mut decoded = Vec::new();
    while let Some(row) = rows.next().db()? {
        decoded.push(decode(row)?);
    }
    Ok(decoded)
}

/// Runs a query for at most one row and decodes it with its table's decoder.
fn query_opt<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    decode: fn(&dyn rows::StoredRow) -> MetaResult<T>,
) -> MetaResult<Option<T>> {
    let mut statement = conn.prepare_cached(sql).db()?;
    let mut rows = statement.query(params).db()?;
    let decoded = match rows.next().db()? {
        Some(row) => Some(decode(row)?),
        None => None,
    };
    Ok(decoded)
}

/// How the shared decoders ([`rows`]) read an SQLite column.
impl rows::StoredRow for rusqlite::Row<'_> {
    fn int(&self, idx: usize) -> MetaResult<i32> {
        self.get(idx).db()
    }
    fn opt_int(&self, idx: usize) -> MetaResult<Option<i32>> {
        self.get(idx).db()
    }
    fn bigint(&self, idx: usize) -> MetaResult<i64> {
        self.get(idx).db()
    }
    fn text(&self, idx: usize) -> MetaResult<String> {
        self.get(idx).db()
    }
    fn opt_text(&self, idx: usize) -> MetaResult<Option<String>> {
        self.get(idx).db()
    }
    fn flag(&self, idx: usize) -> MetaResult<bool> {
        self.get(idx).db()
    }
    /// A 16-byte big-endian blob.
    fn uuid(&self, idx: usize) -> MetaResult<Uuid> {
        let bytes: Vec<u8> = self.get(idx).db()?;
        Uuid::from_slice(&bytes)
            .map_err(|e| MetaError::Corrupt(format!("stored topic id is not a 16-byte uuid: {e}")))
    }
}

const SELECT_TOPIC: &str = concat!(
    "SELECT ",
    rows::topic_columns!(),
    " FROM topics WHERE name = ?1"
);
const SELECT_PARTITION: &str = concat!(
    "SELECT ",
    rows::partition_columns!(),
    " FROM partitions WHERE topic_id = ?1 AND partition = ?2"
);
const SELECT_BROKER: &str = concat!(
    "SELECT ",
    rows::broker_columns!(),
    " FROM brokers WHERE broker_id = ?1"
);

fn find_topic(tx: &Transaction<'_>, name: &str) -> MetaResult<Option<TopicRecord>> {
    query_opt(tx, SELECT_TOPIC, params![name], rows::topic)
}

/// The stored row of a partition, `None` if it does not exist.
fn stored_partition(
    tx: &Transaction<'_>,
    key: PartitionKey,
) -> MetaResult<Option<semantics::PartitionRow>> {
    let found = query_opt(
        tx,
        SELECT_PARTITION,
        params![key.topic_id.as_bytes(), key.partition],
        rows::partition,
    )?;
    Ok(found.map(|(_, stored)| stored))
}

/// The stored registration of a broker id, `None` if it has none.
fn stored_broker(tx: &Transaction<'_>, broker_id: i32) -> MetaResult<Option<BrokerRecord>> {
    query_opt(tx, SELECT_BROKER, params![broker_id], rows::broker)
}

/// Inserts a topic's new partition rows (`semantics::PartitionRow::NEW`).
fn insert_partitions(
    tx: &Transaction<'_>,
    topic_id: Uuid,
    partitions: Range<i32>,
) -> MetaResult<()> {
    let new = semantics::PartitionRow::NEW;
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO partitions
                 (topic_id, partition, leader_epoch, log_start_offset, high_watermark, owner_broker)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .db()?;
    for partition in partitions {
        insert
            .execute(params![
                topic_id.as_bytes(),
                partition,
                new.leader_epoch,
                new.log_start_offset,
                new.high_watermark,
                new.owner
            ])
            .db()?;
    }
    Ok(())
}

/// Stores what a claim or a release decided: the partition's epoch and owner.
fn store_owner(
    tx: &Transaction<'_>,
    key: PartitionKey,
    row: &semantics::PartitionRow,
) -> MetaResult<()> {
    tx.prepare_cached(
        "UPDATE partitions SET leader_epoch = ?3, owner_broker = ?4
         WHERE topic_id = ?1 AND partition = ?2",
    )
    .db()?
    .execute(params![
        key.topic_id.as_bytes(),
        key.partition,
        row.leader_epoch,
        row.owner
    ])
    .db()?;
    Ok(())
}

/// The last value of a counter row (`None`: never counted), advanced by `next` (a rule
/// of [`semantics`]) and stored; returns the new value.
fn advance_counter(
    tx: &Transaction<'_>,
    select: &str,
    upsert: &str,
    key: &dyn rusqlite::ToSql,
    next: fn(Option<i64>) -> MetaResult<i64>,
) -> MetaResult<i64> {
    let value = next(query_opt(tx, select, params![key], rows::number)?)?;
    tx.prepare_cached(upsert)
        .db()?
        .execute(params![key, value])
        .db()?;
    Ok(value)
}

/// A fenced write (`semantics`): reads the rows of its fences inside `tx`, plans, and
/// applies the planned writes. Returns how many offsets it deleted.
fn apply_fenced(tx: &Transaction<'_>, op: semantics::Op<'_>) -> MetaResult<usize> {
    let mut fenced_rows = semantics::Rows::new();
    for key in op.fences() {
        if let Some(stored) = stored_partition(tx, key)? {
            fenced_rows.insert(key, stored);
        }
    }
    let mut deleted = 0;
    for write in semantics::plan(&fenced_rows, op)? {
        deleted += apply_write(tx, write)?;
    }
    Ok(deleted)
}

fn insert_segment(
    tx: &Transaction<'_>,
    key: PartitionKey,
    segment: &SegmentRecord,
) -> MetaResult<usize> {
    tx.prepare_cached(
        "INSERT INTO segments (topic_id, partition, base_offset, end_offset,
             object_key, size_bytes, data_bytes, max_timestamp, created_ms, compacted_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )
    .db()?
    .execute(params![
        key.topic_id.as_bytes(),
        key.partition,
        segment.base_offset,
        segment.end_offset,
        segment.object_key,
        u64_to_sql(segment.size_bytes, "segment size")?,
        u64_to_sql(segment.data_bytes, "segment data size")?,
        segment.max_timestamp,
        segment.created_ms,
        segment.compacted_ms
    ])
    .db()
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
                rows::encode_json(state, "producer state")?
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
        Write::InsertSegment { key, segment } => insert_segment(tx, key, segment)?,
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
        Write::ReplaceSegments { key, drop, insert } => {
            for base_offset in drop {
                run(
                    "DELETE FROM segments
                     WHERE topic_id = ?1 AND partition = ?2 AND base_offset = ?3",
                    params![key.topic_id.as_bytes(), key.partition, base_offset],
                )?;
            }
            for segment in insert {
                insert_segment(tx, key, segment)?;
            }
            0
        }
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
        Write::InsertAbortedTxn { key, aborted: a } => run(
            "INSERT INTO aborted_txns (topic_id, partition, last_offset, producer_id, first_offset)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (topic_id, partition, last_offset) DO NOTHING",
            params![
                key.topic_id.as_bytes(),
                key.partition,
                a.last_offset,
                a.producer_id,
                a.first_offset
            ],
        )?,
        Write::DropAbortedBelow { key, offset } => run(
            "DELETE FROM aborted_txns WHERE topic_id = ?1 AND partition = ?2 AND last_offset < ?3",
            params![key.topic_id.as_bytes(), key.partition, offset],
        )?,
        Write::UpsertTxn { record } => run(
            "INSERT INTO transactions (transactional_id, state) VALUES (?1, ?2)
             ON CONFLICT (transactional_id) DO UPDATE SET state = excluded.state",
            params![
                record.transactional_id,
                rows::encode_json(record, "transaction state")?
            ],
        )?,
        Write::DeleteTxn { transactional_id } => run(
            "DELETE FROM transactions WHERE transactional_id = ?1",
            params![transactional_id],
        )?,
        Write::UpsertTxnOffset { group, pending } => {
            let o = &pending.offset;
            run(
                "INSERT INTO txn_offsets (group_id, topic, partition, producer_id, offset,
                     leader_epoch, metadata, commit_timestamp_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (group_id, topic, partition, producer_id) DO UPDATE SET
                     offset = excluded.offset,
                     leader_epoch = excluded.leader_epoch,
                     metadata = excluded.metadata,
                     commit_timestamp_ms = excluded.commit_timestamp_ms",
                params![
                    group,
                    o.topic,
                    o.partition,
                    pending.producer_id,
                    o.offset,
                    o.leader_epoch,
                    o.metadata,
                    o.commit_timestamp_ms
                ],
            )?
        }
        Write::SettleTxnOffsets {
            group,
            producer_id,
            commit,
        } => {
            if commit {
                // `WHERE true`: SQLite's parser needs it before an upsert's ON CONFLICT.
                run(
                    "INSERT INTO group_offsets (group_id, topic, partition, offset,
                         leader_epoch, metadata, commit_timestamp_ms)
                     SELECT group_id, topic, partition, offset, leader_epoch, metadata,
                         commit_timestamp_ms
                     FROM txn_offsets WHERE group_id = ?1 AND producer_id = ?2 AND true
                     ON CONFLICT (group_id, topic, partition) DO UPDATE SET
                         offset = excluded.offset,
                         leader_epoch = excluded.leader_epoch,
                         metadata = excluded.metadata,
                         commit_timestamp_ms = excluded.commit_timestamp_ms",
                    params![group, producer_id],
                )?;
            }
            run(
                "DELETE FROM txn_offsets WHERE group_id = ?1 AND producer_id = ?2",
                params![group, producer_id],
            )?
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
    row: &semantics::PartitionRow,
) -> MetaResult<PartitionState> {
    let params = params![key.topic_id.as_bytes(), key.partition];
    let segments = query_all(
        tx,
        concat!(
            "SELECT ",
            rows::segment_columns!(),
            " FROM segments WHERE topic_id = ?1 AND partition = ?2 ORDER BY base_offset"
        ),
        params,
        rows::segment,
    )?;
    let wal_ranges = query_all(
        tx,
        concat!(
            "SELECT ",
            rows::wal_range_columns!(),
            " FROM wal_ranges WHERE topic_id = ?1 AND partition = ?2 ORDER BY base_offset"
        ),
        params,
        rows::wal_range,
    )?;
    let producers = query_all(
        tx,
        concat!(
            "SELECT ",
            rows::producer_columns!(),
            " FROM producers WHERE topic_id = ?1 AND partition = ?2 ORDER BY producer_id"
        ),
        params,
        rows::producer,
    )?;
    let epoch_history = query_all(
        tx,
        concat!(
            "SELECT ",
            rows::epoch_columns!(),
            " FROM epoch_history WHERE topic_id = ?1 AND partition = ?2 ORDER BY epoch"
        ),
        params,
        rows::epoch,
    )?;
    let aborted = query_all(
        tx,
        concat!(
            "SELECT ",
            rows::aborted_txn_columns!(),
            " FROM aborted_txns WHERE topic_id = ?1 AND partition = ?2 ORDER BY last_offset"
        ),
        params,
        rows::aborted_txn,
    )?;
    Ok(PartitionState {
        leader_epoch: row.leader_epoch,
        log_start_offset: row.log_start_offset,
        high_watermark: row.high_watermark,
        segments,
        wal_ranges,
        producers,
        epoch_history,
        aborted,
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
            let taken = find_topic(&tx, &topic.name)?.is_some();
            let partitions = semantics::create_topic(taken, &topic)?;
            let configs = rows::encode_json(&topic.configs, "topic configs")?;
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
            insert_partitions(&tx, topic.id, partitions)?;
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
            let topic = semantics::stored_topic(find_topic(&tx, &name)?)?;
            let id = topic.id.as_bytes();
            // What stays (write-ahead objects, committed offsets) is `stored_topic`'s rule.
            for table in [
                "partitions",
                "epoch_history",
                "segments",
                "wal_ranges",
                "producers",
                "aborted_txns",
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
            query_all(
                &tx,
                concat!(
                    "SELECT ",
                    rows::topic_columns!(),
                    " FROM topics ORDER BY name"
                ),
                [],
                rows::topic,
            )
        })
        .await
    }

    async fn set_topic_configs(
        &self,
        name: &str,
        configs: &BTreeMap<String, String>,
    ) -> MetaResult<()> {
        let name = name.to_owned();
        let configs = rows::encode_json(configs, "topic configs")?;
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            semantics::stored_topic(find_topic(&tx, &name)?)?;
            tx.prepare_cached("UPDATE topics SET configs = ?2 WHERE name = ?1")
                .db()?
                .execute(params![name, configs])
                .db()?;
            tx.commit().db()
        })
        .await
    }

    async fn set_partition_count(&self, name: &str, count: i32) -> MetaResult<()> {
        let name = name.to_owned();
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let topic = semantics::stored_topic(find_topic(&tx, &name)?)?;
            let Some(added) = semantics::new_partitions(&topic, count) else {
                return Ok(());
            };
            insert_partitions(&tx, topic.id, added)?;
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
            let claim = semantics::claim(key, stored_partition(&tx, key)?, broker_id)?;
            store_owner(&tx, key, &claim.row)?;
            let (epoch, start_offset) = claim.history;
            tx.prepare_cached(
                "INSERT INTO epoch_history (topic_id, partition, epoch, start_offset)
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .db()?
            .execute(params![
                key.topic_id.as_bytes(),
                key.partition,
                epoch,
                start_offset
            ])
            .db()?;
            let state = load_partition_state(&tx, key, &claim.row)?;
            tx.commit().db()?;
            tracing::debug!(?key, broker_id, leader_epoch = epoch, "claimed partition");
            Ok(state)
        })
        .await
    }

    async fn read_partition(&self, key: PartitionKey) -> MetaResult<PartitionState> {
        self.run(move |conn| {
            let tx = conn.transaction().db()?;
            let stored = stored_partition(&tx, key)?.ok_or(MetaError::PartitionNotFound)?;
            load_partition_state(&tx, key, &stored)
        })
        .await
    }

    async fn release_partition(&self, key: PartitionKey, leader_epoch: i32) -> MetaResult<()> {
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let released = semantics::release(key, stored_partition(&tx, key)?, leader_epoch)?;
            store_owner(&tx, key, &released)?;
            tx.commit().db()
        })
        .await
    }

    async fn partition_owners(&self) -> MetaResult<Vec<PartitionOwner>> {
        self.run(move |conn| {
            let tx = conn.transaction().db()?;
            let found = query_all(
                &tx,
                concat!(
                    "SELECT ",
                    rows::partition_columns!(),
                    " FROM partitions ORDER BY topic_id, partition"
                ),
                [],
                rows::partition,
            )?;
            Ok(found
                .into_iter()
                .map(|(key, stored)| stored.as_owner(key))
                .collect())
        })
        .await
    }

    /// A partition that no longer exists (its topic was deleted) is reported as fenced
    /// with the stale ones: its owner has lost it for good, and the rest of the commit
    /// can be retried without it.
    async fn commit_wal(&self, commits: &[WalCommit]) -> MetaResult<()> {
        let commits = commits.to_vec();
        self.run(move |conn| fenced_tx(conn, semantics::Op::CommitWal(&commits)).map(|_| ()))
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

    async fn replace_segments(
        &self,
        key: PartitionKey,
        leader_epoch: i32,
        replaced: &[i64],
        segments: &[SegmentRecord],
    ) -> MetaResult<()> {
        let (replaced, segments) = (replaced.to_vec(), segments.to_vec());
        self.run(move |conn| {
            let op = semantics::Op::ReplaceSegments {
                key,
                leader_epoch,
                replaced: &replaced,
                segments: &segments,
            };
            fenced_tx(conn, op).map(|_| ())
        })
        .await
    }

    async fn unreferenced_wal_objects(&self) -> MetaResult<Vec<String>> {
        self.run(|conn| {
            let tx = conn.transaction().db()?;
            let objects = query_all(
                &tx,
                concat!("SELECT ", rows::wal_object_columns!(), " FROM wal_objects"),
                [],
                rows::wal_object,
            )?;
            Ok(semantics::unreferenced_wal_objects(objects))
        })
        .await
    }

    async fn known_objects(&self) -> MetaResult<Vec<String>> {
        self.run(|conn| {
            let tx = conn.transaction().db()?;
            query_all(
                &tx,
                "SELECT object_key FROM segments UNION SELECT object_key FROM wal_objects",
                [],
                rows::name,
            )
        })
        .await
    }

    async fn heartbeat_broker(&self, broker: &BrokerRecord) -> MetaResult<()> {
        let b = broker.clone();
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let stored = stored_broker(&tx, b.broker_id)?;
            semantics::heartbeat(stored.map(|s| s.session), &b)?;
            tx.prepare_cached(
                "INSERT INTO brokers (broker_id, session, host, port, zone, lease_expires_ms,
                                      draining)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (broker_id) DO UPDATE SET
                     session = excluded.session, host = excluded.host,
                     port = excluded.port, zone = excluded.zone,
                     lease_expires_ms = excluded.lease_expires_ms,
                     draining = excluded.draining",
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
            tx.commit().db()
        })
        .await
    }

    async fn live_brokers(&self, now_ms: i64) -> MetaResult<Vec<BrokerRecord>> {
        self.run(move |conn| {
            let tx = conn.transaction().db()?;
            let brokers = query_all(
                &tx,
                concat!(
                    "SELECT ",
                    rows::broker_columns!(),
                    " FROM brokers ORDER BY broker_id"
                ),
                [],
                rows::broker,
            )?;
            Ok(brokers
                .into_iter()
                .filter(|b| semantics::is_live(b, now_ms))
                .collect())
        })
        .await
    }

    async fn deregister_broker(&self, broker_id: i32, session: i64) -> MetaResult<()> {
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let stored = stored_broker(&tx, broker_id)?;
            if semantics::deregisters(stored.map(|s| s.session), session) {
                tx.prepare_cached("DELETE FROM brokers WHERE broker_id = ?1")
                    .db()?
                    .execute(params![broker_id])
                    .db()?;
            }
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
            let id = advance_counter(
                &tx,
                "SELECT value FROM counters WHERE name = ?1",
                "INSERT INTO counters (name, value) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                &PRODUCER_ID_COUNTER,
                semantics::next_producer_id,
            )?;
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
            query_all(
                &tx,
                concat!(
                    "SELECT ",
                    rows::offset_columns!(),
                    " FROM group_offsets WHERE group_id = ?1 ORDER BY topic, partition"
                ),
                params![group],
                rows::offset,
            )
        })
        .await
    }
    async fn put_txn(&self, record: &TxnRecord, fence: Fence) -> MetaResult<()> {
        let record = record.clone();
        self.run(move |conn| {
            let op = semantics::Op::PutTxn {
                record: &record,
                fence,
            };
            fenced_tx(conn, op).map(|_| ())
        })
        .await
    }

    async fn delete_txn(&self, transactional_id: &str, fence: Fence) -> MetaResult<()> {
        let transactional_id = transactional_id.to_owned();
        self.run(move |conn| {
            let op = semantics::Op::DeleteTxn {
                transactional_id: &transactional_id,
                fence,
            };
            fenced_tx(conn, op).map(|_| ())
        })
        .await
    }

    async fn list_txns(&self) -> MetaResult<Vec<TxnRecord>> {
        self.run(|conn| {
            let tx = conn.transaction().db()?;
            query_all(
                &tx,
                concat!(
                    "SELECT ",
                    rows::txn_columns!(),
                    " FROM transactions ORDER BY transactional_id"
                ),
                [],
                rows::txn,
            )
        })
        .await
    }

    async fn commit_txn_offsets(
        &self,
        group: &str,
        offsets: &[TxnOffsetRecord],
        fence: Option<Fence>,
    ) -> MetaResult<()> {
        let group = group.to_owned();
        let offsets = offsets.to_vec();
        self.run(move |conn| {
            let op = semantics::Op::CommitTxnOffsets {
                group: &group,
                offsets: &offsets,
                fence,
            };
            fenced_tx(conn, op).map(|_| ())
        })
        .await
    }

    async fn pending_txn_offsets(&self, group: &str) -> MetaResult<Vec<TxnOffsetRecord>> {
        let group = group.to_owned();
        self.run(move |conn| {
            let tx = conn.transaction().db()?;
            query_all(
                &tx,
                concat!(
                    "SELECT ",
                    rows::txn_offset_columns!(),
                    " FROM txn_offsets WHERE group_id = ?1 ORDER BY topic, partition, producer_id"
                ),
                params![group],
                rows::txn_offset,
            )
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
            query_all(
                &tx,
                "SELECT DISTINCT group_id FROM group_offsets ORDER BY group_id",
                [],
                rows::name,
            )
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
            let session = advance_counter(
                &tx,
                "SELECT session FROM broker_sessions WHERE broker_id = ?1",
                "INSERT INTO broker_sessions (broker_id, session) VALUES (?1, ?2)
                 ON CONFLICT (broker_id) DO UPDATE SET session = excluded.session",
                &broker_id,
                semantics::next_session,
            )?;
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
    use crate::metadata::rows::encode_json;
    use crate::metadata::{PartitionCommit, ProducerBatch, ProducerStateRecord, WalRangeRecord};

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

    /// Commits are fsynced (FULL) unless asked not to (NORMAL), on the store's own
    /// connection.
    #[test]
    fn the_sync_policy_is_the_one_asked_for() {
        for (synced, want) in [(true, 2), (false, 1)] {
            let (_dir, path) = temp_db();
            let store = SqliteStore::open_with(&path, synced).expect("open store");
            let level: i64 = store
                .conn
                .lock()
                .expect("connection")
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .expect("synchronous");
            assert_eq!(level, want, "synced={synced}");
        }
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
        assert_eq!(schema_versions(&conn), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(SCHEMA_VERSION, 6);
        drop(store);
        // Opening again finds the schema in place and changes nothing.
        SqliteStore::open(&path).expect("reopen store");
        assert_eq!(schema_versions(&conn), vec![1, 2, 3, 4, 5, 6]);
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
            assert_eq!(schema_versions(&raw(&path)), vec![1, 2, 3, 4, 5, 6]);
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
            vec![1, 2, 3, 4, 5, 6],
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
            txn_first_offset: -1,
            coordinator_epoch: -1,
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
            compacted_ms: 0,
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
                        aborted: vec![],
                    }],
                };
                store
                    .commit_wal(std::slice::from_ref(&commit))
                    .await
                    .expect("commit");
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
                aborted: vec![],
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
                aborted: vec![],
            }],
        };
        store
            .commit_wal(std::slice::from_ref(&commit))
            .await
            .expect("commit");
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

    /// Pins the persisted JSON of producer states: changing it needs a migration. The
    /// transaction fields came with schema version 6; a state stored before them reads
    /// as a producer with no transaction open and no marker seen.
    #[test]
    fn producer_state_json_is_stable() {
        let before_v6 = r#"{"producer_id":1000,"epoch":2,"batches":[{"first_seq":0,"last_seq":4,"base_offset":10,"last_offset":14,"timestamp":1700000000000}],"last_update_ms":1700000000001}"#;
        let golden = r#"{"producer_id":1000,"epoch":2,"batches":[{"first_seq":0,"last_seq":4,"base_offset":10,"last_offset":14,"timestamp":1700000000000}],"last_update_ms":1700000000001,"txn_first_offset":-1,"coordinator_epoch":-1}"#;
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
            txn_first_offset: -1,
            coordinator_epoch: -1,
        };
        assert_eq!(
            encode_json(&state, "producer state").expect("encode"),
            golden
        );
        let decoded: ProducerStateRecord = serde_json::from_str(golden).expect("decode");
        assert_eq!(decoded, state);
        let old: ProducerStateRecord = serde_json::from_str(before_v6).expect("decode");
        assert_eq!(old, state);
    }
}
