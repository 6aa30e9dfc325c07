"""confluent-kafka (librdkafka) against Strata: admin, produce/consume, offsets."""

import time
import warnings
from collections import defaultdict

import pytest
from confluent_kafka import (KafkaError, KafkaException, TopicPartition, TIMESTAMP_CREATE_TIME)
from confluent_kafka.admin import (AlterConfigOpType, ConfigEntry, ConfigResource, ConfigSource,
                                   NewPartitions, NewTopic, OffsetSpec, ResourceType)

from conftest import (admin_client, consume_all, create_topic, producer, topic_partitions,
                      unique_topic, wait_for_topic)

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


def kafka_error_code(exc: BaseException):
    """The KafkaError code carried by a KafkaException, or None."""
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0].code()
    return None


def wait_topic_gone(bootstrap, name, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        md = admin_client(bootstrap).list_topics(timeout=10)
        if name not in md.topics:
            return
        time.sleep(0.2)
    raise AssertionError(f"topic {name} still listed in metadata {timeout}s after DeleteTopics")


def produce_one_by_one(bootstrap, topic, records):
    """Produce (key, value, timestamp) records each in its own request (flush after each)."""
    p = producer(bootstrap, **{"linger.ms": 0})
    offsets = []
    for key, value, ts in records:
        res = []
        p.produce(topic, key=key, value=value, partition=0, timestamp=ts,
                  on_delivery=lambda err, msg: res.append((err, msg.offset())))
        assert p.flush(30) == 0
        assert res and res[0][0] is None, f"delivery failed: {res}"
        offsets.append(res[0][1])
    return offsets


# ---------------------------------------------------------------------------
# topics
# ---------------------------------------------------------------------------

def test_create_topic_listed_in_metadata(module_broker):
    bs = module_broker.bootstrap
    topic = unique_topic("create")
    a = admin_client(bs)
    fs = a.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)],
                         operation_timeout=30)
    fs[topic].result(30)
    wait_for_topic(bs, topic, 3)

    md = a.list_topics(timeout=10)
    t = md.topics[topic]
    assert t.error is None
    assert sorted(t.partitions) == [0, 1, 2]
    for p in t.partitions.values():
        assert p.error is None
        assert p.leader == 0, f"partition {p.id} leader {p.leader}"
        assert p.replicas == [0] and p.isrs == [0]
    # the broker advertises exactly the address it was given
    assert {b.id: (b.host, b.port) for b in md.brokers.values()} == {
        0: ("127.0.0.1", module_broker.port)}

    # creating it again is refused with TOPIC_ALREADY_EXISTS
    fs = a.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)],
                         operation_timeout=30)
    with pytest.raises(KafkaException) as ei:
        fs[topic].result(30)
    assert kafka_error_code(ei.value) == KafkaError.TOPIC_ALREADY_EXISTS, ei.value


def test_describe_cluster(module_broker):
    a = admin_client(module_broker.bootstrap)  # keep the client alive until the future resolves
    desc = a.describe_cluster(request_timeout=30).result(30)
    assert desc.cluster_id, "empty cluster id"
    assert [(n.id, n.host, n.port) for n in desc.nodes] == [(0, "127.0.0.1", module_broker.port)]
    assert desc.controller is not None and desc.controller.id == 0


def test_auto_create_topic_on_produce(broker_factory):
    b = broker_factory(env={"STRATA_AUTO_CREATE_TOPICS_ENABLE": "true",
                            "STRATA_NUM_PARTITIONS": "2"})
    topic = unique_topic("auto")
    p = producer(b.bootstrap)
    results = []
    for i in range(10):
        p.produce(topic, key=str(i).encode(), value=f"auto-{i}".encode(),
                  on_delivery=lambda err, msg: results.append((err, msg.partition(), msg.offset())))
    assert p.flush(60) == 0
    assert len(results) == 10 and all(err is None for err, _, _ in results), results
    assert topic_partitions(b.bootstrap, topic) == 2, "auto-created topic should get num.partitions=2"
    msgs = consume_all(b.bootstrap, topic, 2)
    assert sorted(m.value() for m in msgs) == sorted(f"auto-{i}".encode() for i in range(10))


def test_auto_create_disabled(broker_factory):
    b = broker_factory(env={"STRATA_AUTO_CREATE_TOPICS_ENABLE": "false"})
    topic = unique_topic("noauto")
    p = producer(b.bootstrap, **{"message.timeout.ms": 5000})
    results = []
    p.produce(topic, value=b"x", on_delivery=lambda err, msg: results.append(err))
    p.flush(30)
    assert len(results) == 1 and results[0] is not None, \
        "producing to a missing topic must fail when auto.create.topics.enable=false"
    assert topic_partitions(b.bootstrap, topic) is None


def test_delete_topic(module_broker):
    bs = module_broker.bootstrap
    topic = unique_topic("del")
    create_topic(bs, topic, 2)
    p = producer(bs)
    for i in range(20):
        p.produce(topic, key=str(i).encode(), value=b"before-delete")
    assert p.flush(30) == 0

    a = admin_client(bs)
    a.delete_topics([topic], operation_timeout=30)[topic].result(30)
    wait_topic_gone(bs, topic)

    # deleting it again: UNKNOWN_TOPIC_OR_PART
    with pytest.raises(KafkaException) as ei:
        a.delete_topics([topic], operation_timeout=30)[topic].result(30)
    assert kafka_error_code(ei.value) == KafkaError.UNKNOWN_TOPIC_OR_PART, ei.value

    # a topic re-created under the same name starts empty
    create_topic(bs, topic, 1)
    assert consume_all(bs, topic, 1) == []


def test_create_partitions(module_broker):
    bs = module_broker.bootstrap
    topic = unique_topic("grow")
    create_topic(bs, topic, 1)
    a = admin_client(bs)
    a.create_partitions([NewPartitions(topic, 4)], operation_timeout=30)[topic].result(30)
    wait_for_topic(bs, topic, 4)

    p = producer(bs)
    for part in range(4):
        p.produce(topic, value=f"p{part}".encode(), partition=part)
    assert p.flush(30) == 0
    msgs = consume_all(bs, topic, 4)
    assert sorted((m.partition(), m.offset(), m.value()) for m in msgs) == [
        (part, 0, f"p{part}".encode()) for part in range(4)]

    # shrinking is not allowed
    with pytest.raises(KafkaException) as ei:
        a.create_partitions([NewPartitions(topic, 2)], operation_timeout=30)[topic].result(30)
    assert kafka_error_code(ei.value) == KafkaError.INVALID_PARTITIONS, ei.value
    assert topic_partitions(bs, topic) == 4


# ---------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------

def config_source(entry):
    src = entry.source
    return src if isinstance(src, ConfigSource) else ConfigSource(src)


def describe_topic_config(a, topic):
    res = ConfigResource(ResourceType.TOPIC, topic)
    return a.describe_configs([res], request_timeout=30)[res].result(30)


def test_describe_and_alter_topic_configs(module_broker):
    bs = module_broker.bootstrap
    a = admin_client(bs)
    topic = unique_topic("cfg")
    create_topic(bs, topic, 1, config={"retention.ms": "7200000"})

    entries = describe_topic_config(a, topic)
    for name in ("retention.ms", "retention.bytes", "cleanup.policy", "segment.bytes"):
        assert name in entries, f"{name} missing from DescribeConfigs: {sorted(entries)}"
    assert entries["retention.ms"].value == "7200000"
    int(entries["retention.bytes"].value)
    int(entries["segment.bytes"].value)

    # a topic without overrides reports defaults
    plain = unique_topic("cfgdef")
    create_topic(bs, plain, 1)
    d = describe_topic_config(a, plain)
    assert int(d["retention.ms"].value) != 7200000
    assert config_source(d["retention.ms"]) != ConfigSource.DYNAMIC_TOPIC_CONFIG
    assert config_source(entries["retention.ms"]) == ConfigSource.DYNAMIC_TOPIC_CONFIG

    # IncrementalAlterConfigs SET
    res = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry("retention.ms", "3600000", incremental_operation=AlterConfigOpType.SET)])
    a.incremental_alter_configs([res], request_timeout=30)[res].result(30)
    assert describe_topic_config(a, topic)["retention.ms"].value == "3600000"

    # IncrementalAlterConfigs DELETE reverts to the default
    res = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry("retention.ms", None, incremental_operation=AlterConfigOpType.DELETE)])
    a.incremental_alter_configs([res], request_timeout=30)[res].result(30)
    assert describe_topic_config(a, topic)["retention.ms"].value == d["retention.ms"].value

    # the other topic is untouched
    assert describe_topic_config(a, plain)["retention.ms"].value == d["retention.ms"].value

    # unknown topic: error
    bad = ConfigResource(ResourceType.TOPIC, unique_topic("nosuch"))
    with pytest.raises(KafkaException):
        a.describe_configs([bad], request_timeout=30)[bad].result(30)


def test_legacy_alter_configs(module_broker):
    bs = module_broker.bootstrap
    a = admin_client(bs)
    topic = unique_topic("altcfg")
    create_topic(bs, topic, 1)
    res = ConfigResource(ResourceType.TOPIC, topic, set_config={"retention.ms": "1800000"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        a.alter_configs([res], request_timeout=30)[res].result(30)
    assert describe_topic_config(a, topic)["retention.ms"].value == "1800000"


# ---------------------------------------------------------------------------
# produce / consume round trip per codec
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("codec", CODECS)
def test_roundtrip_codec(module_broker, codec):
    bs = module_broker.bootstrap
    topic = unique_topic(f"codec-{codec}")
    create_topic(bs, topic, 3)
    n = 3000
    base_ts = int(time.time() * 1000) - 3_600_000

    sent = []
    reports = {}

    def on_delivery(seq, err, msg):
        reports[seq] = (err, msg.partition(), msg.offset())

    p = producer(bs, **{"compression.type": codec, "linger.ms": 20, "batch.num.messages": 400})
    for i in range(n):
        key = f"key-{i % 37}".encode()
        value = None if i % 499 == 0 else (f"value-{i}-" + "x" * (i % 50)).encode()
        headers = [("seq", str(i).encode()), ("codec", codec.encode()),
                   ("dup", b"1"), ("dup", b"2")]
        if i % 7 == 0:
            headers.append(("empty", b""))
        if i % 11 == 0:
            headers.append(("null", None))
        ts = base_ts + i
        sent.append((key, value, headers, ts))
        p.produce(topic, key=key, value=value, headers=headers, timestamp=ts,
                  on_delivery=lambda err, msg, seq=i: on_delivery(seq, err, msg))
        if i % 100 == 0:
            p.poll(0)
    assert p.flush(60) == 0, "messages left undelivered"

    assert len(reports) == n
    failed = {s: r[0] for s, r in reports.items() if r[0] is not None}
    assert not failed, f"{len(failed)} delivery reports failed, e.g. {list(failed.items())[:3]}"

    msgs = consume_all(bs, topic, 3)
    assert len(msgs) == n, f"consumed {len(msgs)} messages, produced {n}"

    by_part = defaultdict(list)
    for m in msgs:
        by_part[m.partition()].append(m)
    seen = set()
    for part, ms in by_part.items():
        offsets = [m.offset() for m in ms]
        assert offsets == list(range(len(ms))), f"partition {part}: offsets not consecutive from 0"
        last_seq_per_key = {}
        for m in ms:
            headers = m.headers()
            seq = int(dict(headers)["seq"])
            assert seq not in seen, f"message {seq} consumed twice"
            seen.add(seq)
            key, value, sent_headers, ts = sent[seq]
            assert m.key() == key, f"seq {seq}"
            assert m.value() == value, f"seq {seq}: value {m.value()!r} != {value!r}"
            assert headers == sent_headers, f"seq {seq}: headers {headers} != {sent_headers}"
            assert m.timestamp() == (TIMESTAMP_CREATE_TIME, ts), f"seq {seq}: {m.timestamp()}"
            # delivery report told the producer where the message landed
            assert reports[seq][1:] == (part, m.offset()), f"seq {seq}: DR {reports[seq]}"
            prev = last_seq_per_key.get(key, -1)
            assert seq > prev, f"partition {part}: key {key} out of order ({prev} then {seq})"
            last_seq_per_key[key] = seq
    assert seen == set(range(n))


def test_large_message(module_broker):
    bs = module_broker.bootstrap
    topic = unique_topic("large")
    create_topic(bs, topic, 1)
    big = bytes(range(256)) * 3000  # 768000 bytes
    p = producer(bs, **{"compression.type": "none"})
    errs = []
    p.produce(topic, key=b"big", value=big, on_delivery=lambda err, msg: errs.append(err))
    assert p.flush(60) == 0
    assert errs == [None]
    msgs = consume_all(bs, topic, 1)
    assert len(msgs) == 1 and msgs[0].value() == big


# ---------------------------------------------------------------------------
# offsets
# ---------------------------------------------------------------------------

def list_offset(a, topic, spec):
    tp = TopicPartition(topic, 0)
    res = a.list_offsets({tp: spec}, request_timeout=30)
    return res[tp].result(30)


def test_list_offsets(module_broker):
    bs = module_broker.bootstrap
    a = admin_client(bs)
    topic = unique_topic("listoff")
    create_topic(bs, topic, 1)

    assert list_offset(a, topic, OffsetSpec.earliest()).offset == 0
    assert list_offset(a, topic, OffsetSpec.latest()).offset == 0

    base = int(time.time() * 1000) - 600_000
    ts = [base + i * 1000 for i in range(10)]
    ts[6] = base + 50_000  # out-of-order maximum in the middle
    offsets = produce_one_by_one(bs, topic, [(f"k{i}".encode(), f"v{i}".encode(), t)
                                             for i, t in enumerate(ts)])
    assert offsets == list(range(10))

    assert list_offset(a, topic, OffsetSpec.earliest()).offset == 0
    assert list_offset(a, topic, OffsetSpec.latest()).offset == 10
    r = list_offset(a, topic, OffsetSpec.for_timestamp(base + 2500))
    assert (r.offset, r.timestamp) == (3, base + 3000)
    assert list_offset(a, topic, OffsetSpec.for_timestamp(base)).offset == 0
    assert list_offset(a, topic, OffsetSpec.for_timestamp(base - 10_000)).offset == 0
    # first offset whose timestamp is >= target: message 6 (base+50s), not 9
    r = list_offset(a, topic, OffsetSpec.for_timestamp(base + 9000))
    assert (r.offset, r.timestamp) == (6, base + 50_000)
    # no message that late: offset -1
    assert list_offset(a, topic, OffsetSpec.for_timestamp(base + 60_000)).offset == -1
    r = list_offset(a, topic, OffsetSpec.max_timestamp())
    assert (r.offset, r.timestamp) == (6, base + 50_000)

    # the consumer-side watermark query agrees
    from confluent_kafka import Consumer
    c = Consumer({"bootstrap.servers": bs, "group.id": "strata-tests-dummy",
                  "enable.auto.commit": False})
    try:
        assert c.get_watermark_offsets(TopicPartition(topic, 0), timeout=30) == (0, 10)
        found = c.offsets_for_times([TopicPartition(topic, 0, base + 2500)], timeout=30)
        assert found[0].offset == 3
    finally:
        c.close()


def test_delete_records(module_broker):
    bs = module_broker.bootstrap
    a = admin_client(bs)
    topic = unique_topic("delrec")
    create_topic(bs, topic, 1)
    now = int(time.time() * 1000)
    produce_one_by_one(bs, topic, [(None, f"v{i}".encode(), now + i) for i in range(10)])

    tp = TopicPartition(topic, 0, 4)
    res = a.delete_records([tp], request_timeout=30, operation_timeout=30)
    deleted = list(res.values())[0].result(30)
    assert deleted.low_watermark == 4

    assert list_offset(a, topic, OffsetSpec.earliest()).offset == 4
    assert list_offset(a, topic, OffsetSpec.latest()).offset == 10
    msgs = consume_all(bs, topic, 1)
    assert [(m.offset(), m.value()) for m in msgs] == [(i, f"v{i}".encode()) for i in range(4, 10)]

    # deleting before the current start is a no-op; deleting past the end is an error
    tp2 = TopicPartition(topic, 0, 2)
    res = a.delete_records([tp2], request_timeout=30, operation_timeout=30)
    assert list(res.values())[0].result(30).low_watermark == 4
    tp3 = TopicPartition(topic, 0, 11)
    res = a.delete_records([tp3], request_timeout=30, operation_timeout=30)
    with pytest.raises(KafkaException) as ei:
        list(res.values())[0].result(30)
    assert kafka_error_code(ei.value) == KafkaError.OFFSET_OUT_OF_RANGE, ei.value

    # new writes continue after the old end
    offs = produce_one_by_one(bs, topic, [(None, b"after", now + 20)])
    assert offs == [10]
