"""Transactions from other clients than librdkafka: aiokafka and kafkajs transactional
producers commit and abort across partitions and topics; read_committed consumers of the
same client see exactly the committed records, read_uncommitted ones every record; a
second producer with the same transactional id fences the first."""

import asyncio

from conftest import create_topic, unique_topic
from test_groups_kafkajs import run_node


def test_aiokafka_transactions(module_broker):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.errors import KafkaError
    b = module_broker
    topics = [unique_topic("aio-txn-a"), unique_topic("aio-txn-b")]
    for t in topics:
        create_topic(b.bootstrap, t, 2)
    txn_id = unique_topic("aio-tx")

    async def read(isolation: str, want: int) -> list:
        c = AIOKafkaConsumer(*topics, bootstrap_servers=b.bootstrap, group_id=unique_topic("g"),
                             auto_offset_reset="earliest", isolation_level=isolation,
                             enable_auto_commit=False)
        await c.start()
        seen = []
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            idle_until = None
            while loop.time() < deadline:
                batch = await c.getmany(timeout_ms=300)
                got = [m.value for ms in batch.values() for m in ms]
                seen.extend(got)
                if len(seen) >= want:
                    idle_until = idle_until or loop.time() + 1.5
                    if loop.time() >= idle_until:
                        break
        finally:
            await c.stop()
        return sorted(seen)

    async def run():
        p = AIOKafkaProducer(bootstrap_servers=b.bootstrap, transactional_id=txn_id)
        await p.start()
        committed, aborted = [], []
        try:
            for n in range(6):
                await p.begin_transaction()
                values = [f"{n}-{i}".encode() for i in range(6)]
                for i, v in enumerate(values):
                    await p.send_and_wait(topics[i % 2], v, partition=i % 2)
                if n % 3 == 2:
                    await p.abort_transaction()
                    aborted.extend(values)
                else:
                    await p.commit_transaction()
                    committed.extend(values)
            fresh = AIOKafkaProducer(bootstrap_servers=b.bootstrap, transactional_id=txn_id)
            await fresh.start()
            try:
                async with fresh.transaction():
                    await fresh.send_and_wait(topics[0], b"fresh", partition=0)
                committed.append(b"fresh")
                fenced = False
                try:
                    await p.begin_transaction()
                    await p.send_and_wait(topics[0], b"zombie", partition=0)
                    await p.commit_transaction()
                except KafkaError:
                    fenced = True
                assert fenced, "the first producer was not fenced by the second"
            finally:
                await fresh.stop()
        finally:
            try:
                await p.stop()
            except KafkaError:
                pass
        assert await read("read_committed", len(committed)) == sorted(committed)
        assert await read("read_uncommitted", len(committed) + len(aborted)) == \
            sorted(committed + aborted)

    asyncio.run(run())


def test_kafkajs_transactions(module_broker):
    out = run_node("txn.test.js", module_broker.bootstrap)
    print(out)
