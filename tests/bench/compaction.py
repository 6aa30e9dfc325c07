"""Compaction benchmark on the S3 test server: how fast a pass rewrites, what it costs in
object-store requests, and what it does to produce latency.

    ~/.cache/strata-venv/bin/python tests/bench/compaction.py [--mb 256] [--keys 50000]

One broker on a moto S3 server (metadata in the bucket). A compacted topic (one
partition, 8 MiB segments) takes `--mb` of 1 KiB keyed updates over `--keys` keys with
compaction held off (`min.cleanable.dirty.ratio=1`); then the ratio drops to 0.01 and
the pass runs. Printed: the pass's MB read and written and its duration (MB/s of
segment bytes rewritten), object-store requests per GiB read, and the acks=all produce
p50/p99 of a paced producer (200 records/s on another topic) before and during the pass.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from confluent_kafka import Producer  # noqa: E402
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource  # noqa: E402

from conftest import Broker, create_topic, metric_sum, scrape_metrics, strata_binary  # noqa: E402
from s3 import s3_server  # noqa: E402


def metrics(b) -> dict:
    text = scrape_metrics(b.http_port)
    return {
        "committed": metric_sum(text, "strata_compaction_passes_total", outcome="committed"),
        "read": metric_sum(text, "strata_compaction_bytes_total", direction="read"),
        "written": metric_sum(text, "strata_compaction_bytes_total", direction="written"),
        "requests": metric_sum(text, "strata_object_store_requests_total"),
        "gets": metric_sum(text, "strata_object_store_requests_total", op="get"),
        "puts": metric_sum(text, "strata_object_store_requests_total", op="put"),
    }


class Paced(threading.Thread):
    """acks=all producer at a fixed rate; latency of every acknowledged record."""

    def __init__(self, bootstrap: str, topic: str, rate: int):
        super().__init__(daemon=True)
        self.p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
        self.topic, self.rate = topic, rate
        self.latencies: list[tuple[float, float]] = []  # (sent at, ms)
        self.stop = threading.Event()

    def run(self):
        interval = 1.0 / self.rate
        nxt = time.monotonic()
        while not self.stop.is_set():
            sent = time.monotonic()
            self.p.produce(self.topic, value=b"p" * 512,
                           on_delivery=lambda err, _m, s=sent: err is None and self.latencies.append(
                               (s, (time.monotonic() - s) * 1000)))
            self.p.poll(0)
            nxt += interval
            time.sleep(max(0.0, nxt - time.monotonic()))
        self.p.flush(30)

    def percentiles(self, since: float, until: float) -> str:
        xs = sorted(ms for at, ms in self.latencies if since <= at < until)
        if not xs:
            return "-"
        return f"{xs[len(xs) // 2]:.1f} / {xs[min(len(xs) - 1, int(len(xs) * 0.99))]:.1f} ms ({len(xs)} records)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--keys", type=int, default=50_000)
    args = ap.parse_args()
    server = s3_server()
    base = Path(tempfile.mkdtemp(prefix="strata-compaction-bench-"))
    b = Broker(base / "b", name="bench", binary=strata_binary(), store="s3",
               bucket=server.new_bucket(), env={"STRATA_LOG_CLEANER_BACKOFF_MS": "500"})
    b.start()
    try:
        topic = "compacted"
        create_topic(b.bootstrap, topic, 1, config={
            "cleanup.policy": "compact", "segment.bytes": str(8 << 20), "segment.ms": "2000",
            "min.cleanable.dirty.ratio": "1"})
        create_topic(b.bootstrap, "paced", 1)
        p = Producer({"bootstrap.servers": b.bootstrap, "acks": "all", "linger.ms": 20,
                      "queue.buffering.max.kbytes": 262144})
        value = b"v" * 1000
        n = args.mb * 1024
        t0 = time.monotonic()
        for i in range(n):
            while True:
                try:
                    p.produce(topic, key=b"key-%08d" % (i * 7919 % args.keys), value=value)
                    break
                except BufferError:
                    p.poll(0.05)
            if i % 1000 == 0:
                p.poll(0)
        assert p.flush(300) == 0
        print(f"produced {args.mb} MB over {args.keys} keys in {time.monotonic() - t0:.1f} s")
        time.sleep(5)  # the tail seals (segment.ms) and uploads

        paced = Paced(b.bootstrap, "paced", 200)
        paced.start()
        time.sleep(10)
        quiet = (time.monotonic() - 10, time.monotonic())
        before = metrics(b)
        admin = AdminClient({"bootstrap.servers": b.bootstrap})
        res = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
            ConfigEntry("min.cleanable.dirty.ratio", "0.01", incremental_operation=AlterConfigOpType.SET)])
        admin.incremental_alter_configs([res])[res].result(30)
        started = time.monotonic()
        while metrics(b)["committed"] <= before["committed"]:
            assert time.monotonic() - started < 900, "no pass committed within 15 minutes"
            time.sleep(0.2)
        took = time.monotonic() - started
        paced.stop.set()
        paced.join(60)
        after = metrics(b)
        d = {k: after[k] - before[k] for k in after}
        gib = d["read"] / (1 << 30)
        print(f"pass: read {d['read'] / 1e6:.1f} MB, wrote {d['written'] / 1e6:.1f} MB "
              f"({d['written'] / max(d['read'], 1):.3f}) in {took:.1f} s "
              f"(check interval included): {d['read'] / 1e6 / took:.1f} MB/s read")
        print(f"object-store requests during the pass: {d['requests']:.0f} "
              f"({d['gets']:.0f} GET, {d['puts']:.0f} PUT), {d['requests'] / gib:.0f} per GiB read "
              f"(the paced producer's write-ahead PUTs included)")
        print(f"paced acks=all produce p50 / p99: quiet {paced.percentiles(*quiet)}; "
              f"during the pass {paced.percentiles(started, started + took)}")
    finally:
        b.close()


if __name__ == "__main__":
    main()
