"""Shared harness for Strata's integration tests.

The broker binary comes from $STRATA_BIN (tests/run sets it), else from
$CARGO_TARGET_DIR/release/strata, else ~/.cache/strata-target/release/strata.

`Broker` starts one broker process on free loopback ports with its own data
dir; fixtures make sure every process started here is stopped again, by PID.
Test modules import the helpers below with `from conftest import ...`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0
# Where brokers keep their log: "file" (a directory under the data dir) or "s3" (a
# bucket of a real S3-compatible server on loopback, see s3.py). tests/run runs the
# core suites both ways.
OBJECT_STORE = os.environ.get("STRATA_TEST_OBJECT_STORE", "file")


# ---------------------------------------------------------------------------
# binary location
# ---------------------------------------------------------------------------

def strata_binary() -> Path:
    env = os.environ.get("STRATA_BIN")
    if env:
        return Path(env)
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/strata-target")
    return Path(target) / "release" / "strata"


def python_exe() -> str:
    """The interpreter running pytest (the venv's), for helper subprocesses."""
    return sys.executable


# ---------------------------------------------------------------------------
# ports
# ---------------------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held together while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def can_connect(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Broker
# ---------------------------------------------------------------------------

class BrokerError(RuntimeError):
    pass


_CURRENT_TEST = {"nodeid": None}


class Broker:
    """One Strata broker process.

    zero_config=True runs plain `strata serve` in base_dir/cwd (so ./data lands
    there), on its default port 9092. Otherwise the broker gets free ports and
    explicit --data-dir/--object-store/--metadata flags.

    `env` holds settings as STRATA_* variables; inherited STRATA_* variables of
    the test process (STRATA_BIN, STRATA_VENV, ...) are not passed on.
    """

    instances: list["Broker"] = []

    def __init__(self, base_dir, env: dict | None = None, zero_config: bool = False,
                 name: str = "broker", binary: Path | None = None, store: str | None = None,
                 metadata: str | None = None, broker_id: int = 0, bucket: str | None = None):
        self.binary = Path(binary) if binary else strata_binary()
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.zero_config = zero_config
        self.extra_env = dict(env or {})
        if zero_config:
            self.host, self.port, self.http_port = "127.0.0.1", 9092, None
            self.cwd = self.base_dir / "cwd"
            self.cwd.mkdir(exist_ok=True)
            self.data_dir = self.cwd / "data"
        else:
            self.host = "127.0.0.1"
            self.port, self.http_port = free_ports(2)
            self.cwd = self.base_dir
            self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / f"{name}.stderr.log"
        self.s3 = None
        self.bucket = None
        self.metadata = metadata
        self.broker_id = broker_id
        if (store or OBJECT_STORE) == "s3" and not zero_config:
            from s3 import s3_server
            self.s3 = s3_server()
            # A fleet shares one bucket; a lone broker gets its own.
            self.bucket = bucket or self.s3.new_bucket()
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.closed = False
        self.nodeid = _CURRENT_TEST["nodeid"]
        Broker.instances.append(self)

    # -- properties ---------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def objects_dir(self) -> Path:
        return self.data_dir / "objects"

    @property
    def object_store_url(self) -> str:
        if self.s3:
            return f"s3://{self.bucket}/strata"
        return f"file://{self.data_dir}/objects"

    def objects(self, sub: str, suffix: str = "") -> dict[str, int]:
        """key (relative to the store's root) -> size of the stored objects under sub/."""
        if self.s3:
            found = self.s3.objects(self.bucket, f"strata/{sub}/")
            return {k[len("strata/"):]: v for k, v in found.items() if k.endswith(suffix)}
        root = self.objects_dir
        d = root / sub
        if not d.exists():
            return {}
        return {str(f.relative_to(root)): f.stat().st_size
                for f in d.rglob(f"*{suffix}") if f.is_file()}

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def args(self) -> list[str]:
        if self.zero_config:
            return [str(self.binary), "serve"]
        d = str(self.data_dir)
        return [
            str(self.binary), "serve",
            "--listen", f"{self.host}:{self.port}",
            "--advertise", f"{self.host}:{self.port}",
            "--http", f"{self.host}:{self.http_port}",
            "--data-dir", d,
            "--object-store", self.object_store_url,
            # On S3 the metadata lives in the bucket too, so the data dir is only a cache.
            "--metadata", self.metadata or ("bucket://" if self.s3 else f"sqlite://{d}/metadata.db"),
            "--broker-id", str(self.broker_id),
        ]

    def environment(self) -> dict:
        # the test process's own STRATA_* variables (STRATA_BIN, STRATA_VENV, ...) are not
        # broker settings; STRATA_LOG (log filter) is passed through for debugging
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("STRATA_") or k == "STRATA_LOG"}
        env.setdefault("RUST_BACKTRACE", "1")
        env.setdefault("NO_COLOR", "1")  # plain log files
        if self.s3:
            env.update(self.s3.environment())
        env.update({k: str(v) for k, v in self.extra_env.items()})
        return env

    # -- lifecycle ----------------------------------------------------------
    def start(self, timeout: float = READY_TIMEOUT_S, ready: bool = True) -> "Broker":
        """Starts the broker and waits until it is ready (/readyz), or with ready=False
        only until it accepts connections (a broker that is up but reports unready, as
        on a full cache disk)."""
        if self.alive():
            raise BrokerError(f"{self.name} already running (pid {self.pid})")
        if not self.binary.exists():
            raise BrokerError(f"broker binary {self.binary} does not exist (build it, or set STRATA_BIN)")
        if self.zero_config and not port_is_free(self.port):
            raise BrokerError(f"port {self.port} is taken; cannot start a zero-config broker")
        self.starts += 1
        with open(self.log_path, "ab") as f:
            f.write(f"\n===== harness: start #{self.starts}: {' '.join(self.args())} =====\n".encode())
            f.flush()
            self.proc = subprocess.Popen(
                self.args(), cwd=self.cwd, env=self.environment(),
                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready(timeout, ready)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, ready: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise BrokerError(
                    f"{self.name} exited with code {rc} before accepting connections on "
                    f"{self.bootstrap}\n--- stderr tail ---\n{self.log_tail()}")
            # Listening is not enough: the broker binds before it has recovered; it is
            # ready once /readyz says so.
            if can_connect(self.host, self.port) and (
                    not ready or self.http_port is None or is_ready(self.http_port)):
                return
            if time.monotonic() > deadline:
                self._kill_quietly()
                raise BrokerError(
                    f"{self.name} did not accept TCP connections on {self.bootstrap} within "
                    f"{timeout:.0f}s\n--- stderr tail ---\n{self.log_tail()}")
            time.sleep(0.05)

    def _mark(self, text: str) -> None:
        try:
            with open(self.log_path, "ab") as f:
                f.write(f"===== harness: {text} =====\n".encode())
        except OSError:
            pass

    def kill9(self) -> int | None:
        """SIGKILL the broker by PID and reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self._mark(f"SIGKILL pid {self.proc.pid}")
        os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._mark(f"SIGTERM pid {self.proc.pid}")
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                return self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._mark(f"no exit {grace}s after SIGTERM; SIGKILL pid {self.proc.pid}")
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                self.proc.wait()
        return self.proc.returncode

    def _kill_quietly(self) -> None:
        try:
            self.kill9()
        except Exception:
            pass

    def restart(self, hard: bool = False, wipe_cache: bool = False, wipe_data: bool = False,
                timeout: float = READY_TIMEOUT_S, ready: bool = True) -> "Broker":
        """Stop (SIGTERM, or SIGKILL when hard) and start again on the same ports/dirs;
        wipe_cache deletes the local cache, wipe_data the whole data directory (a lost
        disk: only meaningful when everything durable is in the bucket)."""
        if hard:
            self.kill9()
        else:
            self.stop()
        if wipe_cache:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
        if wipe_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return self.start(timeout, ready)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.closed = True

    # -- introspection ------------------------------------------------------
    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise BrokerError("VmRSS not found")

    def log_tail(self, lines: int = 80) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError as e:
            return f"<no log: {e}>"
        text = data.decode("utf-8", "replace").splitlines()
        return "\n".join(text[-lines:])

    def __repr__(self) -> str:
        return f"<Broker {self.name} {self.bootstrap} pid={self.pid} dir={self.base_dir}>"


# ---------------------------------------------------------------------------
# pytest hooks & fixtures
# ---------------------------------------------------------------------------

def pytest_configure(config):
    config.addinivalue_line("markers", "timeout(seconds): per-test timeout (pytest-timeout)")
    # kafka-python 3 loads its protocol schemas with deprecated importlib.resources calls
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:kafka.*")
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:importlib.*")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _CURRENT_TEST["nodeid"] = item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for b in Broker.instances:
            if b.nodeid == item.nodeid or not b.closed:
                rep.sections.append(
                    (f"{b.name} log tail ({b.log_path})", b.log_tail(80)))


@pytest.fixture(scope="session")
def strata_bin() -> Path:
    path = strata_binary()
    if not path.exists():
        pytest.fail(f"broker binary {path} does not exist: run tests/run, or set STRATA_BIN")
    return path


@pytest.fixture
def broker_factory(tmp_path, strata_bin):
    """Start brokers with custom settings: broker_factory(env={...}, name=...)."""
    made: list[Broker] = []

    def make(env: dict | None = None, name: str | None = None, zero_config: bool = False,
             start: bool = True, store: str | None = None) -> Broker:
        n = name or f"broker{len(made)}"
        b = Broker(tmp_path / n, env=env, zero_config=zero_config, name=n, binary=strata_bin,
                   store=store)
        made.append(b)
        if start:
            b.start()
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def broker(broker_factory) -> Broker:
    """A fresh broker for one test."""
    return broker_factory(name="broker")


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory, strata_bin) -> Broker:
    """One broker shared by the tests of a module (use unique topic names)."""
    b = Broker(tmp_path_factory.mktemp("module-broker"), name="module-broker", binary=strata_bin)
    try:
        b.start()
        yield b
    finally:
        b.close()


# ---------------------------------------------------------------------------
# client helpers (confluent-kafka)
# ---------------------------------------------------------------------------

def scrape_metrics(http_port: int) -> str:
    """The broker's /metrics text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric_sum(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` in a /metrics text whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def is_ready(http_port: int) -> bool:
    """Whether the broker's /readyz answers 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=5) as r:
            return r.status == 200
    except OSError:  # URLError and HTTPError (503 while not ready) included
        return False


def wait_ready(http_port: int, timeout: float = 60.0) -> None:
    """Until /readyz answers 200 (the broker recovered its partitions)."""
    wait_until(lambda: is_ready(http_port), timeout, "/readyz to answer 200")


def wait_until(cond, timeout: float = 30.0, what: str = "condition", interval: float = 0.1) -> None:
    """Polls `cond` every `interval` s until it is true; fails naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def unique_topic(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def admin_client(bootstrap: str):
    from confluent_kafka.admin import AdminClient
    return AdminClient({"bootstrap.servers": bootstrap})


def create_topic(bootstrap: str, name: str, partitions: int = 1, config: dict | None = None,
                 timeout: float = 30.0) -> None:
    from confluent_kafka.admin import NewTopic
    a = admin_client(bootstrap)
    fs = a.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1,
                                   config=config or {})], operation_timeout=timeout,
                         request_timeout=timeout)
    fs[name].result(timeout)
    wait_for_topic(bootstrap, name, partitions)


def topic_partitions(bootstrap: str, name: str, timeout: float = 10.0):
    """Partition count of `name` per Metadata, or None when the topic is absent.

    Asks for all topics: a Metadata request naming the topic would auto-create it
    (librdkafka's admin client allows auto-creation, like a producer)."""
    md = admin_client(bootstrap).list_topics(timeout=timeout)
    t = md.topics.get(name)
    if t is None or t.error is not None:
        return None
    return len(t.partitions)


def wait_for_topic(bootstrap: str, name: str, partitions: int | None = None,
                   timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    a = admin_client(bootstrap)
    while time.monotonic() < deadline:
        md = a.list_topics(timeout=10)
        t = md.topics.get(name)
        last = t
        if t is not None and t.error is None and (partitions is None or len(t.partitions) == partitions):
            return
        time.sleep(0.2)
    raise AssertionError(f"topic {name} not visible with {partitions} partitions in metadata: {last}")


def producer(bootstrap: str, **extra):
    from confluent_kafka import Producer
    conf = {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
            "linger.ms": 5}
    conf.update(extra)
    return Producer(conf)


def consume_all(bootstrap: str, topic: str, partitions: int, timeout: float = 60.0,
                start_offset=None, **extra) -> list:
    """Read every partition of `topic` from the beginning to its end (EOF).

    Returns confluent_kafka.Message objects in per-partition offset order
    (partitions interleaved as they arrive)."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition, OFFSET_BEGINNING
    conf = {
        "bootstrap.servers": bootstrap,
        "group.id": "strata-tests-dummy",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": True,
    }
    conf.update(extra)
    c = Consumer(conf)
    try:
        start = OFFSET_BEGINNING if start_offset is None else start_offset
        c.assign([TopicPartition(topic, p, start) for p in range(partitions)])
        msgs = []
        eof = set()
        deadline = time.monotonic() + timeout
        while len(eof) < partitions:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"consume_all({topic}): only partitions {sorted(eof)} of {partitions} reached "
                    f"their end within {timeout}s; got {len(msgs)} messages")
            m = c.poll(0.5)
            if m is None:
                continue
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    eof.add(m.partition())
                    continue
                raise AssertionError(f"consumer error on {topic}: {err}")
            msgs.append(m)
            eof.discard(m.partition())
        return msgs
    finally:
        c.close()


def roundtrip(bootstrap: str, n: int = 5) -> None:
    """Create a topic, produce n messages with acks=all, read them back exactly."""
    topic = unique_topic("rt")
    create_topic(bootstrap, topic, 1)
    p = producer(bootstrap)
    errors = []
    for i in range(n):
        p.produce(topic, key=f"k{i}".encode(), value=f"v{i}".encode(), partition=0,
                  on_delivery=lambda err, msg: errors.append(err) if err else None)
    remaining = p.flush(30)
    assert remaining == 0, f"{remaining} messages not delivered"
    assert not errors, f"delivery errors: {errors}"
    msgs = consume_all(bootstrap, topic, 1, timeout=30)
    got = [(m.offset(), m.key(), m.value()) for m in msgs]
    assert got == [(i, f"k{i}".encode(), f"v{i}".encode()) for i in range(n)]
