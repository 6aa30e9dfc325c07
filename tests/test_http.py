"""The operator HTTP endpoint: liveness, readiness and unknown paths."""

import urllib.error
import urllib.request


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_and_readiness(broker):
    assert get(broker.http_port, "/healthz") == (200, "ok\n")
    assert get(broker.http_port, "/readyz") == (200, "ready\n")
    status, _ = get(broker.http_port, "/nope")
    assert status == 404


def series(text, name, **labels):
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                return float(value)
    return None


def test_metrics_follow_traffic(broker):
    from conftest import consume_all, create_topic, producer, unique_topic
    topic = unique_topic("metrics")
    create_topic(broker.bootstrap, topic, 2)
    p = producer(broker.bootstrap)
    for i in range(500):
        p.produce(topic, value=b"x" * 100, partition=i % 2)
    assert p.flush(30) == 0
    assert len(consume_all(broker.bootstrap, topic, 2)) == 500
    status, text = get(broker.http_port, "/metrics")
    assert status == 200
    assert series(text, "kafka_server_brokertopicmetrics_messagesin_total", topic=topic) == 500
    bytes_in = series(text, "kafka_server_brokertopicmetrics_bytesin_total", topic=topic)
    assert bytes_in is not None and bytes_in > 500 * 100
    assert series(text, "kafka_server_brokertopicmetrics_bytesout_total", topic=topic) >= bytes_in
    assert series(text, "strata_requests_total", api="Produce") >= 1
    assert series(text, "strata_requests_total", api="Fetch") >= 1
    assert series(text, "strata_wal_flushes_total", outcome="committed") >= 1
    assert series(text, "strata_object_store_requests_total", op="put", outcome="ok") >= 1
    assert series(text, "strata_connections_max") == 10000
    assert series(text, "strata_partitions") == 2
    assert series(text, "strata_request_duration_seconds_count", api="Produce") >= 1
    assert series(text, "strata_metadata_store_duration_seconds_count", op="commit_wal") >= 1
    assert series(text, "strata_wal_flush_bytes_count") >= 1


def test_partition_labels_are_opt_in(broker_factory):
    from conftest import consume_all, create_topic, producer, unique_topic
    b = broker_factory(env={"STRATA_METRICS_PARTITION_LABELS": "true"})
    topic = unique_topic("plabels")
    create_topic(b.bootstrap, topic, 2)
    p = producer(b.bootstrap)
    for i in range(10):
        p.produce(topic, value=b"y" * 50, partition=1)
    assert p.flush(30) == 0
    assert len(consume_all(b.bootstrap, topic, 2)) == 10
    _, text = get(b.http_port, "/metrics")
    assert series(text, "strata_partition_bytes_in_total", topic=topic, partition="1") > 500
    assert series(text, "strata_partition_bytes_out_total", topic=topic, partition="1") > 500
    assert series(text, "strata_partition_bytes_in_total", topic=topic, partition="0") is None
