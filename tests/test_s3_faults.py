"""Object-store failures, injected by a proxy between the broker and a real S3 server
(faulty_proxy.py): 5xx answers before and after the store did the work, latency,
connection resets and stalls.

What must hold: no acknowledged record is lost or duplicated and per-partition order is
kept; while the store stalls, acks=all produces fail with a retriable error instead of
being acknowledged, and reads of data the broker holds keep working; once the faults
stop, the broker recovers by itself, without a restart."""

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from conftest import create_topic, metric_sum, scrape_metrics, unique_topic
from faulty_proxy import FaultyProxy

PARTITIONS = 3
PAD = "x" * 1000
SETTINGS = {
    # Short timeouts so the failures surface within the test.
    "STRATA_OBJECT_STORE_REQUEST_TIMEOUT_MS": "1000",
    "STRATA_WAL_FLUSH_TIMEOUT_MS": "4000",
    "STRATA_WAL_FLUSH_INTERVAL_MS": "10",
    # Segments seal and upload under the faults too.
    "STRATA_SEGMENT_BYTES": "65536",
    "STRATA_WAL_GC_INTERVAL_MS": "500",
}


def produce(bootstrap, topic, values, **extra):
    """Produces value i to partition i % PARTITIONS; returns (acked, failed errors)."""
    conf = {"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 2, "batch.size": 16384,
            "enable.idempotence": True, "message.timeout.ms": 120000}
    conf.update(extra)
    p = Producer(conf)
    acked, failed = [], []

    def report(err, msg):
        if err is None:
            acked.append(msg.value().decode().split(":")[0])
        else:
            failed.append(err)

    for i, v in values:
        # ~1 KiB values: many flushes and segment uploads meet the faults.
        p.produce(topic, value=f"{v}:{PAD}".encode(), partition=i % PARTITIONS, on_delivery=report)
        if i % 200 == 0:
            p.poll(0)
    p.flush(180)
    return acked, failed


def consume(bootstrap, topic, expected, timeout=90.0):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_topic("g"),
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    c.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    got = {p: [] for p in range(PARTITIONS)}
    import time
    deadline = time.monotonic() + timeout
    try:
        while sum(len(v) for v in got.values()) < expected and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            got[m.partition()].append(m.value().decode().split(":")[0])
    finally:
        c.close()
    return got


def metric(b, name, **labels):
    return metric_sum(scrape_metrics(b.http_port), name, **labels)


def test_faults_lose_nothing_acknowledged_and_the_broker_recovers(broker_factory):
    from s3 import s3_server
    proxy = FaultyProxy(s3_server().port)
    try:
        b = broker_factory(env={**SETTINGS}, store="s3", start=False)
        b.extra_env["AWS_ENDPOINT_URL"] = proxy.endpoint
        b.start()
        topic = unique_topic("faults")
        create_topic(b.bootstrap, topic, PARTITIONS)

        # A: a mix of failures on a third of the requests; every record is acknowledged
        # in the end (the store layer retries; the idempotent producer retries the rest).
        proxy.set_faults(error=0.1, error_after=0.08, reset=0.08, latency=0.07)
        phase_a = [(i, f"a-{i}") for i in range(3000)]
        acked_a, failed_a = produce(b.bootstrap, topic, phase_a)
        assert not failed_a, failed_a[:3]
        assert len(acked_a) == len(phase_a)
        assert proxy.counts.get("error_after", 0) > 0 and proxy.counts.get("reset", 0) > 0
        assert metric(b, "strata_object_store_retries_total") > 0

        # B: the store stalls. acks=all produces are not acknowledged: they fail with a
        # retriable error (retries off, so the client reports the broker's answer) ...
        proxy.set_faults(stall=1.0)
        phase_b = [(i, f"b-{i}") for i in range(30)]
        acked_b, failed_b = produce(b.bootstrap, topic, phase_b, **{
            "enable.idempotence": False, "retries": 0, "request.timeout.ms": 30000})
        assert not acked_b, "nothing may be acknowledged while the store is down"
        # Both codes are retriable in the Kafka protocol (librdkafka does not mark
        # delivery-report errors as retriable itself, so the codes are checked).
        assert failed_b and {e.code() for e in failed_b} <= {
            KafkaError.KAFKA_STORAGE_ERROR, KafkaError.REQUEST_TIMED_OUT}, failed_b[:3]
        assert metric(b, "strata_object_store_requests_total", outcome="timeout") > 0
        # ... while data the broker holds is still served.
        during = consume(b.bootstrap, topic, len(acked_a), timeout=60)
        assert sorted(v for vs in during.values() for v in vs) == sorted(acked_a)

        # C: the faults stop; the same broker process takes writes again by itself.
        proxy.set_faults()
        pid = b.pid
        phase_c = [(i, f"c-{i}") for i in range(1000)]
        acked_c, failed_c = produce(b.bootstrap, topic, phase_c)
        assert not failed_c, failed_c[:3]
        assert b.pid == pid and b.alive()

        acked = acked_a + acked_c
        got = consume(b.bootstrap, topic, len(acked) + len(acked_b), timeout=90)
        values = [v for vs in got.values() for v in vs]
        assert len(values) == len(set(values)), "a record was duplicated"
        assert set(acked) <= set(values), f"lost {len(set(acked) - set(values))} acknowledged records"
        for p, vs in got.items():
            for phase in "ac":
                seq = [int(v.split("-")[1]) for v in vs if v[0] == phase]
                assert seq == sorted(seq), f"partition {p} out of order in phase {phase}"
    finally:
        proxy.close()
