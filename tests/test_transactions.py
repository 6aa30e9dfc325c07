"""Transactions with real clients (confluent-kafka/librdkafka): transactional producers
commit and abort across partitions and topics; `read_committed` consumers see exactly
the committed records, in order, and never an aborted one, while `read_uncommitted`
consumers see every data record; a zombie producer is fenced by a newer instance of its
transactional id; an open transaction holds `read_committed` consumers at the last stable
offset until the coordinator aborts it on its timeout; offsets sent to a transaction
become the group's only when it commits.
"""

import time

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from conftest import create_topic, metric_sum, scrape_metrics, unique_topic, wait_until

# Timed-out transactions are looked for every half second; compaction runs promptly.
SETTINGS = {"STRATA_TRANSACTION_ABORT_TIMED_OUT_TRANSACTION_CLEANUP_INTERVAL_MS": "500",
            "STRATA_LOG_CLEANER_BACKOFF_MS": "300", "STRATA_FILE_DELETE_DELAY_MS": "500"}


@pytest.fixture(scope="module")
def txn_broker(tmp_path_factory, strata_bin):
    from conftest import Broker
    b = Broker(tmp_path_factory.mktemp("txn-broker"), name="txn-broker", binary=strata_bin,
               env=SETTINGS)
    try:
        b.start()
        yield b
    finally:
        b.close()


def txn_producer(bootstrap: str, txn_id: str, **conf) -> Producer:
    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": txn_id,
                  "linger.ms": 5, **conf})
    p.init_transactions(30)
    return p


def read_all(bootstrap: str, topic: str, partitions: int, isolation: str,
             expect: int | None = None, timeout: float = 30) -> list:
    """Every record of the topic from offset 0 as a consumer with `isolation` reads it:
    [(partition, offset, value)], read until `expect` records arrived (or, without
    `expect`, until the end offsets it sees are reached)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_topic("g"),
                  "enable.auto.commit": False, "isolation.level": isolation,
                  "auto.offset.reset": "earliest"})
    try:
        c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        out = []
        deadline = time.monotonic() + timeout
        idle = 0
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                idle += 1
                if expect is None and idle >= 6:
                    break
                if expect is not None and len(out) >= expect and idle >= 2:
                    break
                continue
            idle = 0
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(m.error())
            out.append((m.partition(), m.offset(), m.value()))
        return out
    finally:
        c.close()


def test_commits_and_aborts_across_partitions_and_topics(txn_broker):
    b = txn_broker
    t1, t2 = unique_topic("txn-a"), unique_topic("txn-b")
    create_topic(b.bootstrap, t1, 3)
    create_topic(b.bootstrap, t2, 2)
    p = txn_producer(b.bootstrap, unique_topic("tx"))
    committed, aborted = [], []
    for n in range(12):
        p.begin_transaction()
        values = []
        for i in range(10):
            v = f"{n}-{i}".encode()
            topic, parts = (t1, 3) if i % 2 == 0 else (t2, 2)
            p.produce(topic, value=v, partition=i % parts)
            values.append(v)
        if n % 3 == 2:
            # Written first: an abort purges what the client has not sent yet.
            assert p.flush(30) == 0
            p.abort_transaction(30)
            aborted.extend(values)
        else:
            p.commit_transaction(30)
            committed.extend(values)
    # Non-transactional records from another producer, interleaved afterwards.
    plain = Producer({"bootstrap.servers": b.bootstrap})
    for i in range(5):
        plain.produce(t1, value=f"plain-{i}".encode(), partition=i % 3)
    assert plain.flush(30) == 0
    committed.extend(f"plain-{i}".encode() for i in range(5))

    seen = {t1: read_all(b.bootstrap, t1, 3, "read_committed"),
            t2: read_all(b.bootstrap, t2, 2, "read_committed")}
    values = [v for records in seen.values() for _, _, v in records]
    assert sorted(values) == sorted(committed), \
        f"read_committed saw {len(values)} records, {len(set(values) & set(aborted))} aborted"
    # Per partition, offsets increase and records come in the order they were produced.
    for records in seen.values():
        by_part = {}
        for part, off, v in records:
            by_part.setdefault(part, []).append((off, v))
        for got in by_part.values():
            offsets = [o for o, _ in got]
            assert offsets == sorted(set(offsets)), "offsets strictly increase"
            order = [tuple(int(x) for x in v.split(b"-")) for _, v in got if b"plain" not in v]
            assert order == sorted(order), "produced order kept"

    everything = read_all(b.bootstrap, t1, 3, "read_uncommitted") + \
        read_all(b.bootstrap, t2, 2, "read_uncommitted")
    assert sorted(v for _, _, v in everything) == sorted(committed + aborted), \
        "read_uncommitted sees every data record, control records never"
    m = scrape_metrics(b.http_port)
    assert metric_sum(m, "strata_transactions_total", outcome="committed") >= 8
    assert metric_sum(m, "strata_transactions_total", outcome="aborted") >= 4


def test_a_zombie_is_fenced_by_a_new_instance(txn_broker):
    b = txn_broker
    topic = unique_topic("txn-zombie")
    create_topic(b.bootstrap, topic, 1)
    txn_id = unique_topic("tx")
    zombie = txn_producer(b.bootstrap, txn_id)
    zombie.begin_transaction()
    zombie.produce(topic, value=b"zombie-1")
    zombie.flush(30)

    fresh = txn_producer(b.bootstrap, txn_id)  # fences the zombie, aborting its transaction
    fresh.begin_transaction()
    fresh.produce(topic, value=b"fresh-1")
    fresh.commit_transaction(30)

    zombie.produce(topic, value=b"zombie-2")
    with pytest.raises(KafkaException) as e:
        zombie.commit_transaction(30)
    err = e.value.args[0]
    assert err.fatal() or err.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
                                         KafkaError.INVALID_PRODUCER_EPOCH), err
    values = [v for _, _, v in read_all(b.bootstrap, topic, 1, "read_committed")]
    assert values == [b"fresh-1"], values


def test_an_open_transaction_holds_readers_until_it_times_out(txn_broker):
    b = txn_broker
    topic = unique_topic("txn-hang")
    create_topic(b.bootstrap, topic, 1)
    before = Producer({"bootstrap.servers": b.bootstrap})
    before.produce(topic, value=b"before")
    assert before.flush(30) == 0

    hanging = txn_producer(b.bootstrap, unique_topic("tx"), **{"transaction.timeout.ms": 4000})
    hanging.begin_transaction()
    hanging.produce(topic, value=b"in-doubt")
    hanging.flush(30)
    after = Producer({"bootstrap.servers": b.bootstrap})
    after.produce(topic, value=b"after")
    assert after.flush(30) == 0

    # While the transaction is open, read_committed stops at its first record.
    c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": unique_topic("g"),
                  "isolation.level": "read_committed", "auto.offset.reset": "earliest"})
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        got = []
        opened = time.monotonic()
        while time.monotonic() - opened < 25 and b"after" not in got:
            m = c.poll(0.2)
            if m is not None and not m.error():
                got.append(m.value())
                if m.value() == b"after":
                    held = time.monotonic() - opened
        assert got == [b"before", b"after"], got
        print(f"\nread_committed held {held:.1f} s behind the open transaction (timeout 4 s)")
        assert held >= 2.5, "the reader waited for the transaction to end"
    finally:
        c.close()
    m = scrape_metrics(b.http_port)
    assert metric_sum(m, "strata_transactions_total", outcome="timed_out") >= 1
    with pytest.raises(KafkaException):
        hanging.commit_transaction(10)


def test_offsets_sent_to_a_transaction_count_only_once_it_commits(txn_broker):
    b = txn_broker
    src, dst = unique_topic("txn-src"), unique_topic("txn-dst")
    create_topic(b.bootstrap, src, 1)
    create_topic(b.bootstrap, dst, 1)
    group = unique_topic("g")
    p = txn_producer(b.bootstrap, unique_topic("tx"))
    c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": group,
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        c.assign([TopicPartition(src, 0, 0)])
        meta = c.consumer_group_metadata()

        def committed_offset():
            return c.committed([TopicPartition(src, 0)], timeout=10)[0].offset

        p.begin_transaction()
        p.send_offsets_to_transaction([TopicPartition(src, 0, 10)], meta, 30)
        p.abort_transaction(30)
        assert committed_offset() < 0, "an aborted transaction's offsets are discarded"

        p.begin_transaction()
        p.produce(dst, value=b"out")
        p.send_offsets_to_transaction([TopicPartition(src, 0, 7)], meta, 30)
        p.commit_transaction(30)
        wait_until(lambda: committed_offset() == 7, 10, "the committed offset")
    finally:
        c.close()


def test_compaction_keeps_committed_values_over_aborted_ones(txn_broker):
    """An aborted update of a key is newer than its committed value, yet a
    read_committed reader sees only the committed one: compaction must keep it (and
    drop the aborted data), never let the aborted record supersede it."""
    from test_compaction import TOPIC_CONFIG, create_compacted
    b = txn_broker
    topic = unique_topic("txn-compact")
    create_compacted(b.bootstrap, topic)
    keys = [b"k%02d" % i for i in range(40)]
    p = txn_producer(b.bootstrap, unique_topic("tx"))
    for round_ in range(6):
        p.begin_transaction()
        for k in keys:
            p.produce(topic, key=k, value=b"%s-%d" % (k, round_) + b"x" * 500)
        assert p.flush(30) == 0
        if round_ % 2 == 0:
            p.commit_transaction(30)
        else:
            p.abort_transaction(30)
    # The newest committed value of each key is round 4's.
    want = {k: b"%s-4" % k for k in keys}

    def passes():
        return metric_sum(scrape_metrics(b.http_port), "strata_compaction_passes_total",
                          outcome="committed")

    before = passes()
    # Later writes seal the segments holding the transactions (segment.ms).
    filler = Producer({"bootstrap.servers": b.bootstrap})
    deadline = time.monotonic() + 60
    while passes() < before + 2 and time.monotonic() < deadline:
        filler.produce(topic, key=b"filler", value=b"f")
        filler.flush(10)
        time.sleep(0.5)
    assert passes() >= before + 2, "compaction passes ran"
    got = {}
    for _, _, v in read_all(b.bootstrap, topic, 1, "read_committed"):
        if not v.startswith(b"f"):
            got[v[:3]] = v.split(b"x")[0]
    assert got == want, f"{sum(got.get(k) == w for k, w in want.items())} of {len(want)} keys right"
    assert TOPIC_CONFIG["cleanup.policy"] == "compact"


def test_an_operator_lists_describes_and_aborts_a_hanging_transaction(txn_broker):
    import subprocess
    b = txn_broker

    def strata(*args) -> str:
        out = subprocess.run([str(b.binary), "transactions", *args, "--bootstrap", b.bootstrap],
                             capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stderr
        return out.stdout

    topic = unique_topic("txn-op")
    create_topic(b.bootstrap, topic, 2)
    txn_id = unique_topic("tx-hanging")
    hanging = txn_producer(b.bootstrap, txn_id, **{"transaction.timeout.ms": 600000})
    hanging.begin_transaction()
    hanging.produce(topic, value=b"in-doubt", partition=1)
    assert hanging.flush(30) == 0
    after = Producer({"bootstrap.servers": b.bootstrap})
    after.produce(topic, value=b"after", partition=1)
    assert after.flush(30) == 0
    time.sleep(1.0)

    listed = strata("list", "--older-than-ms", "500")
    assert txn_id in listed and "Ongoing" in listed, listed
    described = strata("describe", "--transactional-id", txn_id)
    assert "Ongoing" in described and f"{topic} [1]" in described, described
    m = scrape_metrics(b.http_port)
    assert metric_sum(m, "strata_transaction_oldest_open_seconds") >= 1
    # "in-doubt" holds partition 1's readers back from "after".
    assert metric_sum(m, "strata_last_stable_offset_lag", topic=topic, partition="1") == 2
    # The partition's owner names the producer holding it up (DescribeProducers).
    from kafka import TopicPartition as KTP
    from test_kafka_python import kp_admin
    admin = kp_admin(b.bootstrap)
    try:
        got = admin.describe_producers([KTP(topic, 1)])[KTP(topic, 1)].active_producers
    finally:
        admin.close()
    assert [p.current_transaction_start_offset for p in got] == [0], got

    aborted = strata("abort", "--transactional-id", txn_id)
    assert "fenced" in aborted, aborted
    # Aborted, then re-initialised under a higher epoch: nothing open, the producer fenced.
    after_abort = strata("describe", "--transactional-id", txn_id)
    assert "Empty" in after_abort and "epoch 2" in after_abort, after_abort
    values = [v for _, _, v in read_all(b.bootstrap, topic, 2, "read_committed")]
    assert values == [b"after"], values
    assert metric_sum(scrape_metrics(b.http_port), "strata_last_stable_offset_lag",
                      topic=topic) == 0
    with pytest.raises(KafkaException):
        hanging.commit_transaction(10)
