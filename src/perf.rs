//! `strata perf`: a load tool for the whole broker over TCP.
//!
//! It measures produce throughput (MB/s, records/s) with pipelined requests on several
//! connections, `acks=all` latency (p50/p99/max) at a fixed rate, and consume throughput
//! of everything produced. Record batches are encoded once per partition and resent, so
//! the numbers measure the broker, not the load tool. Requests go to each partition's
//! leader (from Metadata), so a fleet is measured as a whole. Works against any Kafka
//! broker.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use clap::{value_parser, Arg, ArgMatches, Command};
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    CreateTopicsRequest, CreateTopicsResponse, FetchRequest, FetchResponse, ProduceRequest,
    ProduceResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use tokio::sync::mpsc;

use crate::client::{decode_response, Conn};

pub(crate) fn command() -> Command {
    Command::new("perf")
        .about("measure produce throughput, acks=all latency and consume throughput against a running broker")
        .arg(Arg::new("bootstrap").long("bootstrap").default_value("127.0.0.1:9092").help("broker address"))
        .arg(Arg::new("topic").long("topic").default_value("strata-perf").help("topic (created if missing)"))
        .arg(Arg::new("partitions").long("partitions").default_value("8").value_parser(value_parser!(i32)).help("partitions of the topic"))
        .arg(Arg::new("record-size").long("record-size").default_value("1024").value_parser(value_parser!(usize)).help("value bytes per record"))
        .arg(Arg::new("batch-records").long("batch-records").default_value("64").value_parser(value_parser!(usize)).help("records per batch"))
        .arg(Arg::new("seconds").long("seconds").default_value("10").value_parser(value_parser!(u64)).help("duration of the throughput phase"))
        .arg(Arg::new("connections").long("connections").default_value("4").value_parser(value_parser!(usize)).help("producer connections"))
        .arg(Arg::new("inflight").long("inflight").default_value("16").value_parser(value_parser!(usize)).help("requests in flight per connection"))
        .arg(Arg::new("acks").long("acks").default_value("-1").value_parser(value_parser!(i16)).help("acks for the throughput phase (-1 = all)"))
        .arg(Arg::new("latency-rate").long("latency-rate").default_value("1000").value_parser(value_parser!(u64)).help("produce requests per second in the latency phase (one batch each)"))
        .arg(Arg::new("latency-seconds").long("latency-seconds").default_value("10").value_parser(value_parser!(u64)).help("duration of the latency phase"))
}

struct Settings {
    bootstrap: String,
    topic: String,
    partitions: i32,
    record_size: usize,
    batch_records: usize,
    seconds: u64,
    connections: usize,
    inflight: usize,
    acks: i16,
    latency_rate: u64,
    latency_seconds: u64,
}

pub(crate) fn run(m: &ArgMatches) -> anyhow::Result<()> {
    let s = Settings {
        bootstrap: m
            .get_one::<String>("bootstrap")
            .cloned()
            .unwrap_or_default(),
        topic: m.get_one::<String>("topic").cloned().unwrap_or_default(),
        partitions: *m.get_one("partitions").unwrap_or(&8),
        record_size: *m.get_one("record-size").unwrap_or(&1024),
        batch_records: *m.get_one("batch-records").unwrap_or(&64),
        seconds: *m.get_one("seconds").unwrap_or(&10),
        connections: *m.get_one("connections").unwrap_or(&4),
        inflight: *m.get_one("inflight").unwrap_or(&16),
        acks: *m.get_one("acks").unwrap_or(&-1),
        latency_rate: *m.get_one("latency-rate").unwrap_or(&1000),
        latency_seconds: *m.get_one("latency-seconds").unwrap_or(&10),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(perf(s))
}

fn make_batch(records: usize, size: usize) -> anyhow::Result<Bytes> {
    let value = Bytes::from(vec![b'x'; size]);
    let now = crate::clock::now_ms();
    let recs: Vec<Record> = (0..records)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: -1,
            timestamp: now,
            key: Some(Bytes::from(format!("key-{i}"))),
            value: Some(value.clone()),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        recs.iter(),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )?;
    Ok(buf.freeze())
}

fn produce_request(topic: &str, partitions: &[i32], batch: &Bytes, acks: i16) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partition_data(
                partitions
                    .iter()
                    .map(|p| {
                        PartitionProduceData::default()
                            .with_index(*p)
                            .with_records(Some(batch.clone()))
                    })
                    .collect(),
            )])
}

fn check_produce(resp: &ProduceResponse) -> anyhow::Result<()> {
    for t in &resp.responses {
        for p in &t.partition_responses {
            if p.error_code != 0 {
                bail!("produce error {} on partition {}", p.error_code, p.index);
            }
        }
    }
    Ok(())
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// The partitions each leader serves, by leader address, from Metadata; waits until
/// every partition has a leader (a new topic is being claimed).
async fn leaders(
    admin: &Conn,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<BTreeMap<String, Vec<i32>>> {
    let deadline = crate::clock::instant() + Duration::from_secs(30);
    loop {
        let led = crate::client::partition_leaders(admin, &[topic]).await?;
        if led.len() == partitions as usize {
            let mut by_leader: BTreeMap<String, Vec<i32>> = BTreeMap::new();
            for ((_, p), addr) in led {
                by_leader.entry(addr).or_default().push(p);
            }
            return Ok(by_leader);
        }
        if crate::clock::instant() > deadline {
            bail!(
                "only {} of {partitions} partitions of {topic} have a leader",
                led.len()
            );
        }
        crate::clock::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads `partitions` (all led by the broker at `addr`) from offset 0 to their ends:
/// (bytes, records).
async fn consume(addr: String, topic: String, partitions: Vec<i32>) -> anyhow::Result<(u64, i64)> {
    let conn = Conn::connect(&addr).await?;
    let mut offsets: BTreeMap<i32, i64> = partitions.iter().map(|p| (*p, 0)).collect();
    let mut hws: BTreeMap<i32, i64> = partitions.iter().map(|p| (*p, i64::MAX)).collect();
    let mut bytes = 0u64;
    while offsets.iter().any(|(p, o)| *o < hws[p]) {
        let req = FetchRequest::default()
            .with_replica_id(kafka_protocol::messages::BrokerId(-1))
            .with_max_wait_ms(100)
            .with_min_bytes(1)
            .with_max_bytes(64 << 20)
            .with_topics(vec![FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_string(topic.clone())))
                .with_partitions(
                    offsets
                        .iter()
                        .filter(|(p, o)| **o < hws[p])
                        .map(|(p, o)| {
                            FetchPartition::default()
                                .with_partition(*p)
                                .with_fetch_offset(*o)
                                .with_partition_max_bytes(8 << 20)
                        })
                        .collect(),
                )]);
        let resp: FetchResponse = conn.call(&req, 11).await?;
        for t in &resp.responses {
            for p in &t.partitions {
                if p.error_code != 0 {
                    bail!(
                        "fetch error {} on partition {}",
                        p.error_code,
                        p.partition_index
                    );
                }
                hws.insert(p.partition_index, p.high_watermark);
                if let Some(records) = &p.records {
                    bytes += records.len() as u64;
                    if let Some((_, last)) = crate::log::batch::walk(records).last() {
                        offsets.insert(p.partition_index, last.last_offset() + 1);
                    }
                }
            }
        }
    }
    Ok((bytes, offsets.values().sum()))
}

async fn perf(s: Settings) -> anyhow::Result<()> {
    let admin = Conn::connect(&s.bootstrap).await?;
    let create = CreateTopicsRequest::default()
        .with_timeout_ms(30_000)
        .with_topics(vec![CreatableTopic::default()
            .with_name(TopicName(StrBytes::from_string(s.topic.clone())))
            .with_num_partitions(s.partitions)
            .with_replication_factor(1)]);
    let resp: CreateTopicsResponse = admin.call(&create, 5).await?;
    for t in &resp.topics {
        if t.error_code != 0 && t.error_code != 36 {
            bail!("creating topic: error {}", t.error_code);
        }
    }
    let batch = make_batch(s.batch_records, s.record_size)?;
    // Requests go to each partition's leader, so a fleet is measured as a whole.
    let by_leader = leaders(&admin, &s.topic, s.partitions).await?;
    let leader_of: BTreeMap<i32, String> = by_leader
        .iter()
        .flat_map(|(addr, parts)| parts.iter().map(move |p| (*p, addr.clone())))
        .collect();
    let record_bytes = (s.record_size * s.batch_records) as f64;

    // Phase 1: produce throughput (`connections` connections to every leader).
    let acked_batches = Arc::new(AtomicU64::new(0));
    let deadline = crate::clock::instant() + Duration::from_secs(s.seconds);
    let started = crate::clock::instant();
    let mut tasks = Vec::new();
    for (addr, parts) in &by_leader {
        for c in 0..s.connections {
            let conn = Conn::connect(addr).await?;
            // Each connection writes its share of the leader's partitions.
            let mine: Vec<i32> = parts
                .iter()
                .enumerate()
                .filter(|(i, _)| i % s.connections == c)
                .map(|(_, p)| *p)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let req = produce_request(&s.topic, &mine, &batch, s.acks);
            let acked = acked_batches.clone();
            let inflight = s.inflight;
            let acks = s.acks;
            tasks.push(tokio::spawn(async move {
                let mut pending = VecDeque::new();
                while crate::clock::instant() < deadline {
                    while pending.len() < inflight {
                        pending.push_back(conn.send(&req, 7, acks != 0).await?);
                    }
                    if let Some(Some(rx)) = pending.pop_front() {
                        let body = rx.await.context("connection closed")?;
                        check_produce(&decode_response::<ProduceRequest>(body, 7)?)?;
                    }
                    acked.fetch_add(mine.len() as u64, Ordering::Relaxed);
                }
                for rx in pending.into_iter().flatten() {
                    let body = rx.await.context("connection closed")?;
                    check_produce(&decode_response::<ProduceRequest>(body, 7)?)?;
                    acked.fetch_add(mine.len() as u64, Ordering::Relaxed);
                }
                anyhow::Ok(())
            }));
        }
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let batches = acked_batches.load(Ordering::Relaxed) as f64;
    println!(
        "produce: {:.1} MB/s, {:.0} records/s ({} partitions on {} brokers, {} B records, {} records/batch, acks={}, {} connections per broker x {} in flight, {:.1} s)",
        batches * record_bytes / secs / 1e6,
        batches * s.batch_records as f64 / secs,
        s.partitions,
        by_leader.len(),
        s.record_size,
        s.batch_records,
        s.acks,
        s.connections,
        s.inflight,
        secs
    );

    // Phase 2: acks=all latency at a fixed request rate.
    if s.latency_seconds > 0 && s.latency_rate > 0 {
        let mut conns = BTreeMap::new();
        for addr in by_leader.keys() {
            conns.insert(addr.clone(), Arc::new(Conn::connect(addr).await?));
        }
        let small = make_batch(1, s.record_size)?;
        let mut ticker =
            crate::clock::interval(Duration::from_nanos(1_000_000_000 / s.latency_rate));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let end = crate::clock::instant() + Duration::from_secs(s.latency_seconds);
        let (lat_tx, mut lat_rx) = mpsc::unbounded_channel();
        let mut i = 0usize;
        while crate::clock::instant() < end {
            ticker.tick().await;
            let partition = (i % s.partitions as usize) as i32;
            let req = produce_request(&s.topic, &[partition], &small, -1);
            i += 1;
            let conn = &conns[&leader_of[&partition]];
            let sent = crate::clock::instant();
            let rx = conn.send(&req, 7, true).await?.context("no response")?;
            let lat_tx = lat_tx.clone();
            tokio::spawn(async move {
                if let Ok(body) = rx.await {
                    let ok = decode_response::<ProduceRequest>(body, 7)
                        .map(|r| check_produce(&r).is_ok())
                        .unwrap_or(false);
                    let _ = lat_tx.send((sent.elapsed(), ok));
                }
            });
        }
        drop(lat_tx);
        let mut lats = Vec::new();
        let mut failed = 0;
        while let Some((l, ok)) = lat_rx.recv().await {
            if ok {
                lats.push(l)
            } else {
                failed += 1
            }
        }
        lats.sort();
        println!(
            "acks=all latency at {} requests/s ({} B records): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} requests, {} failed)",
            s.latency_rate,
            s.record_size,
            percentile(&lats, 0.5).as_secs_f64() * 1e3,
            percentile(&lats, 0.99).as_secs_f64() * 1e3,
            lats.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            lats.len(),
            failed
        );
    }

    // Phase 3: consume everything from the start, from every leader at once.
    let started = crate::clock::instant();
    let readers: Vec<_> = by_leader
        .into_iter()
        .map(|(addr, parts)| tokio::spawn(consume(addr, s.topic.clone(), parts)))
        .collect();
    let (mut bytes, mut total) = (0u64, 0i64);
    for r in readers {
        let (b, n) = r.await??;
        bytes += b;
        total += n;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "consume: {:.1} MB/s, {:.0} records/s ({} records, {:.1} MB, {:.1} s)",
        bytes as f64 / secs / 1e6,
        total as f64 / secs,
        total,
        bytes as f64 / 1e6,
        secs
    );
    Ok(())
}
