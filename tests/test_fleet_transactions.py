"""Transactions in a fleet (three brokers, one S3-compatible bucket, PostgreSQL), with
confluent-kafka.

A transaction spans partitions owned by different brokers, so its markers go to other
brokers (WriteTxnMarkers) and its produces are verified with a coordinator elsewhere
(AddPartitionsToTxn verify-only). The transaction's coordinator is stopped (SIGTERM, a
hand-off) while the transaction is open; the producer commits through the next
coordinator, which finds the transaction in the metadata store: read_committed
consumers see all of it, on every partition, or none of the aborted ones.
"""

import time

import pytest

from conftest import create_topic, unique_topic, wait_until
from test_bad_input import Reader, i8, request_header, roundtrip_request, string
from test_fleet import LEASE_MS, PARTITIONS, bootstrap, fleet, leaders  # noqa: F401  (fixture)
from test_postgres_metadata import postgres  # noqa: F401  (fixture)
from test_transactions import read_all, txn_producer

SETTINGS = {"STRATA_TRANSACTION_ABORT_TIMED_OUT_TRANSACTION_CLEANUP_INTERVAL_MS": "500"}


def coordinator_of(broker, txn_id: str) -> int:
    """The broker id FindCoordinator (v1, key type transaction) names, asking `broker`
    (-1 while none: COORDINATOR_NOT_AVAILABLE between owners)."""
    r = Reader(roundtrip_request(broker, request_header(10, 1, 3) + string(txn_id) + i8(1)))
    assert r.i32() == 3
    r.i32()  # throttle
    error = r.i16()
    r.string()
    node = r.i32()
    if error == 15:
        return -1
    assert error == 0, f"FindCoordinator error {error}"
    return node


@pytest.mark.parametrize("fleet", [SETTINGS], indirect=True)
def test_a_transaction_across_brokers_commits_through_a_coordinator_hand_off(fleet):
    brokers = {b.broker_id: b for b in fleet.brokers}
    topic = unique_topic("fleet-txn")
    create_topic(brokers[1].bootstrap, topic, PARTITIONS)
    wait_until(lambda: set(leaders(brokers[1].bootstrap, topic).values()) == {1, 2, 3}, 30,
               "the partitions to spread over the three brokers")
    servers = bootstrap(fleet.brokers)
    txn_id = unique_topic("tx")
    p = txn_producer(servers, txn_id, **{"transaction.timeout.ms": 60000})

    committed, aborted = [], []
    for n in range(4):
        p.begin_transaction()
        values = [f"{n}-{part}".encode() for part in range(PARTITIONS)]
        for part, v in enumerate(values):
            p.produce(topic, value=v, partition=part)
        assert p.flush(30) == 0
        if n % 2:
            p.abort_transaction(30)
            aborted.extend(values)
        else:
            p.commit_transaction(30)
            committed.extend(values)

    # Open a transaction on every partition, stop its coordinator, then commit.
    coordinator = coordinator_of(brokers[1], txn_id)
    p.begin_transaction()
    last = [f"handoff-{part}".encode() for part in range(PARTITIONS)]
    for part, v in enumerate(last):
        p.produce(topic, value=v, partition=part)
    assert p.flush(30) == 0
    brokers[coordinator].stop()
    survivors = [b for b in fleet.brokers if b.broker_id != coordinator]
    wait_until(lambda: coordinator_of(survivors[0], txn_id) not in (coordinator, -1), 30,
               "another broker to coordinate the transactional id")
    started = time.monotonic()
    p.commit_transaction(60)
    print(f"\nbroker {coordinator} coordinated the transaction; committed through broker "
          f"{coordinator_of(survivors[0], txn_id)} {time.monotonic() - started:.1f} s after its hand-off")
    committed.extend(last)

    survivor_servers = bootstrap(survivors)
    seen = read_all(survivor_servers, topic, PARTITIONS, "read_committed", expect=len(committed))
    values = sorted(v for _, _, v in seen)
    assert values == sorted(committed), \
        f"{len(values)} read, {len(set(values) & set(aborted))} aborted among them"
    everything = read_all(survivor_servers, topic, PARTITIONS, "read_uncommitted",
                          expect=len(committed) + len(aborted))
    assert sorted(v for _, _, v in everything) == sorted(committed + aborted)
