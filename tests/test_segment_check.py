"""A hole planted in a local segment file is never uploaded.

A partition's local file is only a cache of its write-ahead ranges. Here a batch is cut
out of the middle of the file on disk (as a failed write would leave it) before the file
is sealed. The check before upload must refuse it (`strata_segment_check_failures_total`),
drop the file, and seal that stretch from the write-ahead objects instead, so after a
restart with the local cache wiped every acknowledged record reads back at its offset.
"""

import struct
import time

from confluent_kafka import Producer

from conftest import (consume_all, create_topic, metric_sum, scrape_metrics, unique_topic,
                      wait_until)


def batches(data: bytes) -> list[tuple[int, int, int]]:
    """(position, length, base offset) of each record batch in a log file."""
    out, pos = [], 0
    while pos + 12 <= len(data):
        base, length = struct.unpack(">qi", data[pos:pos + 12])
        out.append((pos, 12 + length, base))
        pos += 12 + length
    return out


def test_a_segment_with_a_hole_is_rebuilt_from_the_write_ahead_log(broker_factory):
    b = broker_factory(env={"STRATA_SEGMENT_MS": "6000", "STRATA_WAL_GC_INTERVAL_MS": "1000"})
    topic = unique_topic("hole")
    create_topic(b.bootstrap, topic, 1, {"retention.ms": "-1"})
    p = Producer({"bootstrap.servers": b.bootstrap, "acks": "all", "linger.ms": 0})
    acked = {}

    def report(err, msg):
        assert err is None, err
        acked[msg.value()] = msg.offset()

    for i in range(20):  # one batch per flush: the local file holds 20 batches
        for j in range(10):
            p.produce(topic, value=f"{i:03d}-{j:03d}".encode(), partition=0, on_delivery=report)
        assert p.flush(30) == 0
    assert len(acked) == 200

    files = [f for f in b.cache_dir.glob("*-0/*.log") if f.stat().st_size > 0]
    assert len(files) == 1, f"expected one local file with data: {files}"
    data = files[0].read_bytes()
    found = batches(data)
    assert len(found) >= 3 and sum(n for _, n, _ in found) == len(data)
    # Cut the third batch out, in place and keeping the file's size (as writes that went
    # astray would leave it): the batches after it move up, zeros fill the end.
    pos, length, base = found[2]
    with open(files[0], "r+b") as f:
        f.seek(pos)
        f.write(data[pos + length:] + b"\0" * length)

    refused = lambda: metric_sum(scrape_metrics(b.http_port), "strata_segment_check_failures_total",
                                 source="local")
    wait_until(lambda: refused() == 1, 30, "the check to refuse the file with a hole")
    wait_until(lambda: len(b.objects("segments", ".seg")) >= 1, 30, "the stretch to be sealed")
    assert f"offset {base} is missing" in b.log_tail(400)
    time.sleep(2)  # a write-ahead collection round: the objects behind the segment go

    b.restart(hard=True, wipe_cache=True)
    msgs = consume_all(b.bootstrap, topic, 1)
    assert [m.offset() for m in msgs] == list(range(200)), "an offset is missing"
    assert {m.value(): m.offset() for m in msgs} == acked
