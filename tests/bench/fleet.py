"""Fleet benchmark: brokers on loopback sharing one S3-compatible bucket (moto) and one
PostgreSQL (a throwaway cluster from tests/postgres.sh).

    ~/.cache/strata-venv/bin/python tests/bench/fleet.py [--only failover|scale|throughput] [--seconds 10]

- failover: three brokers with the default 10 s lease under an idempotent acks=all
  load; one is killed with SIGKILL; reported is the time until every partition it
  owned took a write again (target: lease + 2 s).
- scale: two brokers own a topic of 1,000 partitions (each with a write-ahead tail);
  a third starts; reported is the time from its start until it owns its final share.
- throughput: `strata perf` (which writes to each partition's leader) against one
  broker, then against three; reported per run: produce MB/s, acks=all p50/p99,
  metadata-store operations per second at steady state (all brokers), and, with the
  producer in zone-a and brokers in zone-a/b/c, the share of produced bytes that
  crossed zones (bytes received by brokers outside zone-a).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from conftest import (Broker, create_topic, metric_sum, scrape_metrics, strata_binary,  # noqa: E402
                      unique_topic, wait_ready, wait_until)
from s3 import s3_server  # noqa: E402
from test_fleet import PARTITIONS, Load, bootstrap, leaders  # noqa: E402

ZONES = ["zone-a", "zone-b", "zone-c"]


class Fleet:
    def __init__(self, base: Path, pg_url: str, lease_ms: int | None = None):
        self.base = base
        self.pg_url = pg_url
        self.bucket = s3_server().new_bucket()
        self.lease_ms = lease_ms
        self.brokers: list[Broker] = []

    def add(self, i: int) -> Broker:
        env = {"STRATA_ZONE": ZONES[(i - 1) % 3]}
        if self.lease_ms:
            env["STRATA_BROKER_LEASE_MS"] = str(self.lease_ms)
        b = Broker(self.base / f"b{i}", name=f"b{i}", binary=strata_binary(), store="s3",
                   bucket=self.bucket, metadata=self.pg_url, broker_id=i, env=env)
        b.start(timeout=120)
        wait_ready(b.http_port, 120)
        self.brokers.append(b)
        return b

    def close(self):
        for b in self.brokers:
            b.close()


def postgres() -> tuple[str, str]:
    out = subprocess.run([str(TESTS / "postgres.sh")], capture_output=True, text=True, timeout=300, check=True)
    env = dict(line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines()
               if line.startswith("export "))
    return env["STRATA_TEST_POSTGRES_URL"], env["STRATA_TEST_POSTGRES_DIR"]


def fresh_database(url: str, name: str) -> str:
    """A new database on the cluster, so every run starts from an empty metadata store."""
    base, _ = url.rsplit("/", 1)
    host_port = base.split("@", 1)[1]
    host, port = host_port.split(":")
    subprocess.run(["psql", "-h", host, "-p", port, "-U", "postgres", "-c", f"CREATE DATABASE {name}"],
                   check=True, capture_output=True)
    return f"{base}/{name}"


def failover(base: Path, url: str) -> None:
    fleet = Fleet(base / "failover", fresh_database(url, "failover"))
    try:
        for i in (1, 2, 3):
            fleet.add(i)
        b1, b2, _ = fleet.brokers
        topic = unique_topic("failover")
        create_topic(b1.bootstrap, topic, PARTITIONS)
        wait_until(lambda: set(leaders(b1.bootstrap, topic).values()) == {1, 2, 3}, 30, "spread")
        victim = {p for p, leader in leaders(b1.bootstrap, topic).items() if leader == 2}
        load = Load(bootstrap(fleet.brokers), topic, rate=300).start()
        wait_until(lambda: len(load.acked) > 300, 30, "load")
        b2.kill9()
        killed = time.monotonic()
        wait_until(lambda: load.acked_after(killed, victim) == victim, 60, "failover")
        took = time.monotonic() - killed
        load.stop()
        print(f"failover: {len(victim)} partitions of the killed broker took writes again after "
              f"{took:.1f} s (lease 10 s; target 12 s); {len(load.errors)} produce errors")
    finally:
        fleet.close()


def scale(base: Path, url: str, partitions: int = 1000) -> None:
    fleet = Fleet(base / "scale", fresh_database(url, "scale"))
    try:
        b1, b2 = fleet.add(1), fleet.add(2)
        topic = unique_topic("scale")
        create_topic(b1.bootstrap, topic, partitions, timeout=120)
        # One record per partition, so every partition has a write-ahead tail to recover.
        out = subprocess.run([str(strata_binary()), "perf", "--bootstrap", b1.bootstrap, "--topic", topic,
                        "--partitions", str(partitions), "--seconds", "1", "--latency-seconds", "0",
                        "--batch-records", "1", "--connections", "1"], capture_output=True, text=True, timeout=300)
        assert "produce:" in out.stdout, out.stdout + out.stderr
        started = time.monotonic()
        b3 = fleet.add(3)
        samples = []
        while time.monotonic() - started < 25:
            samples.append((time.monotonic() - started,
                            metric_sum(scrape_metrics(b3.http_port), "strata_partitions")))
            time.sleep(0.1)
        if os.environ.get("STRATA_BENCH_VERBOSE"):
            print([(round(t, 1), n) for t, n in samples[::10]])
            text = scrape_metrics(b3.http_port)
            print([line for line in text.splitlines()
                   if ("_sum" in line or "_count" in line) and ("claim_partition" in line or 'op="get"' in line
                                                                or "read_partition" in line or "partition_owners" in line)])
        final = samples[-1][1]
        reached = next(t for t, n in samples if n == final)
        print(f"scale-out: the new broker owned its share ({final:.0f} of {partitions} partitions) "
              f"{reached:.1f} s after it was started (target 10 s)")
    finally:
        fleet.close()


def perf(b: Broker, topic: str, seconds: int) -> tuple[str, str]:
    out = subprocess.run(
        [str(strata_binary()), "perf", "--bootstrap", b.bootstrap, "--topic", topic, "--partitions", "24",
         "--seconds", str(seconds), "--latency-seconds", str(seconds), "--latency-rate", "500"],
        capture_output=True, text=True, timeout=seconds * 4 + 300)
    text = out.stdout + out.stderr
    mbps = re.search(r"produce: ([\d.]+) MB/s", text)
    lat = re.search(r"p50 ([\d.]+) ms, p99 ([\d.]+) ms", text)
    return (mbps.group(1) if mbps else f"? ({text[-200:]})",
            f"{lat.group(1)} / {lat.group(2)}" if lat else "?")


def throughput(base: Path, url: str, seconds: int) -> None:
    rows = []
    for n in (1, 3):
        fleet = Fleet(base / f"tp{n}", fresh_database(url, f"throughput{n}"))
        try:
            for i in range(1, n + 1):
                fleet.add(i)
            before = [scrape_metrics(b.http_port) for b in fleet.brokers]
            t0 = time.monotonic()
            mbps, lat = perf(fleet.brokers[0], unique_topic("tp"), seconds)
            elapsed = time.monotonic() - t0
            after = [scrape_metrics(b.http_port) for b in fleet.brokers]

            def delta(name, **labels):
                return [metric_sum(a, name, **labels) - metric_sum(b, name, **labels)
                        for a, b in zip(after, before)]

            ops = sum(delta("strata_metadata_store_duration_seconds_count")) / elapsed
            commits = sum(delta("strata_metadata_store_duration_seconds_count", op="commit_wal")) / elapsed
            bytes_in = delta("kafka_server_brokertopicmetrics_bytesin_total")
            crossed = sum(bytes_in[1:]) / max(sum(bytes_in), 1)
            rows.append([str(n), mbps, lat, f"{ops:.0f} ({commits:.0f} commit_wal)", f"{crossed:.0%}"])
        finally:
            fleet.close()
    header = ["brokers", "produce MB/s", "acks=all p50 / p99 ms", "metadata ops/s", "produce bytes crossing zones"]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["failover", "scale", "throughput"])
    ap.add_argument("--seconds", type=int, default=10)
    a = ap.parse_args()
    url, pg_dir = postgres()
    try:
        with tempfile.TemporaryDirectory() as d:
            base = Path(d)
            if a.only in (None, "failover"):
                failover(base, url)
            if a.only in (None, "scale"):
                scale(base, url)
            if a.only in (None, "throughput"):
                throughput(base, url, a.seconds)
    finally:
        subprocess.run([str(TESTS / "postgres.sh"), "stop", pg_dir], capture_output=True, timeout=120)
        srv = s3_server()
        if srv.proc.poll() is None:
            os.killpg(srv.proc.pid, signal.SIGTERM)


if __name__ == "__main__":
    main()
