/*
 * Fuzz: thousands of random, mutated and truncated messages on one
 * connection, plus a storm of connections that send garbage and drop
 * mid-message. Every reply must be a well-formed QMP reply (JSON object with
 * return or error), the fuzzed connection must answer a clean request at the
 * end, and a second client must be served correctly the whole time.
 * Seeds are fixed for reproducibility; BLOCKD_FUZZ_SEED adds one more.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { RawConnection } from '../helpers/raw-connection.js';
import { QmpClient } from '../../src/qmp/client.js';

const temp = makeTempDir();
let daemon: BlockdProcess;
const socket = join(temp.dir, 'fuzz.sock');

before(async () => {
  daemon = await runBlockd(['--qmp', `unix:${socket}`]);
});

after(async () => {
  await daemon.stop();
  temp.cleanup();
});

function prng(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const COMMANDS = ['qmp_capabilities', 'query-version', 'query-commands', 'query-qmp-schema', 'no-such', 'blockdev-add', ''];
const KEYS = ['execute', 'exec-oob', 'arguments', 'id', 'enable', 'foo', '__proto__', 'constructor', 'é', ''];

function generator(random: () => number) {
  const pick = <T>(list: readonly T[]): T => list[Math.floor(random() * list.length)]!;
  const value = (depth: number): unknown => {
    const kind = Math.floor(random() * (depth > 3 ? 6 : 8));
    switch (kind) {
      case 0: return Math.floor(random() * 2 ** 31) * (random() < 0.5 ? -1 : 1);
      case 1: return random() * 1e10;
      case 2: return pick(['', 'oob', 'x'.repeat(Math.floor(random() * 300)), '😀\u0000"\\', '\ud83d']);
      case 3: return random() < 0.5;
      case 4: return null;
      case 5: return pick(KEYS);
      case 6: return Array.from({ length: Math.floor(random() * 4) }, () => value(depth + 1));
      default: return Object.fromEntries(Array.from({ length: Math.floor(random() * 4) }, () => [pick(KEYS), value(depth + 1)]));
    }
  };
  const request = (): string => {
    const message: Record<string, unknown> = {};
    if (random() < 0.9) message[random() < 0.9 ? 'execute' : 'exec-oob'] = random() < 0.9 ? pick(COMMANDS) : value(2);
    if (random() < 0.4) message.arguments = random() < 0.8 ? value(1) : { enable: [pick(['oob', 'bogus'])] };
    if (random() < 0.7) message.id = value(2);
    if (random() < 0.1) message[pick(KEYS)] = value(2);
    return JSON.stringify(message);
  };
  const mutate = (text: string): Buffer => {
    let bytes = Buffer.from(text);
    switch (Math.floor(random() * 9)) {
      case 0: return bytes.subarray(0, Math.floor(random() * bytes.length)); // truncated
      case 1: { // a random byte replaced
        const copy = Buffer.from(bytes);
        if (copy.length) copy[Math.floor(random() * copy.length)] = Math.floor(random() * 256);
        return copy;
      }
      case 2: return Buffer.from(Array.from({ length: Math.floor(random() * 64) }, () => Math.floor(random() * 256))); // noise
      case 3: return Buffer.from(text.replace(/"/g, "'")); // QEMU's single quotes
      case 4: return Buffer.from('['.repeat(Math.floor(random() * 1100)) + text);
      case 5: bytes = Buffer.from(text + text.slice(0, Math.floor(random() * text.length))); return bytes;
      case 6: return Buffer.from(`${text.slice(0, -1)},"id":1e${Math.floor(random() * 700)}}`);
      default: return bytes;
    }
  };
  return { request, mutate };
}

function checkReply(line: string): void {
  const reply = JSON.parse(line) as Record<string, unknown>;
  assert.equal(typeof reply, 'object');
  const keys = Object.keys(reply).filter((key) => key !== 'id');
  assert.ok(keys.length === 1 && (keys[0] === 'return' || keys[0] === 'error' || keys[0] === 'QMP'), `odd reply ${line.slice(0, 200)}`);
  if (keys[0] === 'error') {
    const error = reply.error as { class: string; desc: string };
    assert.ok(['GenericError', 'CommandNotFound'].includes(error.class), line.slice(0, 200));
    assert.equal(typeof error.desc, 'string');
  }
}

/** A second client that keeps asking for the version and checks each answer. */
function steadyClient(): { stop: () => Promise<number> } {
  let running = true;
  let answered = 0;
  const done = (async () => {
    const client = await QmpClient.connect(socket);
    while (running) {
      const version = await client.execute('query-version');
      assert.match(version.package, /^blockd /);
      answered++;
    }
    await client.close();
  })();
  return { stop: async () => { running = false; await done; return answered; } };
}

const seeds = [1, 2, 3, ...(process.env.BLOCKD_FUZZ_SEED ? [Number(process.env.BLOCKD_FUZZ_SEED)] : [])];

for (const seed of seeds) {
  test(`2000 fuzzed messages on one connection (seed ${seed}); a second client is served throughout`, async () => {
    const random = prng(seed);
    const { request, mutate } = generator(random);
    const steady = steadyClient();
    const connection = await RawConnection.open(socket);
    checkReply(await connection.readLine());
    let replies = 0;
    const drain = async () => {
      for (;;) {
        try {
          const line = await connection.readLine(20);
          checkReply(line);
          replies++;
        } catch (error) {
          if ((error as Error).message.startsWith('timed out')) return;
          throw error;
        }
      }
    };
    for (let batch = 0; batch < 40 && !connection.closed; batch++) {
      const parts: Buffer[] = [];
      for (let i = 0; i < 50; i++) parts.push(mutate(request()), Buffer.from(random() < 0.5 ? '\n' : ''));
      connection.send(Buffer.concat(parts));
      await drain();
    }
    assert.ok(!connection.closed, 'the fuzzed connection is still open');
    // A control byte puts the parser back in a clean state; then a clean request is answered.
    connection.send('\x01\n{"execute":"qmp_capabilities","id":"c"}{"execute":"query-version","id":"final"}');
    for (;;) {
      const line = await connection.readLine(10_000);
      checkReply(line);
      if (line.endsWith('"id": "final"}')) {
        assert.match(line, /^\{"return": \{"qemu"/);
        break;
      }
    }
    connection.end();
    assert.ok(replies > 500, `replies: ${replies}`);
    assert.ok((await steady.stop()) > 0, 'the steady client was answered');
  });
}

test('a storm of connections that send garbage and drop mid-message', async () => {
  const random = prng(99);
  const { request, mutate } = generator(random);
  const steady = steadyClient();
  for (let round = 0; round < 20; round++) {
    await Promise.all(Array.from({ length: 10 }, () => new Promise<void>((resolve) => {
      const client = net.connect(socket);
      client.on('error', () => resolve());
      client.on('connect', () => {
        client.write(Buffer.concat([Buffer.from('{"execute":"qmp_capabilities"}'), mutate(request()), mutate(request()).subarray(0, 7)]));
        setTimeout(() => {
          client.destroy();
          resolve();
        }, Math.floor(random() * 5));
      });
    })));
  }
  assert.ok((await steady.stop()) > 0);
  assert.equal(daemon.child.exitCode, null, 'the daemon is still running');
  const client = await QmpClient.connect(socket);
  await client.execute('query-version');
  await client.close();
});
