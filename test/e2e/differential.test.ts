/*
 * Differential: the same protocol conversation against the real
 * qemu-storage-daemon and against blockd. Replies must be equal byte for
 * byte once the version object is normalised (nothing else is). Then the
 * introspected shape of every command both servers have is compared with the
 * masked type names resolved.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { startQsd, type QsdProcess } from '../helpers/qsd-process.js';
import { RawConnection } from '../helpers/raw-connection.js';
import { QmpClient } from '../../src/qmp/client.js';
import { COMMAND_MODE_STEPS, NEGOTIATION_STEPS, normaliseVersion } from './protocol-cases.js';

const temp = makeTempDir();
let qsd: QsdProcess;
let blockd: BlockdProcess;

before(async () => {
  qsd = await startQsd(temp.dir);
  blockd = await runBlockd(['--qmp', `unix:${join(temp.dir, 'blockd.sock')}`]);
});

after(async () => {
  await qsd.stop();
  await blockd.stop();
  temp.cleanup();
});

async function transcript(address: string, extraSteps: { send: string; replies: number }[] = []): Promise<string[]> {
  const connection = await RawConnection.open(address);
  const lines = [normaliseVersion(await connection.readLine())];
  const steps = [...NEGOTIATION_STEPS, ...COMMAND_MODE_STEPS].map((step) => ({ send: step.send, replies: step.expect.length }));
  for (const step of [...steps, ...extraSteps]) {
    connection.send(step.send);
    for (const line of await connection.readLines(step.replies)) lines.push(normaliseVersion(line));
  }
  await connection.expectNothingMore();
  connection.end();
  return lines;
}

/** Opens a connection, skips the greeting, sends each step and collects its replies. */
async function runSteps(address: string, steps: { send: string; replies: number }[]): Promise<string[]> {
  const connection = await RawConnection.open(address);
  await connection.readLine();
  const lines: string[] = [];
  for (const step of steps) {
    connection.send(step.send);
    lines.push(...(await connection.readLines(step.replies)));
  }
  connection.end();
  return lines;
}

test('the protocol conversation is identical to qemu-storage-daemon', async () => {
  const expected = await transcript(qsd.socket);
  const actual = await transcript(`unix:${join(temp.dir, 'blockd.sock')}`);
  assert.equal(actual.length, expected.length);
  for (let i = 0; i < expected.length; i++) assert.equal(actual[i], expected[i], `reply ${i}`);
});

test('oob negotiation and exec-oob errors are identical', async () => {
  const steps = [
    { send: '{"execute":"qmp_capabilities","arguments":{"enable":["oob","oob"]},"id":1}', replies: 1 },
    { send: '{"exec-oob":"query-commands","id":2}', replies: 1 },
    { send: '{"exec-oob":"no-such","id":3}', replies: 1 },
    { send: '{"exec-oob":1,"id":4}', replies: 1 },
    { send: '{"exec-oob":"query-commands","execute":"query-commands","id":5}', replies: 1 },
  ];
  assert.deepEqual(await runSteps(`unix:${join(temp.dir, 'blockd.sock')}`, steps), await runSteps(qsd.socket, steps));
});

test('with several unexpected arguments, both name the same one (glib hash order)', async () => {
  let seed = 11;
  const random = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
  const word = () => Array.from({ length: 1 + Math.floor(random() * 8) }, () => 'abcdefghijklmnopqrstuvwxyz-_0123456789'[Math.floor(random() * 38)]).join('');
  const steps = [{ send: '{"execute":"qmp_capabilities"}', replies: 1 }];
  for (let i = 0; i < 150; i++) {
    const args: Record<string, unknown> = i % 3 === 0 ? { enable: [] } : {};
    for (let k = 0, n = 2 + Math.floor(random() * 30); k < n; k++) args[word()] = k;
    steps.push({ send: JSON.stringify({ execute: i % 3 === 0 ? 'qmp_capabilities' : 'query-version', arguments: args, id: i }), replies: 1 });
  }
  const expected = await runSteps(qsd.socket, steps);
  const actual = await runSteps(`unix:${join(temp.dir, 'blockd.sock')}`, steps);
  for (let i = 0; i < expected.length; i++) assert.equal(actual[i], expected[i], steps[i]!.send);
});

type Entry = Record<string, unknown> & { name: string; 'meta-type': string };

/**
 * Checks that blockd's type `ours` can be used exactly like qemu-storage-daemon's `theirs`:
 * same members with the same types, optionality and features; blockd's enum values and
 * union branches are a subset (it implements fewer drivers), never different.
 */
function assertCompatible(ourSchema: Entry[], ours: string, theirSchema: Entry[], theirs: string, path: string, seen = new Set<string>()): void {
  const key = `${ours}|${theirs}`;
  if (seen.has(key)) return;
  seen.add(key);
  const a = ourSchema.find((entry) => entry.name === ours);
  const b = theirSchema.find((entry) => entry.name === theirs);
  assert.ok(a && b, `${path}: missing entry`);
  assert.equal(a['meta-type'], b['meta-type'], `${path}: meta-type`);
  switch (a['meta-type']) {
    case 'builtin':
      assert.equal(a.name, b.name, path);
      return;
    case 'enum':
      for (const value of a.values as string[]) assert.ok((b.values as string[]).includes(value), `${path}: enum value ${value}`);
      return;
    case 'array':
      return assertCompatible(ourSchema, a['element-type'] as string, theirSchema, b['element-type'] as string, `${path}[]`, seen);
    case 'alternate': {
      const am = a.members as { type: string }[];
      const bm = b.members as { type: string }[];
      assert.equal(am.length, bm.length, `${path}: alternate branches`);
      am.forEach((m, i) => assertCompatible(ourSchema, m.type, theirSchema, bm[i]!.type, `${path}|${i}`, seen));
      return;
    }
    case 'object': {
      type Member = { name: string; type: string; default?: null; features?: string[] };
      const am = a.members as Member[];
      const bm = b.members as Member[];
      assert.deepEqual(am.map((m) => m.name), bm.map((m) => m.name), `${path}: members`);
      am.forEach((m, i) => {
        const other = bm[i]!;
        assert.equal('default' in m, 'default' in other, `${path}.${m.name}: optional`);
        assert.deepEqual(m.features ?? [], other.features ?? [], `${path}.${m.name}: features`);
        assertCompatible(ourSchema, m.type, theirSchema, other.type, `${path}.${m.name}`, seen);
      });
      assert.equal(a.tag, b.tag, `${path}: tag`);
      for (const variant of (a.variants as { case: string; type: string }[] | undefined) ?? []) {
        const other = (b.variants as { case: string; type: string }[]).find((v) => v.case === variant.case);
        assert.ok(other, `${path}: variant ${variant.case}`);
        assertCompatible(ourSchema, variant.type, theirSchema, other.type, `${path}(${variant.case})`, seen);
      }
      return;
    }
  }
}

/** Commands of later QEMU versions that blockd has and qemu-storage-daemon 7.2 does not (the issues ask for them). */
const FROM_LATER_QEMU = ['block-job-change'];

test('every command and event both servers have takes and gives the same shapes', async () => {
  const ours = await QmpClient.connect(`unix:${join(temp.dir, 'blockd.sock')}`);
  const theirs = await QmpClient.connect(qsd.socket);
  const ourSchema = (await ours.execute('query-qmp-schema')) as unknown as Entry[];
  const theirSchema = (await theirs.executeRaw('query-qmp-schema')) as Entry[];
  let compared = 0;
  for (const entry of ourSchema.filter((e) => e['meta-type'] === 'command' || e['meta-type'] === 'event')) {
    if (FROM_LATER_QEMU.includes(entry.name)) continue;
    const reference = theirSchema.find((e) => e.name === entry.name && e['meta-type'] === entry['meta-type']);
    assert.ok(reference, `${entry.name} exists in qemu-storage-daemon`);
    compared++;
    for (const key of ['arg-type', 'ret-type'].filter((k) => k in entry)) {
      assertCompatible(ourSchema, entry[key] as string, theirSchema, reference[key] as string, `${entry.name} ${key}`);
    }
    assert.deepEqual(entry.features, reference.features, `${entry.name} features`);
    // Deliberate difference: blockd lets query-version run out of band.
    if (entry.name !== 'query-version') assert.equal(entry['allow-oob'], reference['allow-oob'], `${entry.name} allow-oob`);
  }
  assert.ok(compared >= 10, `compared ${compared}`);
  // The job commands are compared above only because blockd declares them: they must stay declared.
  for (const name of ['blockdev-mirror', 'drive-mirror', 'blockdev-backup', 'drive-backup']) {
    assert.ok(ourSchema.some((entry) => entry.name === name && entry['meta-type'] === 'command'), `${name} is declared`);
  }
  await ours.close();
  await theirs.close();
});
