"""Exactly once through failures: a consume-transform-produce loop (tests/apps/eos_copy.py,
confluent-kafka, send_offsets_to_transaction) is killed with SIGKILL again and again
while it copies an input topic, and the broker (partition owner and transaction
coordinator at once) is killed with SIGKILL and restarted with its cache wiped. Read at
read_committed, the output holds every input record's copy exactly once."""

import os
import signal
import subprocess
import sys
import threading
import time

from confluent_kafka import Producer

from conftest import REPO_ROOT, create_topic, unique_topic, wait_until
from test_transactions import read_all

APP = REPO_ROOT / "tests" / "apps" / "eos_copy.py"
RECORDS = 3000
PARTITIONS = 3


def start_app(bootstrap: str, group: str, src: str, dst: str, txn_id: str, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(APP), bootstrap, group, src, dst, txn_id],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def test_every_input_is_copied_exactly_once_across_kills(broker_factory, tmp_path):
    b = broker_factory(store="s3", env={"STRATA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0"})
    src, dst = unique_topic("eos-in"), unique_topic("eos-out")
    create_topic(b.bootstrap, src, PARTITIONS)
    create_topic(b.bootstrap, dst, PARTITIONS)
    # The input arrives over about 25 s, so every kill lands mid-stream.
    def feed():
        p = Producer({"bootstrap.servers": b.bootstrap, "linger.ms": 5,
                      "message.timeout.ms": 120000})
        for i in range(RECORDS):
            p.produce(src, key=str(i).encode(), value=str(i).encode(), partition=i % PARTITIONS)
            p.poll(0)
            time.sleep(25 / RECORDS)
        assert p.flush(120) == 0
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    group, txn_id = unique_topic("eos-g"), unique_topic("eos-tx")
    log = open(tmp_path / "app.log", "ab")
    app = start_app(b.bootstrap, group, src, dst, txn_id, log)
    kills = 0
    try:
        # Kill the application mid-stream a few times (each time once it has committed
        # more), and the broker once.
        log_path = tmp_path / "app.log"
        for round_ in range(5):
            before = log_path.read_text().count("committed")
            wait_until(lambda: log_path.read_text().count("committed") > before + 3, 60,
                       "the application to commit transactions")
            os.killpg(app.pid, signal.SIGKILL)
            app.wait()
            kills += 1
            if round_ == 2:
                b.restart(hard=True, wipe_cache=True)
            app = start_app(b.bootstrap, group, src, dst, txn_id, log)

        feeder.join(120)
        assert not feeder.is_alive(), "the input was written"

        def copied() -> int:
            return len(read_all(b.bootstrap, dst, PARTITIONS, "read_committed",
                                expect=RECORDS, timeout=20))
        wait_until(lambda: copied() >= RECORDS, 180, "every input record copied", interval=2)
    finally:
        if app.poll() is None:
            os.killpg(app.pid, signal.SIGKILL)
            app.wait()
        log.close()
    out = [v for _, _, v in read_all(b.bootstrap, dst, PARTITIONS, "read_committed")]
    counts = {}
    for v in out:
        counts[v] = counts.get(v, 0) + 1
    twice = [v for v, n in counts.items() if n > 1]
    missing = RECORDS - len(counts)
    commits = (tmp_path / "app.log").read_text().count("committed")
    print(f"\n{kills} application kills and a broker kill -9 (cache wiped) while the input "
          f"arrived: {commits} transactions, {len(out)} copies of {RECORDS} records")
    assert not twice, f"{len(twice)} records copied more than once, e.g. {twice[:5]}"
    assert missing == 0, f"{missing} records never copied"
    assert set(counts) == {b"copy:%d" % i for i in range(RECORDS)}
