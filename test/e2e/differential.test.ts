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
  await connection.expectSilence(300);
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

/** Resolves masked names into a comparable structure. */
function shape(schema: Entry[], name: string, seen = new Set<string>()): unknown {
  const byName = new Map(schema.map((entry) => [entry.name, entry]));
  const entry = byName.get(name);
  if (!entry) throw new Error(`no schema entry ${name}`);
  if (seen.has(name)) return `<recursive>`;
  const inner = new Set(seen).add(name);
  switch (entry['meta-type']) {
    case 'builtin': return entry.name;
    case 'enum': return { enum: entry.values };
    case 'array': return { array: shape(schema, entry['element-type'] as string, inner) };
    case 'alternate': return { alternate: (entry.members as { type: string }[]).map((m) => shape(schema, m.type, inner)) };
    case 'object': return {
      members: (entry.members as { name: string; type: string; default?: null; features?: string[] }[])
        .map((m) => ({ name: m.name, optional: 'default' in m, features: m.features ?? [], type: shape(schema, m.type, inner) })),
      tag: entry.tag,
      variants: (entry.variants as { case: string; type: string }[] | undefined)?.map((v) => ({ case: v.case, type: shape(schema, v.type, inner) })),
    };
    default: throw new Error(`unexpected meta-type ${entry['meta-type']}`);
  }
}

test('every command both servers have is introspected with the same shape', async () => {
  const ours = await QmpClient.connect(`unix:${join(temp.dir, 'blockd.sock')}`);
  const theirs = await QmpClient.connect(qsd.socket);
  const ourSchema = (await ours.execute('query-qmp-schema')) as unknown as Entry[];
  const theirSchema = (await theirs.executeRaw('query-qmp-schema')) as Entry[];
  const theirCommands = new Map(theirSchema.filter((e) => e['meta-type'] === 'command').map((e) => [e.name, e]));
  let compared = 0;
  for (const command of ourSchema.filter((e) => e['meta-type'] === 'command')) {
    const reference = theirCommands.get(command.name);
    if (!reference) continue;
    compared++;
    for (const key of ['arg-type', 'ret-type']) {
      assert.deepEqual(shape(ourSchema, command[key] as string), shape(theirSchema, reference[key] as string), `${command.name} ${key}`);
    }
    // Deliberate difference: blockd lets query-version run out of band.
    if (command.name !== 'query-version') assert.equal(command['allow-oob'], reference['allow-oob'], `${command.name} allow-oob`);
  }
  assert.equal(compared, 5);
  await ours.close();
  await theirs.close();
});
