"""Consumer-group benchmark with real clients (confluent-kafka), against a running broker.

    python tests/bench/groups.py --bootstrap 127.0.0.1:9092

Reports: time for a 10-member group on a 100-partition topic to form, time for it to
rebalance when an 11th member joins and when one leaves gracefully (until every member
has its new assignment), and offset-commit throughput (synchronous commits of all 100
partitions, and single-partition commits). Rebalance times include the clients' own
heartbeat interval (set with --heartbeat-ms) and the broker's initial rebalance delay.
"""

import argparse
import threading
import time
import uuid

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--partitions", type=int, default=100)
    ap.add_argument("--heartbeat-ms", type=int, default=300)
    ap.add_argument("--commit-seconds", type=float, default=5.0)
    a = ap.parse_args()
    topic = f"bench-groups-{uuid.uuid4().hex[:8]}"
    group = f"bench-group-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": a.bootstrap})
    admin.create_topics([NewTopic(topic, a.partitions, 1)])[topic].result()

    lock = threading.Lock()
    assignment = {}
    stop = threading.Event()

    def member(name, leave_event):
        c = Consumer({"bootstrap.servers": a.bootstrap, "group.id": group,
                      "heartbeat.interval.ms": a.heartbeat_ms, "session.timeout.ms": 10000,
                      "partition.assignment.strategy": "range", "enable.auto.commit": False})

        def on_assign(_c, parts):
            with lock:
                assignment[name] = {p.partition for p in parts}

        def on_revoke(_c, parts):
            with lock:
                assignment[name] = set()

        c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
        while not stop.is_set() and not leave_event.is_set():
            c.poll(0.05)
        c.close()
        with lock:
            assignment.pop(name, None)

    def settled(n):
        with lock:
            if len(assignment) != n:
                return False
            parts = [p for s in assignment.values() for p in s]
        return len(parts) == a.partitions and len(set(parts)) == a.partitions and all(assignment.values())

    def wait(n, timeout=120):
        t0 = time.monotonic()
        while not settled(n):
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"group did not settle with {n} members: {assignment}")
            time.sleep(0.01)
        return time.monotonic() - t0

    leaves = [threading.Event() for _ in range(a.members + 1)]
    threads = []
    t0 = time.monotonic()
    for i in range(a.members):
        t = threading.Thread(target=member, args=(f"m{i}", leaves[i]), daemon=True)
        t.start()
        threads.append(t)
    wait(a.members)
    formed = time.monotonic() - t0
    extra = threading.Thread(target=member, args=("extra", leaves[a.members]), daemon=True)
    extra.start()
    threads.append(extra)
    join_s = wait(a.members + 1)
    leaves[0].set()
    leave_s = wait(a.members)
    print(f"group of {a.members} on {a.partitions} partitions: formed in {formed:.2f} s "
          f"(includes group.initial.rebalance.delay.ms); rebalance on join {join_s:.2f} s, "
          f"on graceful leave {leave_s:.2f} s (heartbeat.interval.ms={a.heartbeat_ms})")
    stop.set()
    for t in threads:
        t.join(10)

    c = Consumer({"bootstrap.servers": a.bootstrap, "group.id": group + "-commits", "enable.auto.commit": False})
    offsets = [TopicPartition(topic, p, 0) for p in range(a.partitions)]
    n = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < a.commit_seconds:
        n += 1
        for tp in offsets:
            tp.offset = n
        c.commit(offsets=offsets, asynchronous=False)
    secs = time.monotonic() - t0
    one = [TopicPartition(topic, 0, 0)]
    m = 0
    t1 = time.monotonic()
    while time.monotonic() - t1 < a.commit_seconds:
        m += 1
        one[0].offset = m
        c.commit(offsets=one, asynchronous=False)
    secs1 = time.monotonic() - t1
    c.close()
    print(f"offset commits (synchronous, one client): {n / secs:.0f} commits/s of {a.partitions} partitions "
          f"({n * a.partitions / secs:.0f} partition offsets/s); {m / secs1:.0f} single-partition commits/s")


if __name__ == "__main__":
    main()
