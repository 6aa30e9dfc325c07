"""Compacted topics (`cleanup.policy=compact`) with real clients.

Keyed updates spread over many small sealed segments are compacted: reading from offset 0
returns exactly the newest value of every key (computed here from what was produced),
each record at the offset it was produced at, offsets strictly increasing; tombstones go
once `delete.retention.ms` has passed; a keyless record is refused with INVALID_RECORD
and nothing of its batch is stored. The configs are created, described and altered with
the AdminClient like any Kafka topic's.
"""

import random
import re
import time

import pytest

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from conftest import metric_sum, producer, scrape_metrics, unique_topic

SETTINGS = {"STRATA_LOG_CLEANER_BACKOFF_MS": "300", "STRATA_FILE_DELETE_DELAY_MS": "500"}
TOPIC_CONFIG = {"cleanup.policy": "compact", "segment.bytes": "16384", "segment.ms": "1000",
                "min.cleanable.dirty.ratio": "0.01", "delete.retention.ms": "2000"}


def create_compacted(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    fs = admin.create_topics([NewTopic(topic, 1, 1, config=TOPIC_CONFIG)])
    fs[topic].result(30)


def produce_all(bootstrap: str, topic: str, records, **conf) -> dict:
    """Produces (key, value) pairs in order; {offset: (key, value)} as acknowledged."""
    p = producer(bootstrap, **{"linger.ms": 5, **conf})
    acked, errors = {}, []

    def report(err, msg):
        if err is not None:
            errors.append(err)
        else:
            acked[msg.offset()] = (msg.key(), msg.value())

    for key, value in records:
        while True:
            try:
                p.produce(topic, key=key, value=value, on_delivery=report)
                break
            except BufferError:  # the client's queue is full: let deliveries drain
                p.poll(0.1)
        p.poll(0)
    assert p.flush(60) == 0
    assert not errors, errors[:3]
    return acked


def read_from_zero(bootstrap: str, topic: str, **conf) -> list:
    """Every record from offset 0 to the end: [(offset, key, value)]."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_topic("g"),
                  "enable.auto.commit": False, "enable.partition.eof": True, **conf})
    c.assign([TopicPartition(topic, 0, 0)])
    out = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    return out
                raise AssertionError(m.error())
            out.append((m.offset(), m.key(), m.value()))
    finally:
        c.close()
    raise AssertionError(f"no end of partition within 60 s; {len(out)} records read")


def newest(acked: dict) -> dict:
    """{key: (offset, value)} of each key's newest record."""
    latest = {}
    for offset in sorted(acked):
        key, value = acked[offset]
        latest[key] = (offset, value)
    return latest


def check_read(read: list, acked: dict) -> None:
    offsets = [o for o, _, _ in read]
    assert offsets == sorted(set(offsets)), "offsets strictly increase"
    for offset, key, value in read:
        assert acked[offset] == (key, value), f"offset {offset} holds what was produced there"
    seen = {key: (offset, value) for offset, key, value in read}
    for key, (offset, value) in newest(acked).items():
        if value is not None:
            assert seen.get(key) == (offset, value), f"{key!r}: newest value missing"


def wait_compacted(bootstrap: str, topic: str, acked: dict, live_keys: int,
                   timeout: float = 60) -> list:
    """Reads until every record left is its key's newest (one per live key), or fails."""
    deadline = time.monotonic() + timeout
    while True:
        read = read_from_zero(bootstrap, topic)
        check_read(read, acked)
        if len(read) == live_keys:
            return read
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(read)} records left, want {live_keys}")
        time.sleep(1)


def read_while_updating(bootstrap: str, topic: str, seconds: float, **conf) -> tuple[int, list]:
    """Updates 100 keys without pause while a consumer tails the partition and others
    replay it from 0, again and again, for `seconds`: a replay's offsets strictly
    increase and hold every key's newest value as of when it started; so do the tailed
    offsets. `conf` goes to the consumers (client.rack). Returns (replays, tailed)."""
    import threading
    from confluent_kafka import Consumer, TopicPartition
    keys = [b"k%03d" % k for k in range(100)]
    acked: dict = {}
    stop = threading.Event()

    def produce():
        i = 0
        while not stop.is_set():
            batch = [(keys[(i + j) % len(keys)], b"v%07d-" % (i + j) + b"y" * 80) for j in range(200)]
            acked.update(produce_all(bootstrap, topic, batch))
            i += 200

    writer = threading.Thread(target=produce)
    writer.start()
    tail = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_topic("g"),
                     "enable.auto.commit": False, **conf})
    tail.assign([TopicPartition(topic, 0, 0)])
    tailed = []
    replays = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(20):
                m = tail.poll(0.05)
                if m is not None and not m.error():
                    tailed.append(m.offset())
            snapshot = newest(dict(acked))
            read = read_from_zero(bootstrap, topic, **conf)
            offsets = [o for o, _, _ in read]
            assert offsets == sorted(set(offsets)), "a replay's offsets strictly increase"
            seen = {k: o for o, k, _ in read}
            for key, (offset, _) in snapshot.items():
                assert seen.get(key, -1) >= offset, f"{key!r}: newest value missing from a replay"
            replays += 1
    finally:
        stop.set()
        writer.join(60)
        tail.close()
    assert tailed == sorted(set(tailed)), "the tailing consumer's offsets strictly increase"
    return replays, tailed


def test_keyed_updates_compact_to_the_newest_value_per_key(broker_factory):
    topic = unique_topic("compacted")
    b = broker_factory(env=SETTINGS)
    create_compacted(b.bootstrap, topic)

    keys = [b"k%04d" % k for k in range(300)]
    updates = [(keys[i % len(keys)], b"v%06d-" % i + b"x" * 100) for i in range(6000)]
    acked = produce_all(b.bootstrap, topic, updates)
    # Tombstones for the first 30 keys.
    acked.update(produce_all(b.bootstrap, topic, [(k, None) for k in keys[:30]]))

    # Every record left is its key's newest; tombstones still count until their horizon.
    read = wait_compacted(b.bootstrap, topic, acked, len(keys))
    tombstones = [k for _, k, v in read if v is None]
    assert sorted(tombstones) == keys[:30]

    text = scrape_metrics(b.http_port)
    assert metric_sum(text, "strata_compaction_passes_total", outcome="committed") >= 1
    removed = metric_sum(text, "strata_compaction_records_total", outcome="removed")
    assert removed >= 6000 - len(keys), removed
    read_bytes = metric_sum(text, "strata_compaction_bytes_total", direction="read")
    written = metric_sum(text, "strata_compaction_bytes_total", direction="written")
    assert written < read_bytes / 4, (read_bytes, written)
    print(f"compaction read {read_bytes:.0f} B, wrote {written:.0f} B "
          f"({written / read_bytes:.3f} of it)")

    # Past the delete horizon a pass removes the tombstones, with nothing new written.
    read = wait_compacted(b.bootstrap, topic, acked, len(keys) - 30)
    assert not [k for _, k, v in read if v is None], "tombstones gone after their horizon"


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_keyless_records_are_refused_on_a_compacted_topic(broker_factory, compression):
    b = broker_factory()
    topic = unique_topic("compacted-keyless")
    create_compacted(b.bootstrap, topic)
    p = producer(b.bootstrap, **{"linger.ms": 50, "enable.idempotence": False, "retries": 0,
                                 "compression.type": compression})
    errors = []
    for i in range(3):
        key = None if i == 1 else b"k%d" % i
        p.produce(topic, key=key, value=b"v", on_delivery=lambda err, _m: errors.append(err))
    p.flush(30)
    assert errors and all(e is not None and e.code() == KafkaError.INVALID_RECORD for e in errors), errors
    assert read_from_zero(b.bootstrap, topic) == [], "nothing of the refused batch is stored"


def test_compaction_configs_are_described_and_altered(broker_factory):
    b = broker_factory()
    topic = unique_topic("compacted-config")
    create_compacted(b.bootstrap, topic)
    admin = AdminClient({"bootstrap.servers": b.bootstrap})
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    described = admin.describe_configs([res])[res].result(30)
    assert described["cleanup.policy"].value == "compact"
    assert described["cleanup.policy"].source == 1  # DYNAMIC_TOPIC_CONFIG
    assert described["min.compaction.lag.ms"].value == "0"
    assert described["min.compaction.lag.ms"].source == 5  # DEFAULT_CONFIG
    assert described["max.compaction.lag.ms"].value == "9223372036854775807"

    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry
    entry = ConfigEntry("cleanup.policy", "compact,delete",
                        incremental_operation=AlterConfigOpType.SET)
    res = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[entry])
    admin.incremental_alter_configs([res])[res].result(30)
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    assert admin.describe_configs([res])[res].result(30)["cleanup.policy"].value == "compact,delete"

    bad = ConfigEntry("cleanup.policy", "compaction", incremental_operation=AlterConfigOpType.SET)
    res = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[bad])
    try:
        admin.incremental_alter_configs([res])[res].result(30)
        raise AssertionError("an unknown policy is refused")
    except KafkaException as e:
        assert e.args[0].code() == KafkaError.INVALID_CONFIG, e


def test_readers_during_compaction_see_no_duplicate_missing_or_backward_offset(broker_factory):
    """A consumer tailing the partition and one replaying it from 0, again and again,
    while updates go on and passes commit: offsets only rise, none repeats, and each
    replay holds every key's newest value as of when it started."""
    b = broker_factory(env=SETTINGS)
    topic = unique_topic("compacted-readers")
    create_compacted(b.bootstrap, topic)
    replays, tailed = read_while_updating(b.bootstrap, topic, 15)
    passes = metric_sum(scrape_metrics(b.http_port), "strata_compaction_passes_total", outcome="committed")
    assert passes >= 2, f"passes committed while reading: {passes}"
    print(f"{replays} replays and {len(tailed)} tailed records over {passes:.0f} passes")


def test_a_pass_killed_mid_rewrite_loses_nothing_and_leaves_no_garbage(broker_factory):
    """SIGKILL while a pass has written some of its objects, the cache wiped: after the
    restart the next pass redoes the work, every key's newest value is there, and the
    orphan collector deletes the killed pass's objects."""
    slow = {**SETTINGS, "STRATA_LOG_CLEANER_IO_MAX_BYTES_PER_SECOND": "400000"}
    b = broker_factory(env=slow)
    topic = unique_topic("compacted-kill")
    create_compacted(b.bootstrap, topic)
    # Small batches make small segments, and 2,000 keys survive in ~40 outputs: the
    # pass spends a second or more writing them, after seconds of (throttled) reading.
    keys = [b"k%04d" % k for k in range(2000)]
    rng = random.Random(7)
    acked = produce_all(b.bootstrap, topic,
                        [(rng.choice(keys), b"v%06d-" % i + b"z" * 300) for i in range(6000)],
                        **{"batch.size": 16384})

    def compacted_objects() -> set:
        return {k for k in b.objects("segments") if re.search(r"-\d+-c\d+\.seg$", k)}

    def committed() -> float:
        return metric_sum(scrape_metrics(b.http_port), "strata_compaction_passes_total",
                          outcome="committed")

    # Kill once a pass has written objects it has not committed: new compacted objects
    # seen while the count of committed passes stays what it was before they appeared.
    deadline = time.monotonic() + 90
    while True:
        assert time.monotonic() < deadline, "no pass caught mid-write within 90 s"
        before, known = committed(), compacted_objects()
        time.sleep(0.05)
        fresh = compacted_objects() - known
        if fresh and committed() == before:
            break
    b.kill9()
    abandoned = fresh
    b.extra_env.update({"STRATA_LOG_CLEANER_IO_MAX_BYTES_PER_SECOND": "0",
                        "STRATA_ORPHAN_GRACE_MS": "1000", "STRATA_ORPHAN_CHECK_INTERVAL_MS": "1000"})
    b.restart(hard=True, wipe_cache=True)  # already killed: this only wipes and starts

    live = len({k for k, _ in acked.values()})
    read = wait_compacted(b.bootstrap, topic, acked, live)
    assert len(read) == live
    deadline = time.monotonic() + 30
    while abandoned & compacted_objects():
        assert time.monotonic() < deadline, f"abandoned objects not collected: {abandoned & compacted_objects()}"
        time.sleep(0.5)
    deleted = metric_sum(scrape_metrics(b.http_port), "strata_orphans_deleted_total", prefix="segments")
    assert deleted >= len(abandoned), deleted


def test_200k_updates_over_10k_keys_compact_and_the_bucket_shrinks(broker_factory):
    """The issue's scale case: 200,000 keyed updates over 10,000 keys in ~80 sealed
    segments of a topic made compacted afterwards (AlterConfigs on a topic with data):
    what is left is exactly each key's newest record at its original offset, the
    tombstoned keys go after their horizon, and the bucket holds a fraction of the bytes."""
    b = broker_factory(env=SETTINGS)
    topic = unique_topic("compacted-scale")
    admin = AdminClient({"bootstrap.servers": b.bootstrap})
    config = {"cleanup.policy": "delete", "segment.bytes": "262144", "segment.ms": "1000"}
    admin.create_topics([NewTopic(topic, 1, 1, config=config)])[topic].result(30)

    rng = random.Random(200_000)
    keys = [b"key-%05d" % k for k in range(10_000)]
    acked = produce_all(b.bootstrap, topic,
                        [(rng.choice(keys), b"v%07d-" % i + b"s" * 90) for i in range(200_000)],
                        **{"batch.size": 65536})
    assert len(acked) == 200_000

    def topic_bytes() -> tuple[int, int]:
        found = b.objects("segments", ".seg")  # the broker's only topic
        return sum(found.values()), len(found)

    # Everything sealed and uploaded: the bucket's bytes for the topic stop growing.
    last, deadline = (-1, 0), time.monotonic() + 60
    while (now := topic_bytes()) != last or now[1] < 50:
        assert time.monotonic() < deadline, f"segments still changing after 60 s: {now}"
        last = now
        time.sleep(2)
    before, segments = last

    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry
    entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
               for k, v in {**TOPIC_CONFIG, "segment.bytes": "262144"}.items()]
    res = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=entries)
    admin.incremental_alter_configs([res])[res].result(30)

    live = len({k for k, _ in acked.values()})
    wait_compacted(b.bootstrap, topic, acked, live, timeout=120)
    after, _ = topic_bytes()
    print(f"200,000 updates over {live} keys in {segments} segments: the topic's segment "
          f"objects went from {before} B to {after} B ({after / before:.3f} of it)")
    assert after < before / 10, (before, after)

    # Tombstones for 1,000 keys: gone after delete.retention.ms, the rest untouched.
    deleted = keys[:1000]
    acked.update(produce_all(b.bootstrap, topic, [(k, None) for k in deleted]))
    read = wait_compacted(b.bootstrap, topic, acked, live - len(set(deleted) & {k for k, _ in acked.values()}),
                          timeout=120)
    assert not set(deleted) & {k for _, k, _ in read}, "tombstoned keys gone after their horizon"


def test_kafka_python_manages_a_compacted_topic_and_kcat_reads_it(broker_factory):
    """kafka-python's admin client creates, describes and alters a compacted topic (the
    legacy AlterConfigs, which replaces every dynamic config); its producer writes keyed
    updates; kcat reads the compacted partition from the beginning."""
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import ConfigResource as KpConfigResource, NewTopic as KpNewTopic
    from test_kcat import KCAT, kcat
    if KCAT is None:
        pytest.fail("kcat not installed (tests/run installs it)")
    b = broker_factory(env=SETTINGS)
    topic = unique_topic("compacted-kp")
    admin = KafkaAdminClient(bootstrap_servers=b.bootstrap, request_timeout_ms=30000)
    try:
        admin.create_topics([KpNewTopic(topic, 1, 1, topic_configs=TOPIC_CONFIG)])

        def described() -> dict:
            got = admin.describe_configs([KpConfigResource("TOPIC", topic)], config_filter="all")
            entries = next(iter(next(iter(got.values())).values()))
            return {k: (v["value"] if isinstance(v, dict) else v) for k, v in entries.items()}

        assert described()["cleanup.policy"] == "compact"
        admin.alter_configs([KpConfigResource("TOPIC", topic, configs={
            **TOPIC_CONFIG, "cleanup.policy": "compact,delete", "min.compaction.lag.ms": "100"})])
        now = described()
        assert now["cleanup.policy"] == "compact,delete" and now["min.compaction.lag.ms"] == "100", now
    finally:
        admin.close()

    keys = [b"kp%03d" % k for k in range(50)]
    p = KafkaProducer(bootstrap_servers=b.bootstrap, acks="all", linger_ms=5)
    sent = [(keys[i % len(keys)], b"v%05d" % i) for i in range(3000)]
    futures = [p.send(topic, key=k, value=v) for k, v in sent]
    p.flush(60)
    acked = {f.get(30).offset: kv for f, kv in zip(futures, sent)}
    p.close()

    def kcat_read() -> list:
        res = kcat("-b", b.bootstrap, "-C", "-t", topic, "-p", "0", "-e", "-o", "beginning",
                   "-q", "-f", "%o|%k|%s\n")
        rows = [line.split("|") for line in res.stdout.decode().splitlines()]
        return [(int(o), k.encode(), v.encode()) for o, k, v in rows]

    deadline = time.monotonic() + 60
    while len(read := kcat_read()) != len(keys):
        assert time.monotonic() < deadline, f"{len(read)} records left, want {len(keys)}"
        time.sleep(1)
    check_read(read, acked)
