"""Takeover benchmark: how long a partition with a long write-ahead tail takes to serve
again after its broker is replaced.

    ~/.cache/strata-venv/bin/python tests/bench/takeover.py [--seconds 60] [--rate-mb 10]

One broker (local object store, SQLite metadata) with sealing pushed out of the way
(`segment.bytes` 1 GiB, `segment.ms` 1 hour), so the partition's whole history stays a
write-ahead tail: one range per flush, 40 flushes a second at the default interval. A
librdkafka producer at its defaults (idempotent, acks=all) writes `--rate-mb` MB/s of
10 KiB records to the one partition for `--seconds`; then the broker is killed (SIGKILL)
and started again on an empty cache directory (a new machine). Reported: the tail
(ranges, bytes), and from the restart the time until /readyz, until an acks=all produce
to the partition is acknowledged, and until its oldest record (offset 0) is fetched.
A one-hour tail at 10 MB/s is 144,000 ranges: the cost before grew with the tail.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from conftest import Broker, create_topic, is_ready, metric_sum, scrape_metrics, unique_topic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--rate-mb", type=float, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        b = Broker(Path(tmp) / "b", name="takeover", env={
            "STRATA_SEGMENT_BYTES": str(1 << 30), "STRATA_SEGMENT_MS": "3600000",
        }).start()
        try:
            run(b, args)
        finally:
            b.stop()


def run(b: Broker, args) -> None:
    topic = unique_topic("takeover")
    create_topic(b.bootstrap, topic, 1)
    p = Producer({"bootstrap.servers": b.bootstrap})
    value = b"x" * 10240
    per_second = int(args.rate_mb * 1e6 / len(value))
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < args.seconds:
        due = int((time.monotonic() - started) * per_second)
        while sent < due:
            try:
                p.produce(topic, value=value, partition=0)
                sent += 1
            except BufferError:
                p.poll(0.01)
        p.poll(0.001)
    assert p.flush(120) == 0
    flushes = metric_sum(scrape_metrics(b.http_port), "strata_wal_flushes_total", outcome="committed")
    mb = sent * len(value) / 1e6
    print(f"tail: {sent} records, {mb:.0f} MB in {args.seconds:.0f} s, "
          f"{flushes:.0f} write-ahead ranges, {len(b.objects('segments', '.seg'))} segments")

    b.kill9()
    shutil.rmtree(b.cache_dir, ignore_errors=True)
    t0 = time.monotonic()
    b.start(ready=False)
    while not is_ready(b.http_port):
        time.sleep(0.01)
    ready = time.monotonic() - t0
    q = Producer({"bootstrap.servers": b.bootstrap, "message.timeout.ms": 120000})
    acked = []
    q.produce(topic, value=b"after", partition=0, on_delivery=lambda e, m: acked.append(e))
    q.flush(120)
    produced = time.monotonic() - t0
    assert acked == [None], acked
    c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": unique_topic("g"),
                  "fetch.wait.max.ms": 10})
    c.assign([TopicPartition(topic, 0, 0)])
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "offset 0 was not fetched within 120 s"
        m = c.poll(0.1)
        if m is not None and m.error() is None:
            assert m.offset() == 0
            break
    fetched = time.monotonic() - t0
    c.close()
    print(f"after SIGKILL and a restart on an empty cache: ready {ready:.2f} s, "
          f"first acks=all produce {produced:.2f} s, offset 0 fetched {fetched:.2f} s")


if __name__ == "__main__":
    main()
