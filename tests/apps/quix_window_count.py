"""A Quix Streams application as a user would write it: a tumbling-window count per key
(10 s windows, emitted when they close) from an input topic to an output topic, with
the library's defaults (its RocksDB state backed by a compacted changelog topic).

Run by tests/test_streams.py in the stream-processing venv:
    python quix_window_count.py BOOTSTRAP GROUP INPUT OUTPUT STATE_DIR [GUARANTEE]
GUARANTEE is Quix's processing_guarantee (default at-least-once; exactly-once makes it
commit its outputs, state changelog and input offsets in one transaction). It runs
until SIGTERM, when Quix commits and closes.
"""

import sys

from quixstreams import Application


def main() -> None:
    bootstrap, group, input_name, output_name, state_dir = sys.argv[1:6]
    guarantee = sys.argv[6] if len(sys.argv) > 6 else "at-least-once"
    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        commit_interval=1.0,
        processing_guarantee=guarantee,
    )
    source = app.topic(input_name, value_deserializer="json", key_deserializer="str")
    sink = app.topic(output_name, value_serializer="json", key_serializer="str")
    sdf = app.dataframe(source)
    sdf = sdf.tumbling_window(duration_ms=10_000).count().final()
    sdf = sdf.to_topic(sink)
    app.run()


if __name__ == "__main__":
    main()
