"""Metadata-store benchmark: the same broker on the same S3-compatible server (moto)
with its metadata in SQLite on local disk and in the bucket itself (`bucket://`).

    ~/.cache/strata-venv/bin/python tests/bench/metadata_store.py [--seconds 10]

For each store, `strata perf` produces flat out with acks=all (throughput phase), then
at a fixed request rate (latency phase). Reported per store: produce MB/s, acks=all
latency p50/p99, write-ahead commit latency p50/p99 (`commit_wal` in the metadata-store
histogram), metadata transactions per second, and object-store PUTs per second in all
(write-ahead objects, segment uploads and, for `bucket://`, the metadata log records),
so the PUTs the bucket store adds are the difference between the rows.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from conftest import Broker, scrape_metrics, strata_binary, wait_ready  # noqa: E402


def scrape(b: Broker) -> dict[str, float]:
    """Every sample of /metrics: series (name and labels) -> value."""
    out: dict[str, float] = {}
    for line in scrape_metrics(b.http_port).splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        out[key] = float(value)
    return out


def total(m: dict[str, float], name: str, **labels) -> float:
    return sum(v for k, v in m.items()
               if (k == name or k.startswith(name + "{"))
               and all(f'{lk}="{lv}"' in k for lk, lv in labels.items()))


def quantile(before: dict, after: dict, name: str, q: float, **labels) -> float:
    """A quantile of a histogram's observations between two scrapes (bucket upper bound)."""
    buckets = []
    for k, v in after.items():
        if not k.startswith(name + "_bucket{") or not all(f'{a}="{b}"' in k for a, b in labels.items()):
            continue
        le = re.search(r'le="([^"]+)"', k).group(1)
        buckets.append((float("inf") if le == "+Inf" else float(le), v - before.get(k, 0.0)))
    buckets.sort()
    count = buckets[-1][1] if buckets else 0
    for le, c in buckets:
        if count and c >= q * count:
            return le
    return float("nan")


def run(metadata: str, seconds: int, base: Path) -> list:
    url = f"sqlite://{base / metadata}/data/metadata.db" if metadata == "sqlite" else "bucket://"
    b = Broker(base / metadata, name=f"bench-{metadata}", binary=strata_binary(), store="s3",
               metadata=url)
    try:
        b.start()
        wait_ready(b.http_port)
        before = scrape(b)
        t0 = time.monotonic()
        perf = subprocess.run(
            [str(strata_binary()), "perf", "--bootstrap", b.bootstrap, "--seconds", str(seconds),
             "--latency-seconds", str(seconds), "--latency-rate", "500"],
            capture_output=True, text=True, timeout=seconds * 4 + 120)
        elapsed = time.monotonic() - t0
        after = scrape(b)
        out = perf.stdout + perf.stderr
        mbps = re.search(r"produce: ([\d.]+) MB/s", out)
        lat = re.search(r"p50 ([\d.]+) ms, p99 ([\d.]+) ms", out)
        commits = total(after, "strata_metadata_store_duration_seconds_count") - \
            total(before, "strata_metadata_store_duration_seconds_count")
        puts = total(after, "strata_object_store_requests_total", op="put") - \
            total(before, "strata_object_store_requests_total", op="put")
        return [
            "bucket://" if metadata == "bucket" else "sqlite://",
            mbps.group(1) if mbps else "?",
            f"{lat.group(1)} / {lat.group(2)}" if lat else "?",
            "%.1f / %.1f" % (1000 * quantile(before, after, "strata_metadata_store_duration_seconds", 0.5, op="commit_wal"),
                             1000 * quantile(before, after, "strata_metadata_store_duration_seconds", 0.99, op="commit_wal")),
            "%.0f" % (commits / elapsed),
            "%.1f" % (puts / elapsed),
        ]
    finally:
        b.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    a = ap.parse_args()
    header = ["metadata", "produce MB/s", "acks=all p50 / p99 ms", "commit_wal p50 / p99 ms (bucket bound)",
              "metadata ops/s", "object-store PUTs/s"]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for metadata in ("sqlite", "bucket"):
            rows.append(run(metadata, a.seconds, Path(d)))
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
