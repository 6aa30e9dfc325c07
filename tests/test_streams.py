"""Stream-processing libraries run unchanged on compacted topics.

A Quix Streams application (tests/apps/quix_window_count.py, its defaults: RocksDB state
backed by a compacted changelog topic the library creates) counts events per key in
10-second tumbling windows. The test computes the counts itself from what it produced
and checks every closed window the app emits, across a stop of the application, a
restart of the broker, and a second run whose local state was deleted, so the window
open across the stop can only be counted right if the state comes back from the
compacted changelog (which the broker has compacted by then).

The same application with `processing_guarantee="exactly-once"` (Quix's transactions:
outputs, changelog and input offsets committed together) counts right across a
SIGKILL of the app and a kill -9 of the broker.

A faust-streaming application (tests/apps/faust_window_count.py) keeps a windowed count
table in memory, backed by the compacted changelog faust creates, so each of its starts
restores the table from the changelog alone; the counts it emits are checked the same
way across a stop of the app and a restart of the broker.

The apps run in their own venv (tests/run makes it from tests/streams-requirements.txt;
`STRATA_STREAMS_PYTHON` points at its interpreter).
"""

import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from conftest import create_topic, metric_sum, producer, scrape_metrics, unique_topic

APPS = Path(__file__).resolve().parent / "apps"
WINDOW_MS = 10_000
# Broker defaults that make every topic's tail seal and compact within seconds, the
# changelog topics the library creates included.
SETTINGS = {"STRATA_SEGMENT_MS": "1000", "STRATA_SEGMENT_BYTES": "16384",
            "STRATA_MIN_CLEANABLE_DIRTY_RATIO": "0.01", "STRATA_LOG_CLEANER_BACKOFF_MS": "300",
            "STRATA_FILE_DELETE_DELAY_MS": "500"}
# Event times from ten minutes ago (well inside retention.ms), on a window boundary.
BASE_MS = int(time.time() * 1000) - 600_000
BASE_MS -= BASE_MS % WINDOW_MS


def streams_python() -> str:
    py = os.environ.get("STRATA_STREAMS_PYTHON", str(Path.home() / ".cache/strata-streams-venv/bin/python"))
    if not Path(py).exists():
        pytest.fail(f"no stream-processing venv at {py}: tests/run creates it")
    return py


class App:
    """The application as a subprocess, stopped by SIGTERM like a deployment would."""

    def __init__(self, script, bootstrap, group, source, sink, state_dir, log_path, *extra):
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [streams_python(), str(APPS / script), bootstrap, group, source, sink, str(state_dir),
             *extra],
            stdout=self.log, stderr=subprocess.STDOUT)

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def wait_log(self, line: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while line.encode() not in Path(self.log_path).read_bytes():
            assert self.proc.poll() is None, f"the app exited ({self.proc.returncode})"
            assert time.monotonic() < deadline, f"the app did not log {line!r} within {timeout:.0f} s"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def produce_events(bootstrap, topic, events) -> None:
    p = producer(bootstrap)
    for key, ts in events:
        p.produce(topic, key=key.encode(), value=json.dumps({"n": 1}).encode(), timestamp=ts)
    assert p.flush(30) == 0


def expected_counts(events) -> dict:
    """{(key, window start): count} of every window closed by a later event of its key."""
    latest = {}
    for k, ts in events:
        latest[k] = max(latest.get(k, ts), ts)
    counts = Counter((k, ts - ts % WINDOW_MS) for k, ts in events)
    return {kw: n for kw, n in counts.items() if kw[1] + WINDOW_MS <= latest[kw[0]]}


def read_windows(bootstrap, topic) -> dict:
    """{(key, window start): count} as the app emitted them (the last emission wins)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_topic("check"),
                  "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        md = c.list_topics(topic, timeout=10).topics.get(topic)
        if md is None or md.error is not None:
            return {}
        parts = list(md.partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out, eof = {}, set()
        deadline = time.monotonic() + 20
        while len(eof) < len(parts) and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                eof.add(m.partition())
                continue
            v = json.loads(m.value())
            out[(m.key().decode(), v["start"])] = v["value"]
        return out
    finally:
        c.close()


def wait_windows(bootstrap, topic, want: dict, what: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = read_windows(bootstrap, topic)
        if all(kw in got for kw in want):
            return got
        if time.monotonic() > deadline:
            missing = sorted(kw for kw in want if kw not in got)
            starts = sorted({(w - BASE_MS) // WINDOW_MS for _, w in missing})
            raise AssertionError(f"{what}: {len(missing)} of {len(want)} windows not emitted "
                                 f"within {timeout:.0f} s (windows {starts} from the first), "
                                 f"e.g. {missing[:3]}")
        time.sleep(1)


def running_counts(events) -> dict:
    """{(key, window start): count} of every window, closed or not."""
    return dict(Counter((k, ts - ts % WINDOW_MS) for k, ts in events))


def two_runs() -> tuple[list, list, list]:
    """20 keys, and (key, event time) of 2,000 events for each run of an app: windows 0-4
    in the first (window 4 stays open), 4-8 in the second, so window 4 is counted by
    both and is right only if the state came back from the changelog."""
    keys = [f"user-{i}" for i in range(20)]
    first = [(keys[i % 20], BASE_MS + (i * 37) % (4 * WINDOW_MS + 5_000)) for i in range(2000)]
    second = [(keys[(i * 7) % 20], BASE_MS + 4 * WINDOW_MS + (i * 53) % (5 * WINDOW_MS))
              for i in range(2000)]
    return keys, first, second


def wait_compaction_pass(b) -> None:
    deadline = time.monotonic() + 60
    while metric_sum(scrape_metrics(b.http_port), "strata_compaction_passes_total",
                     outcome="committed") < 1:
        assert time.monotonic() < deadline, "no compaction pass committed on the changelog"
        time.sleep(0.5)


def quix_setup(broker_factory, prefix: str):
    """A broker, the app's topics and group, the two runs' events and the closing events
    (an event per key in window 10 closes everything before it: Quix closes a key's
    windows on that key's later events); the first run's events are produced."""
    b = broker_factory(env=SETTINGS)
    source, sink, group = (unique_topic(f"{prefix}-in"), unique_topic(f"{prefix}-out"),
                           unique_topic(prefix))
    create_topic(b.bootstrap, source, 1)
    keys, first, second = two_runs()
    closing = [(k, BASE_MS + 10 * WINDOW_MS) for k in keys]
    produce_events(b.bootstrap, source, sorted(first, key=lambda e: e[1]))
    return b, source, sink, group, first, second, closing


def test_quix_streams_window_counts_survive_restarts_through_the_compacted_changelog(
        broker_factory, tmp_path):
    b, source, sink, group, first, second, closing = quix_setup(broker_factory, "quix")
    state = tmp_path / "state"
    app = App("quix_window_count.py", b.bootstrap, group, source, sink, state, tmp_path / "app1.log")
    try:
        want = expected_counts(first)
        got = wait_windows(b.bootstrap, sink, want, "first run")
    finally:
        app.stop()
    for kw, n in want.items():
        assert got[kw] == n, f"first run, {kw}: {got[kw]} counted, {n} produced"

    # The changelog is compacted before the state is restored from it.
    wait_compaction_pass(b)
    b.restart()
    shutil.rmtree(state)  # a new machine: the state comes back from the changelog only

    produce_events(b.bootstrap, source, sorted(second, key=lambda e: e[1]) + closing)
    app = App("quix_window_count.py", b.bootstrap, group, source, sink, state, tmp_path / "app2.log")
    try:
        want = expected_counts(first + second + closing)
        got = wait_windows(b.bootstrap, sink, want, "second run")
    finally:
        app.stop()
    wrong = {kw: (got[kw], n) for kw, n in want.items() if got[kw] != n}
    assert not wrong, f"windows counted wrong (counted, produced): {dict(list(wrong.items())[:5])}"
    spanning = [kw for kw in want if kw[1] == BASE_MS + 4 * WINDOW_MS]
    assert spanning, "a window open across the restart is checked"


def test_quix_streams_exactly_once_counts_survive_kill9_and_a_broker_restart(
        broker_factory, tmp_path):
    """processing_guarantee="exactly-once": Quix commits each checkpoint's outputs,
    changelog writes and input offsets in one transaction. The app is killed with
    SIGKILL once it has emitted some windows, restarted on its state, and the broker is
    killed and restarted (cache wiped) before the second run: every closed window's
    count, read at read_committed, equals the count produced."""
    b, source, sink, group, first, second, closing = quix_setup(broker_factory, "quix-eos")
    state = tmp_path / "state"
    app = App("quix_window_count.py", b.bootstrap, group, source, sink, state,
              tmp_path / "app1.log", "exactly-once")
    try:
        wait_windows(b.bootstrap, sink, dict(list(expected_counts(first).items())[:1]), "first output")
    finally:
        app.kill9()
    app = App("quix_window_count.py", b.bootstrap, group, source, sink, state,
              tmp_path / "app2.log", "exactly-once")
    try:
        want = expected_counts(first)
        got = wait_windows(b.bootstrap, sink, want, "after the kill")
    finally:
        app.kill9()
    wrong = {kw: (got[kw], n) for kw, n in want.items() if got[kw] != n}
    assert not wrong, f"after the kill (counted, produced): {dict(list(wrong.items())[:5])}"

    b.restart(hard=True, wipe_cache=True)
    produce_events(b.bootstrap, source, sorted(second, key=lambda e: e[1]) + closing)
    app = App("quix_window_count.py", b.bootstrap, group, source, sink, state,
              tmp_path / "app3.log", "exactly-once")
    try:
        want = expected_counts(first + second + closing)
        got = wait_windows(b.bootstrap, sink, want, "after the broker restart")
    finally:
        app.stop()
    wrong = {kw: (got[kw], n) for kw, n in want.items() if got[kw] != n}
    assert not wrong, f"windows counted wrong (counted, produced): {dict(list(wrong.items())[:5])}"


def test_faust_table_counts_survive_restarts_through_the_compacted_changelog(
        broker_factory, tmp_path):
    """faust-streaming (tests/apps/faust_window_count.py): a windowed table in memory,
    so each start of the app restores it from the compacted changelog faust creates;
    the last count it emits per key and window equals the count produced, across a
    stop of the app and a restart of the broker."""
    b = broker_factory(env=SETTINGS)
    source, sink, app_id = unique_topic("faust-in"), unique_topic("faust-out"), unique_topic("faust")
    create_topic(b.bootstrap, source, 1)
    keys, first, second = two_runs()
    data = tmp_path / "faust"

    run_faust(b, app_id, source, sink, data, tmp_path / "app1.log", first, first)
    wait_compaction_pass(b)
    b.restart()
    shutil.rmtree(data, ignore_errors=True)
    run_faust(b, app_id, source, sink, data, tmp_path / "app2.log", second, first + second)
    assert (keys[0], BASE_MS + 4 * WINDOW_MS) in running_counts(first + second), \
        "a window counted across the restart is checked"


def run_faust(b, app_id, source, sink, data, log, events, counted) -> None:
    """Runs the faust app, produces `events` once it is ready, and checks that the last
    count it emits per window equals what `counted` holds."""
    app = App("faust_window_count.py", b.bootstrap, app_id, source, sink, data, log)
    try:
        # Produced once the table is restored: faust 0.15 starts fetching its input
        # before it seeks to the committed offsets and can skip records it buffered
        # then; records reaching a running app are the case to check.
        app.wait_log("Worker ready")
        produce_events(b.bootstrap, source, sorted(events, key=lambda e: e[1]))
        want = running_counts(counted)
        got = wait_windows(b.bootstrap, sink, want, log.name)
        deadline = time.monotonic() + 30
        while any(got.get(kw) != n for kw, n in want.items()) and time.monotonic() < deadline:
            time.sleep(1)
            got = read_windows(b.bootstrap, sink)
    finally:
        app.stop()
    wrong = {kw: (got.get(kw), n) for kw, n in want.items() if got.get(kw) != n}
    assert not wrong, f"{log.name} (counted, produced): {dict(list(wrong.items())[:5])}"
