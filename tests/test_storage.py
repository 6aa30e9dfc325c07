"""The storage engine seen from outside: segments sealed and uploaded to the object
store, reads of old offsets from segment objects after the local cache is gone,
write-ahead objects garbage-collected once segments cover them, retention by bytes and
time deleting whole segment objects, and ListOffsets by timestamp on sealed data."""

import time

from confluent_kafka import TopicPartition, Consumer

from conftest import consume_all, create_topic, producer, unique_topic, wait_until

SMALL = {
    "STRATA_SEGMENT_BYTES": "65536",
    "STRATA_WAL_FLUSH_INTERVAL_MS": "5",
    "STRATA_WAL_GC_INTERVAL_MS": "200",
    "STRATA_LOG_RETENTION_CHECK_INTERVAL_MS": "200",
}


def produce_numbered(bootstrap, topic, n, partition=0, size=1000, ts0=1_700_000_000_000):
    p = producer(bootstrap, **{"linger.ms": 2, "batch.size": 16384})
    errors = []
    for i in range(n):
        p.produce(topic, key=str(i).encode(), value=(f"{i:08d}".encode() * (size // 8)),
                  partition=partition, timestamp=ts0 + i,
                  on_delivery=lambda err, msg: errors.append(err) if err else None)
        if i % 500 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    assert not errors, errors[:3]


def test_segments_upload_and_serve_old_offsets_after_cache_loss(broker_factory):
    b = broker_factory(env=SMALL)
    topic = unique_topic("seg")
    # Kept forever: the fixed 2023 timestamps would otherwise be out of retention.
    create_topic(b.bootstrap, topic, 1, config={"retention.ms": "-1"})
    n = 1500  # ~1.5 MB: many 64 KiB segments
    produce_numbered(b.bootstrap, topic, n)
    wait_until(lambda: len(b.objects("segments", ".seg")) >= 10, what="segment objects")
    # Write-ahead objects covered by segments are deleted.
    wait_until(lambda: len(b.objects("wal", ".wal")) <= 5, what="write-ahead garbage collection")
    b.restart(hard=True, wipe_cache=True)
    msgs = consume_all(b.bootstrap, topic, 1, timeout=60)
    assert [m.offset() for m in msgs] == list(range(n))
    assert [int(m.key()) for m in msgs] == list(range(n))
    assert all(m.value() == f"{i:08d}".encode() * 125 for i, m in enumerate(msgs))
    assert [m.timestamp()[1] for m in msgs] == [1_700_000_000_000 + i for i in range(n)]
    # Timestamp lookups land on the exact record, in sealed segments and in the tail.
    c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": "x"})
    try:
        for i in (0, 37, 700, n - 1):
            got = c.offsets_for_times([TopicPartition(topic, 0, 1_700_000_000_000 + i)], timeout=10)
            assert got[0].offset == i
        got = c.offsets_for_times([TopicPartition(topic, 0, 1_800_000_000_000)], timeout=10)
        assert got[0].offset == -1
    finally:
        c.close()


def test_retention_bytes_deletes_whole_oldest_segments(broker_factory):
    b = broker_factory(env=SMALL)
    topic = unique_topic("retb")
    create_topic(b.bootstrap, topic, 1, config={"retention.bytes": "200000", "retention.ms": "-1"})
    n = 1500
    produce_numbered(b.bootstrap, topic, n)

    def low():
        c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": "x"})
        try:
            return c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        finally:
            c.close()

    wait_until(lambda: low()[0] > 0, what="log start offset to rise")
    lo, hi = low()
    assert hi == n
    # What is left is contiguous from the new start to the end.
    msgs = consume_all(b.bootstrap, topic, 1, timeout=60)
    assert [m.offset() for m in msgs] == list(range(msgs[0].offset(), n))
    assert msgs[0].offset() >= lo
    # Deleted segments are gone from the object store: retained sealed data stays near the limit.
    wait_until(lambda: sum(b.objects("segments", ".seg").values()) < 400_000,
               what="segment objects deleted")


def test_retention_ms_and_forever(broker_factory):
    b = broker_factory(env=SMALL)
    old, forever = unique_topic("old"), unique_topic("forever")
    create_topic(b.bootstrap, old, 1, config={"retention.ms": "1000"})
    create_topic(b.bootstrap, forever, 1, config={"retention.ms": "-1"})
    # Timestamps far in the past: everything sealed is immediately out of retention.
    produce_numbered(b.bootstrap, old, 600, ts0=1_000_000_000_000)
    produce_numbered(b.bootstrap, forever, 600, ts0=1_000_000_000_000)

    def watermarks(t):
        c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": "x"})
        try:
            return c.get_watermark_offsets(TopicPartition(t, 0), timeout=10)
        finally:
            c.close()

    wait_until(lambda: watermarks(old)[0] > 0, what="time retention")
    time.sleep(1.0)
    assert watermarks(forever) == (0, 600)
    assert len(consume_all(b.bootstrap, forever, 1)) == 600
