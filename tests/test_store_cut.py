"""A broker cut off from the object store, but not from PostgreSQL, steps down.

Three brokers share one S3 bucket (moto) and one PostgreSQL; broker 1 reaches the bucket
through a proxy (faulty_proxy.py) that can swallow every request. Under an idempotent
`acks=all` load, the proxy stalls everything for longer than a lease: broker 1 still
renews its leases, so only its own verdict on the store can move its partitions. Every
partition must take writes again on the other brokers within lease + deadline + 2 s. When
the proxy heals, no partition moves back before the hold-down; after it, broker 1 gets
its share back. Nothing acknowledged is lost, duplicated or reordered.
"""

import signal
import os
import time

import pytest

from conftest import Broker, create_topic, scrape_metrics, metric_sum, unique_topic, wait_ready, wait_until
from faulty_proxy import FaultyProxy
from test_fleet import PARTITIONS, Load, bootstrap, leaders, verify, wait_led_by
from test_postgres_metadata import postgres  # noqa: F401  (fixture)

LEASE_MS = 2000
DEADLINE_MS = 3000
HOLD_DOWN_MS = 10000


@pytest.fixture
def cut_fleet(tmp_path, strata_bin, postgres):  # noqa: F811
    from s3 import s3_server
    server = s3_server()
    bucket = server.new_bucket()
    proxy = FaultyProxy(server.port)
    brokers = []
    try:
        for i, zone in [(1, "zone-a"), (2, "zone-b"), (3, "zone-c")]:
            env = {"STRATA_ZONE": zone, "STRATA_BROKER_LEASE_MS": str(LEASE_MS),
                   "STRATA_WAL_FLUSH_TIMEOUT_MS": "2000",
                   "STRATA_STORE_UNREACHABLE_TIMEOUT_MS": str(DEADLINE_MS),
                   "STRATA_OWNERSHIP_HOLD_DOWN_MS": str(HOLD_DOWN_MS),
                   # A stalled request is abandoned quickly, so nothing waits on it long.
                   "STRATA_OBJECT_STORE_REQUEST_TIMEOUT_MS": "1000"}
            b = Broker(tmp_path / f"b{i}", name=f"b{i}", binary=strata_bin, store="s3",
                       bucket=bucket, metadata=postgres["STRATA_TEST_POSTGRES_URL"],
                       broker_id=i, env=env)
            if i == 1:
                b.extra_env["AWS_ENDPOINT_URL"] = proxy.endpoint
            b.start()
            wait_ready(b.http_port)
            brokers.append(b)
        yield brokers, proxy
    finally:
        proxy.set_faults()
        proxy.stall_release.set()
        for b in brokers:
            if b.alive():
                try:
                    os.kill(b.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            b.close()
        proxy.close()


def test_a_broker_cut_off_from_the_object_store_steps_down(cut_fleet):
    brokers, proxy = cut_fleet
    b1, b2, b3 = brokers
    topic = unique_topic("cut")
    create_topic(b2.bootstrap, topic, PARTITIONS)
    led = wait_led_by(b2.bootstrap, topic, {1, 2, 3})
    cut_parts = {p for p, leader in led.items() if leader == 1}
    load = Load(bootstrap(brokers), topic).start()
    try:
        wait_until(lambda: len(load.acked) > 500, 30, "the load to run")
        proxy.set_faults(stall=1.0)
        cut = time.monotonic()
        # Writes sent after the cut and acknowledged can only have been committed by
        # the others: broker 1 cannot write a write-ahead object.
        bound = (LEASE_MS + DEADLINE_MS) / 1000 + 2
        wait_until(lambda: load.acked_after(cut + 0.5, cut_parts) == cut_parts, bound + 20,
                   "the cut broker's partitions to take writes elsewhere")
        moved_after = time.monotonic() - cut
        print(f"\nstore cut: every partition of the cut broker took writes again after "
              f"{moved_after:.1f} s (lease {LEASE_MS / 1000:.0f} s + deadline {DEADLINE_MS / 1000:.0f} s)")
        assert moved_after <= bound, f"took {moved_after:.1f} s, more than lease + deadline + 2 s"
        m1 = scrape_metrics(b1.http_port)
        assert metric_sum(m1, "strata_broker_stepped_down") == 1
        assert metric_sum(m1, "strata_store_reachable", store="object") == 0
        assert metric_sum(m1, "strata_partitions") == 0
        assert set(wait_led_by(b2.bootstrap, topic, {2, 3}).values()) == {2, 3}
        # Two leases into the cut, heal it: nothing moves back during the hold-down.
        time.sleep(max(0.0, 2 * LEASE_MS / 1000 - (time.monotonic() - cut)))
        proxy.set_faults()
        proxy.stall_release.set()
        healed = time.monotonic()
        while time.monotonic() - healed < HOLD_DOWN_MS / 1000 - 1:
            current = leaders(b2.bootstrap, topic)
            assert 1 not in current.values(), \
                f"a partition moved back {time.monotonic() - healed:.1f} s after the heal, inside the hold-down"
            time.sleep(0.5)
        wait_led_by(b2.bootstrap, topic, {1, 2, 3}, timeout=30)
        print(f"after the heal, broker 1 led partitions again {time.monotonic() - healed:.1f} s later "
              f"(hold-down {HOLD_DOWN_MS / 1000:.0f} s)")
        time.sleep(2)
    finally:
        load.stop()
    verify(load, b2.bootstrap)
