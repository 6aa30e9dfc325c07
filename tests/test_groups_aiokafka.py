"""aiokafka consumer groups against Strata: members split the partitions, every record
is read exactly once with commits, and a graceful stop rebalances at once."""

import asyncio
import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError as AIOKafkaError
from confluent_kafka import ConsumerGroupTopicPartitions

from conftest import admin_client, create_topic, unique_topic
from group_helpers import GROUP_ENV, produce_values

PARTITIONS = 6


@pytest.fixture
def gbroker(broker_factory):
    return broker_factory(env=GROUP_ENV, name="broker")


class Member:
    """One AIOKafkaConsumer reading in a task: getmany(), record, commit()."""

    def __init__(self, name, bootstrap, group, topic, session_timeout_ms):
        self.name, self.topic = name, topic
        self.assignment: set[int] = set()
        self.events: list[tuple] = []
        self.records: list[tuple] = []  # (partition, offset, value)
        self.commit_failures: list = []
        self.crash = None
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, client_id=name,
            enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=session_timeout_ms, heartbeat_interval_ms=500,
            request_timeout_ms=30000, retry_backoff_ms=100)
        self.task = None

    async def start(self):
        me = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked):
                me.events.append((time.monotonic(), "revoke", {tp.partition for tp in revoked}))
                me.assignment -= {tp.partition for tp in revoked}

            async def on_partitions_assigned(self, assigned):
                me.events.append((time.monotonic(), "assign", {tp.partition for tp in assigned}))
                me.assignment |= {tp.partition for tp in assigned}

        self.consumer.subscribe([self.topic], listener=Listener())
        await self.consumer.start()
        self.task = asyncio.create_task(self._loop())

    async def _loop(self):
        try:
            while True:
                batches = await self.consumer.getmany(timeout_ms=200)
                n = 0
                for tp, msgs in batches.items():
                    for m in msgs:
                        self.records.append((m.partition, m.offset, m.value))
                        n += 1
                if n:
                    try:
                        await self.consumer.commit()
                    except (CommitFailedError, AIOKafkaError) as e:
                        self.commit_failures.append(e)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.crash = e

    async def stop(self):
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None
        await self.consumer.stop()  # LeaveGroup

    def last_event(self):
        return self.events[-1][0] if self.events else 0.0

    def __repr__(self):
        return (f"<{self.name} assignment={sorted(self.assignment)} records={len(self.records)} "
                f"events={[(k, sorted(p)) for _, k, p in self.events]} crash={self.crash!r}>")


async def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what()}")
        await asyncio.sleep(0.05)


def check_split(members):
    owners = {}
    for m in members:
        for p in m.assignment:
            owners.setdefault(p, []).append(m.name)
    doubled = {p: o for p, o in owners.items() if len(o) > 1}
    assert not doubled, f"partitions owned twice: {doubled}: {members}"
    assert sorted(owners) == list(range(PARTITIONS)), f"partitions not covered: {members}"


async def settle(members, timeout=45, quiet=1.5):
    def ok():
        for m in members:
            if m.crash is not None:
                raise AssertionError(f"{m.name} crashed: {m.crash!r}")
        return (all(m.assignment for m in members)
                and time.monotonic() - max(m.last_event() for m in members) >= quiet)
    await wait_for(ok, timeout, lambda: f"all members assigned and quiet: {members}")


def test_aiokafka_group_splits_consumes_and_rebalances_on_stop(gbroker):
    bs = gbroker.bootstrap
    topic, group = unique_topic("aio"), f"aio-{uuid.uuid4().hex[:8]}"
    create_topic(bs, topic, PARTITIONS)
    admin = admin_client(bs)

    def committed():
        r = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)],
                                              request_timeout=30)[group].result(30)
        return {tp.partition: tp.offset for tp in r.topic_partitions if tp.offset >= 0}

    async def scenario():
        loop = asyncio.get_running_loop()
        # a long session timeout: only LeaveGroup can make the stop rebalance quickly
        members = [Member(f"aio-{i}", bs, group, topic, session_timeout_ms=30000)
                   for i in range(3)]
        try:
            for m in members:
                await m.start()
            await settle(members)
            check_split(members)

            # phase 1: every record read exactly once, each by its partition's owner
            v1 = await loop.run_in_executor(None, produce_values, bs, topic, PARTITIONS, 10, "p1")
            want1 = sorted(v.encode() for vs in v1.values() for v in vs)
            await wait_for(lambda: sum(len(m.records) for m in members) >= len(want1), 30,
                           lambda: f"{len(want1)} records read: {members}")
            await asyncio.sleep(0.5)
            assert sorted(r[2] for m in members for r in m.records) == want1
            for m in members:
                stray = {r[0] for r in m.records} - m.assignment
                assert not stray, f"{m.name} read partitions it does not own: {stray}"
            want_commits = {p: 10 for p in range(PARTITIONS)}
            deadline = time.monotonic() + 15
            while await loop.run_in_executor(None, committed) != want_commits:
                assert time.monotonic() < deadline, \
                    f"committed offsets {await loop.run_in_executor(None, committed)}"
                await asyncio.sleep(0.2)

            # a graceful stop: the others take over its partitions right away
            leaving = members.pop(1)
            t0 = time.monotonic()
            await leaving.stop()

            def covered():
                return set().union(*(m.assignment for m in members)) == set(range(PARTITIONS))
            await wait_for(covered, 15, lambda: f"the 2 remaining members own all partitions "
                                                f"(session timeout 30 s): {members}")
            assert time.monotonic() - t0 < 15
            await settle(members)
            check_split(members)

            # phase 2: the new owners resume at the committed offsets (nothing re-read)
            before = {m.name: len(m.records) for m in members}
            v2 = await loop.run_in_executor(None, produce_values, bs, topic, PARTITIONS, 10, "p2")
            want2 = sorted(v.encode() for vs in v2.values() for v in vs)

            def new_records():
                return [r for m in members for r in m.records[before[m.name]:]]
            await wait_for(lambda: len(new_records()) >= len(want2), 30,
                           lambda: f"{len(want2)} phase-2 records: {members}")
            await asyncio.sleep(0.5)
            assert sorted(r[2] for r in new_records()) == want2, \
                "after the rebalance exactly the new records must be read (resumed at commits)"
            for m in members:
                assert m.crash is None, m.crash
        finally:
            for m in members:
                try:
                    await asyncio.wait_for(m.stop(), 30)
                except Exception:  # noqa: BLE001 - teardown
                    pass

    asyncio.run(asyncio.wait_for(scenario(), 100))
