"""Replay and object-store cost benchmark on a real S3-compatible server (moto_server).

    ~/.cache/strata-venv/bin/python tests/bench/replay.py                 # everything
    ~/.cache/strata-venv/bin/python tests/bench/replay.py --only moto,replay --replay-bytes 268435456

Starts its own moto_server (tests/s3.py) and brokers (tests/conftest.py; the binary from
$STRATA_BIN, as in the tests) and reports:

moto  How fast moto_server itself serves ranged GETs of --block-bytes (threads of boto3
      clients, and of plain HTTP connections with presigned URLs, a cheaper client), from
      objects of the segment size and of the default segment.bytes (64 MiB): moto reads the
      whole object for every ranged GET, so its ceiling falls with the object size.
replay A topic of --replay-bytes in sealed segments (1 KiB records); the broker is killed
      and its cache wiped, then the topic is read from offset 0: cold (every block from
      S3) and warm (read again; the memory tier is sized to hold the topic), with
      confluent-kafka (Python) and kcat (C, librdkafka) as readers. Then from the disk
      tier: restarted with a 64 MiB memory tier (the disk tier was filled from memory at
      shutdown); cold and warm with that 64 MiB memory tier (the disk tier filled by the
      cold read itself); and cold and warm with the default sizes (256 MiB memory, 1 GiB
      disk). Each row gives MB/s of record values, GETs per MiB replayed and per MiB
      fetched, cache and disk-tier hits, MiB written to the disk tier, disk-tier writes
      dropped (foyer's buffer and queue overflows), and the CPU of broker and moto
      (percent of one core).
produce Object-store requests at steady state: --produce-seconds of producing (after
      --warmup-seconds) to a topic of 10 and of 1,000 partitions, at a fixed rate
      (confluent-kafka, --produce-rate MB/s) and flat out (`strata perf`): PUTs/s per
      broker, requests per MiB produced, and the average write-ahead PUT.

The numbers depend on the machine's load (printed) and on moto, a Python server.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from conftest import Broker, create_topic, strata_binary, wait_ready  # noqa: E402
from replay_helpers import (cpu_seconds, delta, high_watermarks, produce_numbered,  # noqa: E402
                            read_all, snapshot, wait_uploads_settled)
from s3 import s3_server  # noqa: E402

MiB = 1 << 20


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  " + "  ".join(c.rjust(w) if i else c.ljust(w)
                                      for i, (c, w) in enumerate(zip(r, widths))) for r in cells)


# ---------------------------------------------------------------------------
# moto's own ranged-GET ceiling
# ---------------------------------------------------------------------------

def bench_moto(a) -> list[list]:
    s3 = s3_server()
    client = s3.client()
    bucket = s3.new_bucket()
    rows = []
    block = a.block_bytes
    for obj_bytes in sorted({a.segment_bytes, 64 * MiB}):
        body = os.urandom(obj_bytes)
        keys = [f"moto-bench/{obj_bytes}/{i}" for i in range(2)]
        for k in keys:
            client.put_object(Bucket=bucket, Key=k, Body=body)
        del body
        urls = {k: client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": k},
                                                 ExpiresIn=3600)[len(s3.endpoint):] for k in keys}
        blocks = obj_bytes // block
        local = threading.local()

        def rng(i):
            b = (i // len(keys)) % blocks
            return keys[i % len(keys)], f"bytes={b * block}-{(b + 1) * block - 1}"

        def get_boto(i):
            if not hasattr(local, "c"):
                local.c = s3.client()
            k, r = rng(i)
            return len(local.c.get_object(Bucket=bucket, Key=k, Range=r)["Body"].read())

        def get_http(i):
            if not hasattr(local, "h"):
                local.h = http.client.HTTPConnection("127.0.0.1", s3.port, timeout=60)
            k, r = rng(i)
            local.h.request("GET", urls[k], headers={"Range": r})
            resp = local.h.getresponse()
            body = resp.read()
            assert resp.status == 206, resp.status
            return len(body)

        for name, fn in (("boto3", get_boto), ("http", get_http)):
            for threads in a.moto_threads:
                local = threading.local()
                # the reference object size is slow to serve: a quarter of the bytes
                budget = a.moto_bytes if obj_bytes == a.segment_bytes else a.moto_bytes // 4
                n = max(threads * 4, int(budget // block))
                t0 = time.monotonic()
                with ThreadPoolExecutor(threads) as ex:
                    total = sum(ex.map(fn, range(n)))
                secs = time.monotonic() - t0
                rows.append([f"{obj_bytes // MiB} MiB", f"{block // 1024} KiB", name, threads,
                             f"{total / secs / 1e6:.0f}", f"{n / secs:.0f}"])
                print(f"  moto: object {obj_bytes // MiB} MiB, {name} x{threads}: "
                      f"{total / secs / 1e6:.0f} MB/s", flush=True)
        for k in keys:
            client.delete_object(Bucket=bucket, Key=k)
    return rows


# ---------------------------------------------------------------------------
# replay, cold and warm
# ---------------------------------------------------------------------------

def read_kcat(bootstrap: str, topic: str, ends: list[int]) -> dict:
    t0 = time.monotonic()
    out = subprocess.run(
        ["kcat", "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-q",
         "-f", "%p %o\n", "-X", f"fetch.max.bytes={64 * MiB}",
         "-X", f"max.partition.fetch.bytes={4 * MiB}", "-X", "queued.max.messages.kbytes=262144"],
        capture_output=True, timeout=1200)
    secs = time.monotonic() - t0
    if out.returncode != 0:
        raise SystemExit(f"kcat failed ({out.returncode}): {out.stderr.decode()[-2000:]}")
    counts = [0] * len(ends)
    for line in out.stdout.split(b"\n"):
        if line:
            counts[int(line.split(b" ", 1)[0])] += 1
    if counts != ends:
        raise SystemExit(f"kcat read {counts} records per partition, expected {ends}")
    return {"records": sum(counts), "seconds": secs}


def bench_replay(a, workdir: Path) -> tuple[list[list], str]:
    # Memory tier sized to hold the topic (warm reads from memory), disk tier three times.
    mem = max(256 * MiB, int(a.replay_bytes * 1.6))
    disk = max(1 << 30, -(-a.replay_bytes * 3 // (64 * MiB)) * 64 * MiB)
    env = {
        "STRATA_SEGMENT_BYTES": str(a.segment_bytes),
        "STRATA_RETENTION_MS": "-1",
        "STRATA_CACHE_MEMORY_BYTES": str(mem),
        "STRATA_CACHE_DISK_BYTES": str(disk),
        "STRATA_CACHE_BLOCK_BYTES": str(a.block_bytes),
        "STRATA_CACHE_READAHEAD_BLOCKS": str(a.readahead_blocks),
        "STRATA_OBJECT_STORE_REPLAY_CONCURRENCY": str(a.replay_concurrency),
    }
    b = Broker(workdir / "replay", env=env, name="replay", binary=strata_binary(), store="s3")
    rows = []
    try:
        b.start()
        topic = "replay"
        create_topic(b.bootstrap, topic, a.partitions)
        t0 = time.monotonic()
        acked = produce_numbered(
            b.bootstrap, topic, a.partitions, a.record_size, a.replay_bytes,
            done=lambda: sum(b.objects("segments", ".seg").values()) >= a.replay_bytes)
        produce_s = time.monotonic() - t0
        ends = high_watermarks(b.bootstrap, topic, a.partitions)
        assert ends == acked, (ends, acked)
        segs = wait_uploads_settled(lambda: b.objects("segments", ".seg"))
        value_bytes = sum(ends) * a.record_size
        info = (f"{value_bytes / 2**30:.2f} GiB of {a.record_size} B records ({sum(ends)}) on "
                f"{a.partitions} partitions, {sum(segs.values()) / 2**30:.2f} GiB in {len(segs)} "
                f"sealed segments of {a.segment_bytes // MiB} MiB; produced at "
                f"{value_bytes / produce_s / 1e6:.0f} MB/s; cache block {a.block_bytes // 1024} KiB, "
                f"read-ahead {a.readahead_blocks}, replay concurrency {a.replay_concurrency}, "
                f"memory tier {mem // MiB} MiB, disk tier {disk // MiB} MiB")
        print(f"  replay topic: {info}", flush=True)

        moto_pid = s3_server().proc.pid

        def measure(reader: str, label: str):
            s0 = snapshot(b.http_port)
            cpu0 = (cpu_seconds(b.pid), cpu_seconds(moto_pid))
            if reader == "kcat":
                r = read_kcat(b.bootstrap, topic, ends)
            else:
                r = read_all(b.bootstrap, topic, ends, a.record_size, check=False)
                if r["per_partition"] != ends:
                    raise SystemExit(f"read {r['per_partition']} records per partition, expected {ends}")
            cpu = (cpu_seconds(b.pid) - cpu0[0], cpu_seconds(moto_pid) - cpu0[1])
            used = delta(snapshot(b.http_port), s0)
            mib = value_bytes / MiB
            got = used["get_bytes"] / MiB
            secs = r["seconds"]
            row = [reader, label, f"{value_bytes / secs / 1e6:.0f}", f"{secs:.1f}",
                   int(used["get_requests"]), f"{got:.0f}", f"{used['get_requests'] / mib:.2f}",
                   f"{used['get_requests'] / got:.2f}" if got else "-",
                   int(used["cache_misses"]), int(used["cache_hits"]),
                   int(used["readahead_blocks"]), int(used["disk_hits"]),
                   f"{used['disk_write_bytes'] / MiB:.0f}",
                   int(used["disk_dropped_buffer"] + used["disk_dropped_queue"]),
                   f"{100 * cpu[0] / secs:.0f}%", f"{100 * cpu[1] / secs:.0f}%"]
            rows.append(row)
            print(f"  {reader} {label}: {row[2]} MB/s, {row[4]} GETs ({row[6]}/MiB replayed), "
                  f"{row[8]} misses, {row[11]} disk hits, {row[12]} MiB written to disk, "
                  f"{row[13]} disk writes dropped, CPU broker {row[14]} moto {row[15]}; {load()}",
                  flush=True)

        for reader in a.readers:
            b.restart(hard=True, wipe_cache=True)
            wait_ready(b.http_port)
            measure(reader, "cold (S3)")
            time.sleep(2)  # read-ahead still in flight finishes
            measure(reader, "warm (memory)")
        # The disk tier: a small memory tier; the blocks in memory go to disk at shutdown.
        b.stop()
        b.extra_env["STRATA_CACHE_MEMORY_BYTES"] = str(64 * MiB)
        b.start()
        wait_ready(b.http_port)
        for reader in a.readers:
            measure(reader, "warm (disk, filled at shutdown)")
        # The disk tier as the replay itself fills it: cache wiped, 64 MiB of memory.
        b.restart(hard=True, wipe_cache=True)
        wait_ready(b.http_port)
        measure(a.readers[-1], "cold (S3), 64 MiB memory")
        time.sleep(2)
        measure(a.readers[-1], "warm (disk, filled by replay)")
        # The default cache sizes (256 MiB memory, 1 GiB disk).
        b.extra_env["STRATA_CACHE_MEMORY_BYTES"] = str(256 * MiB)
        b.extra_env["STRATA_CACHE_DISK_BYTES"] = str(1 << 30)
        b.restart(hard=True, wipe_cache=True)
        wait_ready(b.http_port)
        measure(a.readers[-1], "cold (S3), default sizes")
        time.sleep(2)
        measure(a.readers[-1], "warm, default sizes")
        return rows, info
    finally:
        b.close()


# ---------------------------------------------------------------------------
# object-store requests at steady state
# ---------------------------------------------------------------------------

def produce_at_rate(bootstrap: str, topic: str, partitions: int, rate_bytes: float,
                    record: int, stop: threading.Event, errors: list) -> None:
    from confluent_kafka import Producer

    def report(err, msg):
        if err is not None:
            errors.append(err)

    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                  "enable.idempotence": True, "on_delivery": report})
    value = b"r" * record
    per_second = rate_bytes / record
    t0 = time.monotonic()
    n = 0
    while not stop.is_set():
        due = int((time.monotonic() - t0) * per_second)
        while n < due:
            try:
                p.produce(topic, value=value, partition=n % partitions)
                n += 1
            except BufferError:
                p.poll(0.01)
        p.poll(0.01)
    p.flush(60)


def bench_produce(a, workdir: Path) -> list[list]:
    rows = []
    for partitions in a.produce_partitions:
        for mode in a.produce_modes:
            b = Broker(workdir / f"produce-{partitions}-{mode}", name=f"produce-{partitions}-{mode}",
                       binary=strata_binary(), store="s3", env={})
            try:
                b.start()
                topic = f"cost-{partitions}"
                create_topic(b.bootstrap, topic, partitions, timeout=120)
                stop = threading.Event()
                errors: list = []
                perf = None
                if mode == "rate":
                    t = threading.Thread(target=produce_at_rate, daemon=True, args=(
                        b.bootstrap, topic, partitions, a.produce_rate * 1e6, a.record_size, stop, errors))
                    t.start()
                else:
                    batch = max(1, min(64, 640 // partitions))
                    perf = subprocess.Popen(
                        [str(b.binary), "perf", "--bootstrap", b.bootstrap, "--topic", topic,
                         "--partitions", str(partitions), "--record-size", str(a.record_size),
                         "--batch-records", str(batch), "--acks=-1", "--latency-seconds", "0",
                         "--seconds", str(int(a.warmup_seconds + a.produce_seconds + 5))],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                time.sleep(a.warmup_seconds)
                s0, t0 = snapshot(b.http_port), time.monotonic()
                time.sleep(a.produce_seconds)
                s1, secs = snapshot(b.http_port), time.monotonic() - t0
                stop.set()
                if perf is not None:
                    # Only the produce phase is measured: stop perf (by PID) before its
                    # consume phase.
                    perf.kill()
                    perf.communicate()
                else:
                    t.join(90)
                if errors:
                    raise SystemExit(f"produce errors at {partitions} partitions: {errors[:3]}")
                d = delta(s1, s0)
                mib = d["bytes_in"] / MiB
                wal_puts = d["wal_flushes"]
                rows.append([partitions, "rate" if mode == "rate" else "perf (flat out)",
                             f"{d['bytes_in'] / secs / 1e6:.1f}",
                             f"{d['put_requests'] / secs:.1f}", f"{d['get_requests'] / secs:.1f}",
                             f"{d['delete_requests'] / secs:.2f}",
                             f"{d['all_requests'] / mib:.2f}" if mib else "-",
                             f"{d['put_requests'] / mib:.2f}" if mib else "-",
                             f"{d['put_bytes'] / max(1, d['put_requests']) / 1024:.0f} KiB",
                             f"{wal_puts / secs:.1f}"])
                print(f"  produce {partitions} partitions, {mode}: {rows[-1][2]} MB/s, "
                      f"{rows[-1][3]} PUT/s; {load()}", flush=True)
            finally:
                b.close()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="moto,replay,produce",
                    help="comma-separated parts to run: moto, replay, produce")
    ap.add_argument("--replay-bytes", type=int, default=1 << 30,
                    help="bytes of sealed segment objects before the replay")
    ap.add_argument("--partitions", type=int, default=8, help="partitions of the replayed topic")
    ap.add_argument("--record-size", type=int, default=1024)
    ap.add_argument("--segment-bytes", type=int, default=16 * MiB)
    ap.add_argument("--block-bytes", type=int, default=4 * MiB, help="cache.block.bytes")
    ap.add_argument("--readahead-blocks", type=int, default=4, help="cache.readahead.blocks")
    ap.add_argument("--replay-concurrency", type=int, default=16,
                    help="object-store.replay.concurrency")
    ap.add_argument("--readers", default="confluent,kcat",
                    help="replay readers: confluent (Python) and/or kcat")
    ap.add_argument("--moto-threads", default="1,4,8,16")
    ap.add_argument("--moto-bytes", type=int, default=256 * MiB, help="bytes read per moto run")
    ap.add_argument("--produce-partitions", default="10,1000")
    ap.add_argument("--produce-modes", default="rate,perf", help="rate and/or perf")
    ap.add_argument("--produce-rate", type=float, default=10.0, help="MB/s of the fixed-rate producer")
    ap.add_argument("--produce-seconds", type=float, default=20.0, help="measured window")
    ap.add_argument("--warmup-seconds", type=float, default=5.0)
    ap.add_argument("--keep", action="store_true", help="keep the brokers' directories")
    a = ap.parse_args()
    a.moto_threads = [int(x) for x in a.moto_threads.split(",")]
    a.readers = [r for r in a.readers.split(",") if r != "kcat" or shutil.which("kcat")]
    a.produce_partitions = [int(x) for x in a.produce_partitions.split(",")]
    a.produce_modes = a.produce_modes.split(",")
    parts = a.only.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="strata-bench-replay-"))
    print(f"broker {strata_binary()}; {os.cpu_count()} CPUs; {load()}; dirs under {workdir}", flush=True)
    started = time.monotonic()
    out = []
    try:
        if "moto" in parts:
            rows = bench_moto(a)
            out.append("moto_server ranged GETs (moto reads the whole object for each one):\n" + table(
                ["object", "range", "client", "threads", "MB/s", "GET/s"], rows))
        if "replay" in parts:
            rows, info = bench_replay(a, workdir)
            out.append(f"replay of {info}:\n" + table(
                ["reader", "cache", "MB/s", "s", "GETs", "GET MiB", "GETs/MiB replayed",
                 "GETs/MiB fetched", "misses", "hits", "read-ahead", "disk hits", "disk MiB written",
                 "disk drops", "CPU broker", "CPU moto"], rows))
        if "produce" in parts:
            rows = bench_produce(a, workdir)
            out.append(f"object-store requests while producing ({a.record_size} B records, "
                       f"{a.produce_seconds:.0f} s window after {a.warmup_seconds:.0f} s, default "
                       f"settings: wal.flush.interval.ms 25, segment.bytes 64 MiB):\n" + table(
                           ["partitions", "producer", "MB/s", "PUT/s", "GET/s", "DELETE/s",
                            "requests/MiB", "PUTs/MiB", "avg PUT", "WAL flushes/s"], rows))
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print("\n\n".join(out))
    print(f"\n{time.monotonic() - started:.0f} s; {load()}")


if __name__ == "__main__":
    main()
