"""Replay of a long-retention topic from object storage, with the tail kept live.

A broker on a real S3-compatible server (moto_server, see s3.py) holds a topic of at
least STRATA_REPLAY_BYTES (default 1 GiB) in many sealed segment objects. The broker is
killed and its local cache (local segments and the block cache, memory and disk) wiped;
after the restart a consumer reads the whole topic from offset 0: exact counts per
partition, contiguous offsets, every record where it belongs. Meanwhile a tail producer
(acks=all) and a tail consumer on a small topic deliver every tail record exactly once.

The replay must really come from the object store: GET bytes grow by at least the
stored size of the sealed segments, and the block cache misses. Tail produce-ack and
end-to-end latency before and during the replay, replay throughput and the store's
request counts are recorded (printed and written to replay-results.json in the test's
tmp dir), never asserted: they are measurements of this machine and of moto.

    STRATA_REPLAY_BYTES=268435456 pytest tests/test_replay.py   # a quicker, smaller run
"""

import json
import os
import time

import pytest

from conftest import create_topic, unique_topic, wait_ready
from replay_helpers import (TailProcess, delta, high_watermarks, mean_latencies, produce_numbered,
                            read_all, run_tail, snapshot, tail_summary,
                            wait_uploads_settled)

# Bytes of sealed segment objects before the replay (the acceptance: >= 1 GiB); the
# topic holds more (the partitions' active segments are not sealed yet).
REPLAY_BYTES = int(os.environ.get("STRATA_REPLAY_BYTES", str(1 << 30)))
PARTITIONS = 8
RECORD_BYTES = 1024
SEGMENT_BYTES = 16 << 20
TAIL_RATE = 100  # tail records per second
TAIL_BASELINE_S = 8.0
SETTINGS = {
    # Many sealed segments: 1 GiB over 8 partitions is ~64 segment objects.
    "STRATA_SEGMENT_BYTES": str(SEGMENT_BYTES),
    # Long retention: nothing of the replayed topic may be deleted under the test.
    "STRATA_RETENTION_MS": "-1",
}


@pytest.mark.timeout(900)
def test_replay_from_s3_after_cache_loss_keeps_the_tail(broker_factory, tmp_path):
    b = broker_factory(env=SETTINGS, store="s3", name="replay")
    topic = unique_topic("replay")
    create_topic(b.bootstrap, topic, PARTITIONS)
    started = time.monotonic()

    def sealed() -> dict:
        return b.objects("segments", ".seg")

    # 1. The topic: produce until the sealed segment objects hold REPLAY_BYTES.
    t0 = time.monotonic()
    acked = produce_numbered(b.bootstrap, topic, PARTITIONS, RECORD_BYTES, REPLAY_BYTES,
                             done=lambda: sum(sealed().values()) >= REPLAY_BYTES)
    produce_s = time.monotonic() - t0
    ends = high_watermarks(b.bootstrap, topic, PARTITIONS)
    assert ends == acked, f"high watermarks {ends} != acknowledged records {acked}"
    # Segments sealed by the last produces finish uploading (and are in the manifest)
    # before the crash, so every one listed here must be read back from the store.
    segments = wait_uploads_settled(sealed)
    sealed_bytes = sum(segments.values())
    assert sealed_bytes >= REPLAY_BYTES
    assert len(segments) >= max(PARTITIONS, REPLAY_BYTES // SEGMENT_BYTES * 3 // 4), len(segments)
    assert {k.split("/")[2] for k in segments} == {str(p) for p in range(PARTITIONS)}

    tail_topic = unique_topic("tail")
    create_topic(b.bootstrap, tail_topic, 1)

    # 2. Lose the local cache: kill -9, delete DATA_DIR/cache (segments and blocks), restart.
    b.restart(hard=True, wipe_cache=True)
    wait_ready(b.http_port)

    # 3. The tail alone (baseline), on the restarted broker.
    b0 = snapshot(b.http_port)
    before = run_tail(b.bootstrap, tail_topic, tmp_path / "tail-before.json", TAIL_BASELINE_S,
                      rate=TAIL_RATE)
    idle = delta(snapshot(b.http_port), b0)

    # 4. The replay from offset 0, with the tail running.
    tail = TailProcess(b.bootstrap, tail_topic, tmp_path / "tail-during.json", rate=TAIL_RATE)
    try:
        tail.wait_started()
        s0 = snapshot(b.http_port)
        replay_start = time.time()
        replay = read_all(b.bootstrap, topic, ends, RECORD_BYTES)
        replay_end = time.time()
        s1 = snapshot(b.http_port)
        during = tail.stop()
    finally:
        tail.kill()
    used = delta(s1, s0)

    # Exact counts: every partition read from 0 to its end, no gap, no duplicate (checked
    # record by record in read_all), every record's value where it belongs.
    assert replay["per_partition"] == ends
    assert replay["records"] == sum(acked)
    assert replay["value_bytes"] == sum(acked) * RECORD_BYTES

    # The replay came from the object store, through the block cache.
    assert used["get_bytes"] >= sealed_bytes, (used, sealed_bytes)
    assert used["cache_misses"] > 0, used

    # The tail delivered every record exactly once, before and during the replay.
    for name, report in (("before", before), ("during", during)):
        assert report["sent"] > 0, name
        assert not report["failed"], (name, report["failed"][:5])
        assert report["acked"] == report["sent"], (name, report["acked"], report["sent"])
        assert report["received"] == report["acked"], (name, report["received"], report["acked"])
        assert report["missing"] == 0 and report["duplicates"] == 0 and report["unexpected"] == 0, \
            (name, report["missing"], report["duplicates"], report["unexpected"])

    # Measurements, recorded and not asserted.
    mib = replay["value_bytes"] / 2**20
    results = {
        "replay_bytes_setting": REPLAY_BYTES,
        "records": replay["records"],
        "value_mib": round(mib, 1),
        "sealed_segments": len(segments),
        "sealed_mib": round(sealed_bytes / 2**20, 1),
        "produce_seconds": round(produce_s, 1),
        "produce_mb_per_s": round(sum(acked) * RECORD_BYTES / produce_s / 1e6, 1),
        "replay_seconds": round(replay["seconds"], 2),
        "replay_mb_per_s": round(replay["value_bytes"] / replay["seconds"] / 1e6, 1),
        "get_requests": int(used["get_requests"]),
        "get_mib": round(used["get_bytes"] / 2**20, 1),
        "gets_per_mib_replayed": round(used["get_requests"] / mib, 3),
        "gets_per_mib_fetched": round(used["get_requests"] / (used["get_bytes"] / 2**20), 3),
        "cache_misses": int(used["cache_misses"]),
        "cache_hits": int(used["cache_hits"]),
        "readahead_blocks": int(used["readahead_blocks"]),
        "tail_rate_per_s": TAIL_RATE,
        "tail_before_replay": tail_summary(before),
        "tail_during_replay": tail_summary(during, replay_start, replay_end),
        # the broker's side of the tail latency: means of its write-ahead writes and
        # commits and of object-store requests (moto serves the replay's GETs meanwhile)
        "broker_before_replay_mean_ms": mean_latencies(idle),
        "broker_during_replay_mean_ms": mean_latencies(used),
        "test_seconds": round(time.monotonic() - started, 1),
    }
    out = tmp_path / "replay-results.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nreplay results ({out}):\n{json.dumps(results, indent=2)}")
