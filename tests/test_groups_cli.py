"""`strata groups`: list, describe with lag, reset offsets (dry run and --execute),
delete — checked against what a real client committed and sees."""

import subprocess
import time

from confluent_kafka import Consumer, TopicPartition

from conftest import create_topic, producer, unique_topic

GROUP_ENV = {"STRATA_GROUP_INITIAL_REBALANCE_DELAY_MS": "100"}


def strata(bin_path, *args, ok=True):
    res = subprocess.run([str(bin_path), "groups", *args], capture_output=True, text=True, timeout=60)
    if ok:
        assert res.returncode == 0, res.stderr
    return res


def committed(bootstrap, group, topic, partitions):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return {tp.partition: tp.offset for tp in
                c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)}
    finally:
        c.close()


def test_groups_cli(broker_factory, strata_bin):
    b = broker_factory(env=GROUP_ENV)
    topic, group = unique_topic("cli"), unique_topic("cligroup")
    create_topic(b.bootstrap, topic, 2)
    p = producer(b.bootstrap)
    for i in range(40):
        p.produce(topic, value=str(i).encode(), partition=i % 2)
    assert p.flush(30) == 0
    c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                  "enable.auto.commit": False, "client.id": "cli-test-client"})
    c.subscribe([topic])
    seen = 0
    deadline = time.monotonic() + 30
    while seen < 30 and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and m.error() is None:
            seen += 1
    # Commit 15 per partition: lag 5 each.
    c.commit(offsets=[TopicPartition(topic, 0, 15), TopicPartition(topic, 1, 15)], asynchronous=False)

    out = strata(strata_bin, "list", "--bootstrap", b.bootstrap).stdout
    assert group in out and "Stable" in out
    out = strata(strata_bin, "describe", group, "--bootstrap", b.bootstrap).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith(group)]
    assert len(rows) == 2
    for r in rows:
        assert r[1] == topic and r[3] == "15" and r[4] == "20" and r[5] == "5"
        assert r[8] == "cli-test-client"
    # A group with members cannot be reset.
    res = strata(strata_bin, "reset-offsets", group, "--topic", topic, "--to-earliest", "--execute",
                 "--bootstrap", b.bootstrap, ok=False)
    assert res.returncode != 0
    c.close()

    strata(strata_bin, "reset-offsets", group, "--topic", topic, "--to-earliest", "--bootstrap", b.bootstrap)
    assert committed(b.bootstrap, group, topic, 2) == {0: 15, 1: 15}, "a dry run changes nothing"
    strata(strata_bin, "reset-offsets", group, "--topic", topic, "--to-earliest", "--execute", "--bootstrap", b.bootstrap)
    assert committed(b.bootstrap, group, topic, 2) == {0: 0, 1: 0}
    strata(strata_bin, "reset-offsets", group, "--topic", topic, "--shift-by", "7", "--execute", "--bootstrap", b.bootstrap)
    assert committed(b.bootstrap, group, topic, 2) == {0: 7, 1: 7}
    strata(strata_bin, "reset-offsets", group, "--topic", topic, "--to-latest", "--execute", "--bootstrap", b.bootstrap)
    assert committed(b.bootstrap, group, topic, 2) == {0: 20, 1: 20}
    strata(strata_bin, "reset-offsets", group, "--topic", topic, "--to-datetime", "1970-01-01T00:00:00Z",
           "--execute", "--bootstrap", b.bootstrap)
    assert committed(b.bootstrap, group, topic, 2) == {0: 0, 1: 0}

    strata(strata_bin, "delete", group, "--bootstrap", b.bootstrap)
    assert group not in strata(strata_bin, "list", "--bootstrap", b.bootstrap).stdout
    assert committed(b.bootstrap, group, topic, 2) == {0: -1001, 1: -1001}


def scrape(port):
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric(text, name, **labels):
    """Value of the series `name` whose labels include `labels`, or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


def test_consumer_group_lag_metrics(broker_factory):
    b = broker_factory(env=GROUP_ENV)
    topic, group = unique_topic("lag"), unique_topic("laggroup")
    create_topic(b.bootstrap, topic, 2)
    p = producer(b.bootstrap)
    for i in range(30):
        p.produce(topic, value=str(i).encode(), partition=i % 2)
    assert p.flush(30) == 0
    c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        c.commit(offsets=[TopicPartition(topic, 0, 5), TopicPartition(topic, 1, 15)], asynchronous=False)
    finally:
        c.close()
    text = scrape(b.http_port)
    assert metric(text, "kafka_consumergroup_lag", consumergroup=group, topic=topic, partition="0") == 10
    assert metric(text, "kafka_consumergroup_lag", consumergroup=group, topic=topic, partition="1") == 0
    assert metric(text, "kafka_consumergroup_lag_sum", consumergroup=group, topic=topic) == 10
    assert metric(text, "kafka_consumergroup_current_offset", consumergroup=group, topic=topic, partition="0") == 5
    assert metric(text, "kafka_consumergroup_members", consumergroup=group) == 0
    assert metric(text, "strata_consumergroup_lag_seconds", consumergroup=group, topic=topic, partition="0") >= 0
    assert metric(text, "strata_consumergroup_lag_seconds", consumergroup=group, topic=topic, partition="1") == 0
