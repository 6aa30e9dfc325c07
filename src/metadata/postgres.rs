//! The PostgreSQL backend of [`MetadataStore`]: the shared metadata store for several
//! brokers.
//!
//! It owns a small pool of `tokio-postgres` connections to one database and the schema
//! inside it (the first schema on the connections' `search_path`). It exists so that
//! brokers on different machines can share one transactional source of truth; the
//! SQLite backend serves a single broker. Tables, columns and their meaning are the
//! SQLite backend's (see [`super::sqlite`]), with PostgreSQL types: topic ids are
//! `UUID`, offsets, sizes and timestamps `BIGINT`, epochs and partitions `INTEGER`, and
//! the JSON of topic configs, producer states and transaction states is stored as
//! `TEXT`, byte for byte what the SQLite backend writes. Names, group ids and object keys use the `"C"`
//! collation so that every `ORDER BY` is bytewise, like Rust's `String` order.
//!
//! Concurrency: every trait method is one transaction (a lone statement is its own).
//! What an operation decides is [`semantics`]'s; this backend reads the rows it decides
//! on under their locks. Writes that belong to a partition, claims and releases first
//! lock its `partitions` row (`FOR UPDATE`, in key order when there are several), so a
//! claim by another broker either commits before the epoch check and fences the write,
//! or waits for it. Producer ids, broker sessions and broker registrations are one row
//! each, read `FOR UPDATE` and written back; a row that does not exist yet cannot be
//! locked, so it is inserted with `ON CONFLICT DO NOTHING`, and the transaction that
//! loses that race reads the row again (see [`lost_row_races`]), atomic across brokers.
//! Every table's row is decoded by the one decoder [`rows`] has for it, shared with
//! SQLite. Connecting creates or migrates the schema in one
//! transaction under a transaction-scoped advisory lock, so brokers starting together
//! do not race.
//!
//! Errors: anything the server or the connection reports is `Unavailable` (retriable);
//! a stored value that does not decode is `Corrupt`.
//!
//! Persisted format: like SQLite's, every name in the schema versions ([`SCHEMA_V1`] to
//! [`SCHEMA_V6`]), the JSON forms and the counter names are stored and **must be kept
//! stable**; a change needs a new schema version and a step in [`migrate`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{Client, Config, NoTls, Row, Statement, Transaction};
use uuid::Uuid;

use super::PartitionOwner;
use super::{rows, semantics};
use super::{
    AbortedTxnRecord, BrokerRecord, CommittedOffset, Fence, MetaError, MetaResult, MetadataStore,
    PartitionKey, PartitionState, SegmentRecord, TopicRecord, TxnOffsetRecord, TxnRecord,
    WalCommit,
};

/// The schema version this code reads and writes.
const SCHEMA_VERSION: i64 = 6;
/// Name of the `counters` row that allocates producer ids. Persisted; stable.
const PRODUCER_ID_COUNTER: &str = "producer_id";
/// Most connections one store opens; more concurrent operations wait for one.
const POOL_SIZE: usize = 16;
/// How long the server keeps a transaction of ours open while nothing arrives on it.
/// Every transaction sends its statements back to back, so one that goes quiet belongs
/// to a broker that was cut off mid-transaction (its connection hangs, the server does
/// not see it close); its row locks would otherwise stall every other broker's claim of
/// those partitions until the connection dies.
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(5);

/// Connect timeout when the URL does not set `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Key of the transaction-scoped advisory lock that serialises schema migrations
/// ("StrataMD" in ASCII). Stable: brokers of different versions must agree on it.
const MIGRATION_LOCK_KEY: i64 = 0x5374_7261_7461_4d44;

/// Schema version 1: the SQLite backend's version 1 in PostgreSQL types. Every name
/// here is persisted: keep them stable, add a new version with a migration instead.
const SCHEMA_V1: &str = r#"
CREATE TABLE topics (
    name        TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    id          UUID    NOT NULL UNIQUE,
    partitions  INTEGER NOT NULL,
    configs     TEXT    NOT NULL,
    created_ms  BIGINT  NOT NULL
);
CREATE TABLE partitions (
    topic_id         UUID    NOT NULL,
    partition        INTEGER NOT NULL,
    leader_epoch     INTEGER NOT NULL,
    log_start_offset BIGINT  NOT NULL,
    high_watermark   BIGINT  NOT NULL,
    owner_broker     INTEGER,
    PRIMARY KEY (topic_id, partition)
);
CREATE TABLE epoch_history (
    topic_id     UUID    NOT NULL,
    partition    INTEGER NOT NULL,
    epoch        INTEGER NOT NULL,
    start_offset BIGINT  NOT NULL,
    PRIMARY KEY (topic_id, partition, epoch)
);
CREATE TABLE segments (
    topic_id      UUID    NOT NULL,
    partition     INTEGER NOT NULL,
    base_offset   BIGINT  NOT NULL,
    end_offset    BIGINT  NOT NULL,
    object_key    TEXT COLLATE "C" NOT NULL,
    size_bytes    BIGINT  NOT NULL,
    data_bytes    BIGINT  NOT NULL,
    max_timestamp BIGINT  NOT NULL,
    created_ms    BIGINT  NOT NULL,
    PRIMARY KEY (topic_id, partition, base_offset)
);
CREATE TABLE wal_ranges (
    topic_id      UUID    NOT NULL,
    partition     INTEGER NOT NULL,
    base_offset   BIGINT  NOT NULL,
    end_offset    BIGINT  NOT NULL,
    object_key    TEXT COLLATE "C" NOT NULL,
    position      BIGINT  NOT NULL,
    len           BIGINT  NOT NULL,
    max_timestamp BIGINT  NOT NULL,
    PRIMARY KEY (topic_id, partition, base_offset)
);
CREATE INDEX wal_ranges_by_object ON wal_ranges (object_key);
CREATE TABLE wal_objects (
    object_key TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    created_ms BIGINT NOT NULL
);
CREATE TABLE producers (
    topic_id    UUID    NOT NULL,
    partition   INTEGER NOT NULL,
    producer_id BIGINT  NOT NULL,
    state       TEXT    NOT NULL,
    PRIMARY KEY (topic_id, partition, producer_id)
);
CREATE TABLE counters (
    name  TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE broker_sessions (
    broker_id INTEGER NOT NULL PRIMARY KEY,
    session   BIGINT  NOT NULL
);
"#;

/// Schema version 2: consumer-group committed offsets (see the SQLite backend's
/// version 2 for the meaning). `offset` is a reserved word here, hence the quotes.
const SCHEMA_V2: &str = r#"
CREATE TABLE group_offsets (
    group_id            TEXT COLLATE "C" NOT NULL,
    topic               TEXT COLLATE "C" NOT NULL,
    partition           INTEGER NOT NULL,
    "offset"            BIGINT  NOT NULL,
    leader_epoch        INTEGER NOT NULL,
    metadata            TEXT    NOT NULL,
    commit_timestamp_ms BIGINT  NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
);
"#;

/// Schema version 3: broker registrations with their leases (see the SQLite backend's
/// version 3).
const SCHEMA_V3: &str = r#"
CREATE TABLE brokers (
    broker_id        INTEGER NOT NULL PRIMARY KEY,
    session          BIGINT  NOT NULL,
    host             TEXT    NOT NULL,
    port             INTEGER NOT NULL,
    zone             TEXT,
    lease_expires_ms BIGINT  NOT NULL
);
"#;

/// Schema version 4: a broker can be draining (live, giving its work away, taking none).
/// Write-ahead ranges record their object's size, for readers other than the writer.
const SCHEMA_V4: &str = r#"
ALTER TABLE brokers ADD COLUMN draining BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE wal_ranges ADD COLUMN object_size BIGINT NOT NULL DEFAULT 0;
"#;

/// Schema version 5: a segment records when compaction wrote it (0: never).
const SCHEMA_V5: &str = r#"
ALTER TABLE segments ADD COLUMN compacted_ms BIGINT NOT NULL DEFAULT 0;
"#;

/// Schema version 6: transactions (see the SQLite backend's version 6 for the meaning):
/// the aborted transactions of each partition, keyed by their abort marker's offset;
/// each transactional id's state as JSON (`TEXT`, byte for byte what SQLite stores);
/// and the offsets groups committed inside transactions not yet ended, the columns of
/// `group_offsets` plus the producer.
const SCHEMA_V6: &str = r#"
CREATE TABLE aborted_txns (
    topic_id     UUID    NOT NULL,
    partition    INTEGER NOT NULL,
    last_offset  BIGINT  NOT NULL,
    producer_id  BIGINT  NOT NULL,
    first_offset BIGINT  NOT NULL,
    PRIMARY KEY (topic_id, partition, last_offset)
);
CREATE TABLE transactions (
    transactional_id TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    state            TEXT NOT NULL
);
CREATE TABLE txn_offsets (
    group_id            TEXT COLLATE "C" NOT NULL,
    topic               TEXT COLLATE "C" NOT NULL,
    partition           INTEGER NOT NULL,
    producer_id         BIGINT  NOT NULL,
    "offset"            BIGINT  NOT NULL,
    leader_epoch        INTEGER NOT NULL,
    metadata            TEXT    NOT NULL,
    commit_timestamp_ms BIGINT  NOT NULL,
    PRIMARY KEY (group_id, topic, partition, producer_id)
);
"#;

const SELECT_TOPIC_FOR_UPDATE: &str = concat!(
    "SELECT ",
    rows::topic_columns!(),
    " FROM topics WHERE name = $1 FOR UPDATE"
);
/// A topic's new partition rows: `$1` the topic, `$2..$3` the partitions, the rest
/// `semantics::PartitionRow::NEW`'s columns.
const INSERT_PARTITIONS: &str = "INSERT INTO partitions
         (topic_id, partition, leader_epoch, log_start_offset, high_watermark, owner_broker)
     SELECT $1, p, $4, $5, $6, $7 FROM generate_series($2::INTEGER, $3::INTEGER - 1) AS p";
const LOCK_PARTITION: &str = concat!(
    "SELECT ",
    rows::partition_columns!(),
    " FROM partitions WHERE topic_id = $1 AND partition = $2 FOR UPDATE"
);
const LOCK_BROKER: &str = concat!(
    "SELECT ",
    rows::broker_columns!(),
    " FROM brokers WHERE broker_id = $1 FOR UPDATE"
);
/// How many times a write of one row that may not exist yet reads it again after a
/// concurrent transaction inserted it first (see [`lost_row_races`]).
const ROW_RACE_ATTEMPTS: usize = 3;

/// One pooled connection and the statements prepared on it.
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

/// A fixed-size pool: idle connections plus a semaphore that caps how many exist.
struct Pool {
    config: Config,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
}

/// A connection checked out of the pool; it goes back when dropped, unless closed.
struct PooledConn<'a> {
    conn: Option<Conn>,
    pool: &'a Pool,
    _permit: SemaphorePermit<'a>,
}

impl Drop for PooledConn<'_> {
    fn drop(&mut self) {
        // A transaction dropped without commit already queued its ROLLBACK on the
        // connection, ahead of anything the next user sends: the connection is clean.
        if let Some(conn) = self.conn.take().filter(|c| !c.client.is_closed()) {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
        }
    }
}

impl Pool {
    async fn get(&self) -> MetaResult<PooledConn<'_>> {
        let permit =
            self.permits.acquire().await.map_err(|_| {
                MetaError::Unavailable("postgres connection pool is closed".to_owned())
            })?;
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let mut found = None;
            while let Some(conn) = idle.pop() {
                if !conn.client.is_closed() {
                    found = Some(conn);
                    break;
                }
            }
            found
        };
        let conn = match reused {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        Ok(PooledConn {
            conn: Some(conn),
            pool: self,
            _permit: permit,
        })
    }

    async fn connect(&self) -> MetaResult<Conn> {
        let (client, connection) = self.config.connect(NoTls).await.map_err(|e| {
            MetaError::Unavailable(format!("cannot connect to postgres metadata store: {e}"))
        })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "postgres metadata connection failed");
            }
        });
        Ok(Conn {
            client,
            statements: HashMap::new(),
        })
    }
}

impl PooledConn<'_> {
    fn conn(&mut self) -> MetaResult<&mut Conn> {
        self.conn
            .as_mut()
            .ok_or_else(|| MetaError::Unavailable("postgres connection was returned".to_owned()))
    }

    /// Starts a transaction; its statements are prepared once per connection.
    async fn begin(&mut self) -> MetaResult<Tx<'_>> {
        let conn = self.conn()?;
        let tx = conn.client.transaction().await.db()?;
        Ok(Tx {
            tx,
            statements: &mut conn.statements,
        })
    }

    /// A prepared statement for a lone (autocommitted) statement.
    async fn statement(&mut self, sql: &'static str) -> MetaResult<Statement> {
        let conn = self.conn()?;
        if let Some(statement) = conn.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = conn.client.prepare(sql).await.db()?;
        conn.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    /// Runs one statement on its own (its own transaction) and returns its rows.
    async fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> MetaResult<Vec<Row>> {
        let statement = self.statement(sql).await?;
        self.conn()?.client.query(&statement, params).await.db()
    }

    /// Runs one statement on its own (its own transaction); returns the rows changed.
    async fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> MetaResult<u64> {
        let statement = self.statement(sql).await?;
        self.conn()?.client.execute(&statement, params).await.db()
    }
}

/// An open transaction with the connection's statement cache.
struct Tx<'a> {
    tx: Transaction<'a>,
    statements: &'a mut HashMap<&'static str, Statement>,
}

impl Tx<'_> {
    async fn statement(&mut self, sql: &'static str) -> MetaResult<Statement> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.tx.prepare(sql).await.db()?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    async fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> MetaResult<Vec<Row>> {
        let statement = self.statement(sql).await?;
        self.tx.query(&statement, params).await.db()
    }

    async fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> MetaResult<Option<Row>> {
        let statement = self.statement(sql).await?;
        self.tx.query_opt(&statement, params).await.db()
    }

    async fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> MetaResult<u64> {
        let statement = self.statement(sql).await?;
        self.tx.execute(&statement, params).await.db()
    }

    async fn commit(self) -> MetaResult<()> {
        self.tx.commit().await.db()
    }
}

/// The shared metadata store: a pool of connections to one PostgreSQL database.
pub(crate) struct PostgresStore {
    pool: Pool,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password.
        f.debug_struct("PostgresStore")
            .field("hosts", &self.pool.config.get_hosts())
            .field("ports", &self.pool.config.get_ports())
            .field("dbname", &self.pool.config.get_dbname())
            .field("user", &self.pool.config.get_user())
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Runs a fenced write (`semantics`) in one transaction.
    async fn fenced(&self, op: semantics::Op<'_>) -> MetaResult<usize> {
        let mut conn = self.pool.get().await?;
        let mut tx = conn.begin().await?;
        let deleted = apply_fenced(&mut tx, op).await?;
        tx.commit().await?;
        Ok(deleted)
    }

    /// Connects to the database named by `url` (`postgres://user[:password]@host:port/db`,
    /// libpq-style query parameters allowed) and creates or migrates the schema.
    pub(crate) async fn connect(url: &str) -> MetaResult<PostgresStore> {
        let config: Config = url
            .parse()
            .map_err(|e| MetaError::Unavailable(format!("invalid postgres metadata URL: {e}")))?;
        PostgresStore::connect_with(config).await
    }

    /// Like [`PostgresStore::connect`], from a parsed configuration.
    pub(crate) async fn connect_with(mut config: Config) -> MetaResult<PostgresStore> {
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let options = format!(
            "{} -c idle_in_transaction_session_timeout={}",
            config.get_options().unwrap_or_default(),
            IDLE_IN_TRANSACTION.as_millis()
        );
        config.options(options.trim_start());
        let store = PostgresStore {
            pool: Pool {
                config,
                idle: Mutex::new(Vec::new()),
                permits: Semaphore::new(POOL_SIZE),
            },
        };
        let mut conn = store.pool.get().await?;
        migrate(&mut conn.conn()?.client).await?;
        drop(conn);
        tracing::info!(store = ?store, "opened postgres metadata store");
        Ok(store)
    }
}

/// Creates the schema in an empty database, or upgrades an older one, in one
/// transaction that holds the migration advisory lock.
async fn migrate(client: &mut Client) -> MetaResult<()> {
    let tx = client.transaction().await.db()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .db()?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL PRIMARY KEY)",
    )
    .await
    .db()?;
    let row = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
        .await
        .db()?;
    let current = rows::number(&row)?;
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
        tx.batch_execute(sql).await.db()?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&version],
        )
        .await
        .db()?;
        if current >= 1 {
            tracing::info!(
                from = current,
                to = version,
                "migrated postgres metadata schema"
            );
        }
    }
    tx.commit().await.db()
}

/// `?`-friendly mapping of driver errors: the server or the connection failed.
trait PgResultExt<T> {
    fn db(self) -> MetaResult<T>;
}

impl<T> PgResultExt<T> for Result<T, tokio_postgres::Error> {
    fn db(self) -> MetaResult<T> {
        self.map_err(|e| match e.as_db_error() {
            // The driver's `Display` says only "db error": name the server's reason.
            Some(db) => MetaError::Unavailable(format!(
                "postgres: {} {}: {}",
                db.severity(),
                db.code().code(),
                db.message()
            )),
            None => MetaError::Unavailable(format!("postgres: {e}")),
        })
    }
}

/// Sizes and positions are `u64` in the API and `BIGINT` in the database.
fn u64_to_sql(value: u64, what: &str) -> MetaResult<i64> {
    i64::try_from(value)
        .map_err(|_| MetaError::Corrupt(format!("{what} {value} does not fit in a bigint")))
}

fn count(rows: u64) -> MetaResult<usize> {
    usize::try_from(rows)
        .map_err(|_| MetaError::Unavailable(format!("row count {rows} does not fit in usize")))
}

/// How the shared decoders ([`rows`]) read a PostgreSQL column: a value that does not
/// decode is corruption, not unavailability.
impl rows::StoredRow for Row {
    fn int(&self, idx: usize) -> MetaResult<i32> {
        get(self, idx)
    }
    fn opt_int(&self, idx: usize) -> MetaResult<Option<i32>> {
        get(self, idx)
    }
    fn bigint(&self, idx: usize) -> MetaResult<i64> {
        get(self, idx)
    }
    fn text(&self, idx: usize) -> MetaResult<String> {
        get(self, idx)
    }
    fn opt_text(&self, idx: usize) -> MetaResult<Option<String>> {
        get(self, idx)
    }
    fn flag(&self, idx: usize) -> MetaResult<bool> {
        get(self, idx)
    }
    fn uuid(&self, idx: usize) -> MetaResult<Uuid> {
        get(self, idx)
    }
}

fn get<'a, T: FromSql<'a>>(row: &'a Row, idx: usize) -> MetaResult<T> {
    row.try_get(idx)
        .map_err(|e| MetaError::Corrupt(format!("postgres value does not decode: {e}")))
}

/// Decodes every row of an answer with its table's decoder (see [`rows`]).
fn decode_all<T>(
    found: &[Row],
    decode: fn(&dyn rows::StoredRow) -> MetaResult<T>,
) -> MetaResult<Vec<T>> {
    found.iter().map(|row| decode(row)).collect()
}

/// Decodes the row of an answer of at most one row with its table's decoder.
fn decode_opt<T>(
    found: Option<Row>,
    decode: fn(&dyn rows::StoredRow) -> MetaResult<T>,
) -> MetaResult<Option<T>> {
    found.as_ref().map(|row| decode(row)).transpose()
}

/// The stored row of a partition, locked until commit; `None` if it does not exist.
async fn lock_partition(
    tx: &mut Tx<'_>,
    key: PartitionKey,
) -> MetaResult<Option<semantics::PartitionRow>> {
    let row = tx
        .query_opt(LOCK_PARTITION, &[&key.topic_id, &key.partition])
        .await?;
    Ok(decode_opt(row, rows::partition)?.map(|(_, stored)| stored))
}

/// The stored topic named `name`, locked until commit.
async fn lock_topic(tx: &mut Tx<'_>, name: &str) -> MetaResult<Option<TopicRecord>> {
    let row = tx.query_opt(SELECT_TOPIC_FOR_UPDATE, &[&name]).await?;
    decode_opt(row, rows::topic)
}

/// Inserts a topic's new partition rows (`semantics::PartitionRow::NEW`).
async fn insert_partitions(
    tx: &mut Tx<'_>,
    topic_id: Uuid,
    partitions: Range<i32>,
) -> MetaResult<()> {
    let new = semantics::PartitionRow::NEW;
    tx.execute(
        INSERT_PARTITIONS,
        &[
            &topic_id,
            &partitions.start,
            &partitions.end,
            &new.leader_epoch,
            &new.log_start_offset,
            &new.high_watermark,
            &new.owner,
        ],
    )
    .await?;
    Ok(())
}

/// Stores what a claim or a release decided: the partition's epoch and owner.
async fn store_owner(
    tx: &mut Tx<'_>,
    key: PartitionKey,
    row: &semantics::PartitionRow,
) -> MetaResult<()> {
    tx.execute(
        "UPDATE partitions SET leader_epoch = $3, owner_broker = $4
         WHERE topic_id = $1 AND partition = $2",
        &[&key.topic_id, &key.partition, &row.leader_epoch, &row.owner],
    )
    .await?;
    Ok(())
}

/// Writing one row that may not exist yet under its lock: an attempt reads the row
/// `FOR UPDATE`, lets the semantics decide, and updates the row, or inserts it (`ON
/// CONFLICT DO NOTHING`) when there was none. An absent row cannot be locked, so a
/// concurrent transaction may insert it first; the attempt's insert then changes
/// nothing and the caller tries again, now finding the row and waiting for its lock, at
/// most [`ROW_RACE_ATTEMPTS`] times before this error.
fn lost_row_races(what: &str) -> MetaError {
    MetaError::Unavailable(format!(
        "{what}: concurrent writers kept inserting and removing the row; try again"
    ))
}

/// The SQL of one counter table: lock its row, update it, insert it.
struct CounterSql {
    lock: &'static str,
    update: &'static str,
    insert: &'static str,
}

const PRODUCER_ID_SQL: CounterSql = CounterSql {
    lock: "SELECT value FROM counters WHERE name = $1 FOR UPDATE",
    update: "UPDATE counters SET value = $2 WHERE name = $1",
    insert: "INSERT INTO counters (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
};

const SESSION_SQL: CounterSql = CounterSql {
    lock: "SELECT session FROM broker_sessions WHERE broker_id = $1 FOR UPDATE",
    update: "UPDATE broker_sessions SET session = $2 WHERE broker_id = $1",
    insert: "INSERT INTO broker_sessions (broker_id, session) VALUES ($1, $2)
             ON CONFLICT (broker_id) DO NOTHING",
};

/// The last value of a counter row (`None`: never counted), advanced by `next` (a rule
/// of [`semantics`]) and stored under the row's lock; returns the new value.
async fn advance_counter(
    tx: &mut Tx<'_>,
    sql: &CounterSql,
    key: &(dyn ToSql + Sync),
    next: fn(Option<i64>) -> MetaResult<i64>,
) -> MetaResult<i64> {
    for _ in 0..ROW_RACE_ATTEMPTS {
        let row = tx.query_opt(sql.lock, &[key]).await?;
        let last = decode_opt(row, rows::number)?;
        let value = next(last)?;
        let write = if last.is_some() {
            sql.update
        } else {
            sql.insert
        };
        if tx.execute(write, &[key, &value]).await? == 1 {
            return Ok(value);
        }
    }
    Err(lost_row_races("counter"))
}

/// A heartbeat under the lock of the broker's registration (see [`lost_row_races`]).
async fn register_broker(tx: &mut Tx<'_>, b: &BrokerRecord) -> MetaResult<()> {
    let params: [&(dyn ToSql + Sync); 7] = [
        &b.broker_id,
        &b.session,
        &b.host,
        &b.port,
        &b.zone,
        &b.lease_expires_ms,
        &b.draining,
    ];
    for _ in 0..ROW_RACE_ATTEMPTS {
        let row = tx.query_opt(LOCK_BROKER, &[&b.broker_id]).await?;
        let stored = decode_opt(row, rows::broker)?;
        semantics::heartbeat(stored.as_ref().map(|s| s.session), b)?;
        let write = if stored.is_some() {
            "UPDATE brokers SET session = $2, host = $3, port = $4, zone = $5,
                 lease_expires_ms = $6, draining = $7
             WHERE broker_id = $1"
        } else {
            "INSERT INTO brokers (broker_id, session, host, port, zone, lease_expires_ms,
                                  draining)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (broker_id) DO NOTHING"
        };
        if tx.execute(write, &params).await? == 1 {
            return Ok(());
        }
    }
    Err(lost_row_races("broker heartbeat"))
}

/// Reads everything a new owner recovers from; the scalar columns come from the caller.
/// The five reads are pipelined on the connection.
async fn load_partition_state(
    tx: &mut Tx<'_>,
    key: PartitionKey,
    row: &semantics::PartitionRow,
) -> MetaResult<PartitionState> {
    let segments_sql = tx
        .statement(concat!(
            "SELECT ",
            rows::segment_columns!(),
            " FROM segments WHERE topic_id = $1 AND partition = $2 ORDER BY base_offset"
        ))
        .await?;
    let ranges_sql = tx
        .statement(concat!(
            "SELECT ",
            rows::wal_range_columns!(),
            " FROM wal_ranges WHERE topic_id = $1 AND partition = $2 ORDER BY base_offset"
        ))
        .await?;
    let producers_sql = tx
        .statement(concat!(
            "SELECT ",
            rows::producer_columns!(),
            " FROM producers WHERE topic_id = $1 AND partition = $2 ORDER BY producer_id"
        ))
        .await?;
    let history_sql = tx
        .statement(concat!(
            "SELECT ",
            rows::epoch_columns!(),
            " FROM epoch_history WHERE topic_id = $1 AND partition = $2 ORDER BY epoch"
        ))
        .await?;
    let aborted_sql = tx
        .statement(concat!(
            "SELECT ",
            rows::aborted_txn_columns!(),
            " FROM aborted_txns WHERE topic_id = $1 AND partition = $2 ORDER BY last_offset"
        ))
        .await?;
    let params: [&(dyn ToSql + Sync); 2] = [&key.topic_id, &key.partition];
    let (segment_rows, range_rows, producer_rows, history_rows, aborted_rows) = tokio::try_join!(
        tx.tx.query(&segments_sql, &params),
        tx.tx.query(&ranges_sql, &params),
        tx.tx.query(&producers_sql, &params),
        tx.tx.query(&history_sql, &params),
        tx.tx.query(&aborted_sql, &params),
    )
    .db()?;
    Ok(PartitionState {
        leader_epoch: row.leader_epoch,
        log_start_offset: row.log_start_offset,
        high_watermark: row.high_watermark,
        segments: decode_all(&segment_rows, rows::segment)?,
        wal_ranges: decode_all(&range_rows, rows::wal_range)?,
        producers: decode_all(&producer_rows, rows::producer)?,
        epoch_history: decode_all(&history_rows, rows::epoch)?,
        aborted: decode_all(&aborted_rows, rows::aborted_txn)?,
    })
}

/// A fenced write (`semantics`) inside `tx`: locks the rows of its fences (in key
/// order, so two writers never deadlock), plans, and applies the planned writes as a
/// few batched statements pipelined on the connection. Returns how many offsets it
/// deleted.
async fn apply_fenced(tx: &mut Tx<'_>, op: semantics::Op<'_>) -> MetaResult<usize> {
    let fences = op.fences();
    let mut fenced_rows = semantics::Rows::new();
    if !fences.is_empty() {
        let ids: Vec<Uuid> = fences.iter().map(|k| k.topic_id).collect();
        let numbers: Vec<i32> = fences.iter().map(|k| k.partition).collect();
        let locked = tx
            .query(
                concat!(
                    "SELECT ",
                    rows::partition_columns!(),
                    " FROM partitions
                      JOIN unnest($1::UUID[], $2::INTEGER[]) AS k (id, number)
                        ON topic_id = k.id AND partition = k.number
                      ORDER BY topic_id, partition
                      FOR UPDATE OF partitions"
                ),
                &[&ids, &numbers],
            )
            .await?;
        for row in &locked {
            let (key, stored) = rows::partition(row)?;
            fenced_rows.insert(key, stored);
        }
    }
    let writes = semantics::plan(&fenced_rows, op)?;
    Columns::gather(writes)?.apply(tx).await
}

/// Planned writes flattened into column arrays, one batched statement per kind.
#[derive(Default)]
struct Columns<'a> {
    range_topic_ids: Vec<Uuid>,
    range_partitions: Vec<i32>,
    range_bases: Vec<i64>,
    range_ends: Vec<i64>,
    range_objects: Vec<String>,
    range_positions: Vec<i64>,
    range_lens: Vec<i64>,
    range_max_timestamps: Vec<i64>,
    range_object_sizes: Vec<i64>,
    hw_topic_ids: Vec<Uuid>,
    hw_partitions: Vec<i32>,
    hws: Vec<i64>,
    /// By (partition, producer id): the last state wins, like consecutive upserts.
    producers: BTreeMap<(PartitionKey, i64), String>,
    wal_objects: Vec<(&'a str, i64)>,
    segments: Vec<(PartitionKey, &'a SegmentRecord)>,
    drop_ranges: Vec<(PartitionKey, i64)>,
    log_starts: Vec<(PartitionKey, i64)>,
    drop_segments: BTreeMap<PartitionKey, Vec<i64>>,
    /// Segments dropped before `segments` are inserted (compaction's swap reuses base
    /// offsets).
    replaced_segments: BTreeMap<PartitionKey, Vec<i64>>,
    /// By group, then (topic, partition): the last commit wins.
    offsets: BTreeMap<&'a str, BTreeMap<(&'a str, i32), &'a CommittedOffset>>,
    delete_groups: Vec<&'a str>,
    delete_offsets: BTreeMap<&'a str, (Vec<&'a str>, Vec<i32>)>,
    expire: Vec<(&'a str, i64)>,
    /// By (partition, marker offset): the first one wins, like consecutive inserts that
    /// do nothing on conflict.
    aborted: BTreeMap<(PartitionKey, i64), &'a AbortedTxnRecord>,
    drop_aborted: Vec<(PartitionKey, i64)>,
    /// In plan order: (transactional id, its JSON).
    txns: Vec<(&'a str, String)>,
    delete_txns: Vec<&'a str>,
    /// By group, then (topic, partition, producer id): the last commit wins.
    txn_offsets: BTreeMap<&'a str, BTreeMap<(&'a str, i32, i64), &'a TxnOffsetRecord>>,
    /// In plan order: (group, producer id, commit).
    settles: Vec<(&'a str, i64, bool)>,
}

impl<'a> Columns<'a> {
    fn gather(writes: Vec<semantics::Write<'a>>) -> MetaResult<Columns<'a>> {
        use semantics::Write;
        let mut c = Columns::default();
        for write in writes {
            match write {
                Write::InsertRange { key, range } => {
                    c.range_topic_ids.push(key.topic_id);
                    c.range_partitions.push(key.partition);
                    c.range_bases.push(range.base_offset);
                    c.range_ends.push(range.end_offset);
                    c.range_positions
                        .push(u64_to_sql(range.position, "wal range position")?);
                    c.range_lens
                        .push(u64_to_sql(range.len, "wal range length")?);
                    c.range_max_timestamps.push(range.max_timestamp);
                    c.range_object_sizes
                        .push(u64_to_sql(range.object_size, "wal object size")?);
                    c.range_objects.push(range.object_key);
                }
                Write::SetHighWatermark {
                    key,
                    high_watermark,
                } => {
                    c.hw_topic_ids.push(key.topic_id);
                    c.hw_partitions.push(key.partition);
                    c.hws.push(high_watermark);
                }
                Write::UpsertProducer { key, state } => {
                    c.producers.insert(
                        (key, state.producer_id),
                        rows::encode_json(state, "producer state")?,
                    );
                }
                Write::RememberWalObject {
                    object_key,
                    created_ms,
                } => c.wal_objects.push((object_key, created_ms)),
                Write::InsertSegment { key, segment } => c.segments.push((key, segment)),
                Write::DropRangesThrough { key, end_offset } => {
                    c.drop_ranges.push((key, end_offset))
                }
                Write::SetLogStartOffset {
                    key,
                    log_start_offset,
                } => c.log_starts.push((key, log_start_offset)),
                Write::DropSegment { key, base_offset } => {
                    c.drop_segments.entry(key).or_default().push(base_offset)
                }
                Write::ReplaceSegments { key, drop, insert } => {
                    c.replaced_segments
                        .entry(key)
                        .or_default()
                        .extend_from_slice(drop);
                    c.segments
                        .extend(insert.iter().map(|segment| (key, segment)));
                }
                Write::UpsertOffset { group, offset } => {
                    c.offsets
                        .entry(group)
                        .or_default()
                        .insert((offset.topic.as_str(), offset.partition), offset);
                }
                Write::DeleteOffsets {
                    group,
                    partition: None,
                } => c.delete_groups.push(group),
                Write::DeleteOffsets {
                    group,
                    partition: Some((topic, partition)),
                } => {
                    let (topics, partitions) = c.delete_offsets.entry(group).or_default();
                    topics.push(topic);
                    partitions.push(partition);
                }
                Write::ExpireOffsets { group, before_ms } => c.expire.push((group, before_ms)),
                Write::InsertAbortedTxn { key, aborted } => {
                    c.aborted
                        .entry((key, aborted.last_offset))
                        .or_insert(aborted);
                }
                Write::DropAbortedBelow { key, offset } => c.drop_aborted.push((key, offset)),
                Write::UpsertTxn { record } => c.txns.push((
                    record.transactional_id.as_str(),
                    rows::encode_json(record, "transaction state")?,
                )),
                Write::DeleteTxn { transactional_id } => c.delete_txns.push(transactional_id),
                Write::UpsertTxnOffset { group, pending } => {
                    let o = &pending.offset;
                    c.txn_offsets.entry(group).or_default().insert(
                        (o.topic.as_str(), o.partition, pending.producer_id),
                        pending,
                    );
                }
                Write::SettleTxnOffsets {
                    group,
                    producer_id,
                    commit,
                } => c.settles.push((group, producer_id, commit)),
            }
        }
        Ok(c)
    }

    /// Runs the batched statements, pipelined; returns the offsets deleted. The server
    /// runs pipelined statements in the order they are sent, which is the order of
    /// `jobs`; so where a write of an operation depends on an earlier one it is queued
    /// after it: replaced segments are dropped before the new ones are inserted, pending
    /// transactional offsets are stored before any settle, and a settle's copy into
    /// `group_offsets` runs before its delete. The other writes of one operation are
    /// independent of each other.
    async fn apply(self, tx: &mut Tx<'_>) -> MetaResult<usize> {
        type Params<'p> = Vec<&'p (dyn ToSql + Sync)>;
        // (statement, parameters, whether its row count is an answer)
        let mut jobs: Vec<(Statement, Params<'_>, bool)> = Vec::new();
        if !self.range_bases.is_empty() {
            let st = tx
                .statement(
                    "INSERT INTO wal_ranges (topic_id, partition, base_offset, end_offset,
                         object_key, position, len, max_timestamp, object_size)
                     SELECT * FROM unnest($1::UUID[], $2::INTEGER[], $3::BIGINT[],
                         $4::BIGINT[], $5::TEXT[], $6::BIGINT[], $7::BIGINT[], $8::BIGINT[],
                         $9::BIGINT[])",
                )
                .await?;
            jobs.push((
                st,
                vec![
                    &self.range_topic_ids,
                    &self.range_partitions,
                    &self.range_bases,
                    &self.range_ends,
                    &self.range_objects,
                    &self.range_positions,
                    &self.range_lens,
                    &self.range_max_timestamps,
                    &self.range_object_sizes,
                ],
                false,
            ));
        }
        if !self.hws.is_empty() {
            let st = tx
                .statement(
                    "UPDATE partitions AS p SET high_watermark = k.high_watermark
                     FROM unnest($1::UUID[], $2::INTEGER[], $3::BIGINT[])
                          AS k (topic_id, partition, high_watermark)
                     WHERE p.topic_id = k.topic_id AND p.partition = k.partition",
                )
                .await?;
            jobs.push((
                st,
                vec![&self.hw_topic_ids, &self.hw_partitions, &self.hws],
                false,
            ));
        }
        let producer_topic_ids: Vec<Uuid> =
            self.producers.keys().map(|(k, _)| k.topic_id).collect();
        let producer_partitions: Vec<i32> =
            self.producers.keys().map(|(k, _)| k.partition).collect();
        let producer_ids: Vec<i64> = self.producers.keys().map(|(_, id)| *id).collect();
        let producer_states: Vec<&str> = self.producers.values().map(String::as_str).collect();
        if !producer_ids.is_empty() {
            let st = tx
                .statement(
                    "INSERT INTO producers (topic_id, partition, producer_id, state)
                     SELECT * FROM unnest($1::UUID[], $2::INTEGER[], $3::BIGINT[], $4::TEXT[])
                     ON CONFLICT (topic_id, partition, producer_id)
                     DO UPDATE SET state = excluded.state",
                )
                .await?;
            jobs.push((
                st,
                vec![
                    &producer_topic_ids,
                    &producer_partitions,
                    &producer_ids,
                    &producer_states,
                ],
                false,
            ));
        }
        for (object_key, created_ms) in &self.wal_objects {
            let st = tx
                .statement(
                    "INSERT INTO wal_objects (object_key, created_ms) VALUES ($1, $2)
                     ON CONFLICT (object_key) DO NOTHING",
                )
                .await?;
            jobs.push((st, vec![object_key, created_ms], false));
        }
        for (key, bases) in &self.replaced_segments {
            let st = tx
                .statement(
                    "DELETE FROM segments
                     WHERE topic_id = $1 AND partition = $2 AND base_offset = ANY($3::BIGINT[])",
                )
                .await?;
            jobs.push((st, vec![&key.topic_id, &key.partition, bases], false));
        }
        let mut segment_sizes = Vec::with_capacity(self.segments.len());
        for (_, segment) in &self.segments {
            segment_sizes.push((
                u64_to_sql(segment.size_bytes, "segment size")?,
                u64_to_sql(segment.data_bytes, "segment data size")?,
            ));
        }
        for ((key, segment), (size_bytes, data_bytes)) in self.segments.iter().zip(&segment_sizes) {
            let st = tx
                .statement(
                    "INSERT INTO segments (topic_id, partition, base_offset, end_offset,
                         object_key, size_bytes, data_bytes, max_timestamp, created_ms,
                         compacted_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .await?;
            jobs.push((
                st,
                vec![
                    &key.topic_id,
                    &key.partition,
                    &segment.base_offset,
                    &segment.end_offset,
                    &segment.object_key,
                    size_bytes,
                    data_bytes,
                    &segment.max_timestamp,
                    &segment.created_ms,
                    &segment.compacted_ms,
                ],
                false,
            ));
        }
        for (key, end_offset) in &self.drop_ranges {
            let st = tx
                .statement(
                    "DELETE FROM wal_ranges
                     WHERE topic_id = $1 AND partition = $2 AND end_offset <= $3",
                )
                .await?;
            jobs.push((st, vec![&key.topic_id, &key.partition, end_offset], false));
        }
        for (key, log_start_offset) in &self.log_starts {
            let st = tx
                .statement(
                    "UPDATE partitions SET log_start_offset = $3
                     WHERE topic_id = $1 AND partition = $2",
                )
                .await?;
            jobs.push((
                st,
                vec![&key.topic_id, &key.partition, log_start_offset],
                false,
            ));
        }
        for (key, bases) in &self.drop_segments {
            let st = tx
                .statement(
                    "DELETE FROM segments
                     WHERE topic_id = $1 AND partition = $2 AND base_offset = ANY($3::BIGINT[])",
                )
                .await?;
            jobs.push((st, vec![&key.topic_id, &key.partition, bases], false));
        }
        let mut offset_columns = Vec::with_capacity(self.offsets.len());
        for (group, latest) in &self.offsets {
            let o = latest.values();
            offset_columns.push((
                *group,
                o.clone().map(|o| o.topic.as_str()).collect::<Vec<_>>(),
                o.clone().map(|o| o.partition).collect::<Vec<_>>(),
                o.clone().map(|o| o.offset).collect::<Vec<_>>(),
                o.clone().map(|o| o.leader_epoch).collect::<Vec<_>>(),
                o.clone().map(|o| o.metadata.as_str()).collect::<Vec<_>>(),
                o.map(|o| o.commit_timestamp_ms).collect::<Vec<_>>(),
            ));
        }
        for (group, topics, partitions, offsets, epochs, metadata, timestamps) in &offset_columns {
            let st = tx
                .statement(
                    r#"INSERT INTO group_offsets (group_id, topic, partition, "offset",
                           leader_epoch, metadata, commit_timestamp_ms)
                       SELECT $1, k.* FROM unnest($2::TEXT[], $3::INTEGER[], $4::BIGINT[],
                                                 $5::INTEGER[], $6::TEXT[], $7::BIGINT[]) AS k
                       ON CONFLICT (group_id, topic, partition) DO UPDATE SET
                           "offset" = excluded."offset",
                           leader_epoch = excluded.leader_epoch,
                           metadata = excluded.metadata,
                           commit_timestamp_ms = excluded.commit_timestamp_ms"#,
                )
                .await?;
            jobs.push((
                st,
                vec![
                    group, topics, partitions, offsets, epochs, metadata, timestamps,
                ],
                false,
            ));
        }
        for group in &self.delete_groups {
            let st = tx
                .statement("DELETE FROM group_offsets WHERE group_id = $1")
                .await?;
            jobs.push((st, vec![group], true));
        }
        for (group, (topics, partitions)) in &self.delete_offsets {
            // A pair listed twice is deleted (and counted) once.
            let st = tx
                .statement(
                    "DELETE FROM group_offsets AS g
                     USING (SELECT DISTINCT * FROM unnest($2::TEXT[], $3::INTEGER[]))
                           AS k (topic, partition)
                     WHERE g.group_id = $1 AND g.topic = k.topic AND g.partition = k.partition",
                )
                .await?;
            jobs.push((st, vec![group, topics, partitions], true));
        }
        for (group, before_ms) in &self.expire {
            let st = tx
                .statement(
                    "DELETE FROM group_offsets WHERE group_id = $1 AND commit_timestamp_ms < $2",
                )
                .await?;
            jobs.push((st, vec![group, before_ms], true));
        }
        let aborted_topic_ids: Vec<Uuid> = self.aborted.keys().map(|(k, _)| k.topic_id).collect();
        let aborted_partitions: Vec<i32> = self.aborted.keys().map(|(k, _)| k.partition).collect();
        let aborted_last: Vec<i64> = self.aborted.values().map(|a| a.last_offset).collect();
        let aborted_producers: Vec<i64> = self.aborted.values().map(|a| a.producer_id).collect();
        let aborted_first: Vec<i64> = self.aborted.values().map(|a| a.first_offset).collect();
        if !aborted_last.is_empty() {
            let st = tx
                .statement(
                    "INSERT INTO aborted_txns (topic_id, partition, last_offset, producer_id,
                         first_offset)
                     SELECT * FROM unnest($1::UUID[], $2::INTEGER[], $3::BIGINT[],
                         $4::BIGINT[], $5::BIGINT[])
                     ON CONFLICT (topic_id, partition, last_offset) DO NOTHING",
                )
                .await?;
            jobs.push((
                st,
                vec![
                    &aborted_topic_ids,
                    &aborted_partitions,
                    &aborted_last,
                    &aborted_producers,
                    &aborted_first,
                ],
                false,
            ));
        }
        for (key, offset) in &self.drop_aborted {
            let st = tx
                .statement(
                    "DELETE FROM aborted_txns
                     WHERE topic_id = $1 AND partition = $2 AND last_offset < $3",
                )
                .await?;
            jobs.push((st, vec![&key.topic_id, &key.partition, offset], false));
        }
        for (transactional_id, state) in &self.txns {
            let st = tx
                .statement(
                    "INSERT INTO transactions (transactional_id, state) VALUES ($1, $2)
                     ON CONFLICT (transactional_id) DO UPDATE SET state = excluded.state",
                )
                .await?;
            jobs.push((st, vec![transactional_id, state], false));
        }
        for transactional_id in &self.delete_txns {
            let st = tx
                .statement("DELETE FROM transactions WHERE transactional_id = $1")
                .await?;
            jobs.push((st, vec![transactional_id], false));
        }
        let mut txn_offset_columns = Vec::with_capacity(self.txn_offsets.len());
        for (group, latest) in &self.txn_offsets {
            let p = latest.values();
            txn_offset_columns.push((
                *group,
                p.clone()
                    .map(|p| p.offset.topic.as_str())
                    .collect::<Vec<_>>(),
                p.clone().map(|p| p.offset.partition).collect::<Vec<_>>(),
                p.clone().map(|p| p.producer_id).collect::<Vec<_>>(),
                p.clone().map(|p| p.offset.offset).collect::<Vec<_>>(),
                p.clone().map(|p| p.offset.leader_epoch).collect::<Vec<_>>(),
                p.clone()
                    .map(|p| p.offset.metadata.as_str())
                    .collect::<Vec<_>>(),
                p.map(|p| p.offset.commit_timestamp_ms).collect::<Vec<_>>(),
            ));
        }
        for (group, topics, partitions, producers, offsets, epochs, metadata, timestamps) in
            &txn_offset_columns
        {
            let st = tx
                .statement(
                    r#"INSERT INTO txn_offsets (group_id, topic, partition, producer_id,
                           "offset", leader_epoch, metadata, commit_timestamp_ms)
                       SELECT $1, k.* FROM unnest($2::TEXT[], $3::INTEGER[], $4::BIGINT[],
                           $5::BIGINT[], $6::INTEGER[], $7::TEXT[], $8::BIGINT[]) AS k
                       ON CONFLICT (group_id, topic, partition, producer_id) DO UPDATE SET
                           "offset" = excluded."offset",
                           leader_epoch = excluded.leader_epoch,
                           metadata = excluded.metadata,
                           commit_timestamp_ms = excluded.commit_timestamp_ms"#,
                )
                .await?;
            jobs.push((
                st,
                vec![
                    group, topics, partitions, producers, offsets, epochs, metadata, timestamps,
                ],
                false,
            ));
        }
        for (group, producer_id, commit) in &self.settles {
            if *commit {
                // Queued before the delete below: the server runs them in this order.
                let st = tx
                    .statement(
                        r#"INSERT INTO group_offsets (group_id, topic, partition, "offset",
                               leader_epoch, metadata, commit_timestamp_ms)
                           SELECT group_id, topic, partition, "offset", leader_epoch,
                               metadata, commit_timestamp_ms
                           FROM txn_offsets WHERE group_id = $1 AND producer_id = $2
                           ON CONFLICT (group_id, topic, partition) DO UPDATE SET
                               "offset" = excluded."offset",
                               leader_epoch = excluded.leader_epoch,
                               metadata = excluded.metadata,
                               commit_timestamp_ms = excluded.commit_timestamp_ms"#,
                    )
                    .await?;
                jobs.push((st, vec![group, producer_id], false));
            }
            let st = tx
                .statement("DELETE FROM txn_offsets WHERE group_id = $1 AND producer_id = $2")
                .await?;
            jobs.push((st, vec![group, producer_id], false));
        }
        let t = &tx.tx;
        let counts =
            futures::future::try_join_all(jobs.iter().map(|(st, params, _)| t.execute(st, params)))
                .await
                .db()?;
        let mut deleted = 0;
        for ((_, _, answers), rows) in jobs.iter().zip(counts) {
            if *answers {
                deleted += count(rows)?;
            }
        }
        Ok(deleted)
    }
}
#[async_trait]
impl MetadataStore for PostgresStore {
    async fn create_topic(&self, topic: &TopicRecord) -> MetaResult<()> {
        let configs = rows::encode_json(&topic.configs, "topic configs")?;
        let mut conn = self.pool.get().await?;
        let mut tx = conn.begin().await?;
        // The insert is the read: a name taken (or being taken) inserts nothing.
        let inserted = tx
            .execute(
                "INSERT INTO topics (name, id, partitions, configs, created_ms)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
                &[
                    &topic.name,
                    &topic.id,
                    &topic.partitions,
                    &configs,
                    &topic.created_ms,
                ],
            )
            .await?;
        let partitions = semantics::create_topic(inserted == 0, topic)?;
        insert_partitions(&mut tx, topic.id, partitions).await?;
        tx.commit().await
    }

    async fn delete_topic(&self, name: &str) -> MetaResult<TopicRecord> {
        let mut conn = self.pool.get().await?;
        let mut tx = conn.begin().await?;
        let topic = semantics::stored_topic(lock_topic(&mut tx, name).await?)?;
        // What stays (write-ahead objects, committed offsets) is `stored_topic`'s rule.
        for sql in [
            "DELETE FROM partitions WHERE topic_id = $1",
            "DELETE FROM epoch_history WHERE topic_id = $1",
            "DELETE FROM segments WHERE topic_id = $1",
            "DELETE FROM wal_ranges WHERE topic_id = $1",
            "DELETE FROM producers WHERE topic_id = $1",
            "DELETE FROM aborted_txns WHERE topic_id = $1",
        ] {
            tx.execute(sql, &[&topic.id]).await?;
        }
        tx.execute("DELETE FROM topics WHERE name = $1", &[&name])
            .await?;
        tx.commit().await?;
        Ok(topic)
    }

    async fn list_topics(&self) -> MetaResult<Vec<TopicRecord>> {
        let mut conn = self.pool.get().await?;
        let found = conn
            .query(
                concat!(
                    "SELECT ",
                    rows::topic_columns!(),
                    " FROM topics ORDER BY name"
                ),
                &[],
            )
            .await?;
        decode_all(&found, rows::topic)
    }

    async fn set_topic_configs(
        &self,
        name: &str,
        configs: &BTreeMap<String, String>,
    ) -> MetaResult<()> {
        let configs = rows::encode_json(configs, "topic configs")?;
        let mut conn = self.pool.get().await?;
        let mut tx = conn.begin().await?;
        semantics::stored_topic(lock_topic(&mut tx, name).await?)?;
        tx.execute(
            "UPDATE topics SET configs = $2 WHERE name = $1",
            &[&name, &configs],
        )
        .await?;
        tx.commit().await
    }

    async fn set_partition_count(&self, name: &str, count: i32) -> MetaResult<()> {
        let mut conn = self.pool.get().await?;
        let mut tx = conn.begin().await?;
        let topic = semantics::stored_topic(lock_topic(&mut tx, name).await?)?;
        let Some(added) = semantics::new_partitions(&topic, count) else {
            return Ok(());
        };
        insert_partitions(&mut tx, topic.id, added).await?;
        tx.execute(
            "UPDATE topics SET partitions = $2 WHERE name = $1",
            &[&name, &count],
        )
        .await?;
        tx.commit().await
    }

    async fn claim_partition(
        &self,
        key: PartitionKey,
        broker_id: i32,
    ) -> MetaResult<PartitionState> {
        let mut conn = self.pool.get().await?;
        let mut tx = conn.begin().await?;
        // Other claimers wait for the row lock until this claim commits.
        let stored = lock_partition(&mut tx, key).await?;
        let claim = semantics::claim(key, stored, broker_id)?;
        store_owner(&mut tx, key, &claim.row).await?;
        let (epoch, start_offset) = claim.history;
        tx.execute(
            "INSERT INTO epoch_history (topic_id, partition, epoch, start_offset)
             VALUES ($1, $2, $3, $4)",
            &[&key.topic_id, &key.partition, &epoch, &start_offset],
        )
        .await?;
        let state = load_partition_state(&mut tx, key, &claim.row).await?;
        tx.commit().await?;
        tracing::debug!(?key, broker_id, leader_epoch = epoch, "claimed partition");
        Ok(state)
    }

    /// A partition that no longer exists (its topic was deleted) is reported as fenced
    /// with the stale ones, as in the SQLite backend.
    async fn commit_wal(&self, commits: &[WalCommit]) -> MetaResult<()> {
        self.fenced(semantics::Op::CommitWal(commits))
            .await
            .map(|_| ())
    }

    async fn commit_segment(
        &self,
        key: PartitionKey,
        leader_epoch: i32,
        segment: &SegmentRecord,
    ) -> MetaResult<()> {
        let op = semantics::Op::CommitSegment {
            key,
            leader_epoch,
            segment,
        };
        self.fenced(op).await.map(|_| ())
    }

    async fn read_partition(&self, key: PartitionKey) -> MetaResult<PartitionState> {
        let mut conn = self.pool.get().await?;
        // One snapshot for the row and the manifest it belongs to (a seal commits a
        // segment and drops the ranges it covers at once; READ COMMITTED could see one
        // without the other).
        let mut tx = conn.begin().await?;
        tx.execute(
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            &[],
        )
        .await?;
        let row = tx
            .query_opt(
                concat!(
                    "SELECT ",
                    rows::partition_columns!(),
                    " FROM partitions WHERE topic_id = $1 AND partition = $2"
                ),
                &[&key.topic_id, &key.partition],
            )
            .await?;
        let (_, stored) = decode_opt(row, rows::partition)?.ok_or(MetaError::PartitionNotFound)?;
        let state = load_partition_state(&mut tx, key, &stored).await?;
        tx.commit().await?;
        Ok(state)
    }

    async fn release_partition(&self, key: PartitionKey, leader_epoch: i32) -> MetaResult<()> {
        let mut conn = self.pool.get().await?;
        let mut tx = conn.begin().await?;
        let stored = lock_partition(&mut tx, key).await?;
        let released = semantics::release(key, stored, leader_epoch)?;
        store_owner(&mut tx, key, &released).await?;
        tx.commit().await
    }

    async fn partition_owners(&self) -> MetaResult<Vec<PartitionOwner>> {
        let mut conn = self.pool.get().await?;
        let found = conn
            .query(
                concat!(
                    "SELECT ",
                    rows::partition_columns!(),
                    " FROM partitions ORDER BY topic_id, partition"
                ),
                &[],
            )
            .await?;
        found
            .iter()
            .map(|row| rows::partition(row).map(|(key, stored)| stored.as_owner(key)))
            .collect()
    }

    async fn trim_log(
        &self,
        key: PartitionKey,
        leader_epoch: i32,
        log_start_offset: i64,
        drop_segment_base_offsets: &[i64],
    ) -> MetaResult<()> {
        let op = semantics::Op::TrimLog {
            key,
            leader_epoch,
            log_start_offset,
            drop_segment_base_offsets,
        };
        self.fenced(op).await.map(|_| ())
    }

    async fn replace_segments(
        &self,
        key: PartitionKey,
        leader_epoch: i32,
        replaced: &[i64],
        segments: &[SegmentRecord],
    ) -> MetaResult<()> {
        let op = semantics::Op::ReplaceSegments {
            key,
            leader_epoch,
            replaced,
            segments,
        };
        self.fenced(op).await.map(|_| ())
    }

    async fn unreferenced_wal_objects(&self) -> MetaResult<Vec<String>> {
        let mut conn = self.pool.get().await?;
        let found = conn
            .query(
                concat!("SELECT ", rows::wal_object_columns!(), " FROM wal_objects"),
                &[],
            )
            .await?;
        let objects = decode_all(&found, rows::wal_object)?;
        Ok(semantics::unreferenced_wal_objects(objects))
    }

    async fn known_objects(&self) -> MetaResult<Vec<String>> {
        let mut conn = self.pool.get().await?;
        let found = conn
            .query(
                "SELECT object_key FROM segments UNION SELECT object_key FROM wal_objects",
                &[],
            )
            .await?;
        decode_all(&found, rows::name)
    }

    async fn heartbeat_broker(&self, broker: &BrokerRecord) -> MetaResult<()> {
        let mut conn = self.pool.get().await?;
        let mut tx = conn.begin().await?;
        register_broker(&mut tx, broker).await?;
        tx.commit().await
    }

    async fn live_brokers(&self, now_ms: i64) -> MetaResult<Vec<BrokerRecord>> {
        let mut conn = self.pool.get().await?;
        let found = conn
            .query(
                concat!(
                    "SELECT ",
                    rows::broker_columns!(),
                    " FROM brokers ORDER BY broker_id"
                ),
                &[],
            )
            .await?;
        let mut live = Vec::with_capacity(found.len());
        for row in &found {
            let broker = rows::broker(row)?;
            if semantics::is_live(&broker, now_ms) {
                live.push(broker);
            }
        }
        Ok(live)
    }

    async fn deregister_broker(&self, broker_id: i32, session: i64) -> MetaResult<()> {
        let mut conn = self.pool.get().await?;
        let mut tx = conn.begin().await?;
        let row = tx.query_opt(LOCK_BROKER, &[&broker_id]).await?;
        let stored = decode_opt(row, rows::broker)?;
        if semantics::deregisters(stored.map(|s| s.session), session) {
            tx.execute("DELETE FROM brokers WHERE broker_id = $1", &[&broker_id])
                .await?;
        }
        tx.commit().await
    }

    async fn forget_wal_objects(&self, keys: &[String]) -> MetaResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut conn = self.pool.get().await?;
        conn.execute(
            "DELETE FROM wal_objects WHERE object_key = ANY($1::TEXT[])",
            &[&keys],
        )
        .await?;
        Ok(())
    }

    async fn next_producer_id(&self) -> MetaResult<i64> {
        let mut conn = self.pool.get().await?;
        let mut tx = conn.begin().await?;
        let id = advance_counter(
            &mut tx,
            &PRODUCER_ID_SQL,
            &PRODUCER_ID_COUNTER,
            semantics::next_producer_id,
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn commit_offsets(
        &self,
        group: &str,
        offsets: &[CommittedOffset],
        fence: Option<Fence>,
    ) -> MetaResult<()> {
        let op = semantics::Op::CommitOffsets {
            group,
            offsets,
            fence,
        };
        self.fenced(op).await.map(|_| ())
    }

    async fn fetch_offsets(&self, group: &str) -> MetaResult<Vec<CommittedOffset>> {
        let mut conn = self.pool.get().await?;
        let found = conn
            .query(
                concat!(
                    "SELECT ",
                    rows::offset_columns!(),
                    " FROM group_offsets WHERE group_id = $1 ORDER BY topic, partition"
                ),
                &[&group],
            )
            .await?;
        decode_all(&found, rows::offset)
    }

    async fn delete_offsets(
        &self,
        group: &str,
        partitions: Option<&[(String, i32)]>,
        fence: Option<Fence>,
    ) -> MetaResult<usize> {
        let op = semantics::Op::DeleteOffsets {
            group,
            partitions,
            fence,
        };
        self.fenced(op).await
    }

    async fn offset_groups(&self) -> MetaResult<Vec<String>> {
        let mut conn = self.pool.get().await?;
        let found = conn
            .query(
                "SELECT DISTINCT group_id FROM group_offsets ORDER BY group_id",
                &[],
            )
            .await?;
        decode_all(&found, rows::name)
    }

    async fn expire_offsets(
        &self,
        groups: &[String],
        before_ms: i64,
        fence: Option<Fence>,
    ) -> MetaResult<usize> {
        let op = semantics::Op::ExpireOffsets {
            groups,
            before_ms,
            fence,
        };
        self.fenced(op).await
    }

    async fn put_txn(&self, record: &TxnRecord, fence: Fence) -> MetaResult<()> {
        self.fenced(semantics::Op::PutTxn { record, fence })
            .await
            .map(|_| ())
    }

    async fn delete_txn(&self, transactional_id: &str, fence: Fence) -> MetaResult<()> {
        let op = semantics::Op::DeleteTxn {
            transactional_id,
            fence,
        };
        self.fenced(op).await.map(|_| ())
    }

    async fn list_txns(&self) -> MetaResult<Vec<TxnRecord>> {
        let mut conn = self.pool.get().await?;
        let found = conn
            .query(
                concat!(
                    "SELECT ",
                    rows::txn_columns!(),
                    " FROM transactions ORDER BY transactional_id"
                ),
                &[],
            )
            .await?;
        decode_all(&found, rows::txn)
    }

    async fn commit_txn_offsets(
        &self,
        group: &str,
        offsets: &[TxnOffsetRecord],
        fence: Option<Fence>,
    ) -> MetaResult<()> {
        let op = semantics::Op::CommitTxnOffsets {
            group,
            offsets,
            fence,
        };
        self.fenced(op).await.map(|_| ())
    }

    async fn pending_txn_offsets(&self, group: &str) -> MetaResult<Vec<TxnOffsetRecord>> {
        let mut conn = self.pool.get().await?;
        let found = conn
            .query(
                concat!(
                    "SELECT ",
                    rows::txn_offset_columns!(),
                    " FROM txn_offsets WHERE group_id = $1 ORDER BY topic, partition, producer_id"
                ),
                &[&group],
            )
            .await?;
        decode_all(&found, rows::txn_offset)
    }

    async fn start_broker_session(&self, broker_id: i32) -> MetaResult<i64> {
        let mut conn = self.pool.get().await?;
        let mut tx = conn.begin().await?;
        let session =
            advance_counter(&mut tx, &SESSION_SQL, &broker_id, semantics::next_session).await?;
        tx.commit().await?;
        Ok(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::conformance::{self, metadata_store_conformance};
    use crate::metadata::rows::encode_json;
    use crate::metadata::{
        PartitionCommit, ProducerBatch, ProducerStateRecord, TxnState, WalRangeRecord,
    };

    /// Set to a database URL (see `tests/postgres.sh`) to run these tests.
    const URL_ENV: &str = "STRATA_TEST_POSTGRES_URL";
    /// Set (by `tests/run`) when PostgreSQL is expected: a missing URL then fails the
    /// tests instead of skipping them.
    const REQUIRED_ENV: &str = "STRATA_TEST_POSTGRES_REQUIRED";

    /// The test database's configuration, or `None` (test skipped) when unset and not
    /// required.
    fn test_config() -> Option<Config> {
        let Ok(url) = std::env::var(URL_ENV) else {
            assert!(
                std::env::var_os(REQUIRED_ENV).is_none(),
                "PostgreSQL is required ({REQUIRED_ENV} is set) but {URL_ENV} is not"
            );
            eprintln!(
                "skipping PostgreSQL metadata test: {URL_ENV} is not set \
                 (eval \"$(tests/postgres.sh)\" starts a throwaway server)"
            );
            return None;
        };
        Some(
            url.parse()
                .expect("STRATA_TEST_POSTGRES_URL is a postgres URL"),
        )
    }

    /// A client of the test database outside any store, for set-up and inspection.
    async fn raw(config: &Config) -> Client {
        let (client, connection) = config.connect(NoTls).await.expect("connect");
        tokio::spawn(connection);
        client
    }

    /// A fresh, empty schema of the test database and a configuration whose connections
    /// use it (each test sees an empty "database" of its own).
    async fn fresh_schema() -> Option<(Config, String)> {
        let mut config = test_config()?;
        let schema = format!("strata_test_{}", crate::clock::unique_id().simple());
        raw(&config)
            .await
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .expect("create schema");
        config.options(format!("-c search_path={schema}"));
        Some((config, schema))
    }

    /// A store on a fresh schema, or `None` when PostgreSQL is not configured.
    async fn fresh_store() -> Option<PostgresStore> {
        let (config, _) = fresh_schema().await?;
        Some(
            PostgresStore::connect_with(config)
                .await
                .expect("connect store"),
        )
    }

    metadata_store_conformance!(match fresh_store().await {
        Some(store) => store,
        None => return,
    });

    async fn schema_versions(config: &Config) -> Vec<i64> {
        raw(config)
            .await
            .query("SELECT version FROM schema_version ORDER BY version", &[])
            .await
            .expect("versions")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    #[tokio::test]
    async fn conformance_suite_on_one_shared_store() {
        let Some(store) = fresh_store().await else {
            return;
        };
        conformance::run_all(&store).await;
        // And once more on the same, now well-filled schema.
        conformance::run_all(&store).await;
    }

    #[tokio::test]
    async fn connect_via_url_and_open() {
        let Some(config) = test_config() else {
            return;
        };
        drop(config);
        let url = std::env::var(URL_ENV).expect("set");
        let objects = std::sync::Arc::new(
            tiering::Store::open("memory://", &tiering::StoreOptions::default())
                .expect("memory store"),
        );
        let store =
            crate::metadata::open(&url, &objects, std::time::Duration::from_secs(30), 16, true)
                .await
                .expect("open by url");
        store.list_topics().await.expect("list");
    }

    #[tokio::test]
    async fn connect_creates_the_schema_once_at_the_current_version() {
        let Some((config, _)) = fresh_schema().await else {
            return;
        };
        let store = PostgresStore::connect_with(config.clone())
            .await
            .expect("connect");
        assert_eq!(schema_versions(&config).await, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(SCHEMA_VERSION, 6);
        drop(store);
        PostgresStore::connect_with(config.clone())
            .await
            .expect("reconnect");
        assert_eq!(schema_versions(&config).await, vec![1, 2, 3, 4, 5, 6]);
    }

    #[tokio::test]
    async fn brokers_starting_together_do_not_race_on_the_schema() {
        let Some((config, _)) = fresh_schema().await else {
            return;
        };
        let connects = (0..8).map(|_| {
            let config = config.clone();
            tokio::spawn(async move { PostgresStore::connect_with(config).await })
        });
        for handle in connects.collect::<Vec<_>>() {
            handle
                .await
                .expect("task")
                .expect("every concurrent connect succeeds");
        }
        assert_eq!(schema_versions(&config).await, vec![1, 2, 3, 4, 5, 6]);
    }

    #[tokio::test]
    async fn migrates_a_version_1_schema_to_the_current_version() {
        let Some((config, _)) = fresh_schema().await else {
            return;
        };
        let topic = TopicRecord {
            name: "orders".to_owned(),
            id: crate::clock::unique_id(),
            partitions: 2,
            configs: BTreeMap::from([("retention.ms".to_owned(), "1000".to_owned())]),
            created_ms: 42,
        };
        {
            let mut client = raw(&config).await;
            let tx = client.transaction().await.expect("begin");
            tx.batch_execute("CREATE TABLE schema_version (version BIGINT NOT NULL PRIMARY KEY)")
                .await
                .expect("version table");
            tx.batch_execute(SCHEMA_V1).await.expect("v1");
            tx.batch_execute("INSERT INTO schema_version VALUES (1)")
                .await
                .expect("version row");
            tx.execute(
                "INSERT INTO topics (name, id, partitions, configs, created_ms)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &topic.name,
                    &topic.id,
                    &topic.partitions,
                    &encode_json(&topic.configs, "configs").expect("json"),
                    &topic.created_ms,
                ],
            )
            .await
            .expect("topic");
            let new = semantics::PartitionRow::NEW;
            tx.execute(
                INSERT_PARTITIONS,
                &[
                    &topic.id,
                    &0_i32,
                    &topic.partitions,
                    &new.leader_epoch,
                    &new.log_start_offset,
                    &new.high_watermark,
                    &new.owner,
                ],
            )
            .await
            .expect("partitions");
            tx.commit().await.expect("commit");
        }
        let store = PostgresStore::connect_with(config.clone())
            .await
            .expect("migrate");
        assert_eq!(schema_versions(&config).await, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(
            store.list_topics().await.expect("list"),
            vec![topic.clone()]
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
        let offsets = vec![CommittedOffset {
            topic: "orders".to_owned(),
            partition: 0,
            offset: 17,
            leader_epoch: 1,
            metadata: "m".to_owned(),
            commit_timestamp_ms: 1,
        }];
        store
            .commit_offsets("g", &offsets, None)
            .await
            .expect("commit");
        assert_eq!(store.fetch_offsets("g").await.expect("fetch"), offsets);
    }

    #[tokio::test]
    async fn refuses_a_newer_schema() {
        let Some((config, _)) = fresh_schema().await else {
            return;
        };
        drop(
            PostgresStore::connect_with(config.clone())
                .await
                .expect("connect"),
        );
        raw(&config)
            .await
            .execute(
                "INSERT INTO schema_version (version) VALUES ($1)",
                &[&(SCHEMA_VERSION + 1)],
            )
            .await
            .expect("pretend a newer broker migrated");
        match PostgresStore::connect_with(config).await {
            Err(MetaError::Unavailable(msg)) => assert!(msg.contains("upgrade"), "{msg}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn counters_start_at_documented_values() {
        let Some(store) = fresh_store().await else {
            return;
        };
        assert_eq!(store.next_producer_id().await.expect("id"), 1000);
        assert_eq!(store.next_producer_id().await.expect("id"), 1001);
        assert_eq!(store.start_broker_session(3).await.expect("session"), 1);
        assert_eq!(store.start_broker_session(3).await.expect("session"), 2);
        assert_eq!(store.start_broker_session(4).await.expect("session"), 1);
    }

    /// Two brokers (two stores, two pools) allocating at once never share a value.
    #[tokio::test]
    async fn counters_are_atomic_across_brokers() {
        let Some((config, _)) = fresh_schema().await else {
            return;
        };
        let a = PostgresStore::connect_with(config.clone())
            .await
            .expect("a");
        let b = PostgresStore::connect_with(config).await.expect("b");
        let run = async |store: &PostgresStore| {
            let mut ids = Vec::new();
            let mut sessions = Vec::new();
            for _ in 0..50 {
                ids.push(store.next_producer_id().await.expect("id"));
                sessions.push(store.start_broker_session(7).await.expect("session"));
            }
            (ids, sessions)
        };
        let ((ia, sa), (ib, sb), (ic, sc)) = tokio::join!(run(&a), run(&b), run(&a));
        let mut ids = [ia, ib, ic].concat();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 150);
        assert_eq!(ids.first(), Some(&1000));
        let mut sessions = [sa, sb, sc].concat();
        sessions.sort_unstable();
        assert_eq!(sessions, (1..=150).collect::<Vec<i64>>());
    }

    /// Concurrent claimers on two brokers each get their own epoch, and every claim is
    /// in the history.
    #[tokio::test]
    async fn concurrent_claims_are_serialised() {
        let Some((config, _)) = fresh_schema().await else {
            return;
        };
        let a = PostgresStore::connect_with(config.clone())
            .await
            .expect("a");
        let b = PostgresStore::connect_with(config).await.expect("b");
        let topic = TopicRecord {
            name: "claimed".to_owned(),
            id: crate::clock::unique_id(),
            partitions: 1,
            configs: BTreeMap::new(),
            created_ms: 0,
        };
        a.create_topic(&topic).await.expect("create");
        let key = PartitionKey {
            topic_id: topic.id,
            partition: 0,
        };
        let claims = async |store: &PostgresStore, broker: i32| {
            let mut epochs = Vec::new();
            for _ in 0..10 {
                epochs.push(
                    store
                        .claim_partition(key, broker)
                        .await
                        .expect("claim")
                        .leader_epoch,
                );
            }
            epochs
        };
        let (ea, eb, ec, ed) =
            tokio::join!(claims(&a, 1), claims(&b, 2), claims(&a, 3), claims(&b, 4));
        let mut epochs = [ea, eb, ec, ed].concat();
        epochs.sort_unstable();
        assert_eq!(epochs, (1..=40).collect::<Vec<i32>>());
        let state = a.claim_partition(key, 5).await.expect("claim");
        assert_eq!(state.leader_epoch, 41);
        assert_eq!(
            state.epoch_history,
            (1..=41).map(|e| (e, 0)).collect::<Vec<_>>()
        );
    }

    /// A commit racing a claim either lands before it (and is in the claimed state) or
    /// is fenced: never half applied, never applied after the claim.
    #[tokio::test]
    async fn commits_racing_a_claim_are_applied_whole_or_fenced() {
        let Some((config, _)) = fresh_schema().await else {
            return;
        };
        let old = PostgresStore::connect_with(config.clone())
            .await
            .expect("old owner");
        let new = PostgresStore::connect_with(config)
            .await
            .expect("new owner");
        let topic = TopicRecord {
            name: "raced".to_owned(),
            id: crate::clock::unique_id(),
            partitions: 4,
            configs: BTreeMap::new(),
            created_ms: 0,
        };
        old.create_topic(&topic).await.expect("create");
        let keys: Vec<PartitionKey> = (0..4)
            .map(|partition| PartitionKey {
                topic_id: topic.id,
                partition,
            })
            .collect();
        let mut epochs = Vec::new();
        for &key in &keys {
            epochs.push(
                old.claim_partition(key, 1)
                    .await
                    .expect("claim")
                    .leader_epoch,
            );
        }
        let committer = async {
            let mut acknowledged = 0_i64;
            for round in 0..200_i64 {
                let object_key = format!("wal-{round}");
                let commit = WalCommit {
                    object_key: object_key.clone(),
                    created_ms: round,
                    partitions: keys
                        .iter()
                        .zip(&epochs)
                        .map(|(&key, &leader_epoch)| PartitionCommit {
                            key,
                            leader_epoch,
                            range: WalRangeRecord {
                                base_offset: round,
                                end_offset: round + 1,
                                object_key: object_key.clone(),
                                position: 0,
                                len: 1,
                                max_timestamp: round,
                                object_size: 1 << 20,
                            },
                            producers: vec![],
                            aborted: vec![],
                        })
                        .collect(),
                };
                match old.commit_wal(std::slice::from_ref(&commit)).await {
                    Ok(()) => acknowledged = round + 1,
                    Err(MetaError::Fenced(_)) => break,
                    Err(e) => panic!("unexpected {e:?}"),
                }
            }
            acknowledged
        };
        let claimer = async {
            crate::clock::sleep(Duration::from_millis(20)).await;
            new.claim_partition(keys[2], 2).await.expect("take over")
        };
        let (acknowledged, claimed) = tokio::join!(committer, claimer);
        assert!(acknowledged < 200, "the claim fenced the running commits");
        assert_eq!(
            claimed.high_watermark, acknowledged,
            "the new owner sees exactly the acknowledged commits"
        );
        for &key in &keys {
            let state = new.claim_partition(key, 2).await.expect("claim");
            assert_eq!(
                state.high_watermark, acknowledged,
                "{key:?} whole commits only"
            );
        }
    }

    #[tokio::test]
    async fn state_survives_reconnecting() {
        let Some((config, _)) = fresh_schema().await else {
            return;
        };
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
        let range = |base: i64, end: i64, object: &str| WalRangeRecord {
            base_offset: base,
            end_offset: end,
            object_key: object.to_owned(),
            position: 0,
            len: 64,
            max_timestamp: 7,
            object_size: 1 << 20,
        };
        let aborted = AbortedTxnRecord {
            producer_id: 1000,
            first_offset: 12,
            last_offset: 15,
        };
        let txn = TxnRecord {
            transactional_id: "tx-1".to_owned(),
            producer_id: 1000,
            producer_epoch: 3,
            last_producer_epoch: 2,
            timeout_ms: 60_000,
            state: TxnState::Ongoing,
            partitions: vec![("orders".to_owned(), 1)],
            groups: vec!["g".to_owned()],
            start_ms: 5,
            updated_ms: 6,
        };
        let pending = TxnOffsetRecord {
            producer_id: 1000,
            offset: CommittedOffset {
                topic: "orders".to_owned(),
                partition: 1,
                offset: 17,
                leader_epoch: 1,
                metadata: "m".to_owned(),
                commit_timestamp_ms: 4,
            },
        };
        {
            let store = PostgresStore::connect_with(config.clone())
                .await
                .expect("connect");
            store.create_topic(&topic).await.expect("create");
            let epoch = store
                .claim_partition(key, 1)
                .await
                .expect("claim")
                .leader_epoch;
            for (object, base, end) in [("wal-a", 0, 10), ("wal-b", 10, 20)] {
                store
                    .commit_wal(&[WalCommit {
                        object_key: object.to_owned(),
                        created_ms: 3,
                        partitions: vec![PartitionCommit {
                            key,
                            leader_epoch: epoch,
                            range: range(base, end, object),
                            producers: vec![producer.clone()],
                            aborted: if base == 10 { vec![aborted] } else { vec![] },
                        }],
                    }])
                    .await
                    .expect("commit");
            }
            store
                .commit_segment(key, epoch, &segment)
                .await
                .expect("segment");
            store.trim_log(key, epoch, 3, &[]).await.expect("trim");
            let fence = Fence {
                key,
                leader_epoch: epoch,
            };
            store.put_txn(&txn, fence).await.expect("put txn");
            store
                .commit_txn_offsets("g", std::slice::from_ref(&pending), Some(fence))
                .await
                .expect("txn offsets");
        }
        let store = PostgresStore::connect_with(config.clone())
            .await
            .expect("reconnect");
        let state = store.claim_partition(key, 2).await.expect("claim again");
        assert_eq!(
            state,
            PartitionState {
                leader_epoch: 2,
                log_start_offset: 3,
                high_watermark: 20,
                segments: vec![segment],
                wal_ranges: vec![range(10, 20, "wal-b")],
                producers: vec![producer.clone()],
                epoch_history: vec![(1, 0), (2, 20)],
                aborted: vec![aborted],
            }
        );
        assert_eq!(store.list_txns().await.expect("txns"), vec![txn.clone()]);
        assert_eq!(
            store.pending_txn_offsets("g").await.expect("pending"),
            vec![pending]
        );
        let stored: String = raw(&config)
            .await
            .query_one("SELECT state FROM transactions", &[])
            .await
            .expect("txn state")
            .get(0);
        assert_eq!(stored, encode_json(&txn, "txn").expect("json"));
        // The stored JSON is byte for byte the SQLite backend's.
        let stored: String = raw(&config)
            .await
            .query_one("SELECT state FROM producers", &[])
            .await
            .expect("state")
            .get(0);
        assert_eq!(stored, encode_json(&producer, "producer").expect("json"));
        assert_eq!(
            store.unreferenced_wal_objects().await.expect("garbage"),
            vec!["wal-a".to_owned()]
        );
    }

    #[tokio::test]
    async fn undecodable_rows_are_corrupt() {
        let Some((config, _)) = fresh_schema().await else {
            return;
        };
        let store = PostgresStore::connect_with(config.clone())
            .await
            .expect("connect");
        let topic = TopicRecord {
            name: "t".to_owned(),
            id: crate::clock::unique_id(),
            partitions: 2,
            configs: BTreeMap::new(),
            created_ms: 0,
        };
        store.create_topic(&topic).await.expect("create");
        let client = raw(&config).await;
        client
            .execute(
                "INSERT INTO producers (topic_id, partition, producer_id, state)
                 VALUES ($1, 0, 5, 'not json')",
                &[&topic.id],
            )
            .await
            .expect("broken producer row");
        client
            .execute(
                "INSERT INTO segments VALUES ($1, 1, 0, 10, 'k', -1, 0, 0, 0)",
                &[&topic.id],
            )
            .await
            .expect("negative size");
        for partition in [0, 1] {
            let key = PartitionKey {
                topic_id: topic.id,
                partition,
            };
            let result = store.claim_partition(key, 1).await;
            assert!(matches!(result, Err(MetaError::Corrupt(_))), "{result:?}");
        }
        client
            .execute("UPDATE topics SET configs = '[1]'", &[])
            .await
            .expect("broken configs");
        let result = store.list_topics().await;
        assert!(matches!(result, Err(MetaError::Corrupt(_))), "{result:?}");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable() {
        // A loopback port nobody listens on (bound, then released).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let result =
            PostgresStore::connect(&format!("postgres://postgres@127.0.0.1:{port}/x")).await;
        assert!(
            matches!(result, Err(MetaError::Unavailable(_))),
            "{result:?}"
        );
        let result = PostgresStore::connect("not a url").await;
        assert!(
            matches!(result, Err(MetaError::Unavailable(_))),
            "{result:?}"
        );
    }

    /// A server that drops the store's connections: operations fail as `Unavailable`
    /// (retriable) and the pool replaces the dead connections.
    #[tokio::test]
    async fn dropped_connections_are_unavailable_then_replaced() {
        let Some((mut config, schema)) = fresh_schema().await else {
            return;
        };
        // Only this store's connections are terminated, not other tests'.
        config.application_name(&schema);
        let store = PostgresStore::connect_with(config.clone())
            .await
            .expect("connect");
        store.list_topics().await.expect("list");
        let terminated: i64 = raw(&config)
            .await
            .query_one(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = $1 AND pid <> pg_backend_pid()) AS t",
                &[&schema],
            )
            .await
            .expect("terminate")
            .get(0);
        assert!(terminated >= 1, "the store had an open connection");
        let mut results = Vec::new();
        for _ in 0..3 {
            let result = store.list_topics().await;
            let ok = result.is_ok();
            results.push(result);
            if ok {
                break;
            }
            crate::clock::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Ok(_) | Err(MetaError::Unavailable(_)))),
            "{results:?}"
        );
        assert!(
            results.last().is_some_and(Result::is_ok),
            "a new connection replaces the dead one: {results:?}"
        );
    }
}
