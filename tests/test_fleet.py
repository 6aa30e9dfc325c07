"""The fleet: broker processes on loopback sharing one S3-compatible bucket (moto) and
one PostgreSQL, driven by confluent-kafka.

Partitions and group coordinators are spread over the live brokers; clients reach any
broker and are sent to the owner. Under an idempotent `acks=all` load, a broker killed
with SIGKILL, a broker paused past its lease (SIGSTOP, then SIGCONT), a broker added and
a broker stopped (SIGTERM) while a consumer group runs, and PostgreSQL restarted, each
lose no acknowledged record, duplicate none and keep every partition's order.
"""

import json
import os
import signal
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from conftest import (Broker, admin_client, consume_all, create_topic, metric_sum,
                      scrape_metrics, unique_topic, wait_ready, wait_until)
from test_postgres_metadata import pg_ctl, postgres  # noqa: F401  (fixture)

LEASE_MS = 2000
# Enough that every broker owns some: rendezvous hashing is uniform but random per
# topic, and one of four brokers gets none of 48 partitions once in a million topics
# ((3/4)^48; with 24 it was once in a thousand).
PARTITIONS = 48


@pytest.fixture
def fleet(request, tmp_path, strata_bin, postgres):  # noqa: F811
    """Three brokers in zones a, b and c; a test parametrizes the fixture indirectly
    with a dict to add settings to every broker's environment."""
    from s3 import s3_server
    extra = getattr(request, "param", {})
    bucket = s3_server().new_bucket()
    url = postgres["STRATA_TEST_POSTGRES_URL"]
    brokers: list[Broker] = []

    def add(i: int, zone: str) -> Broker:
        b = Broker(tmp_path / f"b{i}", name=f"b{i}", binary=strata_bin, store="s3",
                   bucket=bucket, metadata=url, broker_id=i,
                   env={"STRATA_ZONE": zone, "STRATA_BROKER_LEASE_MS": str(LEASE_MS),
                        # Shorter than the PostgreSQL outage below, so writes fail then.
                        "STRATA_WAL_FLUSH_TIMEOUT_MS": "2000", **extra})
        b.start()
        wait_ready(b.http_port)
        brokers.append(b)
        return b

    for i, zone in [(1, "zone-a"), (2, "zone-b"), (3, "zone-c")]:
        add(i, zone)
    try:
        yield SimpleNamespace(add=add, brokers=brokers, postgres=postgres)
    finally:
        for b in brokers:
            if b.alive():
                try:
                    os.kill(b.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            b.close()


def bootstrap(brokers) -> str:
    return ",".join(b.bootstrap for b in brokers)


def leaders(bootstrap_servers: str, topic: str) -> dict[int, int]:
    """partition -> leader id from a real client's Metadata request (-1: none)."""
    md = admin_client(bootstrap_servers).list_topics(topic=topic, timeout=10)
    t = md.topics[topic]
    if t.error is not None:
        return {"error": str(t.error)}
    return {p.id: p.leader for p in t.partitions.values()}


def wait_led_by(bootstrap_servers: str, topic: str, ids: set[int], timeout: float = 30) -> dict:
    """Waits until the partitions are spread over exactly the brokers `ids`; returns
    the leaders."""
    found = {}

    def ok():
        found.clear()
        found.update(leaders(bootstrap_servers, topic))
        return len(found) == PARTITIONS and set(found.values()) == ids

    try:
        wait_until(ok, timeout, "the partitions to spread")
    except AssertionError:
        raise AssertionError(f"partitions of {topic} not led by exactly {sorted(ids)}: last {found}")
    return dict(found)


def owned(b: Broker) -> float:
    return metric_sum(scrape_metrics(b.http_port), "strata_partitions")


class Background:
    """A loop (`_run`) in a daemon thread until `stop`."""

    def __init__(self):
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        raise NotImplementedError

    def start(self):
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(30)


class Load(Background):
    """An idempotent acks=all producer writing sequence numbers round-robin over the
    partitions, remembering what was acknowledged where."""

    def __init__(self, servers: str, topic: str, rate: int = 400):
        self.topic = topic
        self.rate = rate
        self.producer = Producer({
            "bootstrap.servers": servers, "acks": "all", "enable.idempotence": True,
            "linger.ms": 5, "message.timeout.ms": 120000, "topic.metadata.refresh.interval.ms": 2000,
        })
        self.acked: dict[int, tuple[int, int, float]] = {}  # seq -> (partition, offset, time)
        self.errors: list[str] = []
        self.sent = 0
        super().__init__()

    def _delivered(self, err, msg):
        seq = int(msg.value())
        if err is not None:
            self.errors.append(f"{seq}: {err}")
        else:
            self.acked[seq] = (msg.partition(), msg.offset(), time.monotonic())

    def _run(self):
        gap = 1.0 / self.rate
        while not self.stopping.is_set():
            self.producer.produce(self.topic, value=str(self.sent).encode(),
                                  partition=self.sent % PARTITIONS, on_delivery=self._delivered)
            self.sent += 1
            self.producer.poll(0)
            time.sleep(gap)

    def stop(self) -> None:
        """Stops producing and waits for every answer (again: a no-op)."""
        if self.stopping.is_set():
            return
        super().stop()
        left = self.producer.flush(150)
        assert left == 0, f"{left} records never answered"

    def acked_after(self, t: float, partitions) -> set[int]:
        """Partitions among `partitions` with a record acknowledged after time t."""
        return {p for (p, _, at) in list(self.acked.values()) if at > t and p in partitions}


class GroupReader(Background):
    """A consumer-group member reading the topic in a thread: seq -> (partition, offset),
    and when each record arrived."""

    def __init__(self, servers: str, topic: str, group: str):
        self.consumed: dict[int, tuple[int, int]] = {}
        self.arrived: dict[int, float] = {}
        self.errors: list[str] = []
        self.conf = {"bootstrap.servers": servers, "group.id": group, "auto.offset.reset": "earliest",
                     "session.timeout.ms": 10000, "topic.metadata.refresh.interval.ms": 2000}
        self.topic = topic
        super().__init__()

    def _run(self):
        c = Consumer(self.conf)
        c.subscribe([self.topic])
        try:
            while not self.stopping.is_set():
                m = c.poll(0.2)
                if m is None:
                    continue
                if m.error():
                    self.errors.append(str(m.error()))
                    continue
                seq = int(m.value())
                self.consumed[seq] = (m.partition(), m.offset())
                self.arrived.setdefault(seq, time.monotonic())
        finally:
            c.close()

    def read_all(self, load: "Load", timeout: float = 90) -> None:
        """Waits until every acknowledged record was consumed, each at its offset."""
        wait_until(lambda: set(load.acked) <= set(self.consumed), timeout,
                   "the group to consume every acknowledged record")
        for seq, (p, o, _) in load.acked.items():
            assert self.consumed[seq] == (p, o)


def verify(load: Load, servers: str) -> None:
    """Every acknowledged record is there once, at its offset; nothing is duplicated;
    each partition keeps the order the producer sent in."""
    assert not load.errors, f"produce errors: {load.errors[:5]}"
    assert len(load.acked) == load.sent, f"{load.sent - len(load.acked)} records not acknowledged"
    msgs = consume_all(servers, load.topic, PARTITIONS, timeout=120)
    seen: dict[int, tuple[int, int]] = {}
    by_partition: dict[int, list[int]] = {}
    for m in msgs:
        seq = int(m.value())
        assert seq not in seen, f"record {seq} stored twice: {seen[seq]} and {(m.partition(), m.offset())}"
        seen[seq] = (m.partition(), m.offset())
        by_partition.setdefault(m.partition(), []).append(seq)
    lost = [s for s in load.acked if s not in seen]
    assert not lost, f"{len(lost)} acknowledged records lost, e.g. {lost[:5]}"
    moved = [s for s, (p, o, _) in load.acked.items() if seen[s] != (p, o)]
    assert not moved, f"records not at their acknowledged offsets: {moved[:5]}"
    for p, seqs in by_partition.items():
        assert seqs == sorted(seqs), f"partition {p} out of order"


def loaded_topic(fleet, prefix: str, min_acked: int = 500) -> tuple[str, dict, "Load"]:
    """A topic spread over brokers 1-3 under a running load: (topic, leaders, load)."""
    b1 = fleet.brokers[0]
    topic = unique_topic(prefix)
    create_topic(b1.bootstrap, topic, PARTITIONS)
    led = wait_led_by(b1.bootstrap, topic, {1, 2, 3})
    load = Load(bootstrap(fleet.brokers), topic).start()
    wait_until(lambda: len(load.acked) > min_acked, 30, "the load to run")
    return topic, led, load


def test_produce_and_consume_through_any_broker(fleet):
    b1, b2, b3 = fleet.brokers
    topic = unique_topic("fleet")
    create_topic(b1.bootstrap, topic, PARTITIONS)
    # Every broker answers Metadata with the same spread-out owners.
    led = wait_led_by(b2.bootstrap, topic, {1, 2, 3})
    assert set(led.values()) == {1, 2, 3}, f"partitions not spread over the fleet: {led}"
    wait_until(lambda: leaders(b3.bootstrap, topic) == led, 10, "all brokers to agree on owners")
    assert sum(owned(b) for b in fleet.brokers) == PARTITIONS
    # Produce through one broker, consume through another: exact counts and order.
    p = Producer({"bootstrap.servers": b2.bootstrap, "acks": "all", "enable.idempotence": True})
    for i in range(3000):
        p.produce(topic, value=str(i).encode(), partition=i % PARTITIONS)
    assert p.flush(60) == 0
    msgs = consume_all(b3.bootstrap, topic, PARTITIONS, timeout=60)
    got = sorted(int(m.value()) for m in msgs)
    assert got == list(range(3000))
    for part in range(PARTITIONS):
        seqs = [int(m.value()) for m in msgs if m.partition() == part]
        assert seqs == list(range(part, 3000, PARTITIONS))
    # Coordinator slots are spread too, and every broker sends a group's clients to the
    # same coordinator: offsets committed through one broker are read through another.
    slots = [metric_sum(scrape_metrics(b.http_port), "strata_coordinator_slots") for b in fleet.brokers]
    assert sum(slots) == 50 and min(slots) > 0, f"coordinator slots per broker: {slots}"
    for g in range(8):
        group = f"fleet-{g}"
        c = Consumer({"bootstrap.servers": b1.bootstrap, "group.id": group})
        c.commit(offsets=[TopicPartition(topic, 0, 100 + g)], asynchronous=False)
        c.close()
        c = Consumer({"bootstrap.servers": b3.bootstrap, "group.id": group})
        got = c.committed([TopicPartition(topic, 0)], timeout=10)
        c.close()
        assert got[0].offset == 100 + g, f"{group}: {got}"


def test_kill9_during_acks_all_load(fleet):
    b1, b2, b3 = fleet.brokers
    topic, led, load = loaded_topic(fleet, "kill")
    victim_parts = {p for p, leader in led.items() if leader == 2}
    reader = GroupReader(bootstrap(fleet.brokers), topic, "kill").start()
    try:
        wait_until(lambda: len(reader.consumed) > 300, 60, "the group to consume")
        b2.kill9()
        killed = time.monotonic()
        # Its partitions serve again elsewhere once its lease runs out.
        wait_until(lambda: load.acked_after(killed, victim_parts) == victim_parts,
                   LEASE_MS / 1000 + 30, "the killed broker's partitions to take writes again")
        print(f"\nfailover: partitions of the killed broker took writes again after "
              f"{time.monotonic() - killed:.1f} s (lease {LEASE_MS / 1000:.0f} s)")
        assert wait_led_by(b1.bootstrap, topic, {1, 3})
        time.sleep(2)
        load.stop()
        # The group carried on: it reads everything, including what was written after.
        reader.read_all(load)
        assert any(t > killed for t in reader.arrived.values()), "the group stopped at the kill"
    finally:
        reader.stop()
        load.stop()
    verify(load, b3.bootstrap)


def test_paused_broker_steps_down(fleet):
    b1, b2, b3 = fleet.brokers
    topic, led, load = loaded_topic(fleet, "pause")
    paused_parts = {p for p, leader in led.items() if leader == 3}
    try:
        os.kill(b3.pid, signal.SIGSTOP)
        paused = time.monotonic()
        wait_until(lambda: load.acked_after(paused, paused_parts) == paused_parts,
                   LEASE_MS / 1000 + 30, "the paused broker's partitions to move")
        time.sleep(LEASE_MS / 1000)
        os.kill(b3.pid, signal.SIGCONT)
        # Woken up, it finds newer epochs on its partitions and gives them up without
        # committing; then it rejoins and gets its share back by hand-off.
        wait_until(lambda: metric_sum(scrape_metrics(b3.http_port), "strata_ownership_changes_total",
                                      change="stepped_down") >= len(paused_parts),
                   30, "the resumed broker to step down")
        wait_until(lambda: owned(b3) > 0, 30, "the resumed broker to take its share again")
        time.sleep(2)
    finally:
        load.stop()
    verify(load, b1.bootstrap)


def test_scale_out_and_in_with_a_running_group(fleet):
    b1, b2, b3 = fleet.brokers
    topic, _, load = loaded_topic(fleet, "elastic", min_acked=0)
    reader = GroupReader(bootstrap(fleet.brokers), topic, "elastic").start()
    try:
        wait_until(lambda: len(reader.consumed) > 300, 60, "the group to consume")
        # Scale out: a fourth broker takes its share with no data copied.
        added = time.monotonic()
        b4 = fleet.add(4, "zone-a")
        wait_until(lambda: owned(b4) > 0, 30, "the new broker to take partitions")
        print(f"\nscale-out: the new broker owned partitions {time.monotonic() - added:.1f} s after start")
        wait_led_by(b2.bootstrap, topic, {1, 2, 3, 4})
        time.sleep(2)
        # Scale in: SIGTERM hands everything off before exiting.
        assert b1.stop(grace=60) == 0
        stopped = time.monotonic()
        wait_led_by(b2.bootstrap, topic, {2, 3, 4})
        time.sleep(2)
        load.stop()
        reader.read_all(load)
        assert any(t > stopped for t in reader.arrived.values()), "the group stopped consuming"
    finally:
        reader.stop()
        load.stop()
    # Nothing acknowledged was lost and no produce failed across the hand-offs.
    verify(load, b2.bootstrap)


def test_postgres_restart_during_load(fleet):
    b1, b2, b3 = fleet.brokers
    topic, _, load = loaded_topic(fleet, "pgrestart")
    try:
        pg_ctl(fleet.postgres, "stop")
        stopped = time.monotonic()
        time.sleep(5)
        # Nothing is acknowledged while the metadata store is down.
        down_acks = [s for s, (_, _, at) in list(load.acked.items()) if at > stopped + 1]
        pg_ctl(fleet.postgres, "start")
        restarted = time.monotonic()
        wait_until(lambda: load.acked_after(restarted, set(range(PARTITIONS))) == set(range(PARTITIONS)),
                   60, "writes to resume on every partition")
        print(f"\nPostgreSQL restart: every partition took writes again "
              f"{time.monotonic() - restarted:.1f} s after the restart")
        assert not down_acks, f"{len(down_acks)} records acknowledged while PostgreSQL was down"
        # Writes failed while it was down, with a retriable error the producer retried.
        failed = sum(metric_sum(scrape_metrics(b.http_port), "strata_wal_flushes_total", outcome="commit_failed")
                     for b in fleet.brokers)
        assert failed > 0, "no write failed while PostgreSQL was down"
        time.sleep(2)
    finally:
        load.stop()
    verify(load, b1.bootstrap)


def test_cluster_cli_lists_and_drains(fleet, strata_bin):
    b1, b2, b3 = fleet.brokers
    topic = unique_topic("drain")
    create_topic(b1.bootstrap, topic, PARTITIONS)
    wait_led_by(b1.bootstrap, topic, {1, 2, 3})

    def cluster(*args, http=b1.http_port):
        out = subprocess.run([str(strata_bin), "cluster", *args, "--http", f"127.0.0.1:{http}"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def owners_listed():
        view = json.loads(cluster("status", "--json"))
        return sum(len([p for p in b["partitions"] if p.startswith(topic + "/")]) for b in view["brokers"])

    # The view is the answering broker's, refreshed every ownership pass.
    wait_until(lambda: owners_listed() == PARTITIONS, 10, "every partition listed with its owner")
    view = json.loads(cluster("status", "--json"))
    by_id = {b["id"]: b for b in view["brokers"]}
    assert set(by_id) == {1, 2, 3}
    assert all(len(b["partitions"]) > 0 and len(b["coordinator_slots"]) > 0 for b in by_id.values())
    assert {i: b["zone"] for i, b in by_id.items()} == {1: "zone-a", 2: "zone-b", 3: "zone-c"}
    assert all(0 < b["lease_ms_left"] <= LEASE_MS for b in by_id.values())
    table = cluster("status", "--partitions")
    assert "zone-c" in table and f"{topic}/" in table

    # Drain broker 3 under load: it hands everything off and takes nothing back.
    load = Load(bootstrap(fleet.brokers), topic).start()
    try:
        wait_until(lambda: len(load.acked) > 300, 30, "the load to run")
        answer = json.loads(cluster("drain", http=b3.http_port))
        assert answer == {"broker": 3, "draining": True, "partitions": 0, "coordinator_slots": 0}
        wait_led_by(b1.bootstrap, topic, {1, 2})
        time.sleep(3)
        assert owned(b3) == 0
        view = json.loads(cluster("status", "--json", http=b2.http_port))
        drained = next(b for b in view["brokers"] if b["id"] == 3)
        assert drained["draining"] and drained["partitions"] == [] and drained["coordinator_slots"] == []
    finally:
        load.stop()
    verify(load, b2.bootstrap)


def test_consumer_reads_in_its_zone(fleet):
    """A consumer with `client.rack` is sent (KIP-392 preferred read replica) to the
    broker of its zone, which serves every partition from object storage through its
    cache: no consumer byte leaves the other brokers."""
    b1, b2, b3 = fleet.brokers
    topic = unique_topic("zone")
    create_topic(b1.bootstrap, topic, PARTITIONS)
    led = wait_led_by(b1.bootstrap, topic, {1, 2, 3})
    p = Producer({"bootstrap.servers": b1.bootstrap, "acks": "all", "enable.idempotence": True})
    for i in range(3000):
        p.produce(topic, value=str(i).encode(), partition=i % PARTITIONS)
    assert p.flush(60) == 0

    def topic_bytes_out(b):
        return metric_sum(scrape_metrics(b.http_port), "kafka_server_brokertopicmetrics_bytesout_total", topic=topic)

    before = {b.name: topic_bytes_out(b) for b in fleet.brokers}
    msgs = consume_all(b1.bootstrap, topic, PARTITIONS, timeout=60, **{"client.rack": "zone-b"})
    assert sorted(int(m.value()) for m in msgs) == list(range(3000))
    for part in range(PARTITIONS):
        assert [int(m.value()) for m in msgs if m.partition() == part] == list(range(part, 3000, PARTITIONS))
    # Broker 2 (zone-b) served everything: its own partitions as owner, the others'
    # from storage; brokers 1 and 3 only redirected.
    zone_b = scrape_metrics(b2.http_port)
    others = {p for p, leader in led.items() if leader != 2}
    assert metric_sum(zone_b, "strata_zone_fetch_bytes_total", topic=topic) > 0
    for b in (b1, b3):
        assert topic_bytes_out(b) == before[b.name], f"{b.name} sent consumer bytes across zones"
        redirects = metric_sum(scrape_metrics(b.http_port), "strata_preferred_replica_redirects_total", topic=topic)
        assert redirects >= len([q for q in others if led[q] == b.broker_id])
    assert topic_bytes_out(b2) - before["b2"] > 3000
