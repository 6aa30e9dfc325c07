"""Hostile and malformed input on the Kafka port, over raw sockets.

After every case the broker process must still be alive, its RSS must stay
small, and a confluent-kafka client must still complete a produce/consume
round trip.
"""

import socket
import struct
import time

import crc32c
import pytest

from conftest import create_topic, consume_all, roundtrip, unique_topic

MAX_RSS_KB = 500 * 1024
CLOSE_TIMEOUT_S = 5.0

API_PRODUCE = 0
API_METADATA = 3
API_VERSIONS = 18

ERR_NONE = 0
ERR_CORRUPT_MESSAGE = 2
ERR_UNSUPPORTED_VERSION = 35


# ---------------------------------------------------------------------------
# tiny Kafka wire encoder/decoder
# ---------------------------------------------------------------------------

def i8(v): return struct.pack(">b", v)
def i16(v): return struct.pack(">h", v)
def i32(v): return struct.pack(">i", v)
def u32(v): return struct.pack(">I", v)
def i64(v): return struct.pack(">q", v)


def uvarint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def varint(v):  # zigzag
    return uvarint((v << 1) ^ (v >> 63))


def string(s):
    if s is None:
        return i16(-1)
    b = s.encode()
    return i16(len(b)) + b


def compact_string(s):
    if s is None:
        return uvarint(0)
    b = s.encode()
    return uvarint(len(b) + 1) + b


def compact_bytes(b):
    return uvarint(0) if b is None else uvarint(len(b) + 1) + b


def nbytes(b):
    return i32(-1) if b is None else i32(len(b)) + b


TAGS = uvarint(0)  # empty tagged-field section


def request_header(api_key, api_version, corr, client_id="strata-bad-input", flexible=False):
    h = i16(api_key) + i16(api_version) + i32(corr) + string(client_id)
    return h + TAGS if flexible else h


def frame(payload):
    return i32(len(payload)) + payload


class Reader:
    def __init__(self, data):
        self.d, self.o = data, 0

    def take(self, n):
        if self.o + n > len(self.d):
            raise ValueError(f"short read: need {n} at {self.o}, have {len(self.d)}")
        v = self.d[self.o:self.o + n]
        self.o += n
        return v

    def i8(self): return struct.unpack(">b", self.take(1))[0]
    def i16(self): return struct.unpack(">h", self.take(2))[0]
    def i32(self): return struct.unpack(">i", self.take(4))[0]
    def i64(self): return struct.unpack(">q", self.take(8))[0]

    def uvarint(self):
        shift = result = 0
        while True:
            b = self.take(1)[0]
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    def string(self):
        n = self.i16()
        return None if n < 0 else self.take(n).decode()

    def compact_string(self):
        n = self.uvarint()
        return None if n == 0 else self.take(n - 1).decode()

    def skip_tags(self):
        for _ in range(self.uvarint()):
            self.uvarint()
            self.take(self.uvarint())

    def remaining(self):
        return len(self.d) - self.o


def connect(broker, timeout=10.0):
    s = socket.create_connection((broker.host, broker.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def send_quietly(s, data):
    """sendall that tolerates the broker closing the connection meanwhile."""
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_frame(s):
    (n,) = struct.unpack(">i", recv_exact(s, 4))
    assert 0 <= n < 64 * 1024 * 1024, f"implausible response length {n}"
    return recv_exact(s, n)


def roundtrip_request(broker, payload, timeout=10.0):
    with connect(broker, timeout) as s:
        s.sendall(frame(payload))
        return recv_frame(s)


def wait_closed_by_broker(s, timeout=CLOSE_TIMEOUT_S):
    """True if the broker closes (FIN or RST) the connection within `timeout`.

    Any bytes it sends first (e.g. an error response) are read and ignored."""
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            s.settimeout(max(0.05, deadline - time.monotonic()))
            if s.recv(65536) == b"":
                return True
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        return True
    except socket.timeout:
        return False
    return False


def closed_or_answered(s, corr, timeout=10.0):
    """Broker either closes the connection or sends a response frame with our
    correlation id; returns 'closed' or 'answered'. Fails if it just hangs."""
    s.settimeout(timeout)
    try:
        head = s.recv(4)
        if head == b"":
            return "closed"
        while len(head) < 4:
            more = s.recv(4 - len(head))
            if not more:
                return "closed"
            head += more
        (n,) = struct.unpack(">i", head)
        body = recv_exact(s, min(n, 8))
        (rcorr,) = struct.unpack(">i", body[:4])
        assert rcorr == corr, f"response carries correlation id {rcorr}, sent {corr}"
        return "answered"
    except (ConnectionResetError, BrokenPipeError, ConnectionError):
        return "closed"
    except socket.timeout:
        pytest.fail(f"broker neither answered nor closed the connection within {timeout}s")


def api_versions(broker):
    """{api_key: (min, max)} from an ApiVersions v0 exchange."""
    body = roundtrip_request(broker, request_header(API_VERSIONS, 0, 1))
    r = Reader(body)
    assert r.i32() == 1
    assert r.i16() == ERR_NONE
    out = {}
    for _ in range(r.i32()):
        k, lo, hi = r.i16(), r.i16(), r.i16()
        out[k] = (lo, hi)
    return out


def assert_healthy(broker):
    assert broker.alive(), f"broker died (exit code {broker.proc.returncode})"
    rss = broker.rss_kb()
    assert rss < MAX_RSS_KB, f"broker RSS {rss} kB exceeds {MAX_RSS_KB} kB"
    roundtrip(broker.bootstrap)
    assert broker.alive()


# ---------------------------------------------------------------------------
# record batch v2
# ---------------------------------------------------------------------------

def record_v2(offset_delta, ts_delta, key, value, headers=()):
    body = i8(0) + varint(ts_delta) + varint(offset_delta)
    body += varint(-1) if key is None else varint(len(key)) + key
    body += varint(-1) if value is None else varint(len(value)) + value
    body += varint(len(headers))
    for hk, hv in headers:
        hkb = hk.encode()
        body += varint(len(hkb)) + hkb
        body += varint(-1) if hv is None else varint(len(hv)) + hv
    return varint(len(body)) + body


def record_batch_v2(records, base_ts):
    """records: list of (key, value, headers). Uncompressed, no producer id."""
    recs = b"".join(record_v2(i, 0, k, v, h) for i, (k, v, h) in enumerate(records))
    after_crc = (i16(0)                       # attributes
                 + i32(len(records) - 1)      # lastOffsetDelta
                 + i64(base_ts) + i64(base_ts)
                 + i64(-1) + i16(-1) + i32(-1)  # producerId, epoch, baseSequence
                 + i32(len(records)) + recs)
    crc = crc32c.crc32c(after_crc)
    after_len = i32(-1) + i8(2) + u32(crc) + after_crc  # partitionLeaderEpoch, magic, crc
    return i64(0) + i32(len(after_len)) + after_len


def produce_request(version, corr, topic, partition, batch, acks=-1):
    flexible = version >= 9
    hdr = request_header(API_PRODUCE, version, corr, flexible=flexible)
    if flexible:
        body = (compact_string(None) + i16(acks) + i32(30000)
                + uvarint(2) + compact_string(topic)
                + uvarint(2) + i32(partition) + compact_bytes(batch) + TAGS
                + TAGS + TAGS)
    else:
        body = (string(None) + i16(acks) + i32(30000)
                + i32(1) + string(topic)
                + i32(1) + i32(partition) + nbytes(batch))
    return hdr + body


def produce_partition_error(version, body):
    """(topic, partition, error_code, base_offset) of the first partition response."""
    r = Reader(body)
    r.i32()  # correlation id
    if version >= 9:
        r.skip_tags()
        r.uvarint()
        topic = r.compact_string()
        r.uvarint()
    else:
        r.i32()
        topic = r.string()
        r.i32()
    part = r.i32()
    err = r.i16()
    base = r.i64()
    return topic, part, err, base


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------

def test_garbage_bytes(broker):
    # length prefix 0xdeadbeef (negative as int32) followed by junk
    with connect(broker) as s:
        send_quietly(s, bytes.fromhex("deadbeef") + bytes(range(256)) * 4)
        assert wait_closed_by_broker(s), "broker kept a connection open after a negative frame length"
    # sane length, but the header is garbage (api key -1, version -1, ...)
    with connect(broker) as s:
        send_quietly(s, i32(16) + b"\xff" * 16)
        assert wait_closed_by_broker(s), "broker kept a connection open after a garbage header"
    # plain text
    with connect(broker) as s:
        send_quietly(s, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert wait_closed_by_broker(s), "broker kept a connection open after an HTTP request"
    assert_healthy(broker)


def test_two_gib_frame_is_rejected_without_allocating(broker):
    rss_before = broker.rss_kb()
    with connect(broker) as s:
        send_quietly(s, b"\x7f\xff\xff\xff" + request_header(API_VERSIONS, 0, 7))
        send_quietly(s, b"\x00" * 65536)
        assert wait_closed_by_broker(s), "broker kept reading a 2 GiB frame instead of closing"
    rss_after = broker.rss_kb()
    assert rss_after - rss_before < 256 * 1024, f"RSS grew from {rss_before} kB to {rss_after} kB"
    assert_healthy(broker)


def test_many_large_frame_headers(broker):
    # several connections each announcing ~1 GiB: the broker must not reserve memory for them
    socks = []
    try:
        for _ in range(8):
            s = connect(broker)
            send_quietly(s, i32(1 << 30) + request_header(API_VERSIONS, 0, 1))
            socks.append(s)
        time.sleep(0.5)
        assert broker.alive()
        assert broker.rss_kb() < MAX_RSS_KB
    finally:
        for s in socks:
            s.close()
    assert_healthy(broker)


@pytest.mark.parametrize("how", ["half-close", "close"])
def test_truncated_request(broker, how):
    payload = request_header(API_VERSIONS, 0, 3)  # 10+ bytes; frame claims 100
    with connect(broker) as s:
        s.sendall(i32(100) + payload[:10])
        if how == "half-close":
            s.shutdown(socket.SHUT_WR)
            assert wait_closed_by_broker(s), "broker did not close after EOF in the middle of a frame"
    assert_healthy(broker)


def test_unknown_api_key(broker):
    with connect(broker) as s:
        s.sendall(frame(request_header(9999, 0, 42) + b"\x00" * 8))
        closed_or_answered(s, 42)
    # the broker stays usable on a fresh connection
    assert api_versions(broker)[API_VERSIONS][0] == 0
    assert_healthy(broker)


def test_api_versions_unsupported_version(broker):
    # header v2 (flexible) plus a v3-style body; version 99 does not exist
    payload = (request_header(API_VERSIONS, 99, 12345, flexible=True)
               + compact_string("strata-tests") + compact_string("1.0") + TAGS)
    body = roundtrip_request(broker, payload)
    r = Reader(body)
    assert r.i32() == 12345, "correlation id"
    err = r.i16()
    assert err == ERR_UNSUPPORTED_VERSION, f"error code {err}, expected 35 UNSUPPORTED_VERSION"
    # the body must be in v0 format: error code + [api_key, min, max] and nothing else
    n = r.i32()
    assert 0 <= n < 1000, f"api_keys array length {n}"
    keys = {}
    for _ in range(n):
        k, lo, hi = r.i16(), r.i16(), r.i16()
        keys[k] = (lo, hi)
    assert r.remaining() == 0, f"{r.remaining()} trailing bytes: response body is not v0 format"
    assert API_VERSIONS in keys, "ApiVersions response must list ApiVersions itself"
    assert_healthy(broker)


def test_api_versions_lists_supported_apis(broker):
    keys = api_versions(broker)
    # Produce, Fetch, ListOffsets, Metadata, OffsetForLeaderEpoch, CreateTopics, DeleteTopics,
    # DeleteRecords, InitProducerId, DescribeConfigs, AlterConfigs, CreatePartitions,
    # IncrementalAlterConfigs, DescribeCluster, ApiVersions
    for k in (0, 1, 2, 3, 18, 19, 20, 21, 22, 23, 32, 33, 37, 44, 60):
        assert k in keys, f"api key {k} missing from ApiVersions: {sorted(keys)}"
        lo, hi = keys[k]
        assert 0 <= lo <= hi, f"api key {k}: bad range {lo}..{hi}"


def pick_produce_version(broker):
    lo, hi = api_versions(broker)[API_PRODUCE]
    for v in (9, 8, 7, 3, 10, 11, 12):  # not 13+: those address topics by id
        if lo <= v <= hi:
            return v
    pytest.fail(f"broker supports Produce {lo}..{hi} only; test speaks 3..12")


def test_produce_corrupt_crc(broker):
    topic = unique_topic("crc")
    create_topic(broker.bootstrap, topic, 1)
    version = pick_produce_version(broker)
    ts = int(time.time() * 1000)

    good = record_batch_v2([(b"k0", b"good value", [("h", b"1")])], ts)
    resp = roundtrip_request(broker, produce_request(version, 100, topic, 0, good))
    t, p, err, base = produce_partition_error(version, resp)
    assert (t, p, err, base) == (topic, 0, ERR_NONE, 0), "a valid hand-built batch was rejected"

    bad = bytearray(record_batch_v2([(b"k1", b"corrupted value", [])], ts))
    bad[-3] ^= 0x55  # flip bits inside the record's value, covered by the CRC
    resp = roundtrip_request(broker, produce_request(version, 101, topic, 0, bytes(bad)))
    t, p, err, _ = produce_partition_error(version, resp)
    assert (t, p) == (topic, 0)
    assert err == ERR_CORRUPT_MESSAGE, f"error code {err}, expected 2 CORRUPT_MESSAGE"

    # corrupt the CRC field itself
    bad = bytearray(record_batch_v2([(b"k2", b"bad crc", [])], ts))
    bad[17] ^= 0xFF
    resp = roundtrip_request(broker, produce_request(version, 102, topic, 0, bytes(bad)))
    assert produce_partition_error(version, resp)[2] == ERR_CORRUPT_MESSAGE

    # only the valid record made it into the log
    msgs = consume_all(broker.bootstrap, topic, 1)
    assert [(m.offset(), m.key(), m.value()) for m in msgs] == [(0, b"k0", b"good value")]
    assert_healthy(broker)


def test_produce_truncated_batch(broker):
    topic = unique_topic("trunc")
    create_topic(broker.bootstrap, topic, 1)
    version = pick_produce_version(broker)
    batch = record_batch_v2([(b"k", b"v" * 100, [])], int(time.time() * 1000))
    with connect(broker) as s:
        s.sendall(frame(produce_request(version, 103, topic, 0, batch[:-40])))
        state = closed_or_answered(s, 103)
    if state == "answered":
        msgs = consume_all(broker.bootstrap, topic, 1)
        assert msgs == [], "a truncated batch was appended to the log"
    assert_healthy(broker)


@pytest.mark.parametrize("count", [-2, -1000, 0x7FFFFFFF], ids=["minus2", "minus1000", "int32max"])
def test_metadata_bad_array_length(broker, count):
    # Metadata v1 (non-flexible): topics array length; -1 means null ("all topics") and is legal,
    # other negative lengths and absurd lengths with no data behind them are not
    with connect(broker) as s:
        s.sendall(frame(request_header(API_METADATA, 1, 77) + i32(count)))
        closed_or_answered(s, 77)
    assert broker.rss_kb() < MAX_RSS_KB
    assert_healthy(broker)


def test_metadata_bad_compact_array_length(broker):
    # Metadata v9 (flexible): compact array length as a huge unsigned varint
    with connect(broker) as s:
        s.sendall(frame(request_header(API_METADATA, 9, 78, flexible=True)
                        + uvarint(0xFFFFFFFF) + b"\x00\x00\x00"))
        closed_or_answered(s, 78)
    assert broker.rss_kb() < MAX_RSS_KB
    assert_healthy(broker)


def test_metadata_string_length_past_end(broker):
    # one topic whose name claims 30000 bytes, with 3 bytes present
    with connect(broker) as s:
        s.sendall(frame(request_header(API_METADATA, 1, 79) + i32(1) + i16(30000) + b"abc"))
        closed_or_answered(s, 79)
    assert_healthy(broker)


def test_pipelined_requests_answered_in_order(broker):
    """Many requests in one write: responses come back in order (correlation ids)."""
    with connect(broker) as s:
        s.sendall(b"".join(frame(request_header(API_VERSIONS, 0, corr)) for corr in range(50)))
        for corr in range(50):
            body = recv_frame(s)
            assert struct.unpack(">i", body[:4])[0] == corr
    assert_healthy(broker)
