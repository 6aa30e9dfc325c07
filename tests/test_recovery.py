"""Durability across restarts: SIGTERM, SIGKILL, SIGKILL + loss of the local cache.

The crash test keeps one idempotent confluent-kafka producer process running
while the broker is killed with SIGKILL at random moments, its local cache dir
(DATA/cache) removed, and restarted. Every acknowledged message must survive,
at the offset its delivery report named, with no gaps and no duplicates.
Set STRATA_RECOVERY_SEED to replay a run.
"""

import os
import random
import shutil
import subprocess
import time
from collections import defaultdict

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

from conftest import (admin_client, consume_all, create_topic, producer, python_exe,
                      topic_partitions, unique_topic)

PARTITIONS = 4
ROUNDS = 8
BROKER_ENV = {"STRATA_SEGMENT_BYTES": "1048576", "STRATA_WAL_FLUSH_INTERVAL_MS": "5"}

PRODUCER_SCRIPT = r'''
import os, sys
from confluent_kafka import Producer

bootstrap, topic, ack_path, fail_path, stop_path, done_path = sys.argv[1:7]
partitions = int(sys.argv[7])
acks = open(ack_path, "a", buffering=1)
fails = open(fail_path, "a", buffering=1)
fatal = []

def on_error(err):
    print("producer error_cb:", err, file=sys.stderr, flush=True)
    if err.fatal():
        fatal.append(err)

def on_delivery(err, msg):
    mid = int(msg.key())
    if err is None:
        acks.write(f"{mid} {msg.partition()} {msg.offset()}\n")
    else:
        fails.write(f"{mid} {err}\n")

p = Producer({
    "bootstrap.servers": bootstrap,
    "acks": "all",
    "enable.idempotence": True,
    "message.timeout.ms": 300000,
    "linger.ms": 5,
    "retry.backoff.ms": 100,
    "retry.backoff.max.ms": 1000,
    "reconnect.backoff.ms": 50,
    "reconnect.backoff.max.ms": 500,
    "error_cb": on_error,
})
i = 0
while not os.path.exists(stop_path) and not fatal:
    for _ in range(20):
        value = f"{i:09d}|".encode() + b"x" * 150
        while True:
            try:
                p.produce(topic, key=str(i).encode(), value=value, partition=i % partitions,
                          on_delivery=on_delivery)
                break
            except BufferError:
                p.poll(0.1)
        i += 1
    p.poll(0.005)
remaining = p.flush(240)
with open(done_path, "w") as f:
    f.write(f"{i} {remaining}\n")
if fatal:
    print("FATAL:", fatal, file=sys.stderr, flush=True)
    sys.exit(3)
sys.exit(0 if remaining == 0 else 4)
'''


def read_acks(path):
    """{id: (partition, offset)} from complete lines of the ack file."""
    out = {}
    try:
        data = path.read_text()
    except FileNotFoundError:
        return out
    for line in data.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        mid, part, off = map(int, line.split())
        assert mid not in out, f"message {mid} acknowledged twice"
        out[mid] = (part, off)
    return out


def watermarks(bootstrap, topic, partitions, timeout=30.0):
    """{partition: (low, high)}, retrying while the broker is still coming up."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "strata-tests-dummy",
                  "enable.auto.commit": False})
    try:
        deadline = time.monotonic() + timeout
        out = {}
        for p in range(partitions):
            while True:
                try:
                    out[p] = c.get_watermark_offsets(TopicPartition(topic, p), timeout=5)
                    break
                except KafkaException as e:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"watermarks of {topic}[{p}] unavailable: {e}")
                    time.sleep(0.2)
        return out
    finally:
        c.close()


def produce_numbered(bootstrap, topic, partitions, start, count):
    p = producer(bootstrap)
    errs = []
    for i in range(start, start + count):
        p.produce(topic, key=str(i).encode(), value=f"m{i}".encode(), partition=i % partitions,
                  on_delivery=lambda err, msg: errs.append(err) if err else None)
        if i % 500 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    assert not errs, errs[:5]


def check_numbered(bootstrap, topic, partitions, count):
    msgs = consume_all(bootstrap, topic, partitions, timeout=90)
    by_part = defaultdict(list)
    for m in msgs:
        by_part[m.partition()].append(m)
    for part, ms in by_part.items():
        assert [m.offset() for m in ms] == list(range(len(ms))), f"partition {part} offsets"
    assert sorted(int(m.key()) for m in msgs) == list(range(count))


# ---------------------------------------------------------------------------
# simple restarts
# ---------------------------------------------------------------------------

def test_graceful_restart_keeps_data(broker_factory):
    b = broker_factory(env=BROKER_ENV)
    topic = unique_topic("graceful")
    create_topic(b.bootstrap, topic, 2)
    produce_numbered(b.bootstrap, topic, 2, 0, 2000)
    rc = b.stop()
    assert rc == 0, f"broker exited with {rc} on SIGTERM (expected a clean exit 0)"
    b.start()
    check_numbered(b.bootstrap, topic, 2, 2000)
    produce_numbered(b.bootstrap, topic, 2, 2000, 100)
    check_numbered(b.bootstrap, topic, 2, 2100)


@pytest.mark.parametrize("wipe_cache", [False, True], ids=["keep-cache", "wipe-cache"])
def test_kill9_keeps_acknowledged_data(broker_factory, wipe_cache):
    b = broker_factory(env=BROKER_ENV)
    topic = unique_topic("kill9")
    create_topic(b.bootstrap, topic, 3)
    produce_numbered(b.bootstrap, topic, 3, 0, 3000)
    before = watermarks(b.bootstrap, topic, 3)
    b.restart(hard=True, wipe_cache=wipe_cache)
    after = watermarks(b.bootstrap, topic, 3)
    assert after == before, f"watermarks changed across kill -9: {before} -> {after}"
    check_numbered(b.bootstrap, topic, 3, 3000)
    # and the broker accepts writes again, continuing the offsets
    produce_numbered(b.bootstrap, topic, 3, 3000, 30)
    check_numbered(b.bootstrap, topic, 3, 3030)


def test_losing_the_whole_disk_loses_nothing_on_s3(broker_factory):
    """On S3 with the metadata in the bucket (the default there), kill -9 plus the loss
    of the entire data directory loses nothing acknowledged: topics, configs, data and
    committed offsets all come back, and the offsets carry on."""
    b = broker_factory(env=BROKER_ENV, store="s3")
    assert "bucket://" in b.args()
    topic = unique_topic("disk-lost")
    create_topic(b.bootstrap, topic, 3, config={"retention.ms": "5400000"})
    produce_numbered(b.bootstrap, topic, 3, 0, 3000)
    group = unique_topic("g")
    c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": group,
                  "enable.auto.commit": False})
    c.commit(offsets=[TopicPartition(topic, p, 100 + p) for p in range(3)], asynchronous=False)
    c.close()
    before = watermarks(b.bootstrap, topic, 3)

    b.restart(hard=True, wipe_data=True)
    assert not (b.data_dir / "metadata.db").exists()

    assert watermarks(b.bootstrap, topic, 3) == before
    check_numbered(b.bootstrap, topic, 3, 3000)
    a = admin_client(b.bootstrap)
    desc = ConfigResource(ResourceType.TOPIC, topic)
    assert a.describe_configs([desc], request_timeout=30)[desc].result(30)["retention.ms"].value == "5400000"
    c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": group})
    committed = c.committed([TopicPartition(topic, p) for p in range(3)], timeout=30)
    c.close()
    assert [tp.offset for tp in committed] == [100, 101, 102]
    produce_numbered(b.bootstrap, topic, 3, 3000, 30)
    check_numbered(b.bootstrap, topic, 3, 3030)


def test_metadata_survives_kill9(broker_factory):
    b = broker_factory(env=BROKER_ENV)
    a = admin_client(b.bootstrap)
    keep = unique_topic("meta-keep")
    gone = unique_topic("meta-gone")
    create_topic(b.bootstrap, keep, 3, config={"retention.ms": "5400000"})
    create_topic(b.bootstrap, gone, 1)
    res = ConfigResource(ResourceType.TOPIC, keep, incremental_configs=[
        ConfigEntry("retention.bytes", "987654321", incremental_operation=AlterConfigOpType.SET)])
    a.incremental_alter_configs([res], request_timeout=30)[res].result(30)
    a.delete_topics([gone], operation_timeout=30)[gone].result(30)

    b.restart(hard=True, wipe_cache=True)

    assert topic_partitions(b.bootstrap, keep) == 3
    assert topic_partitions(b.bootstrap, gone) is None, "deleted topic came back after restart"
    a = admin_client(b.bootstrap)
    desc = ConfigResource(ResourceType.TOPIC, keep)
    entries = a.describe_configs([desc], request_timeout=30)[desc].result(30)
    assert entries["retention.ms"].value == "5400000"
    assert entries["retention.bytes"].value == "987654321"


# ---------------------------------------------------------------------------
# repeated crashes under load
# ---------------------------------------------------------------------------

@pytest.mark.timeout(480)
def test_repeated_kill9_with_cache_loss_under_load(broker_factory, tmp_path):
    seed = int(os.environ.get("STRATA_RECOVERY_SEED") or random.randrange(1 << 30))
    print(f"STRATA_RECOVERY_SEED={seed}")
    rng = random.Random(seed)

    b = broker_factory(env=BROKER_ENV)
    topic = unique_topic("crash")
    create_topic(b.bootstrap, topic, PARTITIONS)

    work = tmp_path / "producer"
    work.mkdir()
    script = work / "producer.py"
    script.write_text(PRODUCER_SCRIPT)
    ack_path, fail_path = work / "acks.txt", work / "failures.txt"
    stop_path, done_path = work / "stop", work / "done"
    plog = open(work / "producer.log", "wb")
    proc = subprocess.Popen(
        [python_exe(), str(script), b.bootstrap, topic, str(ack_path), str(fail_path),
         str(stop_path), str(done_path), str(PARTITIONS)],
        stdin=subprocess.DEVNULL, stdout=plog, stderr=subprocess.STDOUT, start_new_session=True)

    def producer_log():
        return (work / "producer.log").read_text(errors="replace")[-4000:]

    try:
        deadline = time.monotonic() + 60
        while not read_acks(ack_path):
            assert proc.poll() is None, f"producer exited early:\n{producer_log()}"
            assert time.monotonic() < deadline, f"no message acknowledged in 60s:\n{producer_log()}"
            time.sleep(0.1)

        history = []
        for rnd in range(ROUNDS):
            time.sleep(rng.uniform(0.05, 2.5))
            assert proc.poll() is None, f"producer died in round {rnd}:\n{producer_log()}"
            before = watermarks(b.bootstrap, topic, PARTITIONS)
            acked = read_acks(ack_path)
            max_acked = defaultdict(lambda: -1)
            for part, off in acked.values():
                max_acked[part] = max(max_acked[part], off)

            b.kill9()
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0.0, 1.0))  # let the producer pile up retries
            shutil.rmtree(b.cache_dir, ignore_errors=True)
            b.start()

            after = watermarks(b.bootstrap, topic, PARTITIONS)
            history.append((rnd, len(acked), before, after))
            for p in range(PARTITIONS):
                assert after[p][1] >= before[p][1], (
                    f"round {rnd}: log end offset of partition {p} went backwards "
                    f"{before[p][1]} -> {after[p][1]} across kill -9 (seed {seed})")
                assert after[p][1] > max_acked[p], (
                    f"round {rnd}: partition {p} ends at {after[p][1]} after restart but offset "
                    f"{max_acked[p]} had been acknowledged (seed {seed})")

        stop_path.touch()
        try:
            rc = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"producer did not finish flushing in 300s:\n{producer_log()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        plog.close()

    produced, remaining = map(int, done_path.read_text().split()) if done_path.exists() else (-1, -1)
    failures = fail_path.read_text().splitlines() if fail_path.exists() else []
    assert rc == 0, (f"producer exited {rc} (produced {produced}, {remaining} undelivered, "
                     f"{len(failures)} failed, e.g. {failures[:3]}):\n{producer_log()}")
    assert not failures, f"{len(failures)} deliveries failed, e.g. {failures[:5]}"
    acked = read_acks(ack_path)
    assert len(acked) == produced, f"{produced} produced, {len(acked)} acknowledged"

    # final read of everything
    msgs = consume_all(b.bootstrap, topic, PARTITIONS, timeout=180)
    by_part = defaultdict(list)
    for m in msgs:
        by_part[m.partition()].append(m)
    ids_seen = {}
    for part in range(PARTITIONS):
        ms = by_part.get(part, [])
        offsets = [m.offset() for m in ms]
        assert offsets == list(range(len(ms))), (
            f"partition {part}: offsets not consecutive from 0 (seed {seed}); "
            f"first gap near {next((a for a, e in zip(offsets, range(len(ms))) if a != e), None)}")
        prev = -1
        for m in ms:
            mid = int(m.key())
            assert m.value().startswith(f"{mid:09d}|".encode()), f"id {mid}: value mismatch"
            assert mid not in ids_seen, (
                f"message {mid} stored twice: {ids_seen[mid]} and {(part, m.offset())} "
                f"(idempotent producer, seed {seed})")
            ids_seen[mid] = (part, m.offset())
            assert mid % PARTITIONS == part
            assert mid > prev, f"partition {part}: message {mid} after {prev} (reordered)"
            prev = mid

    missing = [mid for mid in acked if mid not in ids_seen]
    assert not missing, (f"{len(missing)} acknowledged messages lost, e.g. "
                         f"{[(m, acked[m]) for m in sorted(missing)[:5]]} (seed {seed})")
    moved = [(mid, acked[mid], ids_seen[mid]) for mid in acked if ids_seen[mid] != acked[mid]]
    assert not moved, (f"{len(moved)} messages not at the offset their delivery report named, "
                       f"e.g. {moved[:5]} (seed {seed})")
    assert set(ids_seen) == set(range(produced)), "log holds ids that were never produced"
    final = watermarks(b.bootstrap, topic, PARTITIONS)
    assert {p: hi for p, (lo, hi) in final.items()} == {
        p: len(by_part.get(p, [])) for p in range(PARTITIONS)}
    print(f"{ROUNDS} crash rounds, {produced} messages; history: "
          f"{[(r, n) for r, n, _, _ in history]}")
