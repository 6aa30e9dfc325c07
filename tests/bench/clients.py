"""Real-client benchmark: `tools/clientbench` (one librdkafka producer and consumer at
the client's defaults) against one broker on the local store and on the S3-compatible
test server (moto on loopback, metadata in the bucket).

    ~/.cache/strata-venv/bin/python tests/bench/clients.py [--only local|s3] [--seconds 10]

Per store, four runs, each on fresh topics: `acks=all` with idempotence and random
1 KiB values (then every record is read back and verified, and the end-to-end latency
at 1,000 records/s is measured right after that produce burst), the same with a
one-second burst (about 200 MB, the size the end-to-end target is set for), lz4 with
text values, and `acks=1`. Reported per run: produce and consume MB/s, end-to-end p50/p99, the
broker's resident memory at the end and its CPU seconds per GB produced; then, per run,
the `acks=all` path stage by stage from the broker's `strata_produce_stage_seconds`
(mean and p99 of each stage over the run) and the write-ahead objects per second.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from conftest import Broker, metric_sum, scrape_metrics, strata_binary, wait_ready  # noqa: E402

STAGES = ["queue", "buffer", "write", "commit_wait", "commit", "response"]

TOOL_DIR = ROOT / "tools" / "clientbench"
TARGET = Path(os.environ.get("CLIENTBENCH_TARGET_DIR", Path.home() / ".cache" / "clientbench-target"))

RUNS = [
    ("acks=all, idempotent", []),
    # The end-to-end latency right after a burst of about 200 MB (one second).
    ("acks=all, 1 s burst", ["--seconds", "1"]),
    ("acks=all, lz4 text", ["--compression", "lz4", "--text", "--e2e-rate", "0"]),
    ("acks=1", ["--acks", "1", "--e2e-rate", "0"]),
]


def build_tool() -> Path:
    env = dict(os.environ, CARGO_TARGET_DIR=str(TARGET))
    subprocess.run(["cargo", "build", "--release", "--quiet", "--manifest-path", str(TOOL_DIR / "Cargo.toml")],
                   check=True, env=env, timeout=1800)
    return TARGET / "release" / "clientbench"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def number(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    return m.group(1) if m else "-"


def stage_histograms(text: str) -> dict[str, dict]:
    """Per stage: {"sum", "count", "buckets": [(le, cumulative count)]} from a scrape."""
    out = {s: {"sum": 0.0, "count": 0.0, "buckets": []} for s in STAGES}
    for line in text.splitlines():
        m = re.match(r'strata_produce_stage_seconds_(sum|count|bucket)\{(.*)\} ([\d.e+-]+|\+Inf)$', line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        h = out.get(labels.get("stage", ""))
        if h is None:
            continue
        if m.group(1) == "bucket":
            le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
            h["buckets"].append((le, float(m.group(3))))
        else:
            h[m.group(1)] = float(m.group(3))
    return out


def breakdown(before: str, after: str) -> str:
    """Mean and p99 (bucket upper bound) per stage between two scrapes, in ms."""
    b, a = stage_histograms(before), stage_histograms(after)
    parts = []
    for s in STAGES:
        count = a[s]["count"] - b[s]["count"]
        if count <= 0:
            parts.append(f"{s} -")
            continue
        mean = (a[s]["sum"] - b[s]["sum"]) / count * 1000
        prior = dict(b[s]["buckets"])
        p99 = float("inf")
        for le, cum in sorted(a[s]["buckets"]):
            if cum - prior.get(le, 0.0) >= 0.99 * count:
                p99 = le * 1000
                break
        parts.append(f"{s} {mean:.1f}/{p99:g}")
    return ", ".join(parts)


def run_store(tool: Path, store: str, seconds: int, base: Path) -> list[tuple]:
    if store == "s3":
        from s3 import s3_server
        b = Broker(base / store, name=store, binary=strata_binary(), store="s3", bucket=s3_server().new_bucket())
    else:
        b = Broker(base / store, name=store, binary=strata_binary())
    b.start(timeout=120)
    wait_ready(b.http_port, 120)
    rows = []
    try:
        for name, extra in RUNS:
            cpu = cpu_seconds(b.pid)
            before = scrape_metrics(b.http_port)
            began = time.monotonic()
            length = [] if "--seconds" in extra else ["--seconds", str(seconds)]
            out = subprocess.run([str(tool), "--bootstrap", b.bootstrap, *length, *extra],
                                 capture_output=True, text=True, timeout=seconds * 10 + 300)
            text = out.stdout + out.stderr
            if out.returncode != 0:
                print(text, file=sys.stderr)
                raise SystemExit(f"{store} {name}: clientbench failed")
            produced_gb = float(number(r"produce: ([\d.]+) MB/s", text)) * float(
                number(r"partitions, ([\d.]+) s", text)) / 1000
            used = cpu_seconds(b.pid) - cpu
            after = scrape_metrics(b.http_port)
            wall = time.monotonic() - began
            objects = (metric_sum(after, "strata_wal_flushes_total", outcome="committed")
                       - metric_sum(before, "strata_wal_flushes_total", outcome="committed"))
            print(f"{store} {name}: acks=all stages, mean/p99 ms: {breakdown(before, after)}; "
                  f"write-ahead objects: {objects / wall:.0f}/s over the run", flush=True)
            rows.append((store, name, number(r"produce: ([\d.]+) MB/s", text), number(r"consume: ([\d.]+) MB/s", text),
                         number(r"p50 ([\d.]+) ms", text), number(r"p99 ([\d.]+) ms", text),
                         f"{rss_mb(b.pid):.0f}", f"{used / produced_gb:.1f}" if produced_gb > 0 else "-"))
    finally:
        b.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["local", "s3"])
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    tool = build_tool()
    rows = []
    with tempfile.TemporaryDirectory(prefix="strata-clients-") as base:
        for store in ["local", "s3"]:
            if args.only in (None, store):
                rows += run_store(tool, store, args.seconds, Path(base))
    header = ("store", "run", "produce MB/s", "consume MB/s", "e2e p50 ms", "e2e p99 ms", "RSS MB", "CPU s/GB")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))


if __name__ == "__main__":
    main()
