"""kcat (librdkafka CLI) against Strata."""

import shutil
import subprocess

import pytest

from conftest import create_topic, unique_topic

KCAT = shutil.which("kcat") or shutil.which("kafkacat")
pytestmark = pytest.mark.skipif(KCAT is None, reason="kcat not installed (tests/run installs it)")


def kcat(*args, input=None, timeout=60):
    res = subprocess.run([KCAT, *args], input=input, capture_output=True, timeout=timeout,
                         stdin=None if input is not None else subprocess.DEVNULL)
    assert res.returncode == 0, (
        f"kcat {' '.join(args)} exited {res.returncode}\nstderr:\n"
        f"{res.stderr.decode(errors='replace')[-4000:]}")
    return res


@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4", "zstd"])
def test_kcat_produce_consume_with_keys_and_headers(module_broker, codec):
    bs = module_broker.bootstrap
    topic = unique_topic(f"kcat-{codec}")
    create_topic(bs, topic, 1)
    lines = [f"key{i}:value {i} {'z' * (i % 13)}" for i in range(200)]
    kcat("-b", bs, "-P", "-t", topic, "-p", "0", "-K:", "-z", codec,
         "-X", "acks=all", "-X", "enable.idempotence=true",
         "-H", "h1=v1", "-H", "trace=abc=def",
         input=("\n".join(lines) + "\n").encode())

    res = kcat("-b", bs, "-C", "-t", topic, "-p", "0", "-e", "-o", "beginning", "-q",
               "-f", "%k|%s|%h|%o\n")
    out = res.stdout.decode().splitlines()
    expected = []
    for i, line in enumerate(lines):
        k, v = line.split(":", 1)
        expected.append(f"{k}|{v}|h1=v1,trace=abc=def|{i}")
    assert out == expected


def test_kcat_metadata_lists_topic(module_broker):
    bs = module_broker.bootstrap
    topic = unique_topic("kcat-meta")
    create_topic(bs, topic, 3)
    res = kcat("-b", bs, "-L")
    out = res.stdout.decode()
    assert f'topic "{topic}" with 3 partitions:' in out, out
    assert f"broker 0 at 127.0.0.1:{module_broker.port}" in out, out
    res = kcat("-b", bs, "-L", "-t", topic)
    out = res.stdout.decode()
    for p in range(3):
        assert f"partition {p}, leader 0, replicas: 0, isrs: 0" in out, out


def test_kcat_consume_from_offset(module_broker):
    bs = module_broker.bootstrap
    topic = unique_topic("kcat-off")
    create_topic(bs, topic, 1)
    kcat("-b", bs, "-P", "-t", topic, "-p", "0", input=b"".join(b"m%d\n" % i for i in range(10)))
    res = kcat("-b", bs, "-C", "-t", topic, "-p", "0", "-o", "7", "-e", "-q", "-f", "%o:%s\n")
    assert res.stdout.decode().splitlines() == ["7:m7", "8:m8", "9:m9"]
    # relative from the end
    res = kcat("-b", bs, "-C", "-t", topic, "-p", "0", "-o", "-2", "-e", "-q", "-f", "%o:%s\n")
    assert res.stdout.decode().splitlines() == ["8:m8", "9:m9"]
