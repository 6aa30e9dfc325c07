"""Helpers shared by the consumer-group tests (test_groups*.py).

- GROUP_ENV: broker settings that keep group tests fast.
- wait_until: bounded polling.
- GroupConsumer: a confluent-kafka consumer that subscribes and polls in its own
  thread, recording its rebalance callbacks, records and errors.
- MemberProcess: tests/group_member.py as a subprocess (for SIGKILL tests).
- RawClient: Kafka requests built with kafka-python's protocol classes over a
  plain socket, the version negotiated with ApiVersions.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

from conftest import producer, python_exe

TESTS_DIR = Path(__file__).resolve().parent

# group.initial.rebalance.delay.ms=100 and group.min.session.timeout.ms=1000
GROUP_ENV = {
    "STRATA_GROUP_INITIAL_REBALANCE_DELAY_MS": "100",
    "STRATA_GROUP_MIN_SESSION_TIMEOUT_MS": "1000",
}

# Kafka error codes used by the group tests
ERR_NONE = 0
ERR_UNKNOWN_TOPIC_OR_PARTITION = 3
ERR_OFFSET_METADATA_TOO_LARGE = 12
ERR_REBALANCE_IN_PROGRESS = 27
ERR_ILLEGAL_GENERATION = 22
ERR_INCONSISTENT_GROUP_PROTOCOL = 23
ERR_INVALID_GROUP_ID = 24
ERR_UNKNOWN_MEMBER_ID = 25
ERR_INVALID_SESSION_TIMEOUT = 26
ERR_NON_EMPTY_GROUP = 68
ERR_GROUP_ID_NOT_FOUND = 69
ERR_MEMBER_ID_REQUIRED = 79
ERR_FENCED_INSTANCE_ID = 82
ERR_GROUP_SUBSCRIBED_TO_TOPIC = 86


def wait_until(pred, timeout: float, what, interval: float = 0.05):
    """Poll pred() until it returns something truthy (returned) or `timeout` passes.

    `what` (a string, or a callable giving one) describes the awaited state in the
    AssertionError raised on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            desc = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for: {desc}")
        time.sleep(interval)


def produce_values(bootstrap: str, topic: str, partitions: int, per_partition: int,
                   prefix: str) -> dict[int, list[str]]:
    """Produce `per_partition` records to each partition; returns {partition: [values]}."""
    p = producer(bootstrap)
    values: dict[int, list[str]] = {}
    errors = []
    for part in range(partitions):
        values[part] = []
        for i in range(per_partition):
            v = f"{prefix}-{part}-{i}"
            values[part].append(v)
            p.produce(topic, value=v.encode(), partition=part,
                      on_delivery=lambda err, msg: errors.append(err) if err else None)
        p.poll(0)
    remaining = p.flush(30)
    assert remaining == 0, f"{remaining} records not delivered"
    assert not errors, f"delivery errors: {errors[:5]}"
    return values


# ---------------------------------------------------------------------------
# confluent-kafka consumer in a thread
# ---------------------------------------------------------------------------

class GroupConsumer:
    """A subscribed confluent-kafka consumer polling in its own thread.

    `assignment` follows the rebalance callbacks (on_assign adds, on_revoke and
    on_lost remove: right for eager and cooperative protocols alike);
    `polled_assignment` is consumer.assignment() as of the last poll. Every
    callback is kept in `events` as (monotonic time, kind, frozenset of (topic,
    partition)); every record in `records` as (monotonic time, topic, partition,
    offset, value)."""

    def __init__(self, name: str, bootstrap: str, group: str, topics: list[str],
                 conf: dict | None = None, commit_each: bool = False):
        self.name = name
        self.group = group
        self.topics = list(topics)
        self.conf = {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "client.id": name,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
        }
        self.conf.update(conf or {})
        self.commit_each = commit_each
        self.lock = threading.Lock()
        self.events: list[tuple] = []
        self.assignment: set = set()
        self.polled_assignment: set = set()
        self.records: list[tuple] = []
        self.errors: list = []
        self.commit_errors: list = []
        self.started_at: float | None = None
        self.closed_at: float | None = None
        self.crash: BaseException | None = None
        self._stop = threading.Event()
        self._calls: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"consumer-{name}", daemon=True)

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> "GroupConsumer":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Leave the poll loop and close() the consumer (a dynamic member sends LeaveGroup;
        a static one, with group.instance.id, does not)."""
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"consumer {self.name} did not close within {timeout}s"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def call(self, fn, timeout: float = 30.0):
        """Run fn(consumer) in the consumer's own thread; returns its result or raises."""
        done = threading.Event()
        box = {}

        def job(c):
            try:
                box["r"] = fn(c)
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                box["e"] = e
            finally:
                done.set()

        self._calls.put(job)
        assert done.wait(timeout), f"consumer {self.name}: call not run within {timeout}s"
        if "e" in box:
            raise box["e"]
        return box.get("r")

    # -- callbacks ----------------------------------------------------------
    def _event(self, kind, partitions):
        tps = frozenset((tp.topic, tp.partition) for tp in partitions)
        with self.lock:
            self.events.append((time.monotonic(), kind, tps))
            if kind == "assign":
                self.assignment |= tps
            else:
                self.assignment -= tps

    def _run(self):
        from confluent_kafka import Consumer, KafkaException, TopicPartition
        try:
            c = Consumer(self.conf)
            c.subscribe(self.topics,
                        on_assign=lambda _c, ps: self._event("assign", ps),
                        on_revoke=lambda _c, ps: self._event("revoke", ps),
                        on_lost=lambda _c, ps: self._event("lost", ps))
            self.started_at = time.monotonic()
            try:
                while not self._stop.is_set():
                    while True:
                        try:
                            job = self._calls.get_nowait()
                        except queue.Empty:
                            break
                        job(c)
                    m = c.poll(0.1)
                    try:
                        pa = {(tp.topic, tp.partition) for tp in c.assignment()}
                    except KafkaException:
                        pa = set()
                    with self.lock:
                        self.polled_assignment = pa
                    if m is None:
                        continue
                    err = m.error()
                    if err is not None:
                        with self.lock:
                            if len(self.errors) < 1000:
                                self.errors.append(err)
                        continue
                    with self.lock:
                        self.records.append((time.monotonic(), m.topic(), m.partition(),
                                             m.offset(), m.value()))
                    if self.commit_each:
                        try:
                            res = c.commit(offsets=[TopicPartition(m.topic(), m.partition(),
                                                                   m.offset() + 1)],
                                           asynchronous=False)
                            bad = [tp.error for tp in res or [] if tp.error is not None]
                            if bad:
                                self.commit_errors.append(bad[0])
                        except KafkaException as e:
                            self.commit_errors.append(e)
            finally:
                c.close()
                self.closed_at = time.monotonic()
        except BaseException as e:  # noqa: BLE001 - reported by the tests
            self.crash = e

    # -- views --------------------------------------------------------------
    def snapshot(self):
        with self.lock:
            return set(self.assignment), list(self.events), list(self.records)

    def partitions(self) -> set[int]:
        with self.lock:
            return {p for _, p in self.assignment}

    def event_count(self) -> int:
        with self.lock:
            return len(self.events)

    def last_event_time(self) -> float:
        with self.lock:
            return self.events[-1][0] if self.events else 0.0

    def record_values(self) -> list[bytes]:
        with self.lock:
            return [r[4] for r in self.records]

    def __repr__(self):
        with self.lock:
            return (f"<{self.name} assignment={sorted(self.assignment)} "
                    f"events={[(k, sorted(p for _, p in tps)) for _, k, tps in self.events]} "
                    f"records={len(self.records)} errors={[str(e) for e in self.errors[:3]]}>")


def settle(consumers: list[GroupConsumer], timeout: float = 45.0, quiet: float = 1.5) -> None:
    """Wait until every consumer holds partitions and no callback fired for `quiet` s."""
    def ok():
        for c in consumers:
            if c.crash is not None:
                raise AssertionError(f"consumer {c.name} crashed: {c.crash!r}")
        if not all(c.partitions() for c in consumers):
            return False
        return time.monotonic() - max(c.last_event_time() for c in consumers) >= quiet
    wait_until(ok, timeout, lambda: f"every member assigned and the group quiet: {consumers}")


def assert_disjoint_cover(consumers: list[GroupConsumer], topic: str, partitions: int) -> None:
    """The members' assignments are disjoint and together are exactly the topic's partitions."""
    owners: dict[int, list[str]] = {}
    for c in consumers:
        a, _, _ = c.snapshot()
        for t, p in a:
            assert t == topic, f"{c.name} assigned a partition of another topic: {(t, p)}"
            owners.setdefault(p, []).append(c.name)
    doubled = {p: o for p, o in owners.items() if len(o) > 1}
    assert not doubled, f"partitions assigned to more than one member: {doubled}; {consumers}"
    assert sorted(owners) == list(range(partitions)), \
        f"assignments cover {sorted(owners)}, expected all of 0..{partitions - 1}: {consumers}"
    # the callbacks agree with what the consumers themselves report as assigned
    for c in consumers:
        wait_until(lambda: c.polled_assignment == c.snapshot()[0], 10,
                   lambda: f"{c.name}: assignment() {sorted(c.polled_assignment)} == "
                           f"callbacks' {sorted(c.snapshot()[0])}")


# ---------------------------------------------------------------------------
# tests/group_member.py as a subprocess
# ---------------------------------------------------------------------------

class MemberProcess:
    """One tests/group_member.py process; its JSON-lines report is read from `out`."""

    def __init__(self, name: str, bootstrap: str, group: str, topic: str, out_dir: Path,
                 conf: dict | None = None):
        self.name = name
        self.out = Path(out_dir) / f"{name}.jsonl"
        self.log = Path(out_dir) / f"{name}.stderr.log"
        args = [python_exe(), str(TESTS_DIR / "group_member.py"), "--bootstrap", bootstrap,
                "--group", group, "--topic", topic, "--out", str(self.out),
                "--conf", json.dumps(conf or {})]
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> list[dict]:
        try:
            lines = self.out.read_text().splitlines()
        except FileNotFoundError:
            return []
        evs = []
        for line in lines:
            try:
                evs.append(json.loads(line))
            except ValueError:
                pass  # a line being written right now
        return evs

    def assignment(self) -> set[int]:
        a: set[int] = set()
        for ev in self.events():
            if ev["ev"] == "assign":
                a |= set(ev["p"])
            elif ev["ev"] in ("revoke", "lost"):
                a -= set(ev["p"])
        return a

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()

    def stderr_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __repr__(self):
        evs = [e for e in self.events() if e["ev"] not in ("rec", "commit")]
        return (f"<member {self.name} pid={self.pid} rc={self.proc.poll()} "
                f"assignment={sorted(self.assignment())} events={evs[-8:]} "
                f"stderr={self.stderr_tail(5)!r}>")


# ---------------------------------------------------------------------------
# raw protocol client
# ---------------------------------------------------------------------------

def _response_class(req_cls):
    mod = importlib.import_module(req_cls.__module__)
    return getattr(mod, req_cls.__name__.replace("Request", "Response"))


class RawClient:
    """Requests built with kafka-python's kafka.protocol classes over one socket.

    Each API is sent at the highest version both the broker (per ApiVersions) and
    kafka-python know, unless a version is given."""

    def __init__(self, host: str, port: int, client_id: str = "strata-group-tests",
                 timeout: float = 30.0):
        from kafka.protocol.metadata import ApiVersionsRequest
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.client_id = client_id
        self.corr = 0
        self.versions: dict[int, tuple[int, int]] = {}
        r = self.request(ApiVersionsRequest(), version=0)
        assert r.error_code == 0, f"ApiVersions error {r.error_code}"
        self.versions = {k.api_key: (k.min_version, k.max_version) for k in r.api_keys}

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def pick_version(self, req_cls, cap: int | None = None) -> int:
        key = req_cls.API_KEY
        if key not in self.versions:
            raise AssertionError(f"broker does not advertise {req_cls.__name__} (api key {key}) "
                                 f"in ApiVersions: {sorted(self.versions)}")
        bmin, bmax = self.versions[key]
        v = min(bmax, req_cls.max_version)
        if cap is not None:
            v = min(v, cap)
        if v < max(bmin, req_cls.min_version):
            raise AssertionError(f"no common version of {req_cls.__name__}: broker {bmin}..{bmax}, "
                                 f"kafka-python {req_cls.min_version}..{req_cls.max_version}, cap {cap}")
        return v

    def encode(self, req, version: int) -> tuple[int, bytes]:
        self.corr += 1
        req.API_VERSION = version
        req.with_header(correlation_id=self.corr, client_id=self.client_id)
        return self.corr, bytes(req.encode(header=True, framed=True))

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"connection closed by the broker ({len(buf)}/{n} bytes read)")
            buf += chunk
        return bytes(buf)

    def read_frame(self) -> bytes:
        (n,) = struct.unpack(">i", self._read_exact(4))
        return self._read_exact(n)

    def decode(self, req_cls, version: int, frame: bytes):
        return _response_class(req_cls).decode(frame, version=version, header=True)

    def request(self, req, version: int | None = None, cap: int | None = None):
        v = version if version is not None else self.pick_version(type(req), cap)
        corr, data = self.encode(req, v)
        self.sock.sendall(data)
        resp = self.decode(type(req), v, self.read_frame())
        assert resp.header.correlation_id == corr, \
            f"correlation id {resp.header.correlation_id}, expected {corr}"
        return resp

    # -- group APIs -----------------------------------------------------------
    def find_coordinator(self, group: str):
        from kafka.protocol.metadata import FindCoordinatorRequest
        r = self.request(FindCoordinatorRequest(key=group, key_type=0, coordinator_keys=[group]))
        if r.coordinators:
            c = r.coordinators[0]
            return c.error_code, c.node_id, c.host, c.port
        return r.error_code, r.node_id, r.host, r.port

    @staticmethod
    def subscription(topics: list[str]) -> bytes:
        from kafka.protocol.consumer.metadata import ConsumerProtocolSubscription
        return bytes(ConsumerProtocolSubscription(topics=list(topics), user_data=None,
                                                  owned_partitions=[], generation_id=-1,
                                                  rack_id=None).encode(version=0))

    @staticmethod
    def assignment_bytes(topic_partitions: dict[str, list[int]]) -> bytes:
        from kafka.protocol.consumer.metadata import ConsumerProtocolAssignment as A
        return bytes(A(assigned_partitions=[A.TopicPartition(topic=t, partitions=list(ps))
                                            for t, ps in topic_partitions.items()],
                       user_data=None).encode(version=0))

    def join(self, group: str, topics: list[str], member_id: str = "",
             protocols: list[str] = ("range",), session_timeout_ms: int = 30000,
             rebalance_timeout_ms: int = 30000, instance_id: str | None = None,
             protocol_type: str = "consumer", follow_member_id_required: bool = True):
        """JoinGroup; a MEMBER_ID_REQUIRED answer is followed by the join it asks for."""
        from kafka.protocol.consumer import JoinGroupRequest
        P = JoinGroupRequest.JoinGroupRequestProtocol
        meta = self.subscription(topics)

        def req(mid):
            return JoinGroupRequest(group_id=group, session_timeout_ms=session_timeout_ms,
                                    rebalance_timeout_ms=rebalance_timeout_ms, member_id=mid,
                                    group_instance_id=instance_id, protocol_type=protocol_type,
                                    protocols=[P(name=n, metadata=meta) for n in protocols],
                                    reason=None)
        r = self.request(req(member_id))
        if r.error_code == ERR_MEMBER_ID_REQUIRED and follow_member_id_required:
            assert r.member_id, "MEMBER_ID_REQUIRED without a member id"
            r = self.request(req(r.member_id))
        return r

    def sync(self, group: str, generation: int, member_id: str,
             assignments: dict[str, bytes] | None = None, instance_id: str | None = None,
             protocol_name: str | None = "range"):
        from kafka.protocol.consumer import SyncGroupRequest
        A = SyncGroupRequest.SyncGroupRequestAssignment
        return self.request(SyncGroupRequest(
            group_id=group, generation_id=generation, member_id=member_id,
            group_instance_id=instance_id, protocol_type="consumer", protocol_name=protocol_name,
            assignments=[A(member_id=m, assignment=a) for m, a in (assignments or {}).items()]))

    def heartbeat_request(self, group: str, generation: int, member_id: str,
                          instance_id: str | None = None):
        from kafka.protocol.consumer import HeartbeatRequest
        return HeartbeatRequest(group_id=group, generation_id=generation, member_id=member_id,
                                group_instance_id=instance_id)

    def heartbeat(self, group: str, generation: int, member_id: str,
                  instance_id: str | None = None) -> int:
        return self.request(self.heartbeat_request(group, generation, member_id,
                                                   instance_id)).error_code

    def describe(self, group: str):
        """DescribeGroups for one group; returns its DescribedGroup."""
        from kafka.protocol.admin import DescribeGroupsRequest
        r = self.request(DescribeGroupsRequest(groups=[group], include_authorized_operations=False))
        assert [g.group_id for g in r.groups] == [group], r
        return r.groups[0]

    def leave(self, group: str, member_id: str):
        from kafka.protocol.consumer import LeaveGroupRequest
        M = LeaveGroupRequest.MemberIdentity
        return self.request(LeaveGroupRequest(group_id=group, member_id=member_id,
                                              members=[M(member_id=member_id,
                                                         group_instance_id=None, reason=None)]))

    def commit(self, group: str, generation: int, member_id: str,
               offsets: dict[tuple[str, int], tuple[int, str | None]],
               instance_id: str | None = None) -> dict[tuple[str, int], int]:
        """OffsetCommit; returns {(topic, partition): error code}."""
        from kafka.protocol.consumer import OffsetCommitRequest
        T = OffsetCommitRequest.OffsetCommitRequestTopic
        Pt = T.OffsetCommitRequestPartition
        by_topic: dict[str, list] = {}
        for (t, p), (off, meta) in offsets.items():
            by_topic.setdefault(t, []).append(Pt(partition_index=p, committed_offset=off,
                                                 committed_leader_epoch=-1, commit_timestamp=-1,
                                                 committed_metadata=meta))
        # v8 is the last version kafka-python's classic-group callers use; v9+ is KIP-848
        r = self.request(OffsetCommitRequest(
            group_id=group, generation_id_or_member_epoch=generation, member_id=member_id,
            group_instance_id=instance_id, retention_time_ms=-1,
            topics=[T(name=t, partitions=ps) for t, ps in by_topic.items()]), cap=8)
        return {(t.name, p.partition_index): p.error_code for t in r.topics for p in t.partitions}

    def fetch_offsets(self, group: str, partitions: dict[str, list[int]]):
        """OffsetFetch (single-group form, v<=7); returns (top-level error,
        {(topic, partition): (offset, metadata, error)})."""
        from kafka.protocol.consumer import OffsetFetchRequest
        T = OffsetFetchRequest.OffsetFetchRequestTopic
        r = self.request(OffsetFetchRequest(
            group_id=group, topics=[T(name=t, partition_indexes=list(ps))
                                    for t, ps in partitions.items()],
            require_stable=False), cap=7)
        out = {}
        for t in r.topics:
            for p in t.partitions:
                out[(t.name, p.partition_index)] = (p.committed_offset, p.metadata, p.error_code)
        return getattr(r, "error_code", 0), out


def raw_single_member_group(rc: RawClient, group: str, topic: str, partitions: int,
                            session_timeout_ms: int = 30000):
    """Join `group` as its only member and sync an assignment of every partition of
    `topic`. Returns (generation, member_id)."""
    j = rc.join(group, [topic], session_timeout_ms=session_timeout_ms)
    assert j.error_code == ERR_NONE, f"JoinGroup error {j.error_code}"
    assert j.leader == j.member_id, f"sole member {j.member_id!r} is not the leader {j.leader!r}"
    assert [m.member_id for m in j.members] == [j.member_id]
    assert j.generation_id >= 1
    s = rc.sync(group, j.generation_id, j.member_id,
                {j.member_id: RawClient.assignment_bytes({topic: list(range(partitions))})},
                protocol_name=j.protocol_name)
    assert s.error_code == ERR_NONE, f"SyncGroup error {s.error_code}"
    return j.generation_id, j.member_id
