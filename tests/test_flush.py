"""When the write-ahead flusher starts a flush, seen from a real client.

Group commit: a batch an `acks=all` producer waits on starts a flush as soon as a slot
is free, whatever `wal.flush.interval.ms` says; batches nobody waits on (`acks=1`) wait
for the interval, so many of them share one object. `wal.flush.max.per.second` spaces
flush starts even for waiting producers. The broker's own record of the spacing
(`strata_wal_flush_interval_seconds`) and of its flushes (`strata_wal_flushes_total`)
is what the tests read.

An `acks=1` producer is answered once its batch is queued for the flusher; the queue is
bounded in bytes (`wal.flush.queue.bytes`), so while the store takes nothing the answers
stop after a bounded amount, and resume when it heals.
"""

from conftest import consume_all, create_topic, metric_sum, producer, scrape_metrics, unique_topic

SENDS = 20


def flush_counts(b) -> tuple[float, float, float, float]:
    """(flushes committed, intervals between flush starts, of them under 50 ms, under 0.5 s)."""
    text = scrape_metrics(b.http_port)
    return (
        metric_sum(text, "strata_wal_flushes_total", outcome="committed"),
        metric_sum(text, "strata_wal_flush_interval_seconds_count"),
        metric_sum(text, "strata_wal_flush_interval_seconds_bucket", le="0.05"),
        metric_sum(text, "strata_wal_flush_interval_seconds_bucket", le="0.5"),
    )


def send_one_by_one(b, topic: str, **conf) -> tuple[float, ...]:
    """SENDS records, each waited for before the next is sent; how `flush_counts` moved."""
    before = flush_counts(b)
    p = producer(b.bootstrap, **{"linger.ms": 0, **conf})
    errors = []
    for i in range(SENDS):
        p.produce(topic, value=b"x%d" % i,
                  on_delivery=lambda err, _msg: err and errors.append(err))
        assert p.flush(30) == 0, "every record answered"
    assert not errors, errors
    if conf.get("acks") == "1":
        # an acks=all record afterwards makes the broker flush and commit what waits
        p = producer(b.bootstrap)
        p.produce(topic, value=b"last")
        assert p.flush(30) == 0
    return tuple(x - y for x, y in zip(flush_counts(b), before))


def broker_and_topic(broker_factory, env: dict):
    b = broker_factory(env=env, store="local")
    topic = unique_topic("flush")
    create_topic(b.bootstrap, topic, 1)
    return b, topic


def test_waiting_producers_do_not_wait_for_the_interval_and_acks1_batches_do(broker_factory):
    b, topic = broker_and_topic(broker_factory, {"STRATA_WAL_FLUSH_INTERVAL_MS": "1000"})
    flushes, intervals, _, quick = send_one_by_one(b, topic)
    assert flushes >= SENDS, f"each waited-on record has its own flush: {flushes}"
    assert quick >= SENDS - 5, (
        f"flushes started well inside the 1 s interval: only {quick} of "
        f"{intervals} intervals under 0.5 s")

    # acks=1: answered on append, so the records arrive together and wait the interval
    # in one buffer (two objects at most, if the interval ends mid-way).
    flushes, *_ = send_one_by_one(b, topic, acks="1", **{"enable.idempotence": False})
    assert flushes <= 3, f"acks=1 records share objects: {flushes} flushes"


def test_the_flush_rate_bound_spaces_flush_starts(broker_factory):
    b, topic = broker_and_topic(broker_factory, {"STRATA_WAL_FLUSH_MAX_PER_SECOND": "10"})
    _, intervals, close, _ = send_one_by_one(b, topic)
    assert intervals >= SENDS - 1, f"one flush per waited-on record: {intervals} intervals"
    assert close == 0, "no two flushes started closer than 1 / 10 s"


MIB = 1 << 20


def test_acks1_answers_stop_at_the_queue_byte_bound_while_the_store_takes_nothing(broker_factory):
    from faulty_proxy import FaultyProxy
    from s3 import s3_server
    proxy = FaultyProxy(s3_server().port)
    try:
        # At most ~1 MiB buffered, one flush (~1 MiB) in flight and 2 MiB queued: what
        # an acks=1 producer gets answered while no PUT completes.
        b = broker_factory(env={"STRATA_WAL_FLUSH_QUEUE_BYTES": str(2 * MIB),
                                "STRATA_WAL_FLUSH_BYTES": str(MIB),
                                "STRATA_WAL_FLUSH_CONCURRENCY": "1",
                                "STRATA_WAL_FLUSH_TIMEOUT_MS": "120000",
                                "STRATA_OBJECT_STORE_REQUEST_TIMEOUT_MS": "120000"},
                           store="s3", start=False)
        b.extra_env["AWS_ENDPOINT_URL"] = proxy.endpoint
        b.start()
        topic = unique_topic("flush-bytes")
        create_topic(b.bootstrap, topic, 2)

        proxy.set_faults(stall=1.0)
        total, value = 2048, b"v" * 16384  # 32 MiB
        acked = []
        p = producer(b.bootstrap, acks="1", **{"enable.idempotence": False,
                                                "message.timeout.ms": 300000})
        for i in range(total):
            p.produce(topic, value=value, partition=i % 2,
                      on_delivery=lambda err, _m: err is None and acked.append(1))
            p.poll(0)
        # Wait until the answers stop coming (the queue is full), then look.
        last, still = -1, 0
        while still < 3:
            p.poll(1.0)
            still = still + 1 if len(acked) == last else 0
            last = len(acked)
        held = len(acked) * len(value)
        assert held <= 12 * MIB, f"{held / MIB:.1f} MiB answered while the store took nothing"
        queued = metric_sum(scrape_metrics(b.http_port), "strata_queue_depth",
                            queue="wal_flush_bytes")
        assert queued >= MIB, f"the queue's bytes are what holds the producer back: {queued}"

        proxy.set_faults()
        proxy.stall_release.set()
        assert p.flush(120) == 0, "every record answered once the store takes writes again"
        assert len(acked) == total
        assert len(consume_all(b.bootstrap, topic, 2, timeout=120)) == total
    finally:
        proxy.set_faults()
        proxy.stall_release.set()
        proxy.close()
