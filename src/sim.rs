//! The seeded deterministic simulation of one broker's write path and segment
//! lifecycle.
//!
//! It runs the engine's state machines exactly as the broker does (the partition
//! owners' [`Appender`] and [`Segments`], the flusher's [`FlushCore`]) against the real
//! write-ahead and segment object formats, the real object-store client over an
//! in-memory bucket, and the real metadata store kept in that bucket (`bucket://`).
//! One seeded random number generator decides everything else, one step at a time:
//! which producer sends next, how much time passes, which object write finishes
//! first, which requests fail (before or after they landed), when the cache disk fills
//! up, when a segment upload ends, when retention, DeleteRecords and write-ahead
//! garbage collection run, when an owner plans a compaction pass and when the pass
//! (the real job over the real objects) ends and is swapped in (the topic is
//! `cleanup.policy=compact,delete`: producers write a few keys over and over, with
//! tombstones), when the broker crashes (losing everything in memory, its local files
//! included) and restarts from the bucket. Idempotent producers retry what was not
//! acknowledged, as Kafka clients do, five requests in flight at most. They write in
//! transactions: a run of requests, then (once all are acknowledged, as a client
//! commits only after flushing) the coordinator's commit or abort marker, written by the
//! owner like any batch and retried until it is acknowledged; the next transaction
//! starts after that. Former
//! incarnations keep writing, committing, uploading, compacting and collecting
//! (zombies).
//!
//! After every restart and at the end it checks the durability contract of the design,
//! read back from the bucket: the committed manifest of a partition (segments, then
//! write-ahead ranges) runs from at or below its log start offset to its high
//! watermark without a gap or an overlap, every object it references is still there
//! (objects are never written twice under one name, so none was deleted), batches
//! follow each other without gaps except inside compacted segments, every record in it
//! is the one acknowledged at its offset, every acknowledged record is in it unless
//! retention or DeleteRecords trimmed below it or compaction removed it for a newer
//! committed record of its key (or as a tombstone, or as aborted data), no producer
//! batch is in it twice, no former owner ever committed a segment or a compaction pass,
//! and once the stores answer again every request is acknowledged. For transactions:
//! the stored aborted ranges cover exactly the records of the aborted transactions
//! still in the log (so a `read_committed` reader sees every committed record and no
//! aborted one), and once every marker is acknowledged no transaction is open (the last
//! stable offset is the high watermark). A failure names its seed; `STRATA_SIM_SEED=<seed>` replays exactly
//! that run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::path::Path;
use tiering::faults::{FaultyStore, PutFault};

use crate::config::{CleanupPolicy, TopicConfig};
use crate::log::appender::{Appended, Appender};
use crate::log::batch::{self, BatchHeader, ValidBatch};
use crate::log::compact::filter::is_aborted;
use crate::log::compact::job::{Compacted, Job};
use crate::log::compact::plan::Plan;
use crate::log::compact::swap::{self, Swap};
use crate::log::compact::throttle::Throttle;
use crate::log::marker::Marker;
use crate::log::producer::ProducerTable;
use crate::log::records;
use crate::log::segments::{
    AfterUpload, DeleteTo, Manifest, PlainFile, SegmentRules, Segments, Trim, UploadFrom,
    UploadOutcome,
};
use crate::metadata::bucket::BucketStore;
use crate::metadata::{
    AbortedTxnRecord, MetaError, MetadataStore, PartitionKey, SegmentRecord, TopicRecord,
};
use crate::wal::core::{CommitResult, FlushCore, FlushItem, FlushRules, Written};
use crate::wal::FlushNotice;

const PARTITIONS: usize = 2;
/// Requests a producer keeps in flight (Kafka's idempotent maximum).
const IN_FLIGHT: usize = 5;
const BROKER: i32 = 1;
/// Small segments and a small retention, so a run seals, uploads and trims many times.
const SEGMENT_BYTES: u64 = 400;
const SEGMENT_MS: i64 = 30;
const RETENTION_BYTES: i64 = 2500;
const INDEX_INTERVAL_BYTES: u64 = 256;
/// The keys producers write (few, so passes find much to remove); every record whose
/// number is 3 modulo 7 is a tombstone.
const KEYS: i32 = 5;
/// How long a tombstone a pass kept stays (`delete.retention.ms`).
const DELETE_RETENTION_MS: i64 = 20;
/// The simulated wall clock starts here, past the batches' timestamps, so a sealed
/// segment is at once past `min.compaction.lag.ms`.
const CLOCK_START_MS: i64 = 10_000;

/// A bug the simulation must find (tests only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bug {
    None,
    /// Owners told a flush is durable before its commit.
    AckBeforeCommit,
    /// An upload from the write-ahead objects skips the first range of its stretch.
    SkipARange,
    /// A compaction swap that failed is taken for refused, without asking the store
    /// whether it applied: what the pass wrote is deleted.
    TrustFailedSwap,
    /// Compaction does not know the aborted transactions: an aborted record supersedes
    /// its key's committed value.
    CompactionIgnoresAborts,
}

/// splitmix64: small, seedable, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One request of an idempotent producer: one batch.
#[derive(Debug, Clone)]
struct Request {
    seq: i32,
    records: i32,
    /// The offset it was acknowledged with.
    acked: Option<i64>,
    /// Sent and not answered yet.
    in_flight: bool,
}

/// Where a transaction's marker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkerState {
    /// Not sent (the transaction is still open, or a send failed).
    Pending,
    InFlight,
    Acked,
}

/// One transaction of a producer: its requests (indices) and how it ends.
#[derive(Debug, Clone)]
struct Txn {
    first: usize,
    /// Requests it takes before it ends.
    size: usize,
    commit: bool,
    marker: MarkerState,
}

#[derive(Debug, Default)]
struct Producer {
    requests: Vec<Request>,
    next_seq: i32,
    txns: Vec<Txn>,
}

impl Producer {
    fn pid(p: usize) -> i64 {
        5000 + p as i64
    }

    /// The transaction a new request joins: the last one, while it takes more; `None`
    /// when a new one may start (the last one ended and its marker is acknowledged);
    /// `Err` when none may (its marker is not).
    fn open_txn(&self) -> Result<Option<usize>, ()> {
        match self.txns.last() {
            None => Ok(None),
            Some(t) if self.requests.len() - t.first < t.size => Ok(Some(self.txns.len() - 1)),
            Some(t) if t.marker == MarkerState::Acked => Ok(None),
            Some(_) => Err(()),
        }
    }

    /// The transaction whose marker is due: ended (or `closing`: the run is settling
    /// and no request will join it), every request acknowledged, its marker not sent.
    fn marker_due(&self, closing: bool) -> Option<usize> {
        let i = self.txns.len().checked_sub(1)?;
        let t = &self.txns[i];
        let ended = closing || self.requests.len() - t.first >= t.size;
        let all_acked = self.requests[t.first..].iter().all(|r| r.acked.is_some());
        (ended && all_acked && t.marker == MarkerState::Pending).then_some(i)
    }

    /// The oldest request to send: the first neither acknowledged nor in flight, if it
    /// is within the in-flight window of the oldest unacknowledged one.
    fn next_to_send(&self) -> Option<usize> {
        let oldest = self.requests.iter().position(|r| r.acked.is_none())?;
        let i = self
            .requests
            .iter()
            .position(|r| r.acked.is_none() && !r.in_flight)?;
        (i < oldest + IN_FLIGHT).then_some(i)
    }
}

/// A partition owner as the broker runs it, minus the I/O.
struct Owner {
    writes: Appender<usize>,
    segments: Segments<LocalFileSim>,
    leader_epoch: i32,
    /// A failed flush may have applied, or a newer epoch fenced it: it must be claimed
    /// again before it takes writes.
    fenced: bool,
    /// The segment upload in flight.
    upload: Option<UploadJob>,
    /// The compaction pass planned and not yet finished.
    compaction: Option<Pass>,
    /// The earliest delete horizon of the tombstones the last pass kept.
    horizon: Option<i64>,
    /// The partition's aborted transactions, as committed.
    aborted: Vec<AbortedTxnRecord>,
}

/// A compaction pass an owner planned at its epoch; a later step runs it to its swap.
struct Pass {
    plan: Plan,
    epoch: i32,
    /// The owner's aborted transactions when it planned the pass.
    aborted: Vec<AbortedTxnRecord>,
}

/// A local segment file: the committed batches it holds (lost in a crash).
type LocalFileSim = PlainFile<Vec<Bytes>>;

/// A segment upload the owner started: `[base, end)` from these bytes or ranges.
struct UploadJob {
    base: i64,
    end: i64,
    epoch: i32,
    from: Source,
}

enum Source {
    Local(Vec<Bytes>),
    WriteAhead(Vec<crate::metadata::WalRangeRecord>),
}

/// The parts lost in a crash.
struct Broker {
    meta: Arc<dyn MetadataStore>,
    session: i64,
    core: FlushCore<usize>,
    owners: Vec<Owner>,
    writing: Vec<(u64, Vec<tiering::wal::WalChunk>)>,
    committing: Option<crate::wal::core::NextCommit>,
    /// Uploads of owners since replaced (a reclaim stops the owner, not its upload):
    /// (partition, job). They may still finish; their epoch must keep them out.
    stray_uploads: Vec<(usize, UploadJob)>,
    /// Compaction passes of owners since replaced, likewise.
    stray_passes: Vec<(usize, Pass)>,
}

struct Sim {
    seed: u64,
    rng: Rng,
    rt: tokio::runtime::Runtime,
    bucket: Arc<FaultyStore>,
    store: Arc<tiering::Store>,
    topic: uuid::Uuid,
    producers: Vec<Producer>,
    broker: Broker,
    /// A former incarnation that did not die (paused, cut off) and still finishes its
    /// writes and commits: the epoch fence must keep it from committing or answering.
    zombie: Option<Broker>,
    now: Instant,
    /// Where the simulated wall clock starts (milliseconds are counted from here).
    start: Instant,
    /// Whether faults are injected (off while the run settles at the end).
    faults: bool,
    /// The cache disk refuses writes.
    disk_full: bool,
    bug: Bug,
    stats: Stats,
}

/// What a run went through, so a test can tell a run that exercised nothing.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    acked: u64,
    crashes: u64,
    commits: u64,
    failed_commits: u64,
    failed_writes: u64,
    reclaims: u64,
    zombie_steps: u64,
    segments: u64,
    failed_uploads: u64,
    trims: u64,
    collected: u64,
    compactions: u64,
    refused_swaps: u64,
    commits_txn: u64,
    aborts_txn: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.acked += o.acked;
        self.crashes += o.crashes;
        self.commits += o.commits;
        self.failed_commits += o.failed_commits;
        self.failed_writes += o.failed_writes;
        self.reclaims += o.reclaims;
        self.zombie_steps += o.zombie_steps;
        self.segments += o.segments;
        self.failed_uploads += o.failed_uploads;
        self.trims += o.trims;
        self.collected += o.collected;
        self.compactions += o.compactions;
        self.refused_swaps += o.refused_swaps;
        self.commits_txn += o.commits_txn;
        self.aborts_txn += o.aborts_txn;
    }
}

fn key(topic: uuid::Uuid, p: usize) -> PartitionKey {
    PartitionKey {
        topic_id: topic,
        partition: p as i32,
    }
}

fn stream(topic: uuid::Uuid, p: usize) -> Arc<str> {
    Arc::from(format!("{topic}/{p}"))
}

impl Sim {
    fn new(seed: u64, bug: Bug) -> Result<Sim, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let bucket = Arc::new(FaultyStore::new());
        let store = Arc::new(tiering::Store::new(
            bucket.clone(),
            "sim".into(),
            &tiering::StoreOptions::default(),
        ));
        let topic = uuid::Uuid::from_u64_pair(seed, 1);
        let meta: Arc<dyn MetadataStore> = Arc::new(
            rt.block_on(BucketStore::open(store.clone()))
                .map_err(|e| e.to_string())?,
        );
        rt.block_on(meta.create_topic(&TopicRecord {
            name: "sim".into(),
            id: topic,
            partitions: PARTITIONS as i32,
            configs: Default::default(),
            created_ms: 0,
        }))
        .map_err(|e| e.to_string())?;
        let now = crate::clock::instant();
        let mut sim = Sim {
            seed,
            rng: Rng(seed),
            rt,
            bucket,
            store,
            topic,
            producers: (0..PARTITIONS).map(|_| Producer::default()).collect(),
            broker: Broker::placeholder(meta.clone()),
            zombie: None,
            now,
            start: now,
            faults: true,
            disk_full: false,
            bug,
            stats: Stats::default(),
        };
        sim.broker = sim.boot(meta)?;
        Ok(sim)
    }

    fn now_ms(&self) -> i64 {
        CLOCK_START_MS + self.now.duration_since(self.start).as_millis() as i64
    }

    /// The topic's compaction settings (`cleanup.policy=compact,delete`).
    fn compaction_config() -> TopicConfig {
        TopicConfig {
            cleanup: CleanupPolicy {
                delete: true,
                compact: true,
            },
            min_cleanable_dirty_ratio: 0.2,
            min_compaction_lag_ms: 0,
            max_compaction_lag_ms: i64::MAX,
            delete_retention_ms: DELETE_RETENTION_MS,
            ..TopicConfig::resolve(&Default::default(), &Default::default())
        }
    }

    fn rules(&self) -> SegmentRules {
        let mut rules = SegmentRules::new(SEGMENT_BYTES, SEGMENT_MS, -1, RETENTION_BYTES);
        rules.skip_a_range = self.bug == Bug::SkipARange;
        rules
    }

    /// Starts the broker: a new session, every partition claimed from the metadata.
    fn boot(&self, meta: Arc<dyn MetadataStore>) -> Result<Broker, String> {
        let session = self
            .rt
            .block_on(meta.start_broker_session(BROKER))
            .map_err(|e| e.to_string())?;
        // Flush starts spaced by the rate bound on odd sessions, unbounded on even ones.
        let min_gap = Duration::from_millis(if session % 2 == 1 { 3 } else { 0 });
        let mut rules = FlushRules::new(
            Duration::from_millis(5),
            min_gap,
            4096,
            Duration::from_millis(40),
            3,
        );
        rules.ack_before_commit = self.bug == Bug::AckBeforeCommit;
        let mut owners = Vec::new();
        for p in 0..PARTITIONS {
            owners.push(self.claim(meta.as_ref(), p)?);
        }
        Ok(Broker {
            meta,
            session,
            core: FlushCore::new(rules),
            owners,
            writing: Vec::new(),
            committing: None,
            stray_uploads: Vec::new(),
            stray_passes: Vec::new(),
        })
    }

    /// Claims partition `p`: a new epoch, the state read back, an empty local file at
    /// the high watermark when the disk takes one.
    fn claim(&self, meta: &dyn MetadataStore, p: usize) -> Result<Owner, String> {
        let key = key(self.topic, p);
        let mut state = self
            .rt
            .block_on(meta.claim_partition(key, BROKER))
            .map_err(|e| format!("claiming {key:?}: {e}"))?;
        let now_ms = self.now_ms();
        let local = (!self.disk_full).then(|| LocalFileSim::new(state.high_watermark, now_ms));
        let manifest = Manifest::take_from(&mut state);
        Ok(Owner {
            writes: Appender::new(
                state.leader_epoch,
                state.high_watermark,
                ProducerTable::from_records(state.producers),
            ),
            segments: Segments::new(self.rules(), manifest, local, now_ms),
            leader_epoch: state.leader_epoch,
            fenced: false,
            upload: None,
            compaction: None,
            horizon: None,
            aborted: state.aborted,
        })
    }

    fn fail(&self, what: impl std::fmt::Display) -> String {
        format!(
            "simulation seed {} failed: {what}\n  replay: STRATA_SIM_SEED={} cargo test --release --lib sim::",
            self.seed, self.seed
        )
    }

    /// Sets what the next PUT does: refused, stored with the answer lost, or fine.
    /// The client does not retry these errors itself, so each reaches the engine.
    fn fault(&mut self, percent_fail: u64, percent_land: u64) {
        self.bucket.clear();
        if !self.faults {
            return;
        }
        let r = self.rng.below(100);
        let retriable = false;
        if r < percent_fail {
            self.bucket.fail_next([PutFault::Fail { retriable }]);
        } else if r < percent_fail + percent_land {
            self.bucket
                .fail_next([PutFault::LandThenFail { retriable }]);
        }
    }

    fn run(&mut self, steps: usize) -> Result<(), String> {
        for _ in 0..steps {
            self.step()?;
        }
        // The stores answer again: everything sent must be acknowledged.
        self.faults = false;
        self.disk_full = false;
        for _ in 0..2000 {
            if self.settled() {
                break;
            }
            self.step()?;
        }
        if !self.settled() {
            return Err(self.fail("requests still unacknowledged after the stores healed"));
        }
        self.collect_garbage(false);
        self.check()
    }

    fn settled(&self) -> bool {
        self.producers.iter().all(|p| {
            p.requests.iter().all(|r| r.acked.is_some())
                && p.txns.iter().all(|t| t.marker == MarkerState::Acked)
        })
    }

    fn step(&mut self) -> Result<(), String> {
        match self.rng.below(100) {
            0..=31 => self.produce()?,
            32..=49 => self.now += Duration::from_millis(self.rng.below(8)),
            50..=66 => self.finish_write(),
            67..=84 => self.finish_commit(),
            85..=88 => self.finish_upload()?,
            89..=90 => self.compaction_step()?,
            91..=92 => self.trim(),
            93..=94 => self.collect_garbage(true),
            95 if self.faults => self.disk_full = !self.disk_full,
            96..=97 if self.faults => self.crash()?,
            _ => self.zombie_step()?,
        }
        self.drive()
    }

    /// A producer sends its next request (a new one when none waits to be resent).
    fn produce(&mut self) -> Result<(), String> {
        let p = self.rng.below(PARTITIONS as u64) as usize;
        if let Some(t) = self.producers[p].marker_due(!self.faults) {
            return self.end_txn(p, t);
        }
        let open = self.producers[p].open_txn();
        if self.producers[p].next_to_send().is_none() && self.faults && open.is_ok() {
            let records = 1 + self.rng.below(3) as i32;
            let size = 1 + self.rng.below(4) as usize;
            let commit = self.rng.chance(70);
            let producer = &mut self.producers[p];
            if open == Ok(None) {
                producer.txns.push(Txn {
                    first: producer.requests.len(),
                    size,
                    commit,
                    marker: MarkerState::Pending,
                });
            }
            producer.requests.push(Request {
                seq: producer.next_seq,
                records,
                acked: None,
                in_flight: false,
            });
            producer.next_seq += records;
        }
        let Some(i) = self.producers[p].next_to_send() else {
            return Ok(());
        };
        let request = self.producers[p].requests[i].clone();
        self.producers[p].requests[i].in_flight = true;
        // Some requests are acks=1 in the flusher's eyes: they wait for the interval.
        let urgent_flush = self.rng.chance(80);
        let owner = &mut self.broker.owners[p];
        if owner.fenced {
            // NOT_LEADER: the client retries after a metadata refresh.
            self.producers[p].requests[i].in_flight = false;
            return Ok(());
        }
        let bytes = producer_batch(Producer::pid(p), request.seq, request.records);
        let header = BatchHeader::parse(&bytes).map_err(|e| e.to_string())?;
        let appended = match owner.writes.append(&[ValidBatch { header, bytes }], 0) {
            Ok(a) => a,
            Err(e) => {
                return Err(self.fail(format!(
                "partition {p} refused producer sequence {} ({e}), which a correct broker accepts",
                request.seq
            )))
            }
        };
        let token = encode(i, appended.base_offset);
        self.submit(p, appended, urgent_flush, token);
        Ok(())
    }

    /// The coordinator's marker for transaction `t` of partition `p`'s producer.
    fn end_txn(&mut self, p: usize, t: usize) -> Result<(), String> {
        let now_ms = self.now_ms();
        let owner = &mut self.broker.owners[p];
        if owner.fenced {
            return Ok(());
        }
        let commit = self.producers[p].txns[t].commit;
        let marker = Marker {
            producer_id: Producer::pid(p),
            producer_epoch: 0,
            commit,
            coordinator_epoch: 0,
        };
        let appended = match owner.writes.append_marker(&marker, now_ms) {
            Ok(a) => a,
            Err(e) => {
                return Err(self.fail(format!(
                    "partition {p} refused a marker ({e}) a correct broker takes"
                )))
            }
        };
        self.producers[p].txns[t].marker = MarkerState::InFlight;
        self.submit(p, appended, true, encode(MARKER + t, 0));
        Ok(())
    }

    /// Hands an append's batches to the flusher and answers `token` once committed.
    fn submit(&mut self, p: usize, appended: Appended, urgent: bool, token: usize) {
        let owner = &mut self.broker.owners[p];
        for b in appended.batches {
            self.broker.core.add(
                FlushItem {
                    key: key(self.topic, p),
                    stream: stream(self.topic, p),
                    leader_epoch: owner.leader_epoch,
                    gen: owner.writes.generation(),
                    base_offset: b.base_offset,
                    end_offset: b.end_offset,
                    max_timestamp: b.max_timestamp,
                    batch: b.bytes,
                    producer: b.producer,
                    aborted: b.aborted,
                    notify: p,
                    urgent,
                    arrived: self.now,
                },
                self.now,
            );
        }
        if let Some(token) = owner.writes.wait(appended.end_offset, token) {
            self.ack(p, token);
        }
    }

    fn ack(&mut self, p: usize, token: usize) {
        let (i, base) = decode(token);
        if i >= MARKER {
            let t = &mut self.producers[p].txns[i - MARKER];
            if t.marker != MarkerState::Acked {
                if t.commit {
                    self.stats.commits_txn += 1;
                } else {
                    self.stats.aborts_txn += 1;
                }
            }
            t.marker = MarkerState::Acked;
            return;
        }
        let r = &mut self.producers[p].requests[i];
        r.in_flight = false;
        if r.acked.is_none() {
            self.stats.acked += 1;
        }
        r.acked.get_or_insert(base);
    }

    /// A request failed: the client resends it (and, being idempotent, everything after
    /// it that is not acknowledged).
    fn failed(&mut self, p: usize, token: usize) {
        let (i, _) = decode(token);
        if i >= MARKER {
            let t = &mut self.producers[p].txns[i - MARKER];
            if t.marker == MarkerState::InFlight {
                t.marker = MarkerState::Pending;
            }
            return;
        }
        self.producers[p].requests[i].in_flight = false;
    }

    /// Runs `f` on the current broker, taken out of `self` for the call.
    fn with_broker<T>(&mut self, f: impl FnOnce(&mut Sim, &mut Broker) -> T) -> T {
        let placeholder = Broker::placeholder(self.broker.meta.clone());
        let mut broker = std::mem::replace(&mut self.broker, placeholder);
        let result = f(self, &mut broker);
        self.broker = broker;
        result
    }

    fn finish_write(&mut self) {
        self.with_broker(|sim, broker| sim.write_one(broker));
    }

    fn finish_commit(&mut self) {
        self.with_broker(|sim, broker| sim.commit_one(broker));
    }

    /// The upload of one partition ends (or one a replaced owner left running).
    fn finish_upload(&mut self) -> Result<(), String> {
        self.with_broker(|sim, broker| sim.upload_one(broker, true))
    }

    /// The zombie finishes a write, a commit or an upload, or collects garbage, and
    /// hears about it.
    fn zombie_step(&mut self) -> Result<(), String> {
        let Some(mut zombie) = self.zombie.take() else {
            return Ok(());
        };
        self.stats.zombie_steps += 1;
        let result = match self.rng.below(9) {
            0..=2 => {
                self.write_one(&mut zombie);
                Ok(())
            }
            3..=5 => {
                self.commit_one(&mut zombie);
                Ok(())
            }
            6 => self.upload_one(&mut zombie, false),
            7 => self.compact_one(&mut zombie, false),
            _ => {
                self.collect_with(zombie.meta.clone());
                Ok(())
            }
        };
        let result = result.and_then(|()| self.deliver(&mut zombie, false));
        self.zombie = Some(zombie);
        result
    }

    fn write_one(&mut self, broker: &mut Broker) {
        if broker.writing.is_empty() {
            return;
        }
        let i = self.rng.below(broker.writing.len() as u64) as usize;
        let (seq, chunks) = broker.writing.remove(i);
        let (payload, locations) = tiering::wal::build_wal_object(chunks);
        let size = payload.content_length() as u64;
        let object = tiering::keys::wal_object_key(BROKER, broker.session, seq);
        self.fault(5, 5);
        let put = self.store.put_new(&object, payload, None);
        let written = self.rt.block_on(put).ok().map(|()| Written {
            object_key: object.to_string(),
            object_size: size,
            locations,
        });
        self.stats.failed_writes += u64::from(written.is_none());
        broker.core.written(seq, written, self.now);
    }

    fn commit_one(&mut self, broker: &mut Broker) {
        let Some(next) = broker.committing.take() else {
            return;
        };
        self.fault(5, 5);
        let result = match self.rt.block_on(broker.meta.commit_wal(&next.commits)) {
            Ok(()) => {
                self.stats.commits += 1;
                CommitResult::Committed
            }
            Err(MetaError::Fenced(keys)) => CommitResult::Fenced(keys),
            Err(e) => {
                self.stats.failed_commits += 1;
                CommitResult::Failed {
                    retriable: e.is_retriable(),
                }
            }
        };
        let wait = Duration::from_millis(1 + self.rng.below(10));
        broker.core.committed(next.seq, result, self.now, wait);
    }

    /// One running upload of `broker` ends: a stray one (its owner was replaced) or
    /// the one of a random partition. Only the partition's current owner may commit:
    /// every partition of a zombie (`current` false) was claimed by its successor.
    fn upload_one(&mut self, broker: &mut Broker, current: bool) -> Result<(), String> {
        if !broker.stray_uploads.is_empty() && self.rng.chance(50) {
            let i = self.rng.below(broker.stray_uploads.len() as u64) as usize;
            let (p, job) = broker.stray_uploads.remove(i);
            if let UploadOutcome::Committed(record) = self.upload(broker.meta.as_ref(), p, job) {
                return Err(self.fail(format!(
                    "partition {p}: a replaced owner committed segment {}..{}",
                    record.base_offset, record.end_offset
                )));
            }
            return Ok(());
        }
        let p = self.rng.below(PARTITIONS as u64) as usize;
        let Some(job) = broker.owners[p].upload.take() else {
            return Ok(());
        };
        let outcome = self.upload(broker.meta.as_ref(), p, job);
        let owner = &mut broker.owners[p];
        if let UploadOutcome::Committed(record) = &outcome {
            self.stats.segments += 1;
            if !current {
                return Err(self.fail(format!(
                    "partition {p}: a former incarnation committed segment {}..{}",
                    record.base_offset, record.end_offset
                )));
            }
        } else {
            self.stats.failed_uploads += 1;
        }
        if let AfterUpload::Fenced = owner.segments.uploaded(outcome, self.now) {
            owner.fenced = true;
        }
        Ok(())
    }

    /// What an upload job does: read its bytes, check them, write the segment object,
    /// commit it to the manifest.
    fn upload(&mut self, meta: &dyn MetadataStore, p: usize, job: UploadJob) -> UploadOutcome {
        let local = matches!(job.from, Source::Local(_));
        let parts = match job.from {
            Source::Local(batches) => batches,
            Source::WriteAhead(ranges) => {
                let mut parts = Vec::new();
                for r in &ranges {
                    let read = self.rt.block_on(self.store.get_range(
                        &Path::from(r.object_key.as_str()),
                        r.position..r.position + r.len,
                        tiering::Class::Read,
                        None,
                    ));
                    match read {
                        Ok(bytes) => parts.push(bytes),
                        Err(_) => return UploadOutcome::Failed { retriable: true },
                    }
                }
                parts
            }
        };
        let contents = match crate::log::tail::check_segment(&parts, job.base, job.end) {
            Ok(c) => c,
            Err(_) if local => {
                return UploadOutcome::LocalRefused {
                    base_offset: job.base,
                }
            }
            Err(_) => return UploadOutcome::Failed { retriable: false },
        };
        let (payload, index) =
            tiering::segment::build_segment_object(parts, &contents.entries, INDEX_INTERVAL_BYTES);
        let size_bytes = payload.content_length() as u64;
        let object = tiering::keys::segment_object_key(&stream(self.topic, p), job.base, job.epoch);
        self.fault(5, 5);
        let put = self.rt.block_on(self.store.put_new(&object, payload, None));
        self.bucket.clear();
        if let Err(e) = put {
            return UploadOutcome::Failed {
                retriable: e.is_retriable(),
            };
        }
        let record = SegmentRecord {
            base_offset: job.base,
            end_offset: job.end,
            object_key: object.to_string(),
            size_bytes,
            data_bytes: index.data_len(),
            max_timestamp: contents.max_timestamp,
            created_ms: self.now_ms(),
            compacted_ms: 0,
        };
        self.fault(5, 5);
        let committed =
            self.rt
                .block_on(meta.commit_segment(key(self.topic, p), job.epoch, &record));
        // A fenced commit writes nothing: the fault must not outlive it.
        self.bucket.clear();
        match committed {
            Ok(()) => UploadOutcome::Committed(record),
            Err(MetaError::Fenced(_)) => UploadOutcome::Fenced,
            Err(e) => UploadOutcome::Failed {
                retriable: e.is_retriable(),
            },
        }
    }

    /// A compaction step of the current broker.
    fn compaction_step(&mut self) -> Result<(), String> {
        self.with_broker(|sim, broker| sim.compact_one(broker, true))
    }

    /// A pass of `broker` ends (one a replaced owner left, or one of a random
    /// partition's owner), or an owner with none plans one. Only the partition's
    /// current owner may swap a pass in.
    fn compact_one(&mut self, broker: &mut Broker, current: bool) -> Result<(), String> {
        if !broker.stray_passes.is_empty() && self.rng.chance(50) {
            let i = self.rng.below(broker.stray_passes.len() as u64) as usize;
            let (p, pass) = broker.stray_passes.remove(i);
            // Its owner is gone and never learns the answer: as far as the pass
            // knows, the manifest is still the one it read.
            let swap = self.run_pass(broker.meta.as_ref(), p, &pass, |_| true);
            if matches!(swap, Some((Swap::Committed, _))) {
                return Err(self.fail(format!(
                    "partition {p}: a replaced owner swapped a compaction pass in"
                )));
            }
            return Ok(());
        }
        let p = self.rng.below(PARTITIONS as u64) as usize;
        let now_ms = self.now_ms();
        let owner = &mut broker.owners[p];
        if owner.fenced {
            return Ok(());
        }
        let Some(pass) = owner.compaction.take() else {
            let config = Self::compaction_config();
            owner.compaction = crate::log::compact::plan::plan(
                owner.segments.remote(),
                &config,
                now_ms,
                owner.horizon,
                owner.writes.last_stable_offset(),
            )
            .map(|plan| Pass {
                plan,
                epoch: owner.leader_epoch,
                aborted: owner.aborted.clone(),
            });
            return Ok(());
        };
        let segments = &owner.segments;
        let Some((swap, c)) = self.run_pass(broker.meta.as_ref(), p, &pass, |c| {
            segments.starts_with(&c.replaced)
        }) else {
            return Ok(());
        };
        let owner = &mut broker.owners[p];
        match swap {
            Swap::Committed if !current => {
                return Err(self.fail(format!(
                    "partition {p}: a former incarnation swapped a compaction pass in"
                )));
            }
            Swap::Committed => {
                self.stats.compactions += 1;
                owner.segments.compacted(c.replaced.len(), c.segments);
                owner.horizon = c.counts.next_horizon;
            }
            Swap::Fenced | Swap::Unknown(_) => {
                owner.fenced = true;
                self.stats.refused_swaps += 1;
            }
            Swap::Stale | Swap::Failed(_) => self.stats.refused_swaps += 1,
        }
        Ok(())
    }

    /// Runs `pass` of partition `p` and swaps it in when `fresh` says the owner's
    /// manifest still starts with what it read; `None` when the pass itself failed.
    /// A committed pass deletes the objects it replaced (at once: stricter than the
    /// broker's `file.delete.delay.ms`); a refused one deletes what it wrote when that
    /// is safe (see [`Swap::discard_written`]).
    fn run_pass(
        &mut self,
        meta: &dyn MetadataStore,
        p: usize,
        pass: &Pass,
        fresh: impl FnOnce(&Compacted) -> bool,
    ) -> Option<(Swap, Compacted)> {
        // A small key map now and then, so a pass maps only part of the dirty segments.
        let map_bytes = if self.rng.chance(30) { 64 } else { 1 << 20 };
        let job = Job {
            store: self.store.clone(),
            throttle: Arc::new(Throttle::new(None)),
            stream: stream(self.topic, p),
            leader_epoch: pass.epoch,
            plan: pass.plan.clone(),
            now_ms: self.now_ms(),
            delete_retention_ms: DELETE_RETENTION_MS,
            segment_bytes: SEGMENT_BYTES,
            index_interval_bytes: INDEX_INTERVAL_BYTES,
            batch_limit: 1 << 20,
            map_bytes,
            aborted: Arc::new(if self.bug == Bug::CompactionIgnoresAborts {
                Vec::new()
            } else {
                pass.aborted.clone()
            }),
        };
        self.fault(5, 5);
        let done = self.rt.block_on(job.run());
        self.bucket.clear();
        let c = done.ok()?;
        let current = fresh(&c);
        self.fault(5, 5);
        let swap = if self.bug == Bug::TrustFailedSwap && current {
            let bases: Vec<i64> = c.replaced.iter().map(|s| s.base_offset).collect();
            let replace =
                meta.replace_segments(key(self.topic, p), pass.epoch, &bases, &c.segments);
            match self.rt.block_on(replace) {
                Ok(()) => Swap::Committed,
                Err(_) => Swap::Stale,
            }
        } else {
            self.rt.block_on(swap::swap(
                meta,
                key(self.topic, p),
                pass.epoch,
                &c,
                current,
            ))
        };
        self.bucket.clear();
        let written = c
            .segments
            .iter()
            .filter(|s| !c.replaced.iter().any(|r| r.object_key == s.object_key));
        let doomed: Vec<String> = if swap == Swap::Committed {
            c.replaced
                .iter()
                .filter(|r| !c.segments.iter().any(|s| s.object_key == r.object_key))
                .map(|r| r.object_key.clone())
                .collect()
        } else if swap.discard_written() {
            written.map(|s| s.object_key.clone()).collect()
        } else {
            Vec::new()
        };
        for object in doomed {
            let _ = self.rt.block_on(self.store.delete(&Path::from(object)));
        }
        Some((swap, c))
    }

    /// Retention, or DeleteRecords at a random offset, on one partition of the current
    /// broker: the log start offset is raised in the metadata store, then the dropped
    /// segment objects are deleted.
    fn trim(&mut self) {
        let p = self.rng.below(PARTITIONS as u64) as usize;
        let owner = &self.broker.owners[p];
        if owner.fenced {
            return;
        }
        let trim = if self.rng.chance(70) {
            owner.segments.retention(self.now_ms())
        } else {
            let hw = owner.segments.high_watermark();
            let offset = self.rng.below(hw as u64 + 2) as i64;
            match owner.segments.delete_records(offset) {
                Ok(DeleteTo::Trim(trim)) => Some(trim),
                Ok(DeleteTo::Already(_)) | Err(_) => None,
            }
        };
        let Some(trim) = trim else {
            return;
        };
        let epoch = owner.leader_epoch;
        let bases: Vec<i64> = trim.drop.iter().map(|s| s.base_offset).collect();
        self.fault(5, 5);
        let applied = self.rt.block_on(self.broker.meta.trim_log(
            key(self.topic, p),
            epoch,
            trim.log_start_offset,
            &bases,
        ));
        self.bucket.clear();
        if applied.is_ok() {
            self.stats.trims += 1;
            self.broker.owners[p].segments.trimmed(&trim);
            self.delete_segments(&trim);
        }
    }

    fn delete_segments(&mut self, trim: &Trim) {
        for seg in &trim.drop {
            let object = Path::from(seg.object_key.as_str());
            // Deletes do not fail in the simulated bucket; one that did would leave an
            // orphan, never a hole.
            let _ = self.rt.block_on(self.store.delete(&object));
        }
    }

    /// Write-ahead garbage collection, as the broker's loop runs it (`fault`: the
    /// metadata write that forgets the deleted objects may fail).
    fn collect_garbage(&mut self, fault: bool) {
        if fault {
            self.fault(5, 5);
        } else {
            self.bucket.clear();
        }
        self.collect_with(self.broker.meta.clone());
    }

    fn collect_with(&mut self, meta: Arc<dyn MetadataStore>) {
        let collected = self
            .rt
            .block_on(crate::wal::collect_garbage(&self.store, meta.as_ref()));
        // With nothing to collect nothing is written: the fault must not outlive it.
        self.bucket.clear();
        self.stats.collected += collected.unwrap_or(0) as u64;
    }

    /// Everything in memory is lost; the broker starts again from the bucket.
    fn crash(&mut self) -> Result<(), String> {
        self.stats.crashes += 1;
        self.bucket.clear();
        let meta: Arc<dyn MetadataStore> = Arc::new(
            self.rt
                .block_on(BucketStore::open(self.store.clone()))
                .map_err(|e| self.fail(format!("reopening the metadata: {e}")))?,
        );
        let restarted = self
            .boot(meta)
            .map_err(|e| self.fail(format!("restarting: {e}")))?;
        let old = std::mem::replace(&mut self.broker, restarted);
        if self.rng.chance(50) {
            self.zombie = Some(old);
        }
        for p in &mut self.producers {
            for r in &mut p.requests {
                r.in_flight = false;
            }
            for t in &mut p.txns {
                if t.marker == MarkerState::InFlight {
                    t.marker = MarkerState::Pending;
                }
            }
        }
        self.check()
    }

    /// The broker's loops: start due flushes, run the next commit, deliver notices,
    /// seal and start uploads, claim fenced partitions again.
    fn drive(&mut self) -> Result<(), String> {
        self.with_broker(|sim, broker| sim.deliver(broker, true))
    }

    /// One broker's loops; `current`: it is the one clients reach (a zombie's stale
    /// partitions are not claimed again).
    fn deliver(&mut self, broker: &mut Broker, current: bool) -> Result<(), String> {
        while let Some(started) = broker.core.start(self.now, false) {
            broker.writing.push((started.seq, started.chunks));
        }
        if broker.committing.is_none() {
            broker.committing = broker.core.next_commit(self.now, 0);
        }
        let now_ms = self.now_ms();
        for (p, notice) in broker.core.take_notices() {
            let owner = &mut broker.owners[p];
            match notice {
                FlushNotice::Flushed { gen, range, .. } => {
                    if let Some(durable) = owner.writes.flushed(gen, range.end_offset) {
                        owner.segments.committed(range);
                        owner.aborted.extend(durable.aborted.iter().copied());
                        let (from, batches) = (durable.from, durable.batches);
                        store_local(&mut owner.segments, from, batches, self.disk_full, now_ms);
                        for token in durable.answered {
                            self.ack(p, token);
                        }
                    }
                }
                FlushNotice::Failed {
                    gen,
                    fenced,
                    uncertain,
                } => {
                    if let Some(waiting) = owner.writes.failed(gen) {
                        owner.fenced |= fenced || uncertain;
                        // A zombie's clients are gone: they already resent elsewhere.
                        for token in waiting.into_iter().filter(|_| current) {
                            self.failed(p, token);
                        }
                    }
                }
            }
        }
        for owner in &mut broker.owners {
            tend(owner, self.disk_full, self.now, now_ms);
        }
        for p in 0..PARTITIONS {
            if current && broker.owners[p].fenced && self.rng.chance(30) {
                // The next ownership pass claims it again.
                self.stats.reclaims += 1;
                let mut owner = self
                    .claim(broker.meta.as_ref(), p)
                    .map_err(|e| self.fail(e))?;
                std::mem::swap(&mut broker.owners[p], &mut owner);
                for token in owner.writes.take_waiters() {
                    self.failed(p, token);
                }
                if let Some(job) = owner.upload {
                    broker.stray_uploads.push((p, job));
                }
                if let Some(pass) = owner.compaction {
                    broker.stray_passes.push((p, pass));
                }
            }
        }
        Ok(())
    }

    /// The durability contract, read back from the bucket.
    fn check(&mut self) -> Result<(), String> {
        for p in 0..PARTITIONS {
            let state = self
                .rt
                .block_on(self.broker.meta.read_partition(key(self.topic, p)))
                .map_err(|e| self.fail(format!("reading partition {p}: {e}")))?;
            // Segments, then write-ahead ranges: (base, end, object, position, length,
            // compacted).
            let pieces: Vec<(i64, i64, &str, u64, u64, bool)> = state
                .segments
                .iter()
                .map(|s| {
                    (
                        s.base_offset,
                        s.end_offset,
                        s.object_key.as_str(),
                        0,
                        s.data_bytes,
                        s.compacted_ms > 0,
                    )
                })
                .chain(state.wal_ranges.iter().map(|r| {
                    (
                        r.base_offset,
                        r.end_offset,
                        r.object_key.as_str(),
                        r.position,
                        r.len,
                        false,
                    )
                }))
                .collect();
            let first = pieces.first().map_or(state.high_watermark, |x| x.0);
            if first > state.log_start_offset || state.log_start_offset > state.high_watermark {
                return Err(self.fail(format!(
                    "partition {p}: the manifest starts at {first}, the log at {}, the high watermark is {}",
                    state.log_start_offset, state.high_watermark
                )));
            }
            let mut next = first;
            let mut in_log: HashMap<i32, i64> = HashMap::new();
            // Every record in the log: offset -> (key, whether it has a value).
            let mut found: BTreeMap<i64, (Vec<u8>, bool)> = BTreeMap::new();
            let mut compacted: Vec<(i64, i64)> = Vec::new();
            // Base offsets of the batches the stored aborted ranges cover.
            let mut in_aborted: HashSet<i64> = HashSet::new();
            for &(base, end, object, position, len, was_compacted) in &pieces {
                if base != next {
                    return Err(self.fail(format!(
                        "partition {p}: the manifest has {base}..{end} ({object}) where the log ends at {next}"
                    )));
                }
                if was_compacted {
                    compacted.push((base, end));
                }
                let bytes = self
                    .rt
                    .block_on(self.store.get_range(
                        &Path::from(object),
                        position..position + len,
                        tiering::Class::Read,
                        None,
                    ))
                    .map_err(|e| {
                        self.fail(format!(
                            "partition {p}: {object}, referenced by the manifest, does not read: {e}"
                        ))
                    })?;
                for (at, h) in batch::walk(&bytes) {
                    // A compacted segment has gaps between its batches; nothing else does.
                    if h.base_offset < next || (h.base_offset > next && !was_compacted) {
                        return Err(self.fail(format!(
                            "partition {p}: batch at offset {} where {next} was expected",
                            h.base_offset
                        )));
                    }
                    if h.is_control() {
                        next = h.last_offset() + 1;
                        continue;
                    }
                    if is_aborted(&h, &state.aborted) {
                        in_aborted.insert(h.base_offset);
                    }
                    if in_log.insert(h.base_sequence, h.base_offset).is_some() {
                        return Err(self.fail(format!(
                            "partition {p}: producer sequence {} is in the log twice",
                            h.base_sequence
                        )));
                    }
                    let whole = bytes.slice(at..at + h.total_len);
                    let split = records::split(&whole, &h, 1 << 20).map_err(|e| {
                        self.fail(format!(
                            "partition {p}: batch at {} does not split: {e}",
                            h.base_offset
                        ))
                    })?;
                    for r in split {
                        let key = r.key.as_deref().unwrap_or_default().to_vec();
                        found.insert(r.offset(&h), (key, r.has_value));
                    }
                    next = h.last_offset() + 1;
                }
                if next != end {
                    return Err(self.fail(format!(
                        "partition {p}: {object} holds batches to {next} for {base}..{end}"
                    )));
                }
            }
            if next != state.high_watermark {
                return Err(self.fail(format!(
                    "partition {p}: high watermark {} but the log ends at {next}",
                    state.high_watermark
                )));
            }
            // What producers were told, record by record: offset -> record number.
            let mut acked: BTreeMap<i64, i32> = BTreeMap::new();
            for r in &self.producers[p].requests {
                if let Some(offset) = r.acked {
                    for j in 0..r.records {
                        acked.insert(offset + i64::from(j), r.seq + j);
                    }
                }
            }
            // The model's transactions: the offsets of the records of those it aborted
            // (and ended), and of those it committed.
            // An abort whose marker is not acknowledged yet may have committed already
            // (its answer lost): its records may be gone, but need not be in a range.
            let producer = &self.producers[p];
            let mut aborted_records: HashSet<i64> = HashSet::new();
            let mut maybe_aborted: HashSet<i64> = HashSet::new();
            let mut committed_batches: HashSet<i64> = HashSet::new();
            for t in &producer.txns {
                let end = (t.first + t.size).min(producer.requests.len());
                for r in &producer.requests[t.first..end] {
                    let Some(offset) = r.acked else { continue };
                    let offsets = (0..r.records).map(|j| offset + i64::from(j));
                    if t.commit {
                        committed_batches.insert(offset);
                    } else if t.marker == MarkerState::Acked {
                        aborted_records.extend(offsets.clone());
                        maybe_aborted.extend(offsets);
                    } else {
                        maybe_aborted.extend(offsets);
                    }
                }
            }
            // read_committed readers skip exactly the aborted transactions' batches.
            for &base in &in_aborted {
                if committed_batches.contains(&base) {
                    return Err(self.fail(format!(
                        "partition {p}: the batch at {base} of a committed transaction is in an aborted range"
                    )));
                }
            }
            for &offset in &aborted_records {
                let batch_base = self.producers[p]
                    .requests
                    .iter()
                    .filter_map(|r| {
                        r.acked
                            .filter(|b| offset >= *b && offset < b + i64::from(r.records))
                    })
                    .next();
                // Below the log start nothing is readable (and the ranges there go).
                let readable = offset >= state.log_start_offset && found.contains_key(&offset);
                if readable && batch_base.is_some_and(|b| !in_aborted.contains(&b)) {
                    return Err(self.fail(format!(
                        "partition {p}: aborted record at offset {offset} is not in an aborted range: read_committed readers would see it"
                    )));
                }
            }
            if self.settled() {
                if let Some(open) = state.producers.iter().find(|r| r.txn_first_offset >= 0) {
                    return Err(self.fail(format!(
                        "partition {p}: every marker is acknowledged, yet producer {} has a transaction open from {}",
                        open.producer_id, open.txn_first_offset
                    )));
                }
            }
            // Each record in the log is the one acknowledged at its offset.
            for (&offset, (key, has_value)) in &found {
                let Some(&n) = acked.get(&offset) else {
                    continue;
                };
                let (want_key, want_value) = record(n);
                if *key != want_key || *has_value != want_value.is_some() {
                    return Err(self.fail(format!(
                        "partition {p}: offset {offset} holds another record than record {n} acknowledged there"
                    )));
                }
            }
            // Each acknowledged record (not trimmed) is there, unless compaction removed
            // it: a compacted segment holds it and a newer record of its key exists (or
            // it is a tombstone, which goes after its horizon).
            // Only a committed record supersedes: an aborted one is skipped by readers.
            let keys_after = |offset: i64, key: &[u8]| {
                found
                    .range(offset + 1..)
                    .any(|(o, (k, _))| k == key && !maybe_aborted.contains(o))
                    || acked
                        .range(offset + 1..)
                        .any(|(o, &m)| record(m).0 == key && !maybe_aborted.contains(o))
            };
            let seen: HashSet<i64> = found.keys().copied().collect();
            for (&offset, &n) in acked.range(first..) {
                if seen.contains(&offset) {
                    continue;
                }
                let (key, value) = record(n);
                let in_compacted = compacted.iter().any(|&(b, e)| offset >= b && offset < e);
                let aborted = maybe_aborted.contains(&offset);
                if !in_compacted || (value.is_some() && !aborted && !keys_after(offset, &key)) {
                    return Err(self.fail(format!(
                        "partition {p}: acknowledged record {n} (offset {offset}) is lost{}",
                        if in_compacted {
                            ": compaction removed its key's newest value"
                        } else {
                            ""
                        }
                    )));
                }
            }
        }
        Ok(())
    }
}

impl Broker {
    /// A broker value to hold `Sim::broker`'s place while it is borrowed apart.
    fn placeholder(meta: Arc<dyn MetadataStore>) -> Broker {
        Broker {
            meta,
            session: 0,
            core: FlushCore::new(FlushRules::new(
                Duration::ZERO,
                Duration::ZERO,
                1,
                Duration::ZERO,
                1,
            )),
            owners: Vec::new(),
            writing: Vec::new(),
            committing: None,
            stray_uploads: Vec::new(),
            stray_passes: Vec::new(),
        }
    }
}

/// What the owner does with a commit's batches: append them to the active local file
/// (opening one at their offset if none is active), or, on a full disk, close it.
fn store_local(
    segments: &mut Segments<LocalFileSim>,
    from: i64,
    batches: Vec<Bytes>,
    disk_full: bool,
    now_ms: i64,
) {
    if disk_full {
        segments.stop_appending(now_ms);
        return;
    }
    if !segments.appending() {
        segments.start_appending(LocalFileSim::new(from, now_ms));
    }
    // The commit's batches end at the new high watermark.
    let end = segments.high_watermark();
    if let Some(active) = segments.active_mut() {
        active.end = end;
        active.size += batches.iter().map(|b| b.len() as u64).sum::<u64>();
        active.data.extend(batches);
    }
}

/// The owner's tick: seal the active file when due, start the next upload.
fn tend(owner: &mut Owner, disk_full: bool, now: Instant, now_ms: i64) {
    if let Some(end) = owner.segments.seal_due(now_ms) {
        let next = (!disk_full).then(|| LocalFileSim::new(end, now_ms));
        owner.segments.sealed(next, now_ms);
    }
    if owner.upload.is_some() {
        return;
    }
    let Some(upload) = owner.segments.next_upload(now, now_ms) else {
        return;
    };
    let from = match upload.from {
        UploadFrom::Local(file) => Source::Local(file.data.clone()),
        UploadFrom::WriteAhead(ranges) => Source::WriteAhead(ranges),
    };
    owner.upload = Some(UploadJob {
        base: upload.base_offset,
        end: upload.end_offset,
        epoch: owner.leader_epoch,
        from,
    });
}

/// Record number `n` of a producer: its key, and its value (none: a tombstone).
fn record(n: i32) -> (Vec<u8>, Option<Vec<u8>>) {
    let key = format!("k{}", n % KEYS).into_bytes();
    let value = (n % 7 != 3).then(|| n.to_be_bytes().to_vec());
    (key, value)
}

/// The batch of a producer's request: its records `seq..seq + count`.
fn producer_batch(pid: i64, seq: i32, count: i32) -> Bytes {
    let specs: Vec<records::tests::Spec> = (seq..seq + count)
        .map(|n| {
            let (key, value) = record(n);
            (Some(key), value, 0, 0)
        })
        .collect();
    let deltas: Vec<i32> = (0..count).collect();
    let plain = records::tests::producer_batch(
        0,
        &specs,
        &deltas,
        count - 1,
        crate::log::codec::Codec::None,
        (pid, 0, seq),
    );
    // Transactional.
    let mut b = bytes::BytesMut::from(&plain[..]);
    b[batch::ATTRIBUTES_OFFSET + 1] |= 0x10;
    batch::seal(&mut b);
    b.freeze()
}

/// Marker tokens are told apart from request tokens by their index: `MARKER` plus the
/// transaction's.
const MARKER: usize = 1 << 20;

/// A waiting request's reply token: its index and the offset it will be answered with.
fn encode(i: usize, base: i64) -> usize {
    (i << 32) | (base as usize & 0xFFFF_FFFF)
}

fn decode(token: usize) -> (usize, i64) {
    (token >> 32, (token & 0xFFFF_FFFF) as i64)
}

/// Runs one seed: `Err` names the seed and the broken rule.
fn run_seed(seed: u64, bug: Bug, steps: usize) -> Result<Stats, String> {
    let mut sim = Sim::new(seed, bug)?;
    sim.run(steps)?;
    Ok(sim.stats)
}

fn seeds() -> (u64, u64) {
    if let Some(seed) = std::env::var("STRATA_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return (seed, 1);
    }
    let count = std::env::var("STRATA_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    (1, count)
}

const STEPS: usize = 400;

/// The durability contract holds for every seed.
#[test]
fn durability_holds_under_faults_and_crashes() {
    let (first, count) = seeds();
    let mut total = Stats::default();
    for seed in first..first + count {
        match run_seed(seed, Bug::None, STEPS) {
            Ok(stats) => total += stats,
            Err(e) => panic!("{e}"),
        }
    }
    eprintln!("simulated {count} seeds: {total:?}");
    // Not a vacuous run: writes were acknowledged, and every kind of fault happened.
    assert!(total.acked > 20 * count, "{total:?}");
    if count >= 50 {
        assert!(
            total.crashes > 0
                && total.failed_commits > 0
                && total.failed_writes > 0
                && total.reclaims > 0
                && total.segments > count
                && total.failed_uploads > 0
                && total.trims > 0
                && total.collected > 0
                && total.compactions > 0
                && total.refused_swaps > 0
                && total.commits_txn > 0
                && total.aborts_txn > 0,
            "{total:?}"
        );
    }
}

/// The simulation finds a planted bug (owners told a flush is durable before its
/// commit) within its budget, so it is able to find such bugs at all.
#[test]
fn finds_an_acknowledgement_before_commit() {
    finds(Bug::AckBeforeCommit);
}

/// ... and one in the segment lifecycle (an upload from the write-ahead objects that
/// skips a range: its commit drops the skipped range from the manifest).
#[test]
fn finds_a_segment_that_skips_a_range() {
    finds(Bug::SkipARange);
}

/// ... and one in compaction (a failed swap taken for refused: the objects it wrote
/// are deleted, though the store applied it and its manifest names them).
#[test]
fn finds_a_swap_taken_for_refused() {
    finds(Bug::TrustFailedSwap);
}

/// ... and one in compaction under transactions (a pass that does not know the
/// aborted transactions lets an aborted record supersede its key's committed value).
#[test]
fn finds_compaction_ignoring_aborts() {
    finds(Bug::CompactionIgnoresAborts);
}

/// Runs seeds until one fails with `bug` planted; fails if 500 do not.
fn finds(bug: Bug) {
    let found = (1..=500u64).find_map(|seed| run_seed(seed, bug, STEPS).err());
    let found = found.expect("the planted bug went unnoticed for 500 seeds");
    assert!(found.contains("simulation seed"), "{found}");
    eprintln!("planted bug found: {found}");
}
