"""A consume-transform-produce loop with exactly-once semantics, as users write one with
confluent-kafka: read a batch (read_committed), write each record's transformation to
the output topic, send the consumed offsets to the same transaction, commit. A restarted
instance uses the same transactional id, so it fences the one before it.

Run by tests/test_eos.py:  python eos_copy.py BOOTSTRAP GROUP INPUT OUTPUT TXN_ID
It runs until killed.
"""

import sys

from confluent_kafka import Consumer, KafkaException, Producer


def main() -> None:
    bootstrap, group, input_name, output_name, txn_id = sys.argv[1:6]
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest",
                         # A killed instance leaves the group soon, so the next one
                         # takes its partitions without a long wait.
                         "session.timeout.ms": 6000})
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": txn_id,
                         "linger.ms": 5})
    producer.init_transactions(60)
    consumer.subscribe([input_name])
    while True:
        batch = consumer.consume(50, timeout=0.5)
        records = [m for m in batch if m.error() is None]
        if not records:
            continue
        producer.begin_transaction()
        for m in records:
            producer.produce(output_name, key=m.key(), value=b"copy:" + m.value(),
                             partition=m.partition())
        producer.send_offsets_to_transaction(consumer.position(consumer.assignment()),
                                             consumer.consumer_group_metadata(), 60)
        try:
            producer.commit_transaction(60)
        except KafkaException as e:
            if e.args[0].txn_requires_abort():
                producer.abort_transaction(60)
                # Start again from the committed offsets.
                for tp in consumer.committed(consumer.assignment(), timeout=30):
                    consumer.seek(tp)
            else:
                raise
        print(f"committed {len(records)}", flush=True)


if __name__ == "__main__":
    main()
