"""The cache disk fills up under load: nothing acknowledged is lost or skipped.

The broker's local cache directory is a small tmpfs of its own; the object store and the
metadata store live elsewhere, as they would in a deployment. While idempotent
`acks=all` producers and an `acks=1` producer run and a consumer tails the topic, a
filler file takes every free byte of the cache disk. The broker must notice (metric,
`/readyz` unready), refuse `acks=1` writes with KAFKA_STORAGE_ERROR, keep acknowledging
`acks=all` writes from the write-ahead objects, keep serving readers with no hole, seal
segments from the write-ahead data (small segments) or not (default segments), survive a
restart while the disk is full, and recover by itself once the filler is removed. Then
every acknowledged record is read back at its offset, with no offset missing, also after
the write-ahead objects have been garbage-collected and the broker restarted once more.
"""

import os
import subprocess
import threading
import time

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from conftest import (consume_all, create_topic, is_ready, metric_sum, scrape_metrics,
                      unique_topic, wait_until)

PARTITIONS = 3
VALUE = b"v" * 900


def mount_tmpfs(path, size_mb: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the cache disk (needs root): {r.stderr.strip()}")


def fill(path) -> None:
    """Writes a file into `path` until the disk has no byte left."""
    with open(path, "wb", buffering=0) as f:
        for size in (256 * 1024, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass


class Tail(threading.Thread):
    """A consumer reading every partition from offset 0 as records arrive, with
    auto.offset.reset=error so an offset out of range is an error, not a silent jump."""

    def __init__(self, bootstrap: str, topic: str):
        super().__init__(daemon=True)
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": unique_topic("tail"),
            "enable.auto.commit": False, "auto.offset.reset": "error",
            "topic.metadata.refresh.interval.ms": 1000,
        })
        self.consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        self.seen: dict[int, list[int]] = {p: [] for p in range(PARTITIONS)}
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            m = self.consumer.poll(0.2)
            if m is None:
                continue
            if m.error() is not None:
                if m.error().code() != KafkaError._PARTITION_EOF and m.error().retriable() is False:
                    self.errors.append(str(m.error()))
                continue
            self.seen[m.partition()].append(m.offset())

    def stop(self):
        self.stopping.set()
        self.join(30)
        self.consumer.close()


class Load:
    """Produces numbered records and remembers which were acknowledged where."""

    def __init__(self, bootstrap: str, topic: str, **conf):
        self.topic = topic
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, **conf})
        self.acked: dict[bytes, tuple[int, int]] = {}
        self.errors: list[int] = []
        self.n = 0

    def _report(self, err, msg):
        if err is None:
            self.acked[msg.value()] = (msg.partition(), msg.offset())
        else:
            self.errors.append(err.code())

    def send(self, count: int, tag: str, timeout: float = 60.0) -> None:
        for _ in range(count):
            value = f"{tag}-{self.n:07d}-".encode() + VALUE
            self.n += 1
            while True:
                try:
                    self.producer.produce(self.topic, value=value, partition=self.n % PARTITIONS,
                                          on_delivery=self._report)
                    break
                except BufferError:
                    self.producer.poll(0.1)
            self.producer.poll(0)
        assert self.producer.flush(timeout) == 0, "producer did not drain"


def disk_full(b) -> float:
    return metric_sum(scrape_metrics(b.http_port), "strata_cache_disk_full")


def check_log(bootstrap, topic, acked: dict, what: str) -> None:
    msgs = consume_all(bootstrap, topic, PARTITIONS, timeout=120)
    by_partition: dict[int, list] = {}
    for m in msgs:
        by_partition.setdefault(m.partition(), []).append(m)
    for p, ms in by_partition.items():
        offsets = [m.offset() for m in ms]
        assert offsets == list(range(len(offsets))), f"{what}: partition {p} skips offsets"
    stored = {m.value(): (m.partition(), m.offset()) for m in msgs}
    lost = [v[:16] for v in acked if v not in stored]
    assert not lost, f"{what}: {len(lost)} acknowledged records lost, e.g. {lost[:3]}"
    moved = [v[:16] for v, at in acked.items() if stored[v] != at]
    assert not moved, f"{what}: records not at their acknowledged offsets: {moved[:3]}"


@pytest.mark.parametrize("segment_bytes", [262144, 67108864], ids=["sealing", "no-sealing"])
def test_a_full_cache_disk_loses_nothing(broker_factory, tmp_path, segment_bytes):
    b = broker_factory(env={
        "STRATA_SEGMENT_BYTES": str(segment_bytes),
        # Only the local tails live on the cache disk here; the block cache keeps to memory.
        "STRATA_CACHE_DISK_BYTES": "0",
        "STRATA_CACHE_DISK_MIN_FREE_BYTES": str(1 << 20),
        "STRATA_CACHE_DISK_CHECK_INTERVAL_MS": "200",
        "STRATA_WAL_GC_INTERVAL_MS": "1000",
    }, name=f"disk-{segment_bytes}")
    # The cache directory becomes a 24 MiB disk of its own (the broker is restarted onto it).
    b.stop()
    mount_tmpfs(b.cache_dir, 24)
    filler = b.cache_dir / "filler"
    try:
        b.start()
        topic = unique_topic("full")
        create_topic(b.bootstrap, topic, PARTITIONS, {"retention.ms": "-1"})
        all_load = Load(b.bootstrap, topic, acks="all", **{"enable.idempotence": True})
        one_load = Load(b.bootstrap, topic, acks="1", retries=0, **{"enable.idempotence": False})
        tail = Tail(b.bootstrap, topic)
        tail.start()

        all_load.send(1500, "before")
        one_load.send(300, "before-acks1")
        assert not all_load.errors and not one_load.errors
        assert disk_full(b) == 0

        fill(filler)
        # Writes go on; the first local append that finds no room marks the disk full.
        all_load.send(200, "filling")
        wait_until(lambda: disk_full(b) == 1, 30, "the broker to report its cache disk full")
        assert not is_ready(b.http_port), "/readyz must be unready while the disk is full"

        all_load.send(1500, "full")
        assert not all_load.errors, f"acks=all writes failed on a full cache disk: {all_load.errors[:5]}"
        one_load.send(50, "full-acks1", timeout=30)
        assert one_load.errors and set(one_load.errors) == {KafkaError.KAFKA_STORAGE_ERROR}, \
            f"acks=1 writes must be refused with KAFKA_STORAGE_ERROR while full: {set(one_load.errors)}"
        assert metric_sum(scrape_metrics(b.http_port), "strata_local_write_failures_total") > 0

        # A restart while the disk is still full: the broker comes up (unready) and serves.
        # (The restart drops the local tails, which frees their room: take it too.)
        all_load.producer.flush(30)
        b.restart(hard=True, ready=False)
        fill(b.cache_dir / "filler-2")
        all_load.send(100, "full-refill")
        wait_until(lambda: disk_full(b) == 1, 30, "the restarted broker to see the full disk")
        all_load.send(500, "full-restarted")
        assert not all_load.errors, f"acks=all writes failed after a restart: {all_load.errors[:5]}"

        os.remove(filler)
        os.remove(b.cache_dir / "filler-2")
        wait_until(lambda: is_ready(b.http_port), 30, "/readyz to be ready once space returns")
        assert disk_full(b) == 0
        refused = len(one_load.errors)
        one_load.send(100, "after-acks1")
        assert len(one_load.errors) == refused, "acks=1 writes must work again once space returns"
        all_load.send(1000, "after")
        assert not all_load.errors

        # The tailing consumer saw every offset once, in order, with no error.
        wait_until(lambda: sum(len(v) for v in tail.seen.values()) >= len(all_load.acked) + len(one_load.acked),
                   60, "the tailing consumer to catch up")
        tail.stop()
        assert not tail.errors, f"the tailing consumer got errors: {tail.errors[:5]}"
        for p, offsets in tail.seen.items():
            assert offsets == list(range(len(offsets))), f"the tailing consumer skipped offsets on partition {p}"

        acked = {**all_load.acked, **one_load.acked}
        check_log(b.bootstrap, topic, acked, "after recovery")
        if segment_bytes < (1 << 20):
            # Sealed segments replaced the write-ahead data; give the collector a round,
            # then read everything again from a fresh start.
            segments = lambda: len(b.objects("segments", ".seg"))
            wait_until(lambda: segments() >= 12, 60, "segments to be sealed")
            time.sleep(2.5)
            print(f"\n{segments()} segments sealed, {len(b.objects('wal'))} write-ahead objects left")
        b.restart(hard=True)
        check_log(b.bootstrap, topic, acked, "after a restart")
    finally:
        b.stop()
        subprocess.run(["umount", "-l", str(b.cache_dir)], capture_output=True)
