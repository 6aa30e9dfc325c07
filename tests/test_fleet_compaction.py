"""Compacted topics in a fleet (three brokers, one S3-compatible bucket, PostgreSQL).

A consumer in another zone than the owner reads the partition through its zone's broker,
which serves it from the manifest it re-reads and the segment objects a pass replaces;
tailing and replaying from 0 while passes commit, it sees no duplicate, backward or
missing offset. An owner paused (SIGSTOP) in the middle of a pass loses the partition:
once resumed, nothing it wrote commits, the next owner compacts, every key's newest
value is there, and the objects the paused pass wrote are deleted.
"""

import os
import random
import re
import signal
import time

import pytest

from conftest import metric_sum, scrape_metrics, unique_topic, wait_until
from test_compaction import (SETTINGS, create_compacted, produce_all, read_while_updating,
                             wait_compacted)
from test_fleet import LEASE_MS, bootstrap, fleet, leaders  # noqa: F401  (fixture)
from test_postgres_metadata import postgres  # noqa: F401  (fixture)

ZONES = {1: "zone-a", 2: "zone-b", 3: "zone-c"}


def passes(b, outcome: str = "committed") -> float:
    return metric_sum(scrape_metrics(b.http_port), "strata_compaction_passes_total", outcome=outcome)


def compacted_topic(fleet, prefix: str):
    """A new compacted topic of one partition, and the broker that owns it."""
    brokers = {b.broker_id: b for b in fleet.brokers}
    topic = unique_topic(prefix)
    create_compacted(brokers[1].bootstrap, topic)
    # Brokers 2 and 3 joined just now, so the partition may still move once (and read
    # as leaderless, -1, while it does): the owner is the one named twice, a lease apart.
    seen = []

    def settled():
        seen.append(leaders(brokers[1].bootstrap, topic).get(0, -1))
        return seen[-1] in brokers and seen[-2:] == [seen[-1]] * 2

    wait_until(settled, 30, "the partition to have a settled owner", interval=LEASE_MS / 1000)
    return topic, brokers[seen[-1]]


@pytest.mark.parametrize("fleet", [SETTINGS], indirect=True)
def test_zone_local_readers_during_compaction(fleet):
    topic, owner = compacted_topic(fleet, "compacted-zone")
    reader = next(b for b in fleet.brokers if b is not owner)
    rack = {"client.rack": ZONES[reader.broker_id]}

    replays, tailed = read_while_updating(bootstrap(fleet.brokers), topic, 15, **rack)
    committed = passes(owner)
    zone_bytes = metric_sum(scrape_metrics(reader.http_port), "strata_zone_fetch_bytes_total", topic=topic)
    print(f"{replays} replays and {len(tailed)} tailed records through broker "
          f"{reader.broker_id} ({zone_bytes:.0f} B) over {committed:.0f} passes of broker {owner.broker_id}")
    assert committed >= 2, f"passes committed while reading: {committed}"
    assert zone_bytes > 0, "the reads went through the zone's broker"


@pytest.mark.parametrize("fleet", [{**SETTINGS, "STRATA_LOG_CLEANER_IO_MAX_BYTES_PER_SECOND": "400000",
                                    "STRATA_ORPHAN_GRACE_MS": "3000",
                                    "STRATA_ORPHAN_CHECK_INTERVAL_MS": "1000"}], indirect=True)
def test_an_owner_paused_mid_pass_commits_nothing_and_leaves_no_garbage(fleet):
    topic, owner = compacted_topic(fleet, "compacted-paused")
    others = [b for b in fleet.brokers if b is not owner]
    rng = random.Random(11)
    keys = [b"k%04d" % k for k in range(2000)]
    acked = produce_all(bootstrap(fleet.brokers), topic,
                        [(rng.choice(keys), b"v%06d-" % i + b"z" * 300) for i in range(6000)],
                        **{"batch.size": 16384})

    def compacted_objects() -> set:
        return {k for k in owner.objects("segments") if re.search(r"-\d+-c\d+\.seg$", k)}

    # Pause once the owner has written objects of a pass it has not committed.
    deadline = time.monotonic() + 90
    while True:
        assert time.monotonic() < deadline, "no pass caught mid-write within 90 s"
        before, known = passes(owner), compacted_objects()
        time.sleep(0.05)
        fresh = compacted_objects() - known
        if fresh and passes(owner) == before:
            break
    os.kill(owner.pid, signal.SIGSTOP)
    try:
        others_bootstrap = bootstrap(others)
        wait_until(lambda: leaders(others_bootstrap, topic).get(0) in {b.broker_id for b in others},
                   LEASE_MS / 1000 + 30, "another broker to own the partition")
        time.sleep(LEASE_MS / 1000)
        paused_epoch = re.search(r"-(\d+)-c\d+\.seg$", next(iter(fresh))).group(1)
        seen_at_resume = compacted_objects()
    finally:
        os.kill(owner.pid, signal.SIGCONT)

    live = len({k for k, _ in acked.values()})
    wait_compacted(others_bootstrap, topic, acked, live, timeout=120)

    # The paused pass's objects, and any it wrote after waking, are deleted (by the
    # paused broker itself once its swap is refused, or by the orphan collector).
    def abandoned() -> set:
        late = {k for k in compacted_objects() - seen_at_resume
                if re.search(rf"-{paused_epoch}-c\d+\.seg$", k)}
        return (fresh | late) & compacted_objects()

    wait_until(lambda: not abandoned(), 60, "the paused pass's objects to be deleted")
    print(f"paused pass wrote {len(fresh)} objects before the pause; refused swaps on the paused "
          f"broker: {passes(owner, 'not_committed'):.0f}")
    # Still exactly the newest value of every key.
    wait_compacted(bootstrap(fleet.brokers), topic, acked, live, timeout=30)
