"""A faust-streaming application as a user would write it: a table counting events per key
in 10 s tumbling windows (event time), kept in memory and backed by the compacted
changelog topic faust creates for it, so every start restores the table from the
changelog. Each update sends the window's running count to an output topic.

Run by tests/test_streams.py in the stream-processing venv:
    python faust_window_count.py BOOTSTRAP APP_ID INPUT OUTPUT DATA_DIR
It runs until SIGTERM, when faust commits and stops.
"""

import os
import sys
from datetime import timedelta

import faust

WINDOW_MS = 10_000


def main() -> None:
    bootstrap, app_id, input_name, output_name, data_dir = sys.argv[1:6]
    sys.argv[1:] = ["worker", "--loglevel", os.environ.get("FAUST_LOGLEVEL", "info"), "--without-web"]
    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        datadir=data_dir,
        topic_partitions=1,
        web_enabled=False,
        broker_commit_interval=1.0,
    )
    source = app.topic(input_name, key_type=str, value_serializer="json")
    sink = app.topic(output_name, key_type=str, value_serializer="json")
    counts = app.Table("window-counts", default=int).tumbling(
        timedelta(milliseconds=WINDOW_MS), expires=timedelta(hours=2))

    @app.agent(source)
    async def count(stream):
        async for event in stream.events():
            key = event.key
            counts[key] += 1
            ts = int(round(event.message.timestamp * 1000))
            start = ts - ts % WINDOW_MS
            await sink.send(key=key, value={"start": start, "value": counts[key].current()})

    app.main()


if __name__ == "__main__":
    main()
