"""KIP-848 consumer groups (`group.protocol=consumer`) with confluent-kafka: members
join and get server-side assignments without overlap, a member leaving hands its
partitions to the others, commits work under member epochs, and the group shows in
ListGroups as a consumer-type group."""

import threading

from confluent_kafka import Consumer, TopicPartition

from conftest import admin_client, create_topic, producer, unique_topic, wait_until

ENV = {"STRATA_GROUP_CONSUMER_HEARTBEAT_INTERVAL_MS": "300"}


class Member(threading.Thread):
    def __init__(self, bootstrap, group, topic, assignor=None):
        super().__init__(daemon=True)
        conf = {"bootstrap.servers": bootstrap, "group.id": group, "group.protocol": "consumer",
                "auto.offset.reset": "earliest", "enable.auto.commit": False}
        if assignor:
            conf["group.remote.assignor"] = assignor
        self.c = Consumer(conf)
        self.topic = topic
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.assignment = set()
        self.records = []
        self.errors = []

    def run(self):
        self.c.subscribe([self.topic])
        while not self.stop.is_set():
            m = self.c.poll(0.1)
            if m is not None:
                if m.error():
                    self.errors.append(str(m.error()))
                else:
                    self.records.append((m.partition(), m.offset()))
                    self.c.commit(message=m, asynchronous=False)
            with self.lock:
                self.assignment = {p.partition for p in self.c.assignment()}
        self.c.close()

    def parts(self):
        with self.lock:
            return set(self.assignment)


def disjoint_cover(members, n):
    parts = [p for m in members for p in m.parts()]
    return len(parts) == n and set(parts) == set(range(n))


def test_consumer_protocol_group(broker_factory):
    b = broker_factory(env=ENV)
    topic, group = unique_topic("kip848"), unique_topic("kgroup")
    create_topic(b.bootstrap, topic, 6)
    p = producer(b.bootstrap)
    for i in range(300):
        p.produce(topic, value=str(i).encode(), partition=i % 6)
    assert p.flush(30) == 0
    members = [Member(b.bootstrap, group, topic) for _ in range(3)]
    for m in members:
        m.start()
    try:
        wait_until(lambda: disjoint_cover(members, 6) and all(len(m.parts()) == 2 for m in members),
                 what="three members with two partitions each")
        admin = admin_client(b.bootstrap)
        groups = admin.list_consumer_groups().result(10)
        listed = {g.group_id: g for g in groups.valid}
        assert group in listed, (groups.valid, groups.errors)
        # A member leaves: the remaining two take over all six partitions.
        members[0].stop.set()
        members[0].join(30)
        wait_until(lambda: disjoint_cover(members[1:], 6), what="partitions moved to the remaining members")
        wait_until(lambda: len({r for m in members for r in m.records}) == 300, what="every record consumed")
        assert not [e for m in members for e in m.errors], [m.errors for m in members]
    finally:
        for m in members:
            m.stop.set()
        for m in members:
            m.join(30)
    # Commits under member epochs reached the store.
    c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": group})
    try:
        committed = c.committed([TopicPartition(topic, p) for p in range(6)], timeout=10)
        assert [tp.offset for tp in committed] == [50] * 6
    finally:
        c.close()


def test_consumer_protocol_range_assignor(broker_factory):
    b = broker_factory(env=ENV)
    topic, group = unique_topic("kip848r"), unique_topic("krange")
    create_topic(b.bootstrap, topic, 4)
    members = [Member(b.bootstrap, group, topic, assignor="range") for _ in range(2)]
    for m in members:
        m.start()
    try:
        wait_until(lambda: disjoint_cover(members, 4) and all(len(m.parts()) == 2 for m in members),
                 what=lambda: f"range assignment: {[m.parts() for m in members]} {[m.errors for m in members]}")
        # Range hands out contiguous partitions.
        for m in members:
            parts = sorted(m.parts())
            assert parts[1] - parts[0] == 1, parts
    finally:
        for m in members:
            m.stop.set()
        for m in members:
            m.join(30)
