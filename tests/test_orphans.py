"""The orphan collector: objects under segments/ and wal/ that no manifest references
(a crashed upload, a flush whose commit never happened, a topic deletion cut short) are
deleted once older than the grace period; objects a manifest references never are."""

import time
import uuid

from conftest import (consume_all, create_topic, metric_sum, scrape_metrics, unique_topic,
                      wait_until)
from test_storage import SMALL, produce_numbered

SETTINGS = {
    **SMALL,
    "STRATA_ORPHAN_CHECK_INTERVAL_MS": "300",
    "STRATA_ORPHAN_GRACE_MS": "3000",
}


def orphans_deleted(b) -> float:
    return metric_sum(scrape_metrics(b.http_port), "strata_orphans_deleted_total")


def test_orphans_go_and_referenced_objects_stay(broker_factory):
    b = broker_factory(env=SETTINGS, store="s3")
    s3 = b.s3.client()
    topic = unique_topic("orphans")
    create_topic(b.bootstrap, topic, 1, config={"retention.ms": "-1"})
    n = 1500
    produce_numbered(b.bootstrap, topic, n)
    wait_until(lambda: len(b.objects("segments", ".seg")) >= 10, what="segment objects")

    referenced = set(b.objects("segments", ".seg"))
    planted = [
        f"strata/segments/{uuid.uuid4()}/0/00000000000000000000-1.seg",  # topic gone
        "strata/wal/0/000000009999-000000000000.wal",  # never committed
    ]
    for key in planted:
        s3.put_object(Bucket=b.bucket, Key=key, Body=b"x" * 100)
    outside = "strata/elsewhere/keep.txt"
    s3.put_object(Bucket=b.bucket, Key=outside, Body=b"not ours to judge")

    def gone():
        stored = b.s3.objects(b.bucket, "strata/")
        return not any(k in stored for k in planted)
    wait_until(gone, timeout=30, what="planted orphans deleted")
    assert orphans_deleted(b) >= 2
    stored = b.s3.objects(b.bucket, "strata/")
    assert outside in stored, "objects outside segments/ and wal/ are left alone"
    # Every segment a manifest references is still there, and the log reads back whole
    # from the object store after the local cache is gone.
    still = set(b.objects("segments", ".seg"))
    assert referenced <= still, f"referenced segments deleted: {sorted(referenced - still)[:3]}"
    time.sleep(1)
    b.restart(hard=True, wipe_cache=True)
    msgs = consume_all(b.bootstrap, topic, 1, timeout=60)
    assert [m.offset() for m in msgs] == list(range(n))
