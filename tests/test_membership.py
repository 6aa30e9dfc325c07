"""Membership: brokers sharing one metadata store (a real PostgreSQL) register with a
heartbeat lease; Metadata and DescribeCluster list the live ones with their zones; a
broker killed with SIGKILL leaves the list once its lease expires, one stopped
gracefully leaves at once, and a restarted one comes back."""

import time

from confluent_kafka.admin import AdminClient

from conftest import Broker, wait_until
from test_postgres_metadata import postgres  # noqa: F401  (fixture)

LEASE_MS = 2000


def listed(bootstrap: str) -> dict[int, tuple[str, int]]:
    """Broker id -> (host, port) from a real client's Metadata request."""
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    return {b.id: (b.host, b.port) for b in md.brokers.values()}


def racks(bootstrap: str) -> dict[int, str | None]:
    """Broker id -> rack (zone) from DescribeCluster."""
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until the answer
    desc = admin.describe_cluster(request_timeout=10).result(15)
    return {n.id: n.rack for n in desc.nodes}


def test_brokers_register_expire_and_leave(tmp_path, strata_bin, postgres):  # noqa: F811
    url = postgres["STRATA_TEST_POSTGRES_URL"]
    brokers = []
    try:
        # Broker 3's lease is a minute: only deregistration can take it off the list soon.
        for i, zone, lease in [(1, "zone-a", LEASE_MS), (2, "zone-b", LEASE_MS), (3, "zone-c", 60_000)]:
            b = Broker(tmp_path / f"b{i}", name=f"b{i}", binary=strata_bin, metadata=url,
                       broker_id=i, env={"STRATA_ZONE": zone, "STRATA_BROKER_LEASE_MS": str(lease)})
            b.start()
            brokers.append(b)
        b1, b2, b3 = brokers
        # Every broker lists all three, each at its advertised address and zone.
        want = {b.port: i for i, b in zip((1, 2, 3), brokers)}
        # The client may send its Metadata request to any broker it has learnt of, and a
        # broker sees a newcomer at its next refresh (within a second): each answer is
        # waited for, not taken once.
        for b in brokers:
            wait_until(lambda b=b: {port: i for i, (_, port) in listed(b.bootstrap).items()} == want,
                       10, f"{b.name} to list all brokers at their addresses")
        assert racks(b1.bootstrap) == {1: "zone-a", 2: "zone-b", 3: "zone-c"}

        # SIGKILL: listed until the lease runs out, then gone.
        b2.kill9()
        killed = time.monotonic()
        wait_until(lambda: 2 not in listed(b1.bootstrap), LEASE_MS / 1000 * 3 + 5, "the killed broker to expire")
        assert time.monotonic() - killed >= LEASE_MS / 1000 / 3, "gone before its lease could have run out"

        # SIGTERM: deregisters on the way out; the others drop it at their next heartbeat
        # instead of waiting out its minute-long lease.
        b3.stop()
        wait_until(lambda: set(listed(b1.bootstrap)) == {1}, 20, "the stopped broker to leave")

        # A restarted broker registers again under a new session.
        b2.start()
        wait_until(lambda: set(listed(b1.bootstrap)) == {1, 2}, 10, "the restarted broker to be listed")
    finally:
        for b in brokers:
            b.close()
