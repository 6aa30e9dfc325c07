"""Consumer groups (classic protocol) against Strata: confluent-kafka, kafka-python and
raw requests.

Brokers here run with group.initial.rebalance.delay.ms=100 and
group.min.session.timeout.ms=1000 (GROUP_ENV) so that rebalances are quick.
Members run in threads (GroupConsumer) or, where one is killed hard, as
tests/group_member.py subprocesses (MemberProcess).
"""

import threading
import time
import uuid

import pytest
from confluent_kafka import (Consumer, ConsumerGroupState, ConsumerGroupTopicPartitions,
                             KafkaError, KafkaException, TopicPartition)

from conftest import admin_client, create_topic, producer, unique_topic
from group_helpers import (ERR_FENCED_INSTANCE_ID, ERR_GROUP_ID_NOT_FOUND,
                           ERR_ILLEGAL_GENERATION, ERR_INCONSISTENT_GROUP_PROTOCOL,
                           ERR_INVALID_GROUP_ID, ERR_INVALID_SESSION_TIMEOUT, ERR_NONE,
                           ERR_OFFSET_METADATA_TOO_LARGE, ERR_REBALANCE_IN_PROGRESS,
                           ERR_UNKNOWN_MEMBER_ID, ERR_UNKNOWN_TOPIC_OR_PARTITION, GROUP_ENV,
                           GroupConsumer, MemberProcess, RawClient, assert_disjoint_cover,
                           produce_values, raw_single_member_group, settle, wait_until)


def unique_group(prefix: str = "g") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def gbroker(broker_factory):
    """A fresh broker with quick group settings."""
    return broker_factory(env=GROUP_ENV, name="broker")


@pytest.fixture
def consumers(gbroker):
    """consumers(name, bootstrap, group, topics, conf=..., commit_each=...) starts a
    GroupConsumer; all are closed at teardown (before the broker stops)."""
    made: list[GroupConsumer] = []

    def make(*args, **kwargs) -> GroupConsumer:
        c = GroupConsumer(*args, **kwargs)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        try:
            c.stop(timeout=30)
        except AssertionError:
            pass  # a daemon thread: it dies with the test process


@pytest.fixture
def members(gbroker, tmp_path):
    """members(name, bootstrap, group, topic, conf=...) starts a group_member.py process;
    every process is killed by PID at teardown."""
    made: list[MemberProcess] = []

    def make(name, bootstrap, group, topic, conf=None) -> MemberProcess:
        m = MemberProcess(name, bootstrap, group, topic, tmp_path, conf)
        made.append(m)
        return m

    yield make
    for m in made:
        try:
            m.kill9()
        except Exception:
            pass


def describe_group(bootstrap, group, timeout=30):
    a = admin_client(bootstrap)
    return a.describe_consumer_groups([group], request_timeout=timeout)[group].result(timeout)


def kafka_error_code(exc):
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0].code()
    return None


# ---------------------------------------------------------------------------
# membership and assignment (confluent-kafka)
# ---------------------------------------------------------------------------

def test_three_members_split_six_partitions(gbroker, consumers):
    bs = gbroker.bootstrap
    topic, group = unique_topic("g3"), unique_group()
    create_topic(bs, topic, 6)
    cs = [consumers(f"m{i}", bs, group, [topic]) for i in range(3)]
    settle(cs)
    assert_disjoint_cover(cs, topic, 6)
    events_before = [c.event_count() for c in cs]

    # while the group is stable, each member reads exactly the records of its partitions
    values = produce_values(bs, topic, 6, 20, "g3")
    expected = sorted(v.encode() for vs in values.values() for v in vs)
    wait_until(lambda: sum(len(c.record_values()) for c in cs) >= len(expected), 30,
               lambda: f"{len(expected)} records consumed by the group: {cs}")
    time.sleep(0.5)  # let any stray extra delivery show up
    got = sorted(v for c in cs for v in c.record_values())
    assert got == expected, "the group must read every record exactly once while stable"
    for c in cs:
        own = c.partitions()
        _, _, recs = c.snapshot()
        stray = {p for _, _, p, _, _ in recs} - own
        assert not stray, f"{c.name} read partitions {stray} it is not assigned ({sorted(own)})"
    assert [c.event_count() for c in cs] == events_before, \
        f"no rebalance expected while the group is stable: {cs}"


def test_killed_member_partitions_move_and_nothing_is_skipped(gbroker, members):
    """SIGKILLed member: after its session times out its partitions go to the others,
    which resume at its committed offsets (commit after processing: nothing skipped)."""
    bs = gbroker.bootstrap
    topic, group = unique_topic("gkill"), unique_group()
    create_topic(bs, topic, 6)
    conf = {"session.timeout.ms": 3000, "heartbeat.interval.ms": 500}
    ms = [members(f"member{i}", bs, group, topic, conf) for i in range(3)]

    def assigned_split():
        if any(m.proc.poll() is not None for m in ms):
            raise AssertionError(f"a member process exited: {ms}")
        parts = [m.assignment() for m in ms]
        return all(parts) and sum(len(p) for p in parts) == 6 and set().union(*parts) == set(range(6))
    wait_until(assigned_split, 60, lambda: f"3 members splitting 6 partitions: {ms}")

    def processed(ms_):
        out = {}
        for m in ms_:
            for ev in m.events():
                if ev["ev"] == "rec":
                    out.setdefault((ev["p"], ev["o"]), []).append((m.name, ev["v"]))
        return out

    b1 = produce_values(bs, topic, 6, 40, "b1")
    wait_until(lambda: len(processed(ms)) >= 240, 60,
               lambda: f"240 records processed, have {len(processed(ms))}: {ms}")

    victim = ms[1]
    survivors = [ms[0], ms[2]]
    victim_parts = victim.assignment()
    assert victim_parts, f"victim has no partitions: {victim}"

    # the victim processed and committed its partitions' batch-1 records
    def victim_commits():
        c = {}
        for ev in victim.events():
            if ev["ev"] == "commit":
                c[ev["p"]] = max(c.get(ev["p"], 0), ev["o"])
        return c
    wait_until(lambda: all(victim_commits().get(p) == 40 for p in victim_parts), 30,
               lambda: f"victim committed offset 40 on {sorted(victim_parts)}: {victim_commits()}")
    commits_at_kill = victim_commits()

    victim.kill9()
    b2 = produce_values(bs, topic, 6, 40, "b2")

    def survivors_cover():
        for m in survivors:
            if m.proc.poll() is not None:
                raise AssertionError(f"a surviving member exited: {m}")
        parts = [m.assignment() for m in survivors]
        return sum(len(p) for p in parts) == 6 and set().union(*parts) == set(range(6))
    wait_until(survivors_cover, 45,
               lambda: f"the survivors to take over all partitions after the session timeout: "
                       f"{survivors}")

    all_values = {v for vs in list(b1.values()) + list(b2.values()) for v in vs}
    wait_until(lambda: {v for recs in processed(ms).values() for _, v in recs} >= all_values, 60,
               lambda: f"every record processed; missing "
                       f"{len(all_values - {v for r in processed(ms).values() for _, v in r})}: "
                       f"{survivors}")

    done = processed(ms)
    # at least once, and nothing skipped: every offset of every partition was processed
    for p in range(6):
        offsets = sorted({o for (pp, o) in done if pp == p})
        assert offsets == list(range(80)), f"partition {p}: processed offsets {offsets[:5]}..."
    # each of the victim's partitions was resumed exactly at its committed offset
    for p in sorted(victim_parts):
        firsts = []
        for m in survivors:
            offs = [ev["o"] for ev in m.events() if ev["ev"] == "rec" and ev["p"] == p]
            if offs:
                firsts.append(min(offs))
        assert firsts, f"no survivor processed the victim's partition {p}"
        assert min(firsts) == commits_at_kill[p], \
            (f"partition {p}: the new owner started at offset {min(firsts)}, the victim had "
             f"committed {commits_at_kill[p]}")


def test_graceful_leave_rebalances_before_session_timeout(gbroker, consumers):
    bs = gbroker.bootstrap
    topic, group = unique_topic("gleave"), unique_group()
    create_topic(bs, topic, 6)
    conf = {"session.timeout.ms": 30000, "heartbeat.interval.ms": 500}
    cs = [consumers(f"m{i}", bs, group, [topic], conf=conf) for i in range(3)]
    settle(cs)
    assert_disjoint_cover(cs, topic, 6)

    t0 = time.monotonic()
    cs[2].stop()  # close(): LeaveGroup
    rest = cs[:2]

    def covered():
        parts = [c.partitions() for c in rest]
        return sum(len(p) for p in parts) == 6 and set().union(*parts) == set(range(6))
    wait_until(covered, 15, lambda: f"the 2 remaining members to own all 6 partitions "
                                    f"(session.timeout.ms=30000, so only LeaveGroup can do it "
                                    f"this fast): {rest}")
    elapsed = time.monotonic() - t0
    assert elapsed < 15, f"reassignment took {elapsed:.1f}s"
    settle(rest)
    assert_disjoint_cover(rest, topic, 6)


def test_cooperative_sticky_incremental_rebalance(gbroker, consumers):
    bs = gbroker.bootstrap
    topic, group = unique_topic("gcoop"), unique_group()
    create_topic(bs, topic, 6)
    conf = {"partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": 6000, "heartbeat.interval.ms": 500}

    # a steady stream of records on every partition
    stop_producing = threading.Event()
    produced = {"n": 0, "error": None}

    def produce_loop():
        try:
            p = producer(bs, **{"linger.ms": 1})
            i = 0
            while not stop_producing.is_set():
                p.produce(topic, value=f"c-{i}".encode(), partition=i % 6)
                i += 1
                if i % 6 == 0:
                    p.poll(0)
                    time.sleep(0.01)
            p.flush(30)
            produced["n"] = i
        except BaseException as e:  # noqa: BLE001 - checked by the test
            produced["error"] = e
    pt = threading.Thread(target=produce_loop, daemon=True)
    pt.start()
    try:
        a = consumers("a", bs, group, [topic], conf=conf)
        b = consumers("b", bs, group, [topic], conf=conf)
        settle([a, b])
        assert_disjoint_cover([a, b], topic, 6)
        initial = {a.name: a.partitions(), b.name: b.partitions()}
        assert sorted(len(p) for p in initial.values()) == [3, 3], initial
        marks = {a.name: a.event_count(), b.name: b.event_count()}

        c = consumers("c", bs, group, [topic], conf=conf)
        t_join = time.monotonic()
        settle([a, b, c])
        assert_disjoint_cover([a, b, c], topic, 6)
        t_assigned = min(t for t, kind, tps in c.snapshot()[1] if kind == "assign" and tps)
    finally:
        stop_producing.set()
        pt.join(30)
    assert produced["error"] is None, f"the background producer failed: {produced['error']}"
    assert produced["n"] > 0

    moved = set()
    for m in (a, b):
        own0 = initial[m.name]
        final = m.partitions()
        _, events, records = m.snapshot()
        later = events[marks[m.name]:]
        assert not any(kind == "lost" for _, kind, _ in later), f"{m.name} lost partitions: {later}"
        # replay the callbacks: the member never holds nothing and never loses a kept partition
        held = set(own0)
        for _, kind, tps in later:
            parts = {p for _, p in tps}
            if kind == "assign":
                held |= parts
            else:
                assert parts <= own0 - final, \
                    (f"{m.name} was asked to revoke {sorted(parts)}: a cooperative revocation "
                     f"lists only partitions that move away (kept {sorted(final)}); {later}")
                held -= parts
                assert held, f"{m.name} lost all its partitions during the rebalance: {later}"
        assert final < own0 and len(final) == 2, \
            f"{m.name}: sticky assignment keeps a subset of {sorted(own0)}, got {sorted(final)}"
        moved |= own0 - final
        # kept partitions were read without restarting (no record read twice)
        for p in final:
            offs = [o for _, _, pp, o, _ in records if pp == p]
            assert offs == sorted(set(offs)), f"{m.name} re-read partition {p}: positions were reset"
        # consumption of kept partitions went on while the new member joined
        window = t_assigned - t_join
        if window >= 0.5:
            during = [r for r in records if r[2] in final and t_join <= r[0] <= t_assigned]
            assert during, (f"{m.name} consumed nothing from its kept partitions {sorted(final)} "
                            f"during the {window:.1f}s rebalance")
    assert moved == c.partitions(), f"moved {sorted(moved)}, new member has {sorted(c.partitions())}"
    assert describe_group(bs, group).partition_assignor == "cooperative-sticky"


@pytest.mark.parametrize("strategies,selected", [
    (["range"] * 3, "range"),
    (["roundrobin"] * 3, "roundrobin"),
    (["range,roundrobin", "roundrobin", "roundrobin,range"], "roundrobin"),
], ids=["range", "roundrobin", "common-protocol"])
def test_assignor_strategies(gbroker, consumers, strategies, selected):
    bs = gbroker.bootstrap
    topic, group = unique_topic("gassign"), unique_group()
    create_topic(bs, topic, 6)
    cs = [consumers(f"m{i}", bs, group, [topic],
                    conf={"partition.assignment.strategy": s})
          for i, s in enumerate(strategies)]
    settle(cs)
    assert_disjoint_cover(cs, topic, 6)
    shapes = sorted(tuple(sorted(c.partitions())) for c in cs)
    if selected == "range":
        assert shapes == [(0, 1), (2, 3), (4, 5)], f"range assignor shape expected, got {shapes}"
    else:
        assert shapes == [(0, 3), (1, 4), (2, 5)], f"roundrobin assignor shape expected, got {shapes}"

    d = describe_group(bs, group)
    assert d.partition_assignor == selected, \
        f"group protocol {d.partition_assignor!r}, expected {selected!r} (members offered {strategies})"
    assert d.state == ConsumerGroupState.STABLE, d.state
    assert not d.is_simple_consumer_group
    for m in d.members:
        assert "127.0.0.1" in m.host, (m.member_id, m.client_id, m.host)
    by_client = {m.client_id: {tp.partition for tp in m.assignment.topic_partitions}
                 for m in d.members}
    assert by_client == {c.name: c.partitions() for c in cs}, \
        f"DescribeGroups member assignments {by_client} differ from the members' own"


def test_static_member_restart_keeps_assignment_without_rebalance(gbroker, consumers):
    bs = gbroker.bootstrap
    topic, group = unique_topic("gstatic"), unique_group()
    create_topic(bs, topic, 6)

    def conf(iid):
        return {"group.instance.id": iid, "session.timeout.ms": 5000,
                "heartbeat.interval.ms": 500}
    a = consumers("a", bs, group, [topic], conf=conf("inst-a"))
    wait_until(lambda: len(a.partitions()) == 6, 30, lambda: f"first member owns all: {a}")
    b = consumers("b", bs, group, [topic], conf=conf("inst-b"))
    c = consumers("c", bs, group, [topic], conf=conf("inst-c"))
    settle([a, b, c])
    assert_disjoint_cover([a, b, c], topic, 6)

    d = describe_group(bs, group)
    assert sorted(m.group_instance_id for m in d.members) == ["inst-a", "inst-b", "inst-c"], \
        [(m.member_id, m.group_instance_id) for m in d.members]

    b_parts = b.partitions()
    marks = {a.name: a.event_count(), c.name: c.event_count()}
    t_close = time.monotonic()
    b.stop()  # a static member's close() sends no LeaveGroup
    b2 = consumers("b2", bs, group, [topic], conf=conf("inst-b"))
    wait_until(lambda: b2.partitions(), 20, lambda: f"restarted static member assigned: {b2}")
    # watch past the old incarnation's session timeout too
    wait_until(lambda: time.monotonic() - t_close > 7.0, 10, "7s after the restart")

    assert b2.partitions() == b_parts, \
        f"restarted static member got {sorted(b2.partitions())}, had {sorted(b_parts)}"
    for m in (a, c):
        later = m.snapshot()[1][marks[m.name]:]
        assert not later, f"{m.name} saw rebalance callbacks for a static member's restart: {later}"
    kinds = [k for _, k, _ in b2.snapshot()[1]]
    assert kinds == ["assign"], f"restarted member's callbacks: {kinds}"

    # everyone still consumes its own partitions
    values = produce_values(bs, topic, 6, 5, "st")
    for m in (a, c, b2):
        want = sorted(v.encode() for p in m.partitions() for v in values[p])
        wait_until(lambda: sorted(x for x in m.record_values() if x.startswith(b"st-")) == want,
                   30, lambda: f"{m.name} reads its partitions' new records: {m}")

    # a static member that is gone for good is removed by its session timeout ...
    c_parts = c.partitions()
    c.stop()
    wait_until(lambda: a.partitions() | b2.partitions() == set(range(6)), 30,
               lambda: f"the static member's partitions {sorted(c_parts)} reassigned after its "
                       f"session timeout: {a}, {b2}")
    # ... or at once by an admin LeaveGroup naming its group.instance.id (KIP-345)
    from kafka import KafkaAdminClient
    from kafka.admin import MemberToRemove
    b2.stop()
    kp = KafkaAdminClient(bootstrap_servers=bs, request_timeout_ms=30000)
    try:
        res = kp.remove_group_members(group, [MemberToRemove(group_instance_id="inst-b")])
        assert [e.__name__ for e in res.values()] == ["NoError"], res
        res = kp.remove_group_members(group, [MemberToRemove(group_instance_id="inst-nobody")])
        assert [e.__name__ for e in res.values()] == ["UnknownMemberIdError"], res
    finally:
        kp.close()
    d = describe_group(bs, group)
    assert [m.group_instance_id for m in d.members] == ["inst-a"], \
        f"after removing inst-b: {[(m.member_id, m.group_instance_id) for m in d.members]}"
    wait_until(lambda: a.partitions() == set(range(6)), 15,
               lambda: f"the last member owns all partitions: {a}")


def test_duplicate_instance_id_fences_old_member(gbroker, consumers):
    bs = gbroker.bootstrap
    topic, group = unique_topic("gfence"), unique_group()
    create_topic(bs, topic, 3)
    conf = {"group.instance.id": "dup", "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 500}
    old = consumers("old", bs, group, [topic], conf=conf)
    wait_until(lambda: len(old.partitions()) == 3, 30, lambda: f"first member assigned: {old}")
    new = consumers("new", bs, group, [topic], conf=conf)

    def fenced():
        with old.lock:
            return [e for e in old.errors if e.fatal() or e.code() in
                    (KafkaError._FATAL, KafkaError.FENCED_INSTANCE_ID)]
    errs = wait_until(fenced, 30, lambda: f"the first member to be fenced (fatal error / "
                                          f"FENCED_INSTANCE_ID): {old}; new: {new}")
    assert errs
    wait_until(lambda: len(new.partitions()) == 3, 30, lambda: f"the new member owns all: {new}")

    values = produce_values(bs, topic, 3, 10, "after")
    want = sorted(v.encode() for vs in values.values() for v in vs)
    wait_until(lambda: sorted(x for x in new.record_values() if x.startswith(b"after-")) == want,
               30, lambda: f"the new member reads the new records: {new}")
    assert not [x for x in old.record_values() if x.startswith(b"after-")], \
        "the fenced member must not consume any more"


def test_committed_offsets_survive_broker_kill9(gbroker, consumers):
    bs = gbroker.bootstrap
    topic, group = unique_topic("gdur"), unique_group()
    create_topic(bs, topic, 3)
    produce_values(bs, topic, 3, 20, "d")
    want = {0: 7, 1: 13, 2: 20}
    meta = {p: f"meta-{p}" for p in want}

    c1 = consumers("c1", bs, group, [topic])
    settle([c1])
    res = c1.call(lambda c: c.commit(offsets=[TopicPartition(topic, p, o, metadata=meta[p])
                                              for p, o in want.items()], asynchronous=False))
    assert all(tp.error is None for tp in res), res
    gbroker.kill9()  # right after the commit was acknowledged
    gbroker.start()
    c1.stop()

    probe = Consumer({"bootstrap.servers": bs, "group.id": group, "enable.auto.commit": False})
    try:
        got = probe.committed([TopicPartition(topic, p) for p in want], timeout=30)
    finally:
        probe.close()
    assert {tp.partition: tp.offset for tp in got} == want, got
    assert {tp.partition: tp.metadata for tp in got} == meta, got

    c2 = consumers("c2", bs, group, [topic], commit_each=True)
    settle([c2])
    produce_values(bs, topic, 3, 1, "late")  # partition 2 was fully consumed
    wait_until(lambda: {r[2] for r in c2.snapshot()[2]} == {0, 1, 2}, 30,
               lambda: f"records from all partitions: {c2}")
    firsts = {}
    for _, _, p, o, _ in c2.snapshot()[2]:
        firsts.setdefault(p, o)
    assert firsts == want, f"resumed at {firsts}, committed {want}"

    # kill -9 under a live member that commits every record: it rejoins the restarted
    # broker and goes on from its commits, skipping nothing
    ends = {0: 21, 1: 21, 2: 21}
    wait_until(lambda: {p: max(o for _, _, pp, o, _ in c2.snapshot()[2] if pp == p) + 1
                        for p in range(3)} == ends, 30, lambda: f"c2 read to the end: {c2}")
    a = admin_client(bs)

    def committed():
        r = a.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)],
                                          request_timeout=30)[group].result(30)
        return {tp.partition: tp.offset for tp in r.topic_partitions}
    wait_until(lambda: committed() == ends, 15, lambda: f"c2 committed {ends}: {committed()}")
    gbroker.kill9()
    gbroker.start()
    produce_values(bs, topic, 3, 5, "after-crash")
    wait_until(lambda: {p: max(o for _, _, pp, o, _ in c2.snapshot()[2] if pp == p) + 1
                        for p in range(3)} == {p: 26 for p in range(3)}, 60,
               lambda: f"the live member reads on after the broker's restart: {c2}")
    for p in range(3):
        offs = sorted({o for _, _, pp, o, _ in c2.snapshot()[2] if pp == p})
        assert offs == list(range(want[p], 26)), f"partition {p}: read offsets {offs}"


def test_deleting_a_topic_deletes_its_committed_offsets(gbroker, consumers):
    """Kafka drops every group's offsets of a deleted topic: a topic re-created under the
    same name must not inherit them (a group would skip the new topic's first records)."""
    bs = gbroker.bootstrap
    a = admin_client(bs)
    topic, keep, group = unique_topic("gdel"), unique_topic("gkeep"), unique_group("del")
    create_topic(bs, topic, 2)
    create_topic(bs, keep, 1)
    r = a.alter_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, 0, 5),
                                              TopicPartition(topic, 1, 7),
                                              TopicPartition(keep, 0, 3)])],
        request_timeout=30)[group].result(30)
    assert all(tp.error is None for tp in r.topic_partitions), r.topic_partitions

    def offsets():
        r = a.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)],
                                          request_timeout=30)[group].result(30)
        return {(tp.topic, tp.partition): tp.offset for tp in r.topic_partitions if tp.offset >= 0}

    a.delete_topics([topic], operation_timeout=30)[topic].result(30)
    wait_until(lambda: offsets() == {(keep, 0): 3}, 15,
               lambda: f"the deleted topic's offsets to be dropped, the other topic's kept: "
                       f"{offsets()}")

    create_topic(bs, topic, 2)
    with RawClient(gbroker.host, gbroker.port) as rc:
        _, fetched = rc.fetch_offsets(group, {topic: [0, 1]})
    assert {k: v[0] for k, v in fetched.items()} == {(topic, 0): -1, (topic, 1): -1}, \
        f"the re-created topic inherited offsets: {fetched}"
    values = produce_values(bs, topic, 2, 10, "new")
    c = consumers("after", bs, group, [topic])
    settle([c])
    want = sorted(v.encode() for vs in values.values() for v in vs)
    wait_until(lambda: sorted(c.record_values()) == want, 30,
               lambda: f"the group reads the re-created topic from its start: {c}")


# ---------------------------------------------------------------------------
# kafka-python: consumer group and admin
# ---------------------------------------------------------------------------

class KPGroupConsumer:
    """kafka-python KafkaConsumer polling in its own thread (it is not thread-safe)."""

    def __init__(self, name, bootstrap, group, topic):
        self.name, self.bootstrap, self.group, self.topic = name, bootstrap, group, topic
        self.lock = threading.Lock()
        self.assignment = set()
        self.events = []
        self.records = []
        self.crash = None
        self.commit_requested = threading.Event()
        self.committed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"kp-{name}")

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        from kafka import KafkaConsumer
        from kafka.consumer.subscription_state import ConsumerRebalanceListener
        me = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                with me.lock:
                    me.events.append((time.monotonic(), "revoke", {tp.partition for tp in revoked}))
                    me.assignment -= {tp.partition for tp in revoked}

            def on_partitions_assigned(self, assigned):
                with me.lock:
                    me.events.append((time.monotonic(), "assign", {tp.partition for tp in assigned}))
                    me.assignment |= {tp.partition for tp in assigned}

        try:
            c = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=self.group,
                              client_id=self.name, enable_auto_commit=False,
                              auto_offset_reset="earliest", session_timeout_ms=6000,
                              heartbeat_interval_ms=500, request_timeout_ms=30000)
            c.subscribe([self.topic], listener=Listener())
            try:
                while not self._stop.is_set():
                    for recs in c.poll(timeout_ms=100).values():
                        with self.lock:
                            self.records.extend((r.partition, r.offset, r.value) for r in recs)
                    if self.commit_requested.is_set() and not self.committed.is_set():
                        c.commit()
                        self.committed.set()
            finally:
                c.close()
        except BaseException as e:  # noqa: BLE001
            self.crash = e

    def stop(self, timeout=30):
        self._stop.set()
        self._thread.join(timeout)

    def partitions(self):
        with self.lock:
            return set(self.assignment)

    def last_event_time(self):
        with self.lock:
            return self.events[-1][0] if self.events else 0.0

    def __repr__(self):
        with self.lock:
            return (f"<kp {self.name} assignment={sorted(self.assignment)} "
                    f"records={len(self.records)} crash={self.crash!r}>")


def test_kafka_python_group_and_admin(gbroker):
    from kafka import KafkaAdminClient

    bs = gbroker.bootstrap
    topic, group = unique_topic("gkp"), unique_group("kp")
    create_topic(bs, topic, 4)
    ks = [KPGroupConsumer(f"kp-{i}", bs, group, topic).start() for i in range(2)]
    admin = KafkaAdminClient(bootstrap_servers=bs, request_timeout_ms=30000)
    try:
        def settled():
            for k in ks:
                if k.crash is not None:
                    raise AssertionError(f"{k.name} crashed: {k.crash!r}")
            return (all(k.partitions() for k in ks)
                    and time.monotonic() - max(k.last_event_time() for k in ks) > 1.5)
        wait_until(settled, 45, lambda: f"both kafka-python members assigned: {ks}")
        parts = [k.partitions() for k in ks]
        assert not (parts[0] & parts[1]), f"overlapping assignments {parts}"
        assert parts[0] | parts[1] == {0, 1, 2, 3}, f"assignments {parts} do not cover 0..3"

        values = produce_values(bs, topic, 4, 10, "kp")
        want = sorted(v.encode() for vs in values.values() for v in vs)
        wait_until(lambda: sum(len(k.records) for k in ks) >= 40, 30,
                   lambda: f"40 records read by the group: {ks}")
        time.sleep(0.3)
        assert sorted(v for k in ks for _, _, v in k.records) == want
        for k in ks:
            assert {p for p, _, _ in k.records} <= k.partitions(), f"{k.name} read foreign partitions"
            k.commit_requested.set()
        for k in ks:
            assert k.committed.wait(30), f"{k.name} did not commit: {k}"

        listed = admin.list_groups()
        mine = [g for g in listed if g["group_id"] == group]
        assert mine, f"group {group} not in ListGroups: {listed}"
        assert mine[0]["protocol_type"] == "consumer", mine
        if "group_state" in mine[0]:
            assert mine[0]["group_state"] == "Stable", mine

        desc = admin.describe_groups([group])[group]
        assert desc["error"] is None, desc
        assert desc["group_state"] == "Stable", desc
        assert desc["protocol_type"] == "consumer", desc
        assert desc["protocol_data"] == "range", desc  # kafka-python prefers range
        members = {m["client_id"]: m for m in desc["members"]}
        assert sorted(members) == ["kp-0", "kp-1"], desc["members"]
        for k in ks:
            ma = members[k.name]["member_assignment"]
            assert isinstance(ma, dict), f"undecodable member assignment of {k.name}: {ma!r}"
            got = {(a["topic"], p) for a in ma["assigned_partitions"] for p in a["partitions"]}
            assert got == {(topic, p) for p in k.partitions()}, \
                f"DescribeGroups assignment of {k.name}: {ma}"
            assert members[k.name]["member_metadata"]["topics"] == [topic], members[k.name]

        offsets = admin.list_group_offsets(group)[group]
        assert {tp.partition: om.offset for tp, om in offsets.items() if tp.topic == topic} == \
            {p: 10 for p in range(4)}, offsets
        # several groups in one OffsetFetch (v8)
        from kafka import TopicPartition as KTP
        from kafka.structs import OffsetAndMetadata
        other = unique_group("kp-other")
        res = admin.alter_group_offsets(other, {KTP(topic, 3): OffsetAndMetadata(2, "m", None)})
        assert [e.__name__ for e in res.values()] == ["NoError"], res
        both = admin.list_group_offsets([group, other])
        assert {g: {(tp.partition, om.offset) for tp, om in offs.items()} for g, offs in both.items()} == \
            {group: {(p, 10) for p in range(4)}, other: {(3, 2)}}, both

        unknown = unique_group("kp-unknown")
        res = admin.delete_groups([group, unknown])
        assert res == {group: "NonEmptyGroupError", unknown: "GroupIdNotFoundError"}, \
            f"deleting a live and an unknown group: {res}"

        for k in ks:
            k.stop()
        wait_until(lambda: admin.describe_groups([group])[group]["group_state"] == "Empty", 15,
                   lambda: f"group Empty after both members left: "
                           f"{admin.describe_groups([group])[group]}")
        assert admin.describe_groups([group])[group]["members"] == []

        res = admin.delete_groups([group])
        assert res == {group: "OK"}, f"deleting an empty group: {res}"
        assert group not in [g["group_id"] for g in admin.list_groups()]
        res = admin.delete_groups([group])
        assert res == {group: "GroupIdNotFoundError"}, f"deleting a deleted group: {res}"
        # its offsets are gone with it
        try:
            left = admin.list_group_offsets(group).get(group, {})
        except Exception as e:  # noqa: BLE001 - GROUP_ID_NOT_FOUND is also fine
            assert "GroupIdNotFound" in type(e).__name__, e
            left = {}
        assert not {tp: om for tp, om in left.items() if om.offset >= 0}, left
    finally:
        for k in ks:
            k.stop()
        admin.close()


# ---------------------------------------------------------------------------
# confluent-kafka AdminClient
# ---------------------------------------------------------------------------

def test_confluent_admin_group_apis(gbroker, consumers):
    from kafka import KafkaAdminClient
    from kafka import TopicPartition as KTP

    bs = gbroker.bootstrap
    a = admin_client(bs)
    topic, group = unique_topic("gadm"), unique_group("adm")
    create_topic(bs, topic, 3)
    produce_values(bs, topic, 3, 10, "adm")

    def listed(states=None):
        kw = {"request_timeout": 30}
        if states is not None:
            kw["states"] = states
        res = a.list_consumer_groups(**kw).result(30)
        assert not res.errors, res.errors
        return {g.group_id: g for g in res.valid}

    def offsets(timeout=30):
        r = a.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)],
                                          request_timeout=timeout)[group].result(timeout)
        return {tp.partition: tp.offset for tp in r.topic_partitions
                if tp.topic == topic and tp.offset >= 0}

    c = consumers("adm-0", bs, group, [topic], commit_each=True)
    settle([c])
    wait_until(lambda: len(c.record_values()) >= 30, 30, lambda: f"30 records read: {c}")
    wait_until(lambda: offsets() == {0: 10, 1: 10, 2: 10}, 15,
               lambda: f"committed offsets 10/10/10: {offsets()}")

    # a live group
    g = listed().get(group)
    assert g is not None and not g.is_simple_consumer_group, listed()
    assert g.state == ConsumerGroupState.STABLE, g.state
    assert group in listed({ConsumerGroupState.STABLE})
    assert group not in listed({ConsumerGroupState.EMPTY})
    d = describe_group(bs, group)
    assert d.state == ConsumerGroupState.STABLE and d.partition_assignor == "range", \
        (d.state, d.partition_assignor)
    assert [(m.client_id, sorted(tp.partition for tp in m.assignment.topic_partitions))
            for m in d.members] == [("adm-0", [0, 1, 2])]
    assert d.coordinator.id == 0

    # Kafka refuses to delete a live group, to reset its offsets or to delete offsets of a
    # topic it subscribes to
    with pytest.raises(KafkaException) as ei:
        a.delete_consumer_groups([group], request_timeout=30)[group].result(30)
    assert kafka_error_code(ei.value) == KafkaError.NON_EMPTY_GROUP, ei.value
    fs = a.alter_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, 0, 1)])], request_timeout=30)
    try:
        r = fs[group].result(30)
        errs = [tp.error for tp in r.topic_partitions]
        assert all(e is not None for e in errs), \
            f"an admin offset reset of a group with members must fail, got {r.topic_partitions}"
    except KafkaException as e:
        assert kafka_error_code(e) in (KafkaError.UNKNOWN_MEMBER_ID, KafkaError.REBALANCE_IN_PROGRESS), e
    assert offsets() == {0: 10, 1: 10, 2: 10}
    kp = KafkaAdminClient(bootstrap_servers=bs, request_timeout_ms=30000)
    try:
        res = kp.delete_group_offsets(group, [KTP(topic, 1)])
        assert [e.__name__ for e in res.values()] == ["GroupSubscribedToTopicError"], res
        assert offsets() == {0: 10, 1: 10, 2: 10}
        # ... but the offsets of a topic it does not subscribe to may go
        other = unique_topic("gadm-other")
        create_topic(bs, other, 1)
        res = c.call(lambda cons: cons.commit(offsets=[TopicPartition(other, 0, 0)],
                                              asynchronous=False))
        assert all(tp.error is None for tp in res), res
        res = kp.delete_group_offsets(group, [KTP(other, 0)])
        assert [e.__name__ for e in res.values()] == ["NoError"], res

        # the member leaves: the group is Empty
        c.stop()
        wait_until(lambda: group in listed({ConsumerGroupState.EMPTY}), 15,
                   lambda: f"group listed as Empty: {listed().get(group)}")
        assert group not in listed({ConsumerGroupState.STABLE})
        d = describe_group(bs, group)
        assert d.state == ConsumerGroupState.EMPTY and d.members == [], (d.state, d.members)

        # reset an empty group's offsets, also backwards
        r = a.alter_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, 0, 3),
                                                  TopicPartition(topic, 1, 0),
                                                  TopicPartition(topic, 2, 7)])],
            request_timeout=30)[group].result(30)
        assert all(tp.error is None for tp in r.topic_partitions), r.topic_partitions
        assert offsets() == {0: 3, 1: 0, 2: 7}

        # OffsetDelete (confluent-kafka's Python AdminClient has no call for it)
        res = kp.delete_group_offsets(group, [KTP(topic, 1)])
        assert [e.__name__ for e in res.values()] == ["NoError"], res
        assert offsets() == {0: 3, 2: 7}, "partition 1's offset was deleted"
    finally:
        kp.close()

    # a new member resumes from the reset offsets (and partition 1 from auto.offset.reset)
    c2 = consumers("adm-1", bs, group, [topic])
    settle([c2])
    wait_until(lambda: len(c2.record_values()) >= 7 + 10 + 3, 30,
               lambda: f"20 records after the reset: {c2}")
    firsts = {}
    for _, _, p, o, _ in c2.snapshot()[2]:
        firsts.setdefault(p, o)
    assert firsts == {0: 3, 1: 0, 2: 7}, firsts
    c2.stop()
    wait_until(lambda: group in listed({ConsumerGroupState.EMPTY}), 15, "group Empty again")

    a.delete_consumer_groups([group], request_timeout=30)[group].result(30)
    assert group not in listed()
    with pytest.raises(KafkaException) as ei:
        a.delete_consumer_groups([group], request_timeout=30)[group].result(30)
    assert kafka_error_code(ei.value) == KafkaError.GROUP_ID_NOT_FOUND, ei.value

    # a group that only ever had offsets set by an admin is a "simple" (protocol-less) group
    simple = unique_group("simple")
    r = a.alter_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(simple, [TopicPartition(topic, 0, 4)])],
        request_timeout=30)[simple].result(30)
    assert all(tp.error is None for tp in r.topic_partitions), r.topic_partitions
    g = listed().get(simple)
    assert g is not None, f"group {simple} created by an offset commit is not listed"
    assert g.is_simple_consumer_group and g.state == ConsumerGroupState.EMPTY, (g.is_simple_consumer_group, g.state)
    d = describe_group(bs, simple)
    assert d.state == ConsumerGroupState.EMPTY and d.members == [], (d.state, d.members)
    a.delete_consumer_groups([simple], request_timeout=30)[simple].result(30)


# ---------------------------------------------------------------------------
# bad input, raw requests
# ---------------------------------------------------------------------------

def test_raw_group_errors(gbroker):
    bs = gbroker.bootstrap
    topic, group = unique_topic("graw"), unique_group("raw")
    create_topic(bs, topic, 2)
    with RawClient(gbroker.host, gbroker.port) as rc:
        err, node, host, port = rc.find_coordinator(group)
        assert (err, node, host, port) == (ERR_NONE, 0, gbroker.host, gbroker.port)

        gen, member = raw_single_member_group(rc, group, topic, 2)
        assert rc.heartbeat(group, gen, member) == ERR_NONE

        # DescribeGroups hands back the member's metadata and assignment bytes as sent
        d = rc.describe(group)
        assert (d.error_code, d.group_state, d.protocol_type, d.protocol_data) == \
            (ERR_NONE, "Stable", "consumer", "range"), d
        assert [m.member_id for m in d.members] == [member]
        assert bytes(d.members[0].member_metadata) == RawClient.subscription([topic])
        assert bytes(d.members[0].member_assignment) == \
            RawClient.assignment_bytes({topic: [0, 1]})
        d = rc.describe(unique_group("nobody"))
        assert d.error_code == ERR_GROUP_ID_NOT_FOUND or \
            (d.error_code == ERR_NONE and d.group_state == "Dead" and not d.members), d

        ok = rc.commit(group, gen, member, {(topic, 0): (5, "five"), (topic, 1): (6, None)})
        assert ok == {(topic, 0): ERR_NONE, (topic, 1): ERR_NONE}

        # stale / future generation
        assert rc.commit(group, gen - 1, member, {(topic, 0): (9, None)}) == \
            {(topic, 0): ERR_ILLEGAL_GENERATION}
        assert rc.commit(group, gen + 1, member, {(topic, 0): (9, None)}) == \
            {(topic, 0): ERR_ILLEGAL_GENERATION}
        # unknown member
        assert rc.commit(group, gen, "no-such-member", {(topic, 0): (9, None)}) == \
            {(topic, 0): ERR_UNKNOWN_MEMBER_ID}
        # generation -1 without a member id: only allowed for an empty group
        assert rc.commit(group, -1, "", {(topic, 0): (9, None)}) == \
            {(topic, 0): ERR_UNKNOWN_MEMBER_ID}
        # metadata over offset.metadata.max.bytes (4096) fails that partition only
        res = rc.commit(group, gen, member, {(topic, 0): (11, "x" * 4097),
                                             (topic, 1): (12, "y" * 4096)})
        assert res == {(topic, 0): ERR_OFFSET_METADATA_TOO_LARGE, (topic, 1): ERR_NONE}, res

        top, fetched = rc.fetch_offsets(group, {topic: [0, 1]})
        assert top == ERR_NONE
        assert fetched == {(topic, 0): (5, "five", ERR_NONE), (topic, 1): (12, "y" * 4096, ERR_NONE)}, \
            {k: (o, (m or "")[:10], e) for k, (o, m, e) in fetched.items()}
        # commits for partitions that do not exist
        assert rc.commit(group, gen, member, {("no-such-topic", 0): (1, None),
                                              (topic, 99): (1, None)}) == \
            {("no-such-topic", 0): ERR_UNKNOWN_TOPIC_OR_PARTITION,
             (topic, 99): ERR_UNKNOWN_TOPIC_OR_PARTITION}
        # a partition without a commit: offset -1, no error
        top, fetched = rc.fetch_offsets(unique_group("never"), {topic: [0]})
        assert top == ERR_NONE and fetched[(topic, 0)][0] == -1 and fetched[(topic, 0)][2] == ERR_NONE, \
            fetched

        # heartbeats
        assert rc.heartbeat(group, gen, "no-such-member") == ERR_UNKNOWN_MEMBER_ID
        assert rc.heartbeat(group, gen + 1, member) == ERR_ILLEGAL_GENERATION
        assert rc.heartbeat(unique_group("nogroup"), 1, "no-such-member") in \
            (ERR_UNKNOWN_MEMBER_ID, ERR_GROUP_ID_NOT_FOUND)

        # SyncGroup with a wrong generation / unknown member
        s = rc.sync(group, gen + 1, member, {})
        assert s.error_code == ERR_ILLEGAL_GENERATION, s.error_code
        s = rc.sync(group, gen, "no-such-member", {})
        assert s.error_code == ERR_UNKNOWN_MEMBER_ID, s.error_code

        # JoinGroup: protocols no member shares, bad session timeouts, empty group id
        with RawClient(gbroker.host, gbroker.port) as rc2:
            j = rc2.join(group, [topic], protocols=["no-such-assignor"])
            assert j.error_code == ERR_INCONSISTENT_GROUP_PROTOCOL, j.error_code
            j = rc2.join(unique_group("raw-st"), [topic], session_timeout_ms=500)
            assert j.error_code == ERR_INVALID_SESSION_TIMEOUT, j.error_code
            j = rc2.join(unique_group("raw-st"), [topic], session_timeout_ms=1_800_001)
            assert j.error_code == ERR_INVALID_SESSION_TIMEOUT, j.error_code
            j = rc2.join("", [topic])
            assert j.error_code == ERR_INVALID_GROUP_ID, j.error_code

        # none of this disturbed the member
        assert rc.heartbeat(group, gen, member) == ERR_NONE

        # a static member: its group.instance.id with another member id is fenced
        sgroup = unique_group("raw-static")
        with RawClient(gbroker.host, gbroker.port) as rs:
            j = rs.join(sgroup, [topic], instance_id="inst-1")
            assert j.error_code == ERR_NONE, j.error_code
            s_ = rs.sync(sgroup, j.generation_id, j.member_id,
                         {j.member_id: RawClient.assignment_bytes({topic: [0, 1]})},
                         instance_id="inst-1", protocol_name=j.protocol_name)
            assert s_.error_code == ERR_NONE, s_.error_code
            assert rs.heartbeat(sgroup, j.generation_id, j.member_id, "inst-1") == ERR_NONE
            assert rs.heartbeat(sgroup, j.generation_id, "impostor", "inst-1") == ERR_FENCED_INSTANCE_ID
            assert rs.commit(sgroup, j.generation_id, "impostor", {(topic, 0): (1, None)},
                             instance_id="inst-1") == {(topic, 0): ERR_FENCED_INSTANCE_ID}
            assert rs.commit(sgroup, j.generation_id, j.member_id, {(topic, 0): (1, None)},
                             instance_id="inst-1") == {(topic, 0): ERR_NONE}

        # after LeaveGroup the member is unknown, the group empty: admin-style commits work
        lv = rc.leave(group, member)
        assert lv.error_code == ERR_NONE
        assert rc.heartbeat(group, gen, member) == ERR_UNKNOWN_MEMBER_ID
        assert rc.commit(group, -1, "", {(topic, 0): (2, None)}) == {(topic, 0): ERR_NONE}
        top, fetched = rc.fetch_offsets(group, {topic: [0]})
        assert fetched[(topic, 0)][0] == 2


def in_thread(fn, *args, **kwargs):
    """Run fn in a daemon thread; returns (thread, box) with box["r"] or box["e"] set."""
    box = {}

    def run():
        try:
            box["r"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["e"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def result(t, box, timeout=30):
    t.join(timeout)
    assert not t.is_alive(), f"no answer within {timeout}s"
    if "e" in box:
        raise box["e"]
    return box["r"]


def test_raw_rebalance_protocol(gbroker):
    """Two members by hand: rebalance signalled by heartbeats, the leader's assignment
    handed to the follower through SyncGroup, commits refused while the assignment is
    pending, and a member that does not rejoin within the rebalance timeout dropped."""
    bs = gbroker.bootstrap
    topic, group = unique_topic("grb"), unique_group("rb")
    create_topic(bs, topic, 4)
    kw = dict(session_timeout_ms=30000, rebalance_timeout_ms=3000)
    with RawClient(gbroker.host, gbroker.port) as ra, RawClient(gbroker.host, gbroker.port) as rb, \
            RawClient(gbroker.host, gbroker.port) as rc:
        j = ra.join(group, [topic], **kw)
        assert j.error_code == ERR_NONE and j.leader == j.member_id, (j.error_code, j.leader)
        gen1, ma = j.generation_id, j.member_id
        assert ra.sync(group, gen1, ma, {ma: RawClient.assignment_bytes({topic: [0, 1, 2, 3]})},
                       protocol_name=j.protocol_name).error_code == ERR_NONE

        # B joins: its JoinGroup waits until A has rejoined
        tb, bb = in_thread(rb.join, group, [topic], **kw)
        wait_until(lambda: ra.heartbeat(group, gen1, ma) == ERR_REBALANCE_IN_PROGRESS, 10,
                   "A's heartbeat to answer REBALANCE_IN_PROGRESS")
        assert tb.is_alive(), "B's JoinGroup answered before A rejoined"
        # members of the current generation may still commit while the group prepares
        assert ra.commit(group, gen1, ma, {(topic, 0): (1, None)}) == {(topic, 0): ERR_NONE}

        ja = ra.join(group, [topic], member_id=ma, **kw)
        jb = result(tb, bb)
        assert ja.error_code == ERR_NONE and jb.error_code == ERR_NONE, (ja.error_code, jb.error_code)
        mb = jb.member_id
        gen2 = ja.generation_id
        assert jb.generation_id == gen2 == gen1 + 1, (gen1, ja.generation_id, jb.generation_id)
        assert ja.leader == jb.leader == ma, "the existing member stays the leader"
        assert ja.protocol_name == jb.protocol_name == "range"
        assert sorted(m.member_id for m in ja.members) == sorted([ma, mb])
        assert jb.members == [], "only the leader gets the member list"
        for m in ja.members:
            assert RawClient.subscription([topic]) == bytes(m.metadata), "member metadata relayed as sent"

        # assignment pending (CompletingRebalance): commits are refused
        assert ra.commit(group, gen2, ma, {(topic, 0): (2, None)}) == \
            {(topic, 0): ERR_REBALANCE_IN_PROGRESS}

        # the follower's SyncGroup waits for the leader's
        ts, bs_ = in_thread(rb.sync, group, gen2, mb, {}, protocol_name="range")
        time.sleep(0.5)
        assert ts.is_alive(), "the follower's SyncGroup was answered before the leader's"
        want_a = RawClient.assignment_bytes({topic: [0, 1]})
        want_b = RawClient.assignment_bytes({topic: [2, 3]})
        sa = ra.sync(group, gen2, ma, {ma: want_a, mb: want_b}, protocol_name="range")
        sb = result(ts, bs_)
        assert (sa.error_code, sb.error_code) == (ERR_NONE, ERR_NONE)
        assert bytes(sa.assignment) == want_a and bytes(sb.assignment) == want_b
        assert rb.commit(group, gen2, mb, {(topic, 2): (3, None)}) == {(topic, 2): ERR_NONE}
        assert ra.heartbeat(group, gen2, ma) == ERR_NONE

        # C joins; B rejoins, A never does: after the rebalance timeout (3 s) A is out
        tc, bc = in_thread(rc.join, group, [topic], **kw)
        wait_until(lambda: rb.heartbeat(group, gen2, mb) == ERR_REBALANCE_IN_PROGRESS, 10,
                   "B's heartbeat to answer REBALANCE_IN_PROGRESS")
        jb3 = rb.join(group, [topic], member_id=mb, **kw)
        jc = result(tc, bc)
        assert jb3.error_code == ERR_NONE and jc.error_code == ERR_NONE
        assert jb3.generation_id == jc.generation_id == gen2 + 1
        members3 = sorted(m.member_id for m in (jb3.members or jc.members))
        assert members3 == sorted([mb, jc.member_id]), f"members after the timeout: {members3}"
        assert ra.heartbeat(group, gen2, ma) == ERR_UNKNOWN_MEMBER_ID

        # the offsets committed along the way
        _, fetched = ra.fetch_offsets(group, {topic: [0, 2]})
        assert {k: v[0] for k, v in fetched.items()} == {(topic, 0): 1, (topic, 2): 3}


def test_raw_join_while_sync_pending_restarts_rebalance(gbroker):
    """A member joining while the followers wait for the leader's SyncGroup: the
    pending SyncGroups are answered REBALANCE_IN_PROGRESS and everyone rejoins."""
    bs = gbroker.bootstrap
    topic, group = unique_topic("gpend"), unique_group("pend")
    create_topic(bs, topic, 3)
    kw = dict(session_timeout_ms=30000, rebalance_timeout_ms=5000)
    with RawClient(gbroker.host, gbroker.port) as ra, RawClient(gbroker.host, gbroker.port) as rb, \
            RawClient(gbroker.host, gbroker.port) as rc:
        gen1, ma = raw_single_member_group(ra, group, topic, 3)
        tb, bb = in_thread(rb.join, group, [topic], **kw)
        wait_until(lambda: ra.heartbeat(group, gen1, ma) == ERR_REBALANCE_IN_PROGRESS, 10,
                   "REBALANCE_IN_PROGRESS for A")
        ja = ra.join(group, [topic], member_id=ma, **kw)
        jb = result(tb, bb)
        gen2, mb = ja.generation_id, jb.member_id
        assert (ja.error_code, jb.error_code) == (ERR_NONE, ERR_NONE) and ja.leader == ma

        ts, sbox = in_thread(rb.sync, group, gen2, mb, {}, protocol_name=ja.protocol_name)
        time.sleep(0.3)
        tc, cbox = in_thread(rc.join, group, [topic], **kw)
        sb = result(ts, sbox, timeout=15)
        assert sb.error_code == ERR_REBALANCE_IN_PROGRESS, \
            f"a follower's pending SyncGroup when a new member joins: error {sb.error_code}"
        sa = ra.sync(group, gen2, ma, {ma: RawClient.assignment_bytes({topic: [0, 1, 2]})},
                     protocol_name=ja.protocol_name)
        assert sa.error_code == ERR_REBALANCE_IN_PROGRESS, sa.error_code

        ta, abox = in_thread(ra.join, group, [topic], member_id=ma, **kw)
        jb2 = rb.join(group, [topic], member_id=mb, **kw)
        ja2, jc = result(ta, abox), result(tc, cbox)
        assert {j.error_code for j in (ja2, jb2, jc)} == {ERR_NONE}
        assert ja2.generation_id == jb2.generation_id == jc.generation_id > gen2
        leader = next(j for j in (ja2, jb2, jc) if j.members)
        assert sorted(m.member_id for m in leader.members) == sorted([ma, mb, jc.member_id])


def raw_two_member_group(ra, rb, group, topic, **kw):
    """A joins alone and syncs, then B joins: returns (generation, A's id, B's id) of the
    two-member generation, both synced (A leader, with partition 0; B with the rest)."""
    gen1, ma = raw_single_member_group(ra, group, topic, 2)
    tb, bb = in_thread(rb.join, group, [topic], **kw)
    wait_until(lambda: ra.heartbeat(group, gen1, ma) == ERR_REBALANCE_IN_PROGRESS, 10,
               "REBALANCE_IN_PROGRESS for A")
    ja = ra.join(group, [topic], member_id=ma, **kw)
    jb = result(tb, bb)
    assert (ja.error_code, jb.error_code) == (ERR_NONE, ERR_NONE) and ja.leader == ma
    gen2, mb = ja.generation_id, jb.member_id
    ts, sbox = in_thread(rb.sync, group, gen2, mb, {}, protocol_name=ja.protocol_name)
    sa = ra.sync(group, gen2, ma, {ma: RawClient.assignment_bytes({topic: [0]}),
                                   mb: RawClient.assignment_bytes({topic: [1]})},
                 protocol_name=ja.protocol_name)
    assert (sa.error_code, result(ts, sbox).error_code) == (ERR_NONE, ERR_NONE)
    return gen2, ma, mb


def test_raw_rejoin_rebalances_only_on_changed_metadata(gbroker):
    bs = gbroker.bootstrap
    topic, topic2, group = unique_topic("gmeta"), unique_topic("gmeta2"), unique_group("meta")
    create_topic(bs, topic, 2)
    create_topic(bs, topic2, 1)
    kw = dict(session_timeout_ms=30000, rebalance_timeout_ms=5000)
    with RawClient(gbroker.host, gbroker.port) as ra, RawClient(gbroker.host, gbroker.port) as rb:
        gen, ma, mb = raw_two_member_group(ra, rb, group, topic, **kw)
        # a follower rejoining with unchanged metadata: answered at once, same generation
        j = rb.join(group, [topic], member_id=mb, **kw)
        assert (j.error_code, j.generation_id, j.leader) == (ERR_NONE, gen, ma), \
            (j.error_code, j.generation_id, j.leader)
        assert ra.heartbeat(group, gen, ma) == ERR_NONE, "no rebalance for an unchanged rejoin"
        assert rb.heartbeat(group, gen, mb) == ERR_NONE
        # a changed subscription: rebalance
        tb, bb = in_thread(rb.join, group, [topic, topic2], member_id=mb, **kw)
        wait_until(lambda: ra.heartbeat(group, gen, ma) == ERR_REBALANCE_IN_PROGRESS, 10,
                   "REBALANCE_IN_PROGRESS after a member changed its subscription")
        ja = ra.join(group, [topic], member_id=ma, **kw)
        jb = result(tb, bb)
        assert ja.generation_id == jb.generation_id == gen + 1
        metas = {m.member_id: bytes(m.metadata) for m in ja.members}
        assert metas == {ma: RawClient.subscription([topic]),
                         mb: RawClient.subscription([topic, topic2])}


def test_raw_leader_that_never_syncs_is_dropped(gbroker):
    """The leader vanishes after JoinGroup: the follower's pending SyncGroup is not left
    hanging; it is told to rejoin and the group goes on without the leader."""
    bs = gbroker.bootstrap
    topic, group = unique_topic("gnosync"), unique_group("nosync")
    create_topic(bs, topic, 2)
    with RawClient(gbroker.host, gbroker.port) as ra, RawClient(gbroker.host, gbroker.port) as rb:
        gen1, ma = raw_single_member_group(ra, group, topic, 2, session_timeout_ms=2000)
        tb, bb = in_thread(rb.join, group, [topic], session_timeout_ms=30000,
                           rebalance_timeout_ms=5000)
        wait_until(lambda: ra.heartbeat(group, gen1, ma) == ERR_REBALANCE_IN_PROGRESS, 10,
                   "REBALANCE_IN_PROGRESS for A")
        ja = ra.join(group, [topic], member_id=ma, session_timeout_ms=2000,
                     rebalance_timeout_ms=2000)
        jb = result(tb, bb)
        assert ja.leader == ma and jb.generation_id == ja.generation_id
        mb = jb.member_id
        # B waits for the leader's assignment, which never comes; A sends nothing more
        sb = rb.sync(group, jb.generation_id, mb, {}, protocol_name=jb.protocol_name)
        assert sb.error_code == ERR_REBALANCE_IN_PROGRESS, sb.error_code
        j = rb.join(group, [topic], member_id=mb, session_timeout_ms=30000,
                    rebalance_timeout_ms=5000)
        assert j.error_code == ERR_NONE and j.leader == mb, (j.error_code, j.leader)
        assert [m.member_id for m in j.members] == [mb]
        assert ra.heartbeat(group, ja.generation_id, ma) == ERR_UNKNOWN_MEMBER_ID


def test_group_settings_are_applied(broker_factory):
    b = broker_factory(env={"STRATA_GROUP_INITIAL_REBALANCE_DELAY_MS": "1500",
                            "STRATA_GROUP_MIN_SESSION_TIMEOUT_MS": "2000",
                            "STRATA_GROUP_MAX_SESSION_TIMEOUT_MS": "50000",
                            "STRATA_OFFSET_METADATA_MAX_BYTES": "100"})
    topic = unique_topic("gconf")
    create_topic(b.bootstrap, topic, 1)
    with RawClient(b.host, b.port) as rc:
        assert rc.join(unique_group("st"), [topic], session_timeout_ms=1999).error_code == \
            ERR_INVALID_SESSION_TIMEOUT
        assert rc.join(unique_group("st"), [topic], session_timeout_ms=50001).error_code == \
            ERR_INVALID_SESSION_TIMEOUT

        # group.initial.rebalance.delay.ms holds back the first rebalance of a new group
        group = unique_group("delay")
        t0 = time.monotonic()
        j = rc.join(group, [topic], session_timeout_ms=50000)
        elapsed = time.monotonic() - t0
        assert j.error_code == ERR_NONE, j.error_code
        assert elapsed >= 1.4, \
            f"first JoinGroup of a new group answered after {elapsed:.2f}s (delay is 1.5s)"
        s_ = rc.sync(group, j.generation_id, j.member_id,
                     {j.member_id: RawClient.assignment_bytes({topic: [0]})},
                     protocol_name=j.protocol_name)
        assert s_.error_code == ERR_NONE

        # offset.metadata.max.bytes
        assert rc.commit(group, j.generation_id, j.member_id, {(topic, 0): (1, "m" * 101)}) == \
            {(topic, 0): ERR_OFFSET_METADATA_TOO_LARGE}
        assert rc.commit(group, j.generation_id, j.member_id, {(topic, 0): (1, "m" * 100)}) == \
            {(topic, 0): ERR_NONE}


def test_partitions_added_trigger_rebalance(gbroker, consumers):
    from confluent_kafka.admin import NewPartitions
    bs = gbroker.bootstrap
    topic, group = unique_topic("ggrow"), unique_group()
    create_topic(bs, topic, 2)
    conf = {"topic.metadata.refresh.interval.ms": 1000}
    cs = [consumers(f"m{i}", bs, group, [topic], conf=conf) for i in range(2)]
    settle(cs)
    assert_disjoint_cover(cs, topic, 2)
    a = admin_client(bs)  # keep the client alive until the future resolves
    a.create_partitions([NewPartitions(topic, 4)], operation_timeout=30)[topic].result(30)

    def covered():
        parts = [c.partitions() for c in cs]
        return parts[0] | parts[1] == {0, 1, 2, 3}
    wait_until(covered, 30, lambda: f"the group to rebalance onto 4 partitions: {cs}")
    settle(cs)
    assert_disjoint_cover(cs, topic, 4)


def test_heartbeat_flood_does_not_disturb_other_groups(gbroker, consumers):
    bs = gbroker.bootstrap
    topic, group = unique_topic("gflood"), unique_group("calm")
    create_topic(bs, topic, 4)
    produce_values(bs, topic, 4, 5, "calm")
    calm = [consumers(f"calm-{i}", bs, group, [topic], commit_each=True) for i in range(2)]
    settle(calm)
    assert_disjoint_cover(calm, topic, 4)
    wait_until(lambda: sum(len(c.record_values()) for c in calm) >= 20, 30, "20 records read")
    a = admin_client(bs)

    def committed():
        r = a.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)],
                                          request_timeout=30)[group].result(30)
        return {tp.partition: tp.offset for tp in r.topic_partitions if tp.offset >= 0}
    wait_until(lambda: committed() == {p: 5 for p in range(4)}, 15,
               lambda: f"calm group committed 5 on each partition: {committed()}")
    assign_before = {c.name: c.partitions() for c in calm}
    events_before = {c.name: c.event_count() for c in calm}

    flood_topic, flood_group = unique_topic("gflood-raw"), unique_group("flood")
    create_topic(bs, flood_topic, 1)
    N = 5000
    with RawClient(gbroker.host, gbroker.port) as rc, \
            RawClient(gbroker.host, gbroker.port) as bogus:
        gen, member = raw_single_member_group(rc, flood_group, flood_topic, 1)

        def flood(client, make_req, n, codes, failures):
            """Pipeline n requests from a writer thread while reading the answers."""
            try:
                cls = type(make_req())
                v = client.pick_version(cls)
                frames, corrs = [], []
                for _ in range(n):
                    corr, data = client.encode(make_req(), v)
                    frames.append(data)
                    corrs.append(corr)
                writer_err = []

                def write():
                    try:
                        for i in range(0, n, 100):
                            client.sock.sendall(b"".join(frames[i:i + 100]))
                    except OSError as e:
                        writer_err.append(e)
                w = threading.Thread(target=write, daemon=True)
                w.start()
                got_corrs = []
                for _ in range(n):
                    r = client.decode(cls, v, client.read_frame())
                    got_corrs.append(r.header.correlation_id)
                    codes[r.error_code] = codes.get(r.error_code, 0) + 1
                w.join(30)
                assert not writer_err, writer_err
                assert got_corrs == corrs, "answers must come back in request order"
            except BaseException as e:  # noqa: BLE001 - re-raised by the test
                failures.append(e)

        good, bad, failures = {}, {}, []
        threads = [
            threading.Thread(target=flood, daemon=True, args=(
                rc, lambda: rc.heartbeat_request(flood_group, gen, member), N, good, failures)),
            threading.Thread(target=flood, daemon=True, args=(
                bogus, lambda: bogus.heartbeat_request(unique_group("nope"), 1, "nobody"), N, bad,
                failures)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads), "flood answers not all read within 90s"
        if failures:
            raise failures[0]
        assert good == {ERR_NONE: N}, f"heartbeats of a live member: error codes {good}"
        assert sum(bad.values()) == N and set(bad) <= {ERR_UNKNOWN_MEMBER_ID, ERR_GROUP_ID_NOT_FOUND}, bad

        assert rc.heartbeat(flood_group, gen, member) == ERR_NONE
        assert rc.commit(flood_group, gen, member, {(flood_topic, 0): (1, None)}) == \
            {(flood_topic, 0): ERR_NONE}

    time.sleep(1.0)
    assert {c.name: c.partitions() for c in calm} == assign_before
    assert {c.name: c.event_count() for c in calm} == events_before, \
        f"the flood caused a rebalance of another group: {calm}"
    assert committed() == {p: 5 for p in range(4)}
    # and the calm group still works
    values = produce_values(bs, topic, 4, 3, "after-flood")
    want = sorted(v.encode() for vs in values.values() for v in vs)
    wait_until(lambda: sorted(v for c in calm for v in c.record_values()
                              if v.startswith(b"after-flood")) == want, 30,
               lambda: f"calm group reads new records: {calm}")
