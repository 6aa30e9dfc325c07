"""A broker cut off from one of its stores steps down, and does not come straight back.

Three brokers share one S3 bucket (moto) and one PostgreSQL; broker 1 reaches the bucket
through an HTTP proxy (faulty_proxy.py) and PostgreSQL through a TCP proxy (tcp_proxy.py),
each of which can swallow everything, as a network partition does. Under an idempotent
`acks=all` load, one path of broker 1 is cut for longer than a lease. Every partition must
take writes again on the other brokers within lease + deadline + 2 s. When the path heals,
no partition moves back before the hold-down; after it, broker 1 gets its share back.
Nothing acknowledged is lost, duplicated or reordered.
"""

import time
from types import SimpleNamespace

import pytest

from conftest import Broker, create_topic, metric_sum, scrape_metrics, unique_topic, wait_ready, wait_until
from faulty_proxy import FaultyProxy
from test_bad_input import Reader, i32, request_header, roundtrip_request, string
from tcp_proxy import TcpProxy
from test_fleet import PARTITIONS, Load, bootstrap, leaders, verify, wait_led_by
from test_postgres_metadata import postgres  # noqa: F401  (fixture)

LEASE_MS = 2000
DEADLINE_MS = 3000
HOLD_DOWN_MS = 10000


SETTINGS = {"STRATA_BROKER_LEASE_MS": str(LEASE_MS), "STRATA_WAL_FLUSH_TIMEOUT_MS": "2000",
            "STRATA_STORE_UNREACHABLE_TIMEOUT_MS": str(DEADLINE_MS),
            "STRATA_OWNERSHIP_HOLD_DOWN_MS": str(HOLD_DOWN_MS),
            # A stalled request is abandoned quickly, so nothing waits on it long.
            "STRATA_OBJECT_STORE_REQUEST_TIMEOUT_MS": "1000",
            "STRATA_METADATA_REQUEST_TIMEOUT_MS": "2000"}


@pytest.fixture
def cut_fleet(tmp_path, strata_bin, postgres):  # noqa: F811
    """Brokers 1-3 on one bucket and one PostgreSQL; broker 1 reaches the bucket through
    an HTTP proxy and PostgreSQL through a TCP proxy, either of which can be cut."""
    from s3 import s3_server
    server = s3_server()
    bucket = server.new_bucket()
    s3_proxy = FaultyProxy(server.port)
    url = postgres["STRATA_TEST_POSTGRES_URL"]
    pg_port = int(url.rsplit(":", 1)[1].split("/")[0])
    pg_proxy = TcpProxy(pg_port)
    brokers = []
    try:
        for i, zone in [(1, "zone-a"), (2, "zone-b"), (3, "zone-c")]:
            metadata = url.replace(f":{pg_port}/", f":{pg_proxy.port}/") if i == 1 else url
            b = Broker(tmp_path / f"b{i}", name=f"b{i}", binary=strata_bin, store="s3",
                       bucket=bucket, metadata=metadata, broker_id=i,
                       env={"STRATA_ZONE": zone, **SETTINGS})
            if i == 1:
                b.extra_env["AWS_ENDPOINT_URL"] = s3_proxy.endpoint
            b.start()
            wait_ready(b.http_port)
            brokers.append(b)
        yield SimpleNamespace(brokers=brokers, s3=s3_proxy, pg=pg_proxy)
    finally:
        s3_proxy.set_faults()
        s3_proxy.stall_release.set()
        pg_proxy.heal()
        for b in brokers:
            b.close()
        s3_proxy.close()
        pg_proxy.close()


def metadata_of(broker, topic: str) -> tuple[set[int], dict[int, int]]:
    """The brokers listed and each partition's leader in one broker's own Metadata v1
    answer (a client library would ask whichever broker it likes)."""
    corr = 7
    body = request_header(3, 1, corr) + i32(1) + string(topic)
    r = Reader(roundtrip_request(broker, body))
    assert r.i32() == corr
    brokers = set()
    for _ in range(r.i32()):
        brokers.add(r.i32())
        r.string()
        r.i32()
        r.string()
    r.i32()  # controller
    leaders = {}
    for _ in range(r.i32()):
        r.i16(), r.string(), r.i8()
        for _ in range(r.i32()):
            r.i16()
            partition, leader = r.i32(), r.i32()
            leaders[partition] = leader
            for _ in range(2):  # replicas, isr
                for _ in range(r.i32()):
                    r.i32()
    return brokers, leaders


def cut_and_heal(fleet, cut, heal, what: str) -> None:
    """Cuts broker 1 off (`cut`), checks its partitions take writes elsewhere within
    lease + deadline + 2 s, heals it two leases into the cut, checks nothing moves back
    during the hold-down and that it gets its share afterwards; nothing acknowledged is
    lost."""
    b1, b2, b3 = fleet.brokers
    topic = unique_topic("cut")
    create_topic(b2.bootstrap, topic, PARTITIONS)
    led = wait_led_by(b2.bootstrap, topic, {1, 2, 3})
    cut_parts = {p for p, leader in led.items() if leader == 1}
    load = Load(bootstrap(fleet.brokers), topic).start()
    try:
        wait_until(lambda: len(load.acked) > 500, 30, "the load to run")
        cut()
        started = time.monotonic()
        # Writes acknowledged after the cut can only have been committed by the others:
        # broker 1 can commit nothing.
        bound = (LEASE_MS + DEADLINE_MS) / 1000 + 2
        try:
            wait_until(lambda: load.acked_after(started + 0.5, cut_parts) == cut_parts, bound + 20,
                       "the cut broker's partitions to take writes elsewhere")
        except AssertionError:
            # Say which partitions are stuck and who leads them, for the failure report.
            missing = cut_parts - load.acked_after(started + 0.5, cut_parts)
            print(f"\nno writes since the cut on partitions {sorted(missing)}; "
                  f"load errors {load.errors[-10:]}, {load.sent} sent, {len(load.acked)} acknowledged")
            for b in (b2, b3):
                led = leaders(b.bootstrap, topic)
                owned = metric_sum(scrape_metrics(b.http_port), "strata_partitions")
                print(f"{b.name} names leaders {({p: led.get(p) for p in missing})} and owns {owned:.0f}")
            raise
        moved_after = time.monotonic() - started
        print(f"\n{what} cut: every partition of the cut broker took writes again after "
              f"{moved_after:.1f} s (lease {LEASE_MS / 1000:.0f} s + deadline {DEADLINE_MS / 1000:.0f} s)")
        assert moved_after <= bound, f"took {moved_after:.1f} s, more than lease + deadline + 2 s"
        wait_until(lambda: metric_sum(scrape_metrics(b1.http_port), "strata_broker_stepped_down") == 1,
                   10, "the cut broker to step down")
        m1 = scrape_metrics(b1.http_port)
        assert metric_sum(m1, "strata_store_reachable", store=what) == 0
        assert metric_sum(m1, "strata_partitions") == 0
        now_led = wait_led_by(b2.bootstrap, topic, {2, 3})
        # Clients still asking broker 1 are sent where its partitions went: it names
        # its peers and the same leaders the others do, never "no leader".
        brokers, named = metadata_of(b1, topic)
        assert {2, 3} <= brokers, f"broker 1 lists only brokers {sorted(brokers)}"
        assert named == now_led, f"broker 1 names {named}, the others {now_led}"
        # Two leases into the cut, heal it: nothing moves back during the hold-down.
        time.sleep(max(0.0, 2 * LEASE_MS / 1000 - (time.monotonic() - started)))
        heal()
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


def test_a_broker_cut_off_from_the_object_store_steps_down(cut_fleet):
    # It still renews its leases: only its own verdict on the store moves its partitions.
    def heal():
        cut_fleet.s3.set_faults()
        cut_fleet.s3.stall_release.set()

    cut_and_heal(cut_fleet, lambda: cut_fleet.s3.set_faults(stall=1.0), heal, "object")


def test_a_broker_cut_off_from_postgres_steps_down(cut_fleet):
    # Its leases run out and the others take over; on the way back it must not take
    # its partitions straight back.
    cut_and_heal(cut_fleet, cut_fleet.pg.cut, cut_fleet.pg.heal, "metadata")
