"""kafka-python against Strata: produce/consume per codec, admin topics, offsets."""

import time
from collections import defaultdict

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka import codec as kcodec

from conftest import unique_topic

CODECS = [None, "gzip", "snappy", "lz4", "zstd"]
CODEC_AVAILABLE = {None: lambda: True, "gzip": kcodec.has_gzip, "snappy": kcodec.has_snappy,
                   "lz4": kcodec.has_lz4, "zstd": kcodec.has_zstd}


def kp_admin(bootstrap):
    return KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)


def kp_create_topic(bootstrap, name, partitions):
    a = kp_admin(bootstrap)
    try:
        a.create_topics({name: {"num_partitions": partitions, "replication_factor": 1}},
                        timeout_ms=30000, wait_for_metadata=True)
    finally:
        a.close()


def kp_consume_all(bootstrap, topic, partitions, timeout=60.0):
    """Every record of `topic` from the beginning to the end offsets seen at start."""
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                      auto_offset_reset="earliest")
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        end = c.end_offsets(tps, timeout_ms=30000)
        records = []
        deadline = time.monotonic() + timeout
        while any(c.position(tp) < end[tp] for tp in tps):
            assert time.monotonic() < deadline, (
                f"kafka-python consumer stuck: positions "
                f"{ {tp.partition: c.position(tp) for tp in tps} } ends "
                f"{ {tp.partition: end[tp] for tp in tps} }")
            for recs in c.poll(timeout_ms=500).values():
                records.extend(recs)
        return records, end
    finally:
        c.close()


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c or "none")
def test_roundtrip_codec(module_broker, codec):
    assert CODEC_AVAILABLE[codec](), f"python library for {codec} missing from the venv"
    bs = module_broker.bootstrap
    topic = unique_topic(f"kp-{codec or 'none'}")
    kp_create_topic(bs, topic, 3)

    n = 2000
    base_ts = int(time.time() * 1000) - 3_600_000
    p = KafkaProducer(bootstrap_servers=bs, acks="all", compression_type=codec, linger_ms=10,
                      request_timeout_ms=30000)
    sent = []
    futures = []
    try:
        for i in range(n):
            key = f"key-{i % 23}".encode()
            value = (f"kp-{i}-" + "y" * (i % 40)).encode()
            headers = [("seq", str(i).encode()), ("h", b"\x00\x01binary")]
            ts = base_ts + i
            sent.append((key, value, headers, ts))
            futures.append(p.send(topic, key=key, value=value, headers=headers, timestamp_ms=ts))
        p.flush(timeout=60)
        metas = [f.get(timeout=60) for f in futures]
    finally:
        p.close(timeout=10)

    records, end = kp_consume_all(bs, topic, 3)
    assert len(records) == n, f"consumed {len(records)} records, produced {n}"
    assert sum(end.values()) == n

    by_part = defaultdict(list)
    for r in records:
        by_part[r.partition].append(r)
    seen = set()
    for part, rs in by_part.items():
        assert [r.offset for r in rs] == list(range(len(rs))), f"partition {part} offsets"
        last = {}
        for r in rs:
            seq = int(dict(r.headers)["seq"])
            assert seq not in seen, f"message {seq} consumed twice"
            seen.add(seq)
            key, value, headers, ts = sent[seq]
            assert (r.key, r.value) == (key, value), f"seq {seq}"
            assert [(k, bytes(v)) for k, v in r.headers] == headers, f"seq {seq}: {r.headers}"
            assert r.timestamp == ts and r.timestamp_type == 0, f"seq {seq}: {r.timestamp}"
            assert (metas[seq].partition, metas[seq].offset) == (part, r.offset), f"seq {seq}"
            assert seq > last.get(key, -1), f"key {key} out of order in partition {part}"
            last[key] = seq
    assert seen == set(range(n))


def test_admin_create_delete_topics(module_broker):
    bs = module_broker.bootstrap
    topic = unique_topic("kp-admin")
    a = kp_admin(bs)
    try:
        a.create_topics({topic: {"num_partitions": 2, "replication_factor": 1}}, timeout_ms=30000,
                        wait_for_metadata=True)
        assert topic in a.list_topics()
        desc = [t for t in a.describe_topics([topic]) if t["name"] == topic]
        assert len(desc) == 1 and len(desc[0]["partitions"]) == 2, desc

        a.create_partitions({topic: 3}, timeout_ms=30000)
        deadline = time.monotonic() + 30
        while True:
            desc = [t for t in a.describe_topics([topic]) if t["name"] == topic]
            if len(desc[0]["partitions"]) == 3:
                break
            assert time.monotonic() < deadline, f"partition count did not grow: {desc}"
            time.sleep(0.2)

        a.delete_topics([topic], timeout_ms=30000)
        deadline = time.monotonic() + 30
        while topic in a.list_topics():
            assert time.monotonic() < deadline, "topic still listed after delete_topics"
            time.sleep(0.2)
    finally:
        a.close()


def test_offsets_queries(module_broker):
    bs = module_broker.bootstrap
    topic = unique_topic("kp-offsets")
    kp_create_topic(bs, topic, 1)
    base = int(time.time() * 1000) - 60_000
    p = KafkaProducer(bootstrap_servers=bs, acks="all")
    try:
        for i in range(5):
            p.send(topic, value=f"m{i}".encode(), partition=0, timestamp_ms=base + i * 1000)
            p.flush(timeout=30)
    finally:
        p.close(timeout=10)
    c = KafkaConsumer(bootstrap_servers=bs, group_id=None, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        assert c.beginning_offsets([tp], timeout_ms=30000)[tp] == 0
        assert c.end_offsets([tp], timeout_ms=30000)[tp] == 5
        found = c.offsets_for_times({tp: base + 1500}, timeout_ms=30000)[tp]
        assert found is not None and found.offset == 2 and found.timestamp == base + 2000
    finally:
        c.close()


def test_subscribe_without_group(module_broker):
    """Topic subscription with group_id=None (no coordinator) reads from the beginning."""
    bs = module_broker.bootstrap
    topic = unique_topic("kp-sub")
    kp_create_topic(bs, topic, 2)
    p = KafkaProducer(bootstrap_servers=bs, acks="all")
    try:
        for i in range(10):
            p.send(topic, key=str(i).encode(), value=f"s{i}".encode())
        p.flush(timeout=30)
    finally:
        p.close(timeout=10)
    c = KafkaConsumer(topic, bootstrap_servers=bs, auto_offset_reset="earliest",
                      consumer_timeout_ms=10000)
    try:
        got = []
        for m in c:
            got.append(m.value)
            if len(got) == 10:
                break
    finally:
        c.close()
    assert sorted(got) == sorted(f"s{i}".encode() for i in range(10))


def test_describe_producers_shows_the_idempotent_producers_of_a_partition(module_broker):
    """DescribeProducers (kafka-python's admin, as `kafka-transactions.sh
    describe-producers` sends it): each idempotent producer that wrote to the partition,
    with its epoch and the last sequence it wrote; a partition with no producer has none."""
    from confluent_kafka import Producer
    bs = module_broker.bootstrap
    topic = unique_topic("kp-producers")
    kp_create_topic(bs, topic, 2)
    counts = {}
    for name, n in (("a", 7), ("b", 3)):
        p = Producer({"bootstrap.servers": bs, "enable.idempotence": True, "linger.ms": 0})
        for i in range(n):
            p.produce(topic, value=b"%s%d" % (name.encode(), i), partition=0)
            p.flush(30)  # one batch each: the last sequence is n - 1
        counts[name] = n
    admin = kp_admin(bs)
    try:
        got = admin.describe_producers([TopicPartition(topic, 0), TopicPartition(topic, 1)])
    finally:
        admin.close()
    producers = got[TopicPartition(topic, 0)].active_producers
    assert sorted(p.last_sequence for p in producers) == sorted(n - 1 for n in counts.values()), producers
    assert all(p.producer_id >= 0 and p.producer_epoch == 0 for p in producers), producers
    assert all(p.last_timestamp > 0 and p.current_transaction_start_offset == -1 for p in producers)
    assert len({p.producer_id for p in producers}) == 2
    assert got[TopicPartition(topic, 1)].active_producers == []
