/*
 * What keeps one NBD client from hurting the others: the UNIX socket is created 0600;
 * with max-connections=1 multi-conn is not advertised, a second client waits (no greeting)
 * until the first leaves, as in QEMU's listen backlog, and a backlog of max-connections is
 * all that waits: further clients are dropped at once; a handshake that does not finish in
 * 10 s is dropped while a connected client stays; NBD_CMD_CACHE does not allocate what it
 * is asked to cache.
 */
import assert from 'node:assert/strict';
import { readFileSync, statSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { Command, TransmissionFlag } from '../../src/nbd/protocol.js';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { NbdRawClient } from '../helpers/nbd-raw-client.js';
import { makeTempDir } from '../helpers/paths.js';
import { waitUntil } from '../helpers/wait-until.js';

const temp = makeTempDir();
after(() => temp.cleanup());

async function startServer(name: string, serverOptions: string, nullOptions: string): Promise<{ blockd: BlockdProcess; socket: string }> {
  const socket = join(temp.dir, `${name}.sock`);
  const blockd = await runBlockd([
    '--blockdev', `driver=null-co,node-name=n0,read-zeroes=on,${nullOptions}`,
    '--nbd-server', `addr.type=unix,addr.path=${socket}${serverOptions}`,
    '--export', 'type=nbd,id=e0,node-name=n0,name=disk',
    '--qmp', `unix:${join(temp.dir, `${name}-qmp.sock`)}`,
  ]);
  return { blockd, socket };
}

/** A connection that counts what the server sends and tells when the server closes it. */
function rawConnection(path: string): { received: () => number; closed: Promise<void>; bytes: (count: number) => Promise<void>; destroy: () => void } {
  const socket = net.connect(path);
  let received = 0;
  const waiters: { count: number; resolve: () => void }[] = [];
  socket.on('data', (chunk: Buffer) => {
    received += chunk.length;
    for (const waiter of waiters.filter((w) => received >= w.count)) waiter.resolve();
  });
  socket.on('error', () => {});
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  return {
    received: () => received,
    closed,
    bytes: (count) => new Promise((resolve) => (received >= count ? resolve() : waiters.push({ count, resolve }))),
    destroy: () => socket.destroy(),
  };
}

describe('max-connections=1', { timeout: 20_000 }, () => {
  let server: { blockd: BlockdProcess; socket: string };
  before(async () => (server = await startServer('limited', ',max-connections=1', 'size=1048576')));
  after(() => server.blockd.stop());

  test('the NBD socket is created mode 0600, like the QMP socket', () => {
    assert.equal(statSync(server.socket).mode & 0o777, 0o600);
  });

  test('a second client waits for the first to leave; a third, beyond the backlog, is dropped', async () => {
    const first = await NbdRawClient.open(server.socket, 'disk');
    assert.equal(first.transmissionFlags & TransmissionFlag.CAN_MULTI_CONN, 0);
    const waiting = rawConnection(server.socket);
    const third = rawConnection(server.socket);
    // The server accepts in order: once the third is dropped, the second sits in the backlog.
    await third.closed;
    assert.equal(third.received(), 0, 'the dropped client got no greeting');
    assert.equal(waiting.received(), 0, 'no greeting while the only slot is taken');
    first.close();
    await waiting.bytes(18); // the greeting, once the slot is free
    waiting.destroy();
  });
});

describe('handshake limit and NBD_CMD_CACHE', { timeout: 60_000 }, () => {
  let server: { blockd: BlockdProcess; socket: string };
  // Reads take 10 ms, so every request on a connection's 16 slots is in the daemon at once.
  before(async () => (server = await startServer('open', '', 'size=1073741824,latency-ns=10000000')));
  after(() => server.blockd.stop());

  test('a client that stalls in the handshake is dropped; a connected one stays', { timeout: 30_000 }, async () => {
    const connected = await NbdRawClient.open(server.socket, 'disk');
    const stalled = rawConnection(server.socket);
    await stalled.bytes(18); // the greeting; the client never answers it
    await stalled.closed;
    await waitUntil(() => server.blockd.stderr().includes('handshake not finished within 10 s'), 'the drop is logged');
    assert.deepEqual(await connected.read(0, 4096), Buffer.alloc(4096), 'the connected client is still served');
    connected.close();
  });

  test('CACHE requests of 32 MiB on every slot do not make the daemon allocate them', async () => {
    const peak = () => Number(/VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${server.blockd.child.pid}/status`, 'utf8'))![1]) * 1024;
    const before = peak();
    const clients = await Promise.all([0, 1].map(() => NbdRawClient.open(server.socket, 'disk', [])));
    for (let round = 0; round < 2; round++) {
      await Promise.all(clients.map(async (client) => {
        for (let slot = 0; slot < 16; slot++) client.request(Command.CACHE, slot * (32 << 20), 32 << 20);
        for (let slot = 0; slot < 16; slot++) {
          const reply = await client.readReply();
          assert.deepEqual(reply.kind === 'simple' ? reply.error : reply.type, 0, 'CACHE succeeds with a simple reply');
        }
      }));
    }
    const grown = peak() - before;
    assert.ok(grown < 256 << 20, `peak RSS grew by ${grown >> 20} MiB for 2 x 16 CACHE requests of 32 MiB`);
    for (const client of clients) client.close();
  });
});
