"""The broker on a PostgreSQL metadata store: real clients produce and consume, state
survives a broker restart, and /readyz turns unready while PostgreSQL is down and ready
again once it is back (writes wait, nothing acknowledged is lost)."""

import os
import subprocess
from pathlib import Path

import pytest

from conftest import (Broker, consume_all, create_topic, is_ready, producer, unique_topic,
                      wait_until)

ROOT = Path(__file__).resolve().parent.parent
PG = ROOT / "tests" / "postgres.sh"


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster of this test's own (it gets stopped mid-test)."""
    out = subprocess.run([str(PG)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    env = dict(line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines() if line.startswith("export "))
    yield env
    subprocess.run([str(PG), "stop", env["STRATA_TEST_POSTGRES_DIR"]], capture_output=True, timeout=120)


def pg_ctl(env, action):
    bin_dir = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1]
    data = Path(env["STRATA_TEST_POSTGRES_DIR"]) / "data"
    port = env["STRATA_TEST_POSTGRES_URL"].rsplit(":", 1)[1].split("/")[0]
    cmd = [str(bin_dir), "-D", str(data), "-w", "-t", "60"]
    if action == "start":
        cmd += ["-l", str(data.parent / "server.log"), "-o",
                f"-p {port} -k {data.parent} -c listen_addresses=127.0.0.1 -c max_connections=300", "start"]
    else:
        cmd += ["-m", "fast", "stop"]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_broker_on_postgres(tmp_path, strata_bin, postgres):
    b = Broker(tmp_path / "pgbroker", name="pgbroker", binary=strata_bin,
               metadata=postgres["STRATA_TEST_POSTGRES_URL"])
    try:
        b.start()
        topic = unique_topic("pg")
        create_topic(b.bootstrap, topic, 2)
        p = producer(b.bootstrap)
        for i in range(200):
            p.produce(topic, value=str(i).encode(), partition=i % 2)
        assert p.flush(30) == 0
        assert is_ready(b.http_port)
        # PostgreSQL goes away: the broker reports unready, and comes back by itself.
        pg_ctl(postgres, "stop")
        wait_until(lambda: not is_ready(b.http_port), 30, "/readyz to turn unready")
        pg_ctl(postgres, "start")
        wait_until(lambda: is_ready(b.http_port), 60, "/readyz to turn ready again")
        for i in range(200, 300):
            p.produce(topic, value=str(i).encode(), partition=i % 2)
        assert p.flush(60) == 0
        # Everything acknowledged is there, also after a restart over the same stores.
        b.restart(hard=True, wipe_cache=True)
        msgs = consume_all(b.bootstrap, topic, 2, timeout=60)
        assert sorted(int(m.value()) for m in msgs) == list(range(300))
    finally:
        b.close()
