//! The seeded deterministic simulation of one broker's write path.
//!
//! It runs the engine's state machines exactly as the broker does (the partition
//! owners' [`Appender`], the flusher's [`FlushCore`]) against the real write-ahead
//! object format, the real object-store client over an in-memory bucket, and the real
//! metadata store kept in that bucket (`bucket://`). One seeded random number generator
//! decides everything else, one step at a time: which producer sends next, how much
//! time passes, which object write finishes first, which requests fail (before or after
//! they landed), when the broker crashes (losing everything in memory) and restarts
//! from the bucket. Idempotent producers retry what was not acknowledged, as Kafka
//! clients do, five requests in flight at most.
//!
//! After every restart and at the end it checks the durability contract of the design:
//! every acknowledged batch is in the committed log at the offset it was acknowledged
//! with, the committed ranges of a partition run from 0 to its high watermark without
//! a gap or an overlap, no producer batch is in the log twice, and once the stores
//! answer again every request is acknowledged. A failure names its seed;
//! `STRATA_SIM_SEED=<seed>` replays exactly that run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::path::Path;
use tiering::faults::{FaultyStore, PutFault};

use crate::log::appender::Appender;
use crate::log::batch::{self, BatchHeader, ValidBatch};
use crate::log::producer::ProducerTable;
use crate::metadata::bucket::BucketStore;
use crate::metadata::{MetaError, MetadataStore, PartitionKey, TopicRecord};
use crate::wal::core::{CommitResult, FlushCore, FlushItem, FlushRules, Written};
use crate::wal::FlushNotice;

const PARTITIONS: usize = 2;
/// Requests a producer keeps in flight (Kafka's idempotent maximum).
const IN_FLIGHT: usize = 5;
const BROKER: i32 = 1;

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

#[derive(Debug, Default)]
struct Producer {
    requests: Vec<Request>,
    next_seq: i32,
}

impl Producer {
    fn pid(p: usize) -> i64 {
        5000 + p as i64
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
    leader_epoch: i32,
    /// A failed flush may have applied, or a newer epoch fenced it: it must be claimed
    /// again before it takes writes.
    fenced: bool,
}

/// The parts lost in a crash.
struct Broker {
    meta: Arc<dyn MetadataStore>,
    session: i64,
    core: FlushCore<usize>,
    owners: Vec<Owner>,
    writing: Vec<(u64, Vec<tiering::wal::WalChunk>)>,
    committing: Option<(u64, crate::metadata::WalCommit)>,
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
    /// Whether faults are injected (off while the run settles at the end).
    faults: bool,
    bug: bool,
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
    }
}

fn key(topic: uuid::Uuid, p: usize) -> PartitionKey {
    PartitionKey {
        topic_id: topic,
        partition: p as i32,
    }
}

impl Sim {
    fn new(seed: u64, bug: bool) -> Result<Sim, String> {
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
        let broker = Self::boot(&rt, meta, topic, bug)?;
        Ok(Sim {
            seed,
            rng: Rng(seed),
            rt,
            bucket,
            store,
            topic,
            producers: (0..PARTITIONS).map(|_| Producer::default()).collect(),
            broker,
            zombie: None,
            now,
            faults: true,
            bug,
            stats: Stats::default(),
        })
    }

    /// Starts the broker: a new session, every partition claimed from the metadata.
    fn boot(
        rt: &tokio::runtime::Runtime,
        meta: Arc<dyn MetadataStore>,
        topic: uuid::Uuid,
        bug: bool,
    ) -> Result<Broker, String> {
        let session = rt
            .block_on(meta.start_broker_session(BROKER))
            .map_err(|e| e.to_string())?;
        let mut rules =
            FlushRules::new(Duration::from_millis(5), 4096, Duration::from_millis(40), 3);
        rules.ack_before_commit = bug;
        let mut owners = Vec::new();
        for p in 0..PARTITIONS {
            owners.push(claim(rt, meta.as_ref(), key(topic, p))?);
        }
        Ok(Broker {
            meta,
            session,
            core: FlushCore::new(rules),
            owners,
            writing: Vec::new(),
            committing: None,
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
        for _ in 0..2000 {
            if self.settled() {
                break;
            }
            self.step()?;
        }
        if !self.settled() {
            return Err(self.fail("requests still unacknowledged after the stores healed"));
        }
        self.check()
    }

    fn settled(&self) -> bool {
        self.producers
            .iter()
            .all(|p| p.requests.iter().all(|r| r.acked.is_some()))
    }

    fn step(&mut self) -> Result<(), String> {
        match self.rng.below(100) {
            0..=34 => self.produce()?,
            35..=54 => self.now += Duration::from_millis(self.rng.below(8)),
            55..=74 => self.finish_write(),
            75..=95 => self.finish_commit(),
            96..=97 if self.faults => self.crash()?,
            _ => self.zombie_step()?,
        }
        self.drive()
    }

    /// A producer sends its next request (a new one when none waits to be resent).
    fn produce(&mut self) -> Result<(), String> {
        let p = self.rng.below(PARTITIONS as u64) as usize;
        if self.producers[p].next_to_send().is_none() && self.faults {
            let records = 1 + self.rng.below(3) as i32;
            let producer = &mut self.producers[p];
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
        let owner = &mut self.broker.owners[p];
        if owner.fenced {
            // NOT_LEADER: the client retries after a metadata refresh.
            self.producers[p].requests[i].in_flight = false;
            return Ok(());
        }
        let bytes = batch::tests::make_batch(request.records, Producer::pid(p), 0, request.seq, 0);
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
        for b in appended.batches {
            self.broker.core.add(
                FlushItem {
                    key: key(self.topic, p),
                    stream: Arc::from(format!("{}/{p}", self.topic)),
                    leader_epoch: owner.leader_epoch,
                    gen: owner.writes.generation(),
                    base_offset: b.base_offset,
                    end_offset: b.end_offset,
                    max_timestamp: b.max_timestamp,
                    batch: b.bytes,
                    producer: b.producer,
                    notify: p,
                },
                self.now,
            );
        }
        let token = encode(i, appended.base_offset);
        if let Some(token) = owner.writes.wait(appended.end_offset, token) {
            self.ack(p, token);
        }
        Ok(())
    }

    fn ack(&mut self, p: usize, token: usize) {
        let (i, base) = decode(token);
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
        self.producers[p].requests[i].in_flight = false;
    }

    fn finish_write(&mut self) {
        let placeholder = self.placeholder();
        let mut broker = std::mem::replace(&mut self.broker, placeholder);
        self.write_one(&mut broker);
        self.broker = broker;
    }

    /// The zombie finishes a write or a commit, and hears about it.
    fn zombie_step(&mut self) -> Result<(), String> {
        let Some(mut zombie) = self.zombie.take() else {
            return Ok(());
        };
        self.stats.zombie_steps += 1;
        if self.rng.chance(50) {
            self.write_one(&mut zombie);
        } else {
            self.commit_one(&mut zombie);
        }
        let result = self.deliver(&mut zombie, false);
        self.zombie = Some(zombie);
        result
    }

    /// A broker value to hold `self.broker`'s place while it is borrowed apart.
    fn placeholder(&self) -> Broker {
        Broker {
            meta: self.broker.meta.clone(),
            session: 0,
            core: FlushCore::new(FlushRules::new(Duration::ZERO, 1, Duration::ZERO, 1)),
            owners: Vec::new(),
            writing: Vec::new(),
            committing: None,
        }
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
        broker.core.written(seq, written);
    }

    fn finish_commit(&mut self) {
        let placeholder = self.placeholder();
        let mut broker = std::mem::replace(&mut self.broker, placeholder);
        self.commit_one(&mut broker);
        self.broker = broker;
    }

    fn commit_one(&mut self, broker: &mut Broker) {
        let Some((seq, commit)) = broker.committing.take() else {
            return;
        };
        self.fault(5, 5);
        let result = match self.rt.block_on(broker.meta.commit_wal(&commit)) {
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
        broker.core.committed(seq, result, self.now, wait);
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
        let restarted = Self::boot(&self.rt, meta, self.topic, self.bug)
            .map_err(|e| self.fail(format!("restarting: {e}")))?;
        let old = std::mem::replace(&mut self.broker, restarted);
        if self.rng.chance(50) {
            self.zombie = Some(old);
        }
        for p in &mut self.producers {
            for r in &mut p.requests {
                r.in_flight = false;
            }
        }
        self.check()
    }

    /// The broker's loops: start due flushes, run the next commit, deliver notices,
    /// claim fenced partitions again.
    fn drive(&mut self) -> Result<(), String> {
        let placeholder = self.placeholder();
        let mut broker = std::mem::replace(&mut self.broker, placeholder);
        let result = self.deliver(&mut broker, true);
        self.broker = broker;
        result
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
        for (p, notice) in broker.core.take_notices() {
            let owner = &mut broker.owners[p];
            match notice {
                FlushNotice::Flushed { gen, range } => {
                    if let Some(durable) = owner.writes.flushed(gen, range.end_offset) {
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
        for p in 0..PARTITIONS {
            if current && broker.owners[p].fenced && self.rng.chance(30) {
                // The next ownership pass claims it again.
                self.stats.reclaims += 1;
                let mut owner = claim(&self.rt, broker.meta.as_ref(), key(self.topic, p))
                    .map_err(|e| self.fail(e))?;
                for token in broker.owners[p].writes.take_waiters() {
                    self.failed(p, token);
                }
                std::mem::swap(&mut broker.owners[p], &mut owner);
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
            let mut next = 0i64;
            let mut in_log: HashMap<i32, i64> = HashMap::new();
            for range in &state.wal_ranges {
                if range.base_offset != next {
                    return Err(self.fail(format!(
                        "partition {p}: committed range starts at {} where the log ends at {next}",
                        range.base_offset
                    )));
                }
                let bytes = self
                    .rt
                    .block_on(self.store.get_range(
                        &Path::from(range.object_key.as_str()),
                        range.position..range.position + range.len,
                        tiering::Class::Read,
                        None,
                    ))
                    .map_err(|e| self.fail(format!("partition {p}: reading a range: {e}")))?;
                for (_, h) in batch::walk(&bytes) {
                    if h.base_offset != next {
                        return Err(self.fail(format!(
                            "partition {p}: batch at offset {} where {next} was expected",
                            h.base_offset
                        )));
                    }
                    if in_log.insert(h.base_sequence, h.base_offset).is_some() {
                        return Err(self.fail(format!(
                            "partition {p}: producer sequence {} is in the log twice",
                            h.base_sequence
                        )));
                    }
                    next = h.last_offset() + 1;
                }
                if next != range.end_offset {
                    return Err(self.fail(format!(
                        "partition {p}: range to {} holds batches to {next}",
                        range.end_offset
                    )));
                }
            }
            if next != state.high_watermark {
                return Err(self.fail(format!(
                    "partition {p}: high watermark {} but the log ends at {next}",
                    state.high_watermark
                )));
            }
            for r in &self.producers[p].requests {
                if let Some(offset) = r.acked {
                    if in_log.get(&r.seq) != Some(&offset) {
                        return Err(self.fail(format!(
                            "partition {p}: acknowledged batch (sequence {}, offset {offset}) is {}",
                            r.seq,
                            match in_log.get(&r.seq) {
                                Some(o) => format!("at offset {o} instead"),
                                None => "lost".into(),
                            }
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

fn claim(
    rt: &tokio::runtime::Runtime,
    meta: &dyn MetadataStore,
    key: PartitionKey,
) -> Result<Owner, String> {
    let state = rt
        .block_on(meta.claim_partition(key, BROKER))
        .map_err(|e| format!("claiming {key:?}: {e}"))?;
    Ok(Owner {
        writes: Appender::new(
            state.leader_epoch,
            state.high_watermark,
            ProducerTable::from_records(state.producers),
        ),
        leader_epoch: state.leader_epoch,
        fenced: false,
    })
}

/// A waiting request's reply token: its index and the offset it will be answered with.
fn encode(i: usize, base: i64) -> usize {
    (i << 32) | (base as usize & 0xFFFF_FFFF)
}

fn decode(token: usize) -> (usize, i64) {
    (token >> 32, (token & 0xFFFF_FFFF) as i64)
}

/// Runs one seed: `Err` names the seed and the broken rule.
fn run_seed(seed: u64, bug: bool, steps: usize) -> Result<Stats, String> {
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
        match run_seed(seed, false, STEPS) {
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
                && total.reclaims > 0,
            "{total:?}"
        );
    }
}

/// The simulation finds a planted bug (owners told a flush is durable before its
/// commit) within its budget, so it is able to find such bugs at all.
#[test]
fn finds_an_acknowledgement_before_commit() {
    let found = (1..=500u64).find_map(|seed| run_seed(seed, true, STEPS).err());
    let found = found.expect("the planted bug went unnoticed for 500 seeds");
    assert!(found.contains("simulation seed"), "{found}");
    eprintln!("planted bug found: {found}");
}
