//! A real-client benchmark: one librdkafka producer and one consumer, at the client's
//! defaults (idempotence on, as Kafka's own clients default to; `acks=all`,
//! `linger.ms=5`, five requests in flight per connection), against any Kafka broker.
//!
//! Three phases: produce as fast as the producer goes for `--seconds`; read everything
//! back and verify every acknowledged record arrived exactly once; then produce at a
//! fixed rate while a consumer reads, and report end-to-end latency percentiles (from
//! the send to the consumer seeing the record, both clocks the same machine's).
//!
//! Each record carries its sequence number and send time in its first 16 bytes; the
//! rest is filler, random (incompressible) unless `--text`. It is a separate crate so
//! the broker never links librdkafka.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

#[derive(Parser, Debug)]
#[command(about = "one librdkafka producer and consumer at the client's defaults")]
struct Args {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap: String,
    /// Topic prefix: the run creates `<prefix>-<n>` and `<prefix>-<n>-e2e`.
    #[arg(long, default_value = "clientbench")]
    topic: String,
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Value bytes per record (at least 16).
    #[arg(long, default_value_t = 1024)]
    record_size: usize,
    /// Duration of the produce phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// `acks` of the producer (`all`, `1`); `1` turns idempotence off, as it requires all.
    #[arg(long, default_value = "all")]
    acks: String,
    /// Producer compression (`none`, `lz4`, `zstd`, ...).
    #[arg(long, default_value = "none")]
    compression: String,
    /// Compressible text filler instead of random bytes.
    #[arg(long)]
    text: bool,
    /// Records per second of the end-to-end phase (0 skips it).
    #[arg(long, default_value_t = 1000)]
    e2e_rate: u64,
    /// Duration of the end-to-end phase.
    #[arg(long, default_value_t = 10)]
    e2e_seconds: u64,
}

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Counts what the broker acknowledged, and remembers which sequence numbers.
#[derive(Default)]
struct Delivered {
    records: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    seqs: Mutex<HashSet<u64>>,
    /// Send-to-acknowledgement latencies (µs), kept only in the end-to-end phase.
    acks: Mutex<Option<Vec<u64>>>,
}

struct Counting(Arc<Delivered>);

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => {
                let payload = m.payload().unwrap_or_default();
                self.0.records.fetch_add(1, Ordering::Relaxed);
                self.0
                    .bytes
                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
                if let Some(seq) = seq_of(payload) {
                    self.0.seqs.lock().expect("seqs").insert(seq);
                }
                if let (Some(acks), Some(at)) =
                    (self.0.acks.lock().expect("acks").as_mut(), sent_at(payload))
                {
                    acks.push(micros_now().saturating_sub(at));
                }
            }
            Err((e, _)) => {
                self.0.errors.fetch_add(1, Ordering::Relaxed);
                self.0
                    .first_error
                    .lock()
                    .expect("error")
                    .get_or_insert_with(|| e.to_string());
            }
        }
    }
}

fn seq_of(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

/// The `q` quantile of sorted microseconds, in milliseconds.
fn pick(sorted: &[u64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1)))
        .map_or(f64::NAN, |&us| us as f64 / 1000.0)
}

/// The sequence number of the end-to-end phase's warm-up record.
const WARM_UP: u64 = u64::MAX;

fn sent_at(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(8..16)?.try_into().ok()?))
}

/// Filler the records' values are cut from: random bytes (xorshift), or text.
fn filler(text: bool) -> Vec<u8> {
    const LEN: usize = 1 << 20;
    if text {
        let words = b"the quick brown fox jumps over the lazy dog while stream processors count windows of events ";
        words.iter().copied().cycle().take(LEN).collect()
    } else {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..LEN)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }
}

fn producer(args: &Args, delivered: Arc<Delivered>) -> anyhow::Result<ThreadedProducer<Counting>> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &args.bootstrap)
        .set("acks", &args.acks)
        .set("compression.type", &args.compression);
    if args.acks == "all" || args.acks == "-1" {
        config.set("enable.idempotence", "true");
    }
    config
        .create_with_context(Counting(delivered))
        .context("creating the producer")
}

fn consumer(args: &Args, topic: &str) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap)
        .set("group.id", format!("{topic}-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .context("creating the consumer")?;
    consumer.subscribe(&[topic]).context("subscribing")?;
    Ok(consumer)
}

async fn create_topic(args: &Args, name: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap)
        .create()
        .context("creating the admin client")?;
    let topic = NewTopic::new(name, args.partitions, TopicReplication::Fixed(1));
    for result in admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .context("creating the topic")?
    {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, e)) => bail!("creating topic {name}: {e}"),
        }
    }
    Ok(())
}

/// Sends one record with sequence number `seq`, waiting while the producer's queue is full.
fn send(
    producer: &ThreadedProducer<Counting>,
    topic: &str,
    value: &mut [u8],
    seq: u64,
) -> anyhow::Result<()> {
    value[..8].copy_from_slice(&seq.to_be_bytes());
    value[8..16].copy_from_slice(&micros_now().to_be_bytes());
    loop {
        match producer.send::<[u8], [u8]>(BaseRecord::to(topic).payload(value)) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => bail!("producing: {e}"),
        }
    }
}

fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9)
}

/// Phase 1: produce as fast as the producer goes.
fn produce(args: &Args, topic: &str) -> anyhow::Result<Arc<Delivered>> {
    let delivered = Arc::new(Delivered::default());
    let producer = producer(args, delivered.clone())?;
    let filler = filler(args.text);
    let size = args.record_size.max(16);
    let mut value = vec![0u8; size];
    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let mut seq = 0u64;
    while Instant::now() < until {
        let at = (seq as usize * 7919) % (filler.len() - size);
        value[16..].copy_from_slice(&filler[at + 16..at + size]);
        send(&producer, topic, &mut value, seq)?;
        seq += 1;
    }
    producer
        .flush(Duration::from_secs(120))
        .context("waiting for every answer")?;
    let took = started.elapsed();
    let records = delivered.records.load(Ordering::Relaxed);
    let errors = delivered.errors.load(Ordering::Relaxed);
    println!(
        "produce: {:.1} MB/s, {:.0} records/s (acks={}, idempotence {}, compression {}, {} {} B records, {} partitions, {:.1} s, {} errors)",
        mb_per_s(delivered.bytes.load(Ordering::Relaxed), took),
        records as f64 / took.as_secs_f64(),
        args.acks,
        if args.acks == "all" || args.acks == "-1" { "on" } else { "off" },
        args.compression,
        if args.text { "text" } else { "random" },
        size,
        args.partitions,
        took.as_secs_f64(),
        errors,
    );
    if let Some(e) = delivered.first_error.lock().expect("error").as_ref() {
        bail!("{errors} records failed; the first: {e}");
    }
    Ok(delivered)
}

/// Phase 2: read everything back; every acknowledged record exactly once.
fn verify(args: &Args, topic: &str, delivered: &Delivered) -> anyhow::Result<()> {
    let want = delivered.seqs.lock().expect("seqs").clone();
    let consumer = consumer(args, topic)?;
    let mut seen: HashSet<u64> = HashSet::with_capacity(want.len());
    let (mut duplicates, mut bytes) = (0u64, 0u64);
    let mut started = None;
    let mut last_progress = Instant::now();
    while seen.len() < want.len() && last_progress.elapsed() < Duration::from_secs(30) {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message.context("consuming")?;
        started.get_or_insert_with(Instant::now);
        last_progress = Instant::now();
        let payload = message.payload().unwrap_or_default();
        bytes += payload.len() as u64;
        match seq_of(payload) {
            Some(seq) if !seen.insert(seq) => duplicates += 1,
            _ => {}
        }
    }
    let took = started.map_or(Duration::ZERO, |s| s.elapsed());
    let missing = want.difference(&seen).count();
    println!(
        "consume: {:.1} MB/s, {} records read in {:.1} s; verified: {} acknowledged, {} missing, {} duplicates",
        mb_per_s(bytes, took),
        seen.len() as u64 + duplicates,
        took.as_secs_f64(),
        want.len(),
        missing,
        duplicates,
    );
    if missing > 0 || duplicates > 0 {
        bail!("{missing} acknowledged records missing, {duplicates} read twice");
    }
    Ok(())
}

/// Phase 3: a fixed rate while a consumer reads; latency from send to receipt, in the
/// steady state: one warm-up record goes through first, so the producer's start-up
/// (metadata, producer id) and the consumer's first fetch position are not counted.
fn end_to_end(args: &Args, topic: &str) -> anyhow::Result<()> {
    let consumer = consumer(args, topic)?;
    // Joined and assigned before the first record is sent.
    let assigned_by = Instant::now() + Duration::from_secs(30);
    while consumer.assignment().map_or(0, |a| a.count()) == 0 {
        if Instant::now() > assigned_by {
            bail!("the consumer got no partitions within 30 s");
        }
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            m.context("consuming")?;
        }
    }
    let delivered = Arc::new(Delivered::default());
    let producer = producer(args, delivered.clone())?;
    let mut value = vec![b'x'; args.record_size.max(16)];
    let warm_up = Instant::now();
    send(&producer, topic, &mut value, WARM_UP)?;
    producer
        .flush(Duration::from_secs(30))
        .context("waiting for the warm-up record")?;
    let acked = warm_up.elapsed();
    *delivered.acks.lock().expect("acks") = Some(Vec::new());
    let warm_by = Instant::now() + Duration::from_secs(30);
    loop {
        if Instant::now() > warm_by {
            bail!("the warm-up record was not read within 30 s");
        }
        if let Some(m) = consumer.poll(Duration::from_millis(50)) {
            if seq_of(m.context("consuming")?.payload().unwrap_or_default()) == Some(WARM_UP) {
                println!(
                    "warm-up record: acknowledged after {:.1} ms, read after {:.1} ms",
                    acked.as_secs_f64() * 1000.0,
                    warm_up.elapsed().as_secs_f64() * 1000.0
                );
                break;
            }
        }
    }
    let total = args.e2e_rate * args.e2e_seconds;
    let reader = std::thread::spawn(move || -> anyhow::Result<Vec<u64>> {
        let mut latencies = Vec::with_capacity(total as usize);
        let mut last = Instant::now();
        while (latencies.len() as u64) < total && last.elapsed() < Duration::from_secs(30) {
            if let Some(m) = consumer.poll(Duration::from_millis(50)) {
                let m = m.context("consuming")?;
                last = Instant::now();
                if let Some(at) = sent_at(m.payload().unwrap_or_default()) {
                    latencies.push(micros_now().saturating_sub(at));
                }
            }
        }
        Ok(latencies)
    });
    let gap = Duration::from_secs_f64(1.0 / args.e2e_rate.max(1) as f64);
    let started = Instant::now();
    for seq in 0..total {
        let due = started + gap * seq as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        send(&producer, topic, &mut value, seq)?;
    }
    producer
        .flush(Duration::from_secs(60))
        .context("waiting for every answer")?;
    let mut latencies = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader panicked"))??;
    latencies.sort_unstable();
    let mut acks = delivered
        .acks
        .lock()
        .expect("acks")
        .take()
        .unwrap_or_default();
    acks.sort_unstable();
    println!(
        "end-to-end at {} records/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} of {} records read); acknowledged: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        args.e2e_rate,
        pick(&latencies, 0.50),
        pick(&latencies, 0.99),
        pick(&latencies, 1.0),
        latencies.len(),
        total,
        pick(&acks, 0.50),
        pick(&acks, 0.99),
        pick(&acks, 1.0),
    );
    if (latencies.len() as u64) < total {
        bail!("{} records never read", total - latencies.len() as u64);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.record_size < 16 {
        bail!("--record-size must be at least 16");
    }
    let (_, version) = rdkafka::util::get_rdkafka_version();
    println!("librdkafka {version}");
    let run = format!("{}-{}", args.topic, micros_now());
    create_topic(&args, &run).await?;
    let delivered = tokio::task::block_in_place(|| produce(&args, &run))?;
    tokio::task::block_in_place(|| verify(&args, &run, &delivered))?;
    if args.e2e_rate > 0 && args.e2e_seconds > 0 {
        let e2e = format!("{run}-e2e");
        create_topic(&args, &e2e).await?;
        tokio::task::block_in_place(|| end_to_end(&args, &e2e))?;
    }
    Ok(())
}
