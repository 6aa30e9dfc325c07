"""Every advertised version of a few core APIs, over raw sockets.

Clients in the wild use old versions (kcat/librdkafka 2.0 and kafka-python pick
different ones than confluent-kafka 2.16), so each version the broker lists in
ApiVersions must decode, answer with a well-formed body, and keep the
connection open.
"""

import time

import pytest

from conftest import create_topic, producer, unique_topic
from test_bad_input import (API_METADATA, API_PRODUCE, API_VERSIONS, ERR_NONE, Reader, TAGS,
                            api_versions, compact_string, connect, frame, i8, i32, i64,
                            produce_partition_error, produce_request, record_batch_v2, recv_frame,
                            request_header, string, uvarint)

API_LIST_OFFSETS = 2


@pytest.fixture
def topic_with_data(broker):
    topic = unique_topic("ver")
    create_topic(broker.bootstrap, topic, 2)
    p = producer(broker.bootstrap)
    for i in range(3):
        p.produce(topic, value=f"v{i}".encode(), partition=0, timestamp=int(time.time() * 1000))
    assert p.flush(30) == 0
    return topic


def exchange(s, payload):
    s.sendall(frame(payload))
    return recv_frame(s)


def versions_of(broker, key):
    lo, hi = api_versions(broker)[key]
    return range(lo, hi + 1)


# ---------------------------------------------------------------------------
# ApiVersions
# ---------------------------------------------------------------------------

def test_api_versions_every_version(broker):
    with connect(broker) as s:
        for v in versions_of(broker, API_VERSIONS):
            flexible = v >= 3
            body = b""
            if flexible:
                body = compact_string("strata-tests") + compact_string("1.0") + TAGS
            resp = exchange(s, request_header(API_VERSIONS, v, 1000 + v, flexible=flexible) + body)
            r = Reader(resp)
            assert r.i32() == 1000 + v
            # ApiVersions responses always use header v0 (no tagged fields)
            assert r.i16() == ERR_NONE, f"ApiVersions v{v}"
            n = r.uvarint() - 1 if flexible else r.i32()
            keys = {}
            for _ in range(n):
                k, lo, hi = r.i16(), r.i16(), r.i16()
                if flexible:
                    r.skip_tags()
                keys[k] = (lo, hi)
            if v >= 1:
                r.i32()  # throttle_time_ms
            if flexible:
                r.skip_tags()
            assert r.remaining() == 0, f"ApiVersions v{v}: {r.remaining()} trailing bytes"
            assert keys[API_VERSIONS][1] >= v


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------

def metadata_request(v, corr):
    flexible = v >= 9
    hdr = request_header(API_METADATA, v, corr, flexible=flexible)
    if v == 0:
        body = i32(0)  # v0: an empty list means all topics
    elif flexible:
        body = uvarint(0)  # null: all topics
    else:
        body = i32(-1)
    if v >= 4:
        body += i8(0)  # allow_auto_topic_creation
    if 8 <= v <= 10:
        body += i8(0)  # include_cluster_authorized_operations
    if v >= 8:
        body += i8(0)  # include_topic_authorized_operations
    if flexible:
        body += TAGS
    return hdr + body


def parse_metadata(v, resp, corr):
    flexible = v >= 9
    r = Reader(resp)
    assert r.i32() == corr
    if flexible:
        r.skip_tags()

    def arr():
        return r.uvarint() - 1 if flexible else r.i32()

    def s():
        return r.compact_string() if flexible else r.string()

    if v >= 3:
        r.i32()  # throttle
    brokers = []
    for _ in range(arr()):
        node, host, port = r.i32(), s(), r.i32()
        if v >= 1:
            s()  # rack
        if flexible:
            r.skip_tags()
        brokers.append((node, host, port))
    if v >= 2:
        s()  # cluster id
    controller = r.i32() if v >= 1 else None
    topics = {}
    for _ in range(arr()):
        err, name = r.i16(), s()
        if v >= 10:
            r.take(16)  # topic id
        if v >= 1:
            r.i8()  # is_internal
        parts = {}
        for _ in range(arr()):
            perr, idx, leader = r.i16(), r.i32(), r.i32()
            if v >= 7:
                r.i32()  # leader epoch
            replicas = [r.i32() for _ in range(arr())]
            isr = [r.i32() for _ in range(arr())]
            if v >= 5:
                [r.i32() for _ in range(arr())]  # offline replicas
            if flexible:
                r.skip_tags()
            parts[idx] = (perr, leader, replicas, isr)
        if v >= 8:
            r.i32()  # topic authorized operations
        if flexible:
            r.skip_tags()
        topics[name] = (err, parts)
    if 8 <= v <= 10:
        r.i32()  # cluster authorized operations
    if flexible:
        r.skip_tags()
    assert r.remaining() == 0, f"Metadata v{v}: {r.remaining()} trailing bytes"
    return brokers, controller, topics


def test_metadata_every_version(broker, topic_with_data):
    with connect(broker) as s:
        for v in versions_of(broker, API_METADATA):
            resp = exchange(s, metadata_request(v, 2000 + v))
            brokers, controller, topics = parse_metadata(v, resp, 2000 + v)
            assert brokers == [(0, "127.0.0.1", broker.port)], f"Metadata v{v}: {brokers}"
            if v >= 1:
                assert controller == 0, f"Metadata v{v}: controller {controller}"
            assert topic_with_data in topics, f"Metadata v{v}: topics {sorted(topics)}"
            err, parts = topics[topic_with_data]
            assert err == ERR_NONE
            assert parts == {0: (0, 0, [0], [0]), 1: (0, 0, [0], [0])}, f"Metadata v{v}: {parts}"


# ---------------------------------------------------------------------------
# ListOffsets
# ---------------------------------------------------------------------------

def list_offsets_request(v, corr, topic, partition, timestamp):
    flexible = v >= 6
    hdr = request_header(API_LIST_OFFSETS, v, corr, flexible=flexible)
    body = i32(-1)  # replica id: consumer
    if v >= 2:
        body += i8(0)  # isolation level READ_UNCOMMITTED
    part = i32(partition)
    if v >= 4:
        part += i32(-1)  # current leader epoch: unknown
    part += i64(timestamp)
    if v == 0:
        part += i32(1)  # max_num_offsets
    if flexible:
        part += TAGS
        body += uvarint(2) + compact_string(topic) + uvarint(2) + part + TAGS
    else:
        body += i32(1) + string(topic) + i32(1) + part
    if v >= 10:
        body += i32(30000)  # timeout
    if flexible:
        body += TAGS
    return hdr + body


def parse_list_offsets(v, resp, corr):
    flexible = v >= 6
    r = Reader(resp)
    assert r.i32() == corr
    if flexible:
        r.skip_tags()
    if v >= 2:
        r.i32()  # throttle
    n_topics = r.uvarint() - 1 if flexible else r.i32()
    assert n_topics == 1
    r.compact_string() if flexible else r.string()
    n_parts = r.uvarint() - 1 if flexible else r.i32()
    assert n_parts == 1
    r.i32()
    err = r.i16()
    if v == 0:
        offsets = [r.i64() for _ in range(r.i32())]
        offset = offsets[0] if offsets else None
    else:
        r.i64()  # timestamp
        offset = r.i64()
        if v >= 4:
            r.i32()  # leader epoch
    if flexible:
        r.skip_tags()
        r.skip_tags()
        r.skip_tags()
    assert r.remaining() == 0, f"ListOffsets v{v}: {r.remaining()} trailing bytes"
    return err, offset


def test_list_offsets_every_version(broker, topic_with_data):
    problems = []
    for v in versions_of(broker, API_LIST_OFFSETS):
        with connect(broker) as s:  # one connection per version: a close only costs that one
            for ts, want in ((-2, 0), (-1, 3)):
                corr = 3000 + 10 * v + (ts + 2)
                try:
                    resp = exchange(s, list_offsets_request(v, corr, topic_with_data, 0, ts))
                except (ConnectionError, OSError) as e:
                    problems.append(f"ListOffsets v{v} timestamp {ts}: connection closed ({e})")
                    break
                err, offset = parse_list_offsets(v, resp, corr)
                if (err, offset) != (ERR_NONE, want):
                    problems.append(f"ListOffsets v{v} timestamp {ts}: error {err}, offset "
                                    f"{offset}, expected offset {want}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------
# Produce
# ---------------------------------------------------------------------------

def test_produce_every_version(broker, topic_with_data):
    expected = 3
    with connect(broker) as s:
        for v in versions_of(broker, API_PRODUCE):
            if v >= 13:
                continue  # topic ids instead of names; not spoken here
            batch = record_batch_v2([(b"k", f"produce-v{v}".encode(), [])],
                                    int(time.time() * 1000))
            resp = exchange(s, produce_request(v, 4000 + v, topic_with_data, 0, batch))
            assert int.from_bytes(resp[:4], "big", signed=True) == 4000 + v
            t, p, err, base = produce_partition_error(v, resp)
            assert (t, p, err, base) == (topic_with_data, 0, ERR_NONE, expected), f"Produce v{v}"
            expected += 1
