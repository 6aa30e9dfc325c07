#!/usr/bin/env node
// kafkajs consumer group against a Strata broker.
//
//   STRATA_BOOTSTRAP=127.0.0.1:9092 node group.test.js
//
// Creates a 6-partition topic, runs a group of 3 consumers on it, and checks that
// their assignments are disjoint and cover all 6 partitions, then that every
// produced message is consumed exactly once, each by its partition's owner.
// Exits 0 on success and 1 on any failure (with the reason on stderr).
'use strict';

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { Kafka, logLevel } = require('kafkajs');

const BOOTSTRAP = process.env.STRATA_BOOTSTRAP;
const PARTITIONS = 6;
const MEMBERS = 3;
const PER_PARTITION = 10;
const OVERALL_TIMEOUT_MS = Number(process.env.STRATA_JS_TIMEOUT_MS || 90000);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitFor(pred, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  while (!pred()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs / 1000}s waiting for: ${what()}`);
    }
    await sleep(50);
  }
}

async function main() {
  if (!BOOTSTRAP) throw new Error('STRATA_BOOTSTRAP (host:port of the broker) is not set');
  const suffix = crypto.randomBytes(5).toString('hex');
  const topic = `kjs-${suffix}`;
  const groupId = `kjs-group-${suffix}`;
  const kafka = new Kafka({
    clientId: 'strata-kafkajs-test',
    brokers: [BOOTSTRAP],
    logLevel: logLevel.WARN,
    retry: { retries: 8, initialRetryTime: 100 },
  });

  const admin = kafka.admin();
  const producer = kafka.producer();
  const members = [];
  try {
    await admin.connect();
    const created = await admin.createTopics({
      topics: [{ topic, numPartitions: PARTITIONS, replicationFactor: 1 }],
      waitForLeaders: true,
    });
    assert.equal(created, true, 'createTopics reported the topic as existing already');

    for (let i = 0; i < MEMBERS; i++) {
      const name = `kjs-${i}`;
      const consumer = kafka.consumer({
        groupId,
        sessionTimeout: 10000,
        rebalanceTimeout: 15000,
        heartbeatInterval: 500,
        maxWaitTimeInMs: 500,
      });
      const m = { name, consumer, assignment: [], lastEvent: Date.now(), joins: 0, records: [] };
      consumer.on(consumer.events.GROUP_JOIN, (e) => {
        m.assignment = [...((e.payload.memberAssignment || {})[topic] || [])].sort((a, b) => a - b);
        m.lastEvent = Date.now();
        m.joins += 1;
      });
      consumer.on(consumer.events.REBALANCING, () => {
        m.lastEvent = Date.now();
      });
      consumer.on(consumer.events.CRASH, (e) => {
        m.crash = e.payload.error;
      });
      members.push(m);
    }
    const state = () => JSON.stringify(members.map((m) => ({
      name: m.name, assignment: m.assignment, joins: m.joins, records: m.records.length,
      crash: m.crash ? String(m.crash) : undefined,
    })));

    for (const m of members) {
      await m.consumer.connect();
      await m.consumer.subscribe({ topic, fromBeginning: true });
      await m.consumer.run({
        eachMessage: async ({ partition, message }) => {
          m.records.push({ partition, offset: Number(message.offset), value: message.value.toString() });
        },
      });
    }

    // every member assigned, and no rebalance for a while
    await waitFor(() => {
      for (const m of members) if (m.crash) throw new Error(`${m.name} crashed: ${m.crash}`);
      return members.every((m) => m.assignment.length > 0)
        && Date.now() - Math.max(...members.map((m) => m.lastEvent)) > 2000;
    }, 60000, () => `all ${MEMBERS} members assigned: ${state()}`);

    const owner = new Map();
    for (const m of members) {
      for (const p of m.assignment) {
        assert.ok(!owner.has(p), `partition ${p} assigned to ${owner.get(p)} and ${m.name}: ${state()}`);
        owner.set(p, m.name);
      }
    }
    assert.deepEqual([...owner.keys()].sort((a, b) => a - b), [...Array(PARTITIONS).keys()],
      `assignments do not cover all ${PARTITIONS} partitions: ${state()}`);
    const joinsBefore = members.map((m) => m.joins);

    await producer.connect();
    const expected = [];
    const messages = [];
    for (let p = 0; p < PARTITIONS; p++) {
      for (let i = 0; i < PER_PARTITION; i++) {
        const value = `kjs-${p}-${i}`;
        expected.push(value);
        messages.push({ partition: p, value });
      }
    }
    await producer.send({ topic, acks: -1, messages });

    await waitFor(() => members.reduce((n, m) => n + m.records.length, 0) >= expected.length,
      30000, () => `${expected.length} messages consumed: ${state()}`);
    await sleep(500);

    const consumed = members.flatMap((m) => m.records.map((r) => r.value)).sort();
    assert.deepEqual(consumed, [...expected].sort(), 'every message consumed exactly once');
    for (const m of members) {
      for (const r of m.records) {
        assert.equal(owner.get(r.partition), m.name,
          `${m.name} consumed partition ${r.partition} owned by ${owner.get(r.partition)}`);
      }
    }
    assert.deepEqual(members.map((m) => m.joins), joinsBefore, `unexpected rebalance: ${state()}`);

    console.log(JSON.stringify({
      ok: true, topic, groupId,
      assignments: Object.fromEntries(members.map((m) => [m.name, m.assignment])),
      consumed: consumed.length,
    }));
  } finally {
    await Promise.allSettled(members.map((m) => m.consumer.disconnect()));
    await Promise.allSettled([producer.disconnect(), admin.disconnect()]);
  }
}

const timer = setTimeout(() => {
  console.error(`FAIL: kafkajs group test did not finish within ${OVERALL_TIMEOUT_MS / 1000}s`);
  process.exit(1);
}, OVERALL_TIMEOUT_MS);

main().then(() => {
  clearTimeout(timer);
  process.exit(0);
}, (err) => {
  console.error(`FAIL: ${err && err.stack ? err.stack : err}`);
  process.exit(1);
});
