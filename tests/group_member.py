#!/usr/bin/env python3
"""One consumer-group member as its own process, for tests that kill members hard.

    group_member.py --bootstrap HOST:PORT --group G --topic T --out FILE [--conf JSON]

Subscribes to T in group G with confluent-kafka and, for every record: records it
("processed"), then commits offset+1 for its partition synchronously. Everything
it does goes to FILE as JSON lines, each written and flushed at once (so a
SIGKILL loses nothing that was reported):

    {"ev": "start", "pid": ...}
    {"ev": "assign", "p": [partitions]}        (eager: the whole new assignment)
    {"ev": "revoke", "p": [...]} / {"ev": "lost", "p": [...]}
    {"ev": "rec", "p": P, "o": OFFSET, "v": "value"}
    {"ev": "commit", "p": P, "o": NEXT_OFFSET}
    {"ev": "commit_error", "p": P, "o": NEXT_OFFSET, "err": "..."}
    {"ev": "error", "code": N, "name": "...", "fatal": bool, "err": "..."}
    {"ev": "closed"}

SIGTERM makes it close the consumer (LeaveGroup) and exit 0.
"""

import argparse
import json
import os
import signal
import sys
import time

from confluent_kafka import Consumer, KafkaException, TopicPartition


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--conf", default="{}", help="extra consumer settings as a JSON object")
    args = ap.parse_args()

    out = open(args.out, "a", buffering=1)

    def emit(**ev):
        ev["t"] = time.time()
        out.write(json.dumps(ev) + "\n")
        out.flush()

    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))

    conf = {
        "bootstrap.servers": args.bootstrap,
        "group.id": args.group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
    }
    conf.update(json.loads(args.conf))
    c = Consumer(conf)

    def parts(ps):
        return sorted(tp.partition for tp in ps)

    c.subscribe([args.topic],
                on_assign=lambda _c, ps: emit(ev="assign", p=parts(ps)),
                on_revoke=lambda _c, ps: emit(ev="revoke", p=parts(ps)),
                on_lost=lambda _c, ps: emit(ev="lost", p=parts(ps)))
    emit(ev="start", pid=os.getpid())
    try:
        while not stop["flag"]:
            m = c.poll(0.2)
            if m is None:
                continue
            err = m.error()
            if err is not None:
                emit(ev="error", code=err.code(), name=err.name(), fatal=err.fatal(), err=str(err))
                continue
            v = m.value().decode() if m.value() is not None else None
            emit(ev="rec", p=m.partition(), o=m.offset(), v=v)
            nxt = m.offset() + 1
            try:
                res = c.commit(offsets=[TopicPartition(m.topic(), m.partition(), nxt)],
                               asynchronous=False)
                bad = [tp for tp in res or [] if tp.error is not None]
                if bad:
                    emit(ev="commit_error", p=m.partition(), o=nxt, err=str(bad[0].error))
                else:
                    emit(ev="commit", p=m.partition(), o=nxt)
            except KafkaException as e:
                emit(ev="commit_error", p=m.partition(), o=nxt, err=str(e))
    finally:
        c.close()
        emit(ev="closed")
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
