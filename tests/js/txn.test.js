#!/usr/bin/env node
// kafkajs transactions against a Strata broker.
//
//   STRATA_BOOTSTRAP=127.0.0.1:9092 node txn.test.js
//
// A transactional producer commits and aborts transactions across two topics (written
// before each end, so aborted records reach the broker); a read_committed consumer
// (kafkajs' default) must see exactly the committed records, a read_uncommitted one
// every record; a second producer with the same transactional id fences the first.
// Exits 0 on success and 1 on any failure (with the reason on stderr).
'use strict';

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { Kafka, logLevel } = require('kafkajs');

const BOOTSTRAP = process.env.STRATA_BOOTSTRAP;
const OVERALL_TIMEOUT_MS = Number(process.env.STRATA_JS_TIMEOUT_MS || 90000);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function readAll(kafka, topics, readUncommitted, want) {
  const consumer = kafka.consumer({
    groupId: `kjs-txn-read-${crypto.randomBytes(4).toString('hex')}`,
    readUncommitted,
    maxWaitTimeInMs: 200,
  });
  const seen = [];
  await consumer.connect();
  for (const topic of topics) await consumer.subscribe({ topic, fromBeginning: true });
  await consumer.run({
    eachMessage: async ({ message }) => { seen.push(message.value.toString()); },
  });
  const deadline = Date.now() + 30000;
  while (seen.length < want && Date.now() < deadline) await sleep(100);
  await sleep(1500); // anything extra (an aborted record) would arrive by now
  await consumer.disconnect();
  return seen.sort();
}

async function main() {
  if (!BOOTSTRAP) throw new Error('STRATA_BOOTSTRAP (host:port of the broker) is not set');
  const suffix = crypto.randomBytes(5).toString('hex');
  const topics = [`kjs-txn-a-${suffix}`, `kjs-txn-b-${suffix}`];
  const kafka = new Kafka({
    clientId: 'strata-kafkajs-txn',
    brokers: [BOOTSTRAP],
    logLevel: logLevel.WARN,
    retry: { retries: 8, initialRetryTime: 100 },
  });
  const admin = kafka.admin();
  await admin.connect();
  await admin.createTopics({
    topics: topics.map((topic) => ({ topic, numPartitions: 2, replicationFactor: 1 })),
    waitForLeaders: true,
  });
  await admin.disconnect();

  const transactionalId = `kjs-tx-${suffix}`;
  const producer = kafka.producer({ transactionalId, idempotent: true, maxInFlightRequests: 1 });
  await producer.connect();
  const committed = [];
  const aborted = [];
  for (let n = 0; n < 6; n++) {
    const txn = await producer.transaction();
    const values = [];
    for (let i = 0; i < 6; i++) {
      const value = `${n}-${i}`;
      values.push(value);
      await txn.send({ topic: topics[i % 2], messages: [{ partition: i % 2, value }] });
    }
    if (n % 3 === 2) {
      await txn.abort();
      aborted.push(...values);
    } else {
      await txn.commit();
      committed.push(...values);
    }
  }

  // A second instance fences the first: its next transaction fails.
  const fresh = kafka.producer({ transactionalId, idempotent: true, maxInFlightRequests: 1 });
  await fresh.connect();
  const t2 = await fresh.transaction();
  await t2.send({ topic: topics[0], messages: [{ partition: 0, value: 'fresh' }] });
  await t2.commit();
  committed.push('fresh');
  let fenced = null;
  try {
    const zombie = await producer.transaction();
    await zombie.send({ topic: topics[0], messages: [{ partition: 0, value: 'zombie' }] });
    await zombie.commit();
  } catch (e) {
    fenced = e;
  }
  assert.ok(fenced, 'the first producer was not fenced by the second');

  const readCommitted = await readAll(kafka, topics, false, committed.length);
  assert.deepEqual(readCommitted, [...committed].sort(), 'read_committed sees exactly the committed records');
  const readAllRecords = await readAll(kafka, topics, true, committed.length + aborted.length);
  assert.deepEqual(readAllRecords, [...committed, ...aborted].sort(), 'read_uncommitted sees every record');

  await fresh.disconnect();
  await producer.disconnect().catch(() => {});
  console.log(JSON.stringify({
    ok: true, committed: committed.length, aborted: aborted.length,
    fenced: fenced.name || String(fenced),
  }));
}

const timer = setTimeout(() => {
  console.error(`txn.test.js: no result within ${OVERALL_TIMEOUT_MS / 1000}s`);
  process.exit(1);
}, OVERALL_TIMEOUT_MS);
main().then(() => { clearTimeout(timer); process.exit(0); }, (e) => {
  console.error(e && e.stack ? e.stack : String(e));
  process.exit(1);
});
