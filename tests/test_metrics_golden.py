"""The metrics the broker serves match the committed golden sample
`dashboards/metrics.sample.prom`: every family's name, type and label names (not the
values). A metric renamed, dropped or relabelled breaks dashboards and alerts, so it must
be a deliberate change: regenerate with STRATA_UPDATE_GOLDEN=1 and review the diff."""

import os
import re
import time
import urllib.request
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from conftest import consume_all, create_topic, producer, unique_topic

GOLDEN = Path(__file__).resolve().parent.parent / "dashboards" / "metrics.sample.prom"
# Families that only appear after a failure (an error outcome, a partition error).
ON_FAILURE_ONLY = {"strata_partition_errors_total"}


def families(text):
    """{name: (type, frozenset(label names))} from Prometheus text format."""
    types, labels = {}, {}
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            types[m.group(1)] = m.group(2)
            continue
        if not line or line.startswith("#"):
            continue
        name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
        base = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        keys = frozenset(k for k in re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', line) if k != "le")
        labels.setdefault(base, set()).update(keys)
    return {n: (t, frozenset(labels.get(n, set()))) for n, t in types.items()}


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_metrics_match_golden_sample(broker_factory):
    b = broker_factory(env={"STRATA_GROUP_INITIAL_REBALANCE_DELAY_MS": "100"})
    topic = unique_topic("golden")
    create_topic(b.bootstrap, topic, 2)
    # A compacted topic, so its per-partition compaction gauges are served too.
    create_topic(b.bootstrap, unique_topic("golden-compacted"), 1, config={"cleanup.policy": "compact"})
    p = producer(b.bootstrap)
    for i in range(100):
        p.produce(topic, value=str(i).encode(), partition=i % 2)
    assert p.flush(30) == 0
    assert len(consume_all(b.bootstrap, topic, 2)) == 100
    c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": unique_topic("g"), "auto.offset.reset": "earliest"})
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + 30
        while not c.assignment() and time.monotonic() < deadline:
            c.poll(0.2)
        c.commit(offsets=[TopicPartition(topic, 0, 10)], asynchronous=False)
        text = scrape(b.http_port)
    finally:
        c.close()
    served = families(text)
    if os.environ.get("STRATA_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    golden = families(GOLDEN.read_text())
    missing = {n: golden[n] for n in golden if n not in served and n not in ON_FAILURE_ONLY}
    extra = {n: served[n] for n in served if n not in golden}
    changed = {n: (golden[n], served[n]) for n in golden if n in served and golden[n] != served[n]}
    assert not missing, f"metrics in the golden sample but not served: {missing}"
    assert not extra, f"new metrics not in the golden sample (regenerate it): {extra}"
    assert not changed, f"type or labels changed: {changed}"
