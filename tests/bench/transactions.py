"""Transactions benchmark: transactions per second, EndTxn latency, and read_committed
end-to-end latency, with confluent-kafka (librdkafka) at its defaults.

    ~/.cache/strata-venv/bin/python tests/bench/transactions.py [--store local|s3] [--seconds 20]

One broker (local store with SQLite metadata, or the moto S3 server with metadata in the
bucket). Phase 1: one transactional producer runs transactions of 100 records of 1 KiB
over 6 partitions back to back for `--seconds`: transactions per second, and the
commit_transaction() latency (EndTxn plus the client's flush of what was still in
flight) p50/p99. Phase 2: a transactional producer paced at 1,000 records/s commits
every 100 records (a 100 ms commit interval, as Kafka Streams' exactly-once default)
while a read_committed consumer tails the topic: end-to-end latency (send to receive)
p50/p99, and the rate reached (a commit holds the producer up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from conftest import Broker, create_topic, strata_binary  # noqa: E402


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def throughput(bootstrap: str, seconds: float) -> None:
    create_topic(bootstrap, "txn-bench", 6)
    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": "bench-tx"})
    p.init_transactions(30)
    value = b"v" * 1024
    commits = []
    n = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        p.begin_transaction()
        for i in range(100):
            p.produce("txn-bench", value=value, partition=i % 6)
        started = time.monotonic()
        p.commit_transaction(30)
        commits.append((time.monotonic() - started) * 1000)
        n += 1
    elapsed = time.monotonic() - t0
    print(f"transactions of 100 x 1 KiB: {n / elapsed:.1f} txn/s ({n * 100 / elapsed:,.0f} records/s, "
          f"{n * 100 * 1024 / elapsed / 1e6:.1f} MB/s); commit_transaction p50 {pct(commits, 0.5):.1f} ms, "
          f"p99 {pct(commits, 0.99):.1f} ms")


def end_to_end(bootstrap: str, seconds: float) -> None:
    create_topic(bootstrap, "txn-e2e", 1)
    received: list[float] = []
    stop = threading.Event()

    def consume():
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-e2e",
                      "isolation.level": "read_committed", "auto.offset.reset": "earliest",
                      "fetch.wait.max.ms": 100})
        c.assign([TopicPartition("txn-e2e", 0, 0)])
        while not stop.is_set():
            m = c.poll(0.1)
            if m is not None and m.error() is None:
                sent = float(m.value().decode())
                received.append((time.time() - sent) * 1000)
        c.close()

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    time.sleep(2)
    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": "bench-e2e-tx"})
    p.init_transactions(30)
    t0 = time.monotonic()
    nxt = t0
    sent = 0
    while time.monotonic() - t0 < seconds:
        p.begin_transaction()
        for _ in range(100):
            p.produce("txn-e2e", value=f"{time.time():.6f}".encode())
            sent += 1
            nxt += 0.001
            time.sleep(max(0.0, nxt - time.monotonic()))
        p.commit_transaction(30)
    time.sleep(2)
    stop.set()
    reader.join(10)
    print(f"read_committed end to end at {sent / seconds:.0f} records/s (100 per transaction): "
          f"p50 {pct(received, 0.5):.1f} ms, p99 {pct(received, 0.99):.1f} ms "
          f"({len(received)} of {sent} received)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", choices=["local", "s3"], default="local")
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="strata-txn-bench-"))
    kwargs = {}
    if args.store == "s3":
        from s3 import s3_server
        kwargs = {"store": "s3", "bucket": s3_server().new_bucket()}
    b = Broker(base / "b", name="bench", binary=strata_binary(), **kwargs)
    b.start()
    try:
        print(f"store: {args.store}")
        throughput(b.bootstrap, args.seconds)
        end_to_end(b.bootstrap, args.seconds)
        print(f"broker RSS {b.rss_kb() / 1024:.0f} MB")
    finally:
        b.close()


if __name__ == "__main__":
    main()
