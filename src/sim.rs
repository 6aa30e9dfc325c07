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
//! garbage collection run, when the broker crashes (losing everything in memory, its
//! local files included) and restarts from the bucket. Idempotent producers retry what
//! was not acknowledged, as Kafka clients do, five requests in flight at most. Former
//! incarnations keep writing, committing, uploading and collecting (zombies).
//!
//! After every restart and at the end it checks the durability contract of the design,
//! read back from the bucket: the committed manifest of a partition (segments, then
//! write-ahead ranges) runs from at or below its log start offset to its high
//! watermark without a gap or an overlap, every object it references is still there
//! (objects are never written twice under one name, so none was deleted), every
//! acknowledged batch is in it at the offset it was acknowledged with unless retention
//! or DeleteRecords trimmed below it, no producer batch is in it twice, no former
//! owner ever committed a segment, and once the stores answer again every request is
//! acknowledged. A failure names its seed; `STRATA_SIM_SEED=<seed>` replays exactly
//! that run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::path::Path;
use tiering::faults::{FaultyStore, PutFault};

use crate::log::appender::Appender;
use crate::log::batch::{self, BatchHeader, ValidBatch};
use crate::log::producer::ProducerTable;
use crate::log::segments::{
    AfterUpload, DeleteTo, Manifest, PlainFile, SegmentRules, Segments, Trim, UploadFrom,
    UploadOutcome,
};
use crate::metadata::bucket::BucketStore;
use crate::metadata::{MetaError, MetadataStore, PartitionKey, SegmentRecord, TopicRecord};
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

/// A bug the simulation must find (tests only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bug {
    None,
    /// Owners told a flush is durable before its commit.
    AckBeforeCommit,
    /// An upload from the write-ahead objects skips the first range of its stretch.
    SkipARange,
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
    segments: Segments<LocalFileSim>,
    leader_epoch: i32,
    /// A failed flush may have applied, or a newer epoch fenced it: it must be claimed
    /// again before it takes writes.
    fenced: bool,
    /// The segment upload in flight.
    upload: Option<UploadJob>,
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
        self.now.duration_since(self.start).as_millis() as i64
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
        self.producers
            .iter()
            .all(|p| p.requests.iter().all(|r| r.acked.is_some()))
    }

    fn step(&mut self) -> Result<(), String> {
        match self.rng.below(100) {
            0..=31 => self.produce()?,
            32..=49 => self.now += Duration::from_millis(self.rng.below(8)),
            50..=66 => self.finish_write(),
            67..=84 => self.finish_commit(),
            85..=90 => self.finish_upload()?,
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
        // Some requests are acks=1 in the flusher's eyes: they wait for the interval.
        let urgent_flush = self.rng.chance(80);
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
                    stream: stream(self.topic, p),
                    leader_epoch: owner.leader_epoch,
                    gen: owner.writes.generation(),
                    base_offset: b.base_offset,
                    end_offset: b.end_offset,
                    max_timestamp: b.max_timestamp,
                    batch: b.bytes,
                    producer: b.producer,
                    notify: p,
                    urgent: urgent_flush,
                    arrived: self.now,
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
        let result = match self.rng.below(8) {
            0..=2 => {
                self.write_one(&mut zombie);
                Ok(())
            }
            3..=5 => {
                self.commit_one(&mut zombie);
                Ok(())
            }
            6 => self.upload_one(&mut zombie, false),
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
            // Segments, then write-ahead ranges: (base, end, object, position, length).
            let pieces: Vec<(i64, i64, &str, u64, u64)> = state
                .segments
                .iter()
                .map(|s| {
                    (
                        s.base_offset,
                        s.end_offset,
                        s.object_key.as_str(),
                        0,
                        s.data_bytes,
                    )
                })
                .chain(state.wal_ranges.iter().map(|r| {
                    (
                        r.base_offset,
                        r.end_offset,
                        r.object_key.as_str(),
                        r.position,
                        r.len,
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
            for &(base, end, object, position, len) in &pieces {
                if base != next {
                    return Err(self.fail(format!(
                        "partition {p}: the manifest has {base}..{end} ({object}) where the log ends at {next}"
                    )));
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
            for r in &self.producers[p].requests {
                let Some(offset) = r.acked else { continue };
                // Trimmed: wholly below the manifest, which starts at or below the log
                // start offset.
                if offset + i64::from(r.records) <= first {
                    continue;
                }
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
                && total.collected > 0,
            "{total:?}"
        );
    }
}

/// The simulation finds a planted bug (owners told a flush is durable before its
/// commit) within its budget, so it is able to find such bugs at all.
#[test]
fn finds_an_acknowledgement_before_commit() {
    let found = (1..=500u64).find_map(|seed| run_seed(seed, Bug::AckBeforeCommit, STEPS).err());
    let found = found.expect("the planted bug went unnoticed for 500 seeds");
    assert!(found.contains("simulation seed"), "{found}");
    eprintln!("planted bug found: {found}");
}

/// ... and one in the segment lifecycle (an upload from the write-ahead objects that
/// skips a range: its commit drops the skipped range from the manifest).
#[test]
fn finds_a_segment_that_skips_a_range() {
    let found = (1..=500u64).find_map(|seed| run_seed(seed, Bug::SkipARange, STEPS).err());
    let found = found.expect("the planted bug went unnoticed for 500 seeds");
    assert!(found.contains("simulation seed"), "{found}");
    eprintln!("planted bug found: {found}");
}
