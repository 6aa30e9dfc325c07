"""Helpers of the replay test and benchmark (tests/test_replay.py, tests/bench/replay.py).

- scrape / metric / snapshot: the broker's /metrics, and the object-store and block-cache
  counters the replay is judged by.
- produce_numbered: a fast confluent-kafka producer of identifiable records: record i of
  partition p is `b"p:i:"` padded to the record size, so on a fresh topic its offset is i
  and a reader can check every record's identity and position cheaply.
- high_watermarks, read_all: exact end offsets, and a reader from offset 0 to them that
  checks contiguity and content.
- TailProcess: a tail producer (acks=all) and consumer on a small topic, in their own
  process (`python tests/replay_helpers.py tail ...`) so the replay reader's GIL does not
  distort their timing; it records every record's produce-ack and end-to-end latency
  and whether each was delivered exactly once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from conftest import metric_sum, scrape_metrics

HERE = Path(__file__).resolve()

# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------


scrape = scrape_metrics
metric = metric_sum


# name -> (metric, labels): the counters replay and produce cost are judged by
COUNTERS = {
    "get_requests": ("strata_object_store_requests_total", {"op": "get"}),
    "put_requests": ("strata_object_store_requests_total", {"op": "put"}),
    "delete_requests": ("strata_object_store_requests_total", {"op": "delete"}),
    "all_requests": ("strata_object_store_requests_total", {}),
    "get_bytes": ("strata_object_store_bytes_total", {"op": "get"}),
    "put_bytes": ("strata_object_store_bytes_total", {"op": "put"}),
    "cache_hits": ("strata_cache_lookups_total", {"result": "hit"}),
    "cache_misses": ("strata_cache_lookups_total", {"result": "miss"}),
    "cache_bytes_from_cache": ("strata_cache_read_bytes_total", {"source": "cache"}),
    "cache_bytes_from_store": ("strata_cache_read_bytes_total", {"source": "store"}),
    "readahead_blocks": ("strata_cache_readahead_blocks_total", {}),
    "cache_evictions": ("strata_cache_evictions_total", {}),
    "wal_flushes": ("strata_wal_flushes_total", {"outcome": "committed"}),
    "bytes_in": ("kafka_server_brokertopicmetrics_bytesin_total", {}),
    "bytes_out": ("kafka_server_brokertopicmetrics_bytesout_total", {}),
    # where an acks=all produce spends its time: the write-ahead PUT and the commit
    "wal_write_seconds": ("strata_wal_flush_write_seconds_sum", {}),
    "wal_writes": ("strata_wal_flush_write_seconds_count", {}),
    "wal_commit_seconds": ("strata_wal_flush_commit_seconds_sum", {}),
    "wal_commits": ("strata_wal_flush_commit_seconds_count", {}),
    "put_seconds": ("strata_object_store_request_duration_seconds_sum", {"op": "put"}),
    "puts_timed": ("strata_object_store_request_duration_seconds_count", {"op": "put"}),
    "get_seconds": ("strata_object_store_request_duration_seconds_sum", {"op": "get"}),
    "gets_timed": ("strata_object_store_request_duration_seconds_count", {"op": "get"}),
    # the disk tier (foyer's own metrics): entries dropped instead of written, and hits
    "disk_dropped_buffer": ("foyer_storage_inner_op_total", {"op": "buffer_overflow"}),
    "disk_dropped_queue": ("foyer_storage_inner_op_total", {"op": "channel_overflow"}),
    "disk_hits": ("foyer_storage_op_total", {"op": "hit"}),
    "disk_enqueues": ("foyer_storage_op_total", {"op": "enqueue"}),
    "disk_write_bytes": ("foyer_storage_disk_io_bytes_total", {"op": "write"}),
    "disk_misses": ("foyer_storage_op_total", {"op": "miss"}),
}


def snapshot(http_port: int) -> dict:
    text = scrape(http_port)
    return {k: metric(text, name, **labels) for k, (name, labels) in COUNTERS.items()}


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def mean_latencies(d: dict) -> dict:
    """Mean latencies (ms) over a snapshot delta: write-ahead object write and commit,
    object-store PUT and GET attempts."""
    def mean(total, n):
        return round(1000.0 * d[total] / d[n], 1) if d[n] else None
    return {"wal_write_ms": mean("wal_write_seconds", "wal_writes"),
            "wal_commit_ms": mean("wal_commit_seconds", "wal_commits"),
            "store_put_ms": mean("put_seconds", "puts_timed"),
            "store_get_ms": mean("get_seconds", "gets_timed")}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_uploads_settled(list_segments, quiet: float = 3.0, timeout: float = 120.0) -> dict:
    """Waits until the segment objects stop changing for `quiet` seconds (segments
    sealed while producing are uploaded a few at a time) and returns them."""
    deadline = time.monotonic() + timeout
    last = list_segments()
    since = time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise AssertionError(f"segment uploads still going on after {timeout}s")
        time.sleep(0.5)
        now = list_segments()
        if now != last:
            last, since = now, time.monotonic()
    return last


def percentiles(values: list[float]) -> dict:
    """p50/p90/p99/p99.9/max (nearest rank) and count of `values`."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return {"count": 0}

    def q(p):
        return round(v[min(len(v) - 1, max(0, math.ceil(p * len(v)) - 1))], 2)

    return {"count": len(v), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p99.9": q(0.999),
            "max": round(v[-1], 2)}


# ---------------------------------------------------------------------------
# the replayed topic
# ---------------------------------------------------------------------------

def record_value(partition: int, seq: int, size: int) -> bytes:
    head = b"%d:%d:" % (partition, seq)
    return head + b"x" * (size - len(head))


def produce_numbered(bootstrap: str, topic: str, partitions: int, size: int, min_bytes: int,
                     done=None, check_every_bytes: int = 32 << 20, timeout: float = 600.0) -> list[int]:
    """Produces record_value(p, i) to every partition in turn (i = 0, 1, ...) until at
    least `min_bytes` of values were produced and `done()` (checked every
    `check_every_bytes` after that) is true. Idempotent, acks=all. Returns the records
    acknowledged per partition; fails on any delivery error."""
    from confluent_kafka import Producer
    acked = [0] * partitions
    errors = []

    def report(err, msg):
        if err is not None:
            errors.append(err)
        else:
            acked[msg.partition()] += 1

    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                  "linger.ms": 20, "batch.size": 1 << 20, "queue.buffering.max.kbytes": 64 << 10,
                  "queue.buffering.max.messages": 1_000_000, "message.timeout.ms": 120_000,
                  "on_delivery": report})
    pad = b"x" * size
    deadline = time.monotonic() + timeout
    sent = 0
    next_check = min_bytes
    i = 0
    while True:
        for part in range(partitions):
            head = b"%d:%d:" % (part, i)
            value = head + pad[len(head):]
            while True:
                try:
                    p.produce(topic, value=value, partition=part)
                    break
                except BufferError:  # local queue full: let deliveries drain it
                    p.poll(0.01)
        i += 1
        sent += size * partitions
        if i % 500 == 0:
            p.poll(0)
            if errors:
                break
        if sent >= next_check:
            # Judged by acknowledged bytes (the local queue runs up to 64 MiB ahead).
            if sum(acked) * size >= min_bytes and (done is None or done()):
                break
            next_check = sent + check_every_bytes
        if time.monotonic() > deadline:
            raise AssertionError(f"producing {min_bytes} bytes took more than {timeout}s")
    remaining = p.flush(120)
    assert remaining == 0, f"{remaining} records not delivered"
    assert not errors, f"delivery errors: {errors[:3]}"
    assert acked == [i] * partitions, f"acknowledged {acked}, produced {i} per partition"
    return acked


def high_watermarks(bootstrap: str, topic: str, partitions: int) -> list[int]:
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "replay-watermarks"})
    try:
        return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
                for p in range(partitions)]
    finally:
        c.close()


def read_all(bootstrap: str, topic: str, ends: list[int], size: int | None = None,
             check: bool = True, timeout: float = 600.0, stall: float = 60.0, **extra) -> dict:
    """Reads every partition from offset 0 to ends[p] with confluent-kafka.

    With `check`, every record's offset must follow the previous one (no gap, no
    duplicate) and its value must be record_value(p, offset, size): its length and
    prefix always, all its bytes for a sample. Fails when nothing arrives for `stall`
    seconds before the ends are reached. Returns records, value bytes, seconds (first
    fetch to last record) and the records read per partition."""
    from confluent_kafka import Consumer, TopicPartition
    conf = {"bootstrap.servers": bootstrap, "group.id": f"replay-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False, "auto.offset.reset": "error",
            "fetch.max.bytes": 64 << 20, "max.partition.fetch.bytes": 4 << 20,
            "queued.max.messages.kbytes": 256 << 10, "fetch.wait.max.ms": 100}
    conf.update(extra)
    c = Consumer(conf)
    n = len(ends)
    nxt = [0] * n
    value_bytes = 0
    bad = []
    try:
        t0 = time.monotonic()
        c.assign([TopicPartition(topic, p, 0) for p in range(n) if ends[p] > 0])
        deadline = t0 + timeout
        progress = t0
        while any(nxt[p] < ends[p] for p in range(n)):
            now = time.monotonic()
            if now > deadline or now - progress > stall:
                raise AssertionError(f"replay of {topic} incomplete after {now - t0:.0f}s "
                                     f"({now - progress:.0f}s without a record): at {nxt} of {ends}")
            msgs = c.consume(10000, 0.5)
            if msgs:
                progress = time.monotonic()
            for m in msgs:
                err = m.error()
                if err is not None:
                    raise AssertionError(f"consumer error on {topic}: {err}")
                p = m.partition()
                off = m.offset()
                v = m.value()
                value_bytes += len(v)
                if check:
                    if off != nxt[p]:
                        raise AssertionError(
                            f"partition {p}: offset {off} after {nxt[p] - 1} "
                            f"({'duplicate' if off < nxt[p] else 'gap'})")
                    if (len(v) != size or not v.startswith(b"%d:%d:" % (p, off))
                            or (off % 4099 == 0 and v != record_value(p, off, size))):
                        bad.append((p, off, v[:32]))
                        if len(bad) > 10:
                            raise AssertionError(f"unexpected record values: {bad}")
                nxt[p] = off + 1
        seconds = time.monotonic() - t0
    finally:
        c.close()
    assert not bad, f"unexpected record values: {bad}"
    return {"records": sum(nxt), "value_bytes": value_bytes, "seconds": seconds,
            "per_partition": nxt}


# ---------------------------------------------------------------------------
# the tail producer and consumer
# ---------------------------------------------------------------------------

class TailProcess:
    """`python tests/replay_helpers.py tail` as a subprocess: produces `rate` records/s
    (acks=all) to partition 0 of `topic` and consumes them, until stop() or
    `max_seconds`; then drains and writes its record of every record to `out`."""

    def __init__(self, bootstrap: str, topic: str, out: Path, rate: int = 100, size: int = 200,
                 max_seconds: float = 300.0):
        self.out = Path(out)
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "tail", "--bootstrap", bootstrap, "--topic", topic,
             "--rate", str(rate), "--size", str(size), "--out", str(self.out),
             "--max-seconds", str(max_seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def wait_started(self, timeout: float = 45.0) -> None:
        """Returns once the first tail record was acknowledged and consumed."""
        result = {}

        def read():
            result["line"] = self.proc.stdout.readline()

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if result.get("line", "").strip() != "started":
            self.kill()
            raise AssertionError(f"tail process did not start: {result.get('line')!r}")

    def stop(self, timeout: float = 120.0) -> dict:
        """Stops producing; waits for the drain; returns the process's report."""
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"tail process did not finish within {timeout}s of stop")
        assert rc == 0, f"tail process exited with {rc}"
        return json.loads(self.out.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by PID: the process this object started
            self.proc.wait()


def run_tail(bootstrap: str, topic: str, out: Path, seconds: float, **kw) -> dict:
    t = TailProcess(bootstrap, topic, out, **kw)
    try:
        t.wait_started()
        time.sleep(seconds)
        return t.stop()
    finally:
        t.kill()


def tail_summary(report: dict, start: float | None = None, end: float | None = None) -> dict:
    """Delivery counts of the whole run and latency percentiles (ms) of the records sent
    within [start, end] (wall-clock seconds; None: unbounded) after the warm-up."""
    start = report["started_at"] if start is None else max(start, report["started_at"])
    recs = [r for r in report["records"] if r[1] >= start and (end is None or r[1] <= end)]
    return {
        "records_in_window": len(recs),
        "produce_ack_ms": percentiles([r[2] for r in recs]),
        "end_to_end_ms": percentiles([r[3] for r in recs]),
        "sent": report["sent"], "acked": report["acked"], "failed": len(report["failed"]),
        "received": report["received"], "duplicates": report["duplicates"],
        "missing": report["missing"], "unexpected": report["unexpected"],
    }


def _tail_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="replay_helpers.py tail")
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-seconds", type=float, default=300.0)
    a = ap.parse_args(argv)
    from confluent_kafka import Consumer, Producer, TopicPartition

    tag = uuid.uuid4().hex[:8]
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()

    c = Consumer({"bootstrap.servers": a.bootstrap, "group.id": f"tail-{tag}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    _, end = c.get_watermark_offsets(TopicPartition(a.topic, 0), timeout=30)
    c.assign([TopicPartition(a.topic, 0, end)])
    lock = threading.Lock()
    e2e: dict[int, float] = {}
    counts = {"duplicates": 0, "unexpected": 0}
    consuming = threading.Event()
    consuming.set()
    consumer_errors = []

    def consume():
        while consuming.is_set():
            m = c.poll(0.05)  # returns as soon as a record arrives (consume(n) waits for n)
            if m is not None:
                now = time.time()
                if m.error():
                    consumer_errors.append(str(m.error()))
                    continue
                parts = m.value().split(b":", 3)
                if parts[0].decode() != tag:
                    continue
                seq, sent_at = int(parts[1]), float(parts[2])
                with lock:
                    if seq in e2e:
                        counts["duplicates"] += 1
                    else:
                        e2e[seq] = (now - sent_at) * 1000.0

    ct = threading.Thread(target=consume, daemon=True)
    ct.start()

    sent_at: dict[int, float] = {}
    ack_ms: dict[int, float] = {}
    failed = []

    def report(err, msg):
        seq = int(msg.value().split(b":", 2)[1])
        if err is not None:
            failed.append(f"{seq}: {err}")
        else:
            ack_ms[seq] = msg.latency() * 1000.0

    p = Producer({"bootstrap.servers": a.bootstrap, "acks": "all", "enable.idempotence": True,
                  "linger.ms": 0, "message.timeout.ms": 120_000, "on_delivery": report})
    seq = 0

    def send():
        nonlocal seq
        wall = time.time()
        head = f"{tag}:{seq}:{wall:.6f}:".encode()
        p.produce(a.topic, value=head + b"t" * max(0, a.size - len(head)), partition=0)
        sent_at[seq] = wall
        seq += 1

    # Warm-up (connections, metadata, producer id): a record every 100 ms until one was
    # acknowledged and consumed. Warm-up records count for delivery, not for latency.
    t0 = time.monotonic()
    while not stop.is_set() and time.monotonic() - t0 < 30:
        send()
        p.poll(0.1)
        with lock:
            got = bool(e2e)
        if got and ack_ms:
            break
    started_at = time.time()
    started = bool(ack_ms) and bool(e2e)
    if started:
        print("started", flush=True)
    period = 1.0 / a.rate
    t0 = time.monotonic()
    next_t = t0
    while started and not stop.is_set() and time.monotonic() - t0 < a.max_seconds:
        if time.monotonic() >= next_t:
            send()
            next_t += period
        p.poll(max(0.0, min(next_t - time.monotonic(), 0.005)))
    remaining = p.flush(120)
    # Drain: every acknowledged record must arrive; then a moment more for duplicates.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with lock:
            if set(ack_ms) <= set(e2e):
                break
        time.sleep(0.05)
    time.sleep(1.0)
    consuming.clear()
    ct.join(10)
    c.close()
    with lock:
        received = dict(e2e)
        dups, unexpected = counts["duplicates"], len(set(received) - set(sent_at))
    report_json = {
        "tag": tag,
        "started_at": started_at,
        "sent": len(sent_at),
        "acked": len(ack_ms),
        "unflushed": remaining,
        "failed": failed[:100],
        "received": len(received),
        "duplicates": dups,
        "missing": len(set(ack_ms) - set(received)),
        "unexpected": unexpected,
        "consumer_errors": consumer_errors[:20],
        # [seq, sent (wall clock s), produce-ack latency ms, end-to-end latency ms]
        "records": [[s, sent_at[s], ack_ms.get(s), received.get(s)] for s in sorted(sent_at)],
    }
    Path(a.out).write_text(json.dumps(report_json))
    if not started:
        print("never started", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "tail":
        sys.exit(_tail_main(sys.argv[2:]))
    sys.exit("usage: replay_helpers.py tail --bootstrap HOST:PORT --topic T --out FILE [...]")
