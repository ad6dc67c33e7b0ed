/*
 * blockd's nbd driver against real NBD servers (qemu-nbd, qemu-storage-daemon,
 * nbdkit) in an in-process daemon: data written beforehand by qemu-io reads
 * back, data written through blockd is in the image afterwards (qemu-img
 * compare, qemu-io read -P), block status matches what qemu-img map sees
 * through QEMU's own client, a qcow2 overlay reads through to the export,
 * odd block sizes, simple replies, refused write-zeroes and server errors
 * work, and a lost server fails requests with EIO or, with reconnect-delay,
 * is waited for.
 */
import assert from 'node:assert/strict';
import { copyFileSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { pino } from 'pino';
import type { ChildEdge } from '../../src/blockdev/child-edge.js';
import { Daemon } from '../../src/daemon.js';
import { encodeChunkHeader, encodeGreeting, encodeInfoExport, encodeOffsetHeader, encodeOptionReply, decodeOptionHeader, decodeRequestHeader } from '../../src/nbd/messages.js';
import { ChunkType, Command, Option, OptionReply, TransmissionFlag } from '../../src/nbd/protocol.js';
import { SocketReader } from '../../src/nbd/socket-reader.js';
import { mapEntries } from '../../src/tools/img-map.js';
import { ModelledDisk } from '../helpers/disk-model.js';
import { freePort, startNbdkit, startQemuNbd, startQsdExport, type NbdServer } from '../helpers/nbd-servers.js';
import { makeTempDir } from '../helpers/paths.js';
import { KiB, MiB, SeededRandom, assertCheckClean, createQcow2, qemuIo, qemuIoReadPatterns, runQemuImg, type MapExtent } from '../helpers/qemu-tools.js';

const { dir, cleanup } = makeTempDir('blockd-nbd-client-');
const daemon = new Daemon(pino({ level: 'silent' }));
after(async () => {
  await daemon.shutdown('test');
  cleanup();
});

const CLUSTER = 64 * KiB;
const isEio = (error: Error & { code?: string }) => error.code === 'EIO';

async function addNbd(name: string, server: NbdServer, extra: Record<string, unknown> = {}): Promise<void> {
  await daemon.runCommand('blockdev-add', { driver: 'nbd', 'node-name': name, server: server.address, export: 'disk', ...extra });
}

/** Runs `body` with a user of node `name`; then, whatever happened, detaches it and deletes `remove` (default: the node). */
async function usingNode(name: string, body: (user: ChildEdge) => Promise<void>, options: { write?: boolean; remove?: string[] } = {}): Promise<void> {
  const node = daemon.graph.find(name)!;
  const user = await daemon.graph.attachUser({ describe: () => 'test user' }, node, 'root', { perm: options.write === false ? 0x1 : 0x3, shared: 0xf });
  try {
    await body(user);
  } finally {
    await daemon.graph.detach(user);
    for (const remove of options.remove ?? [name]) await daemon.runCommand('blockdev-del', { 'node-name': remove });
  }
}

/** A 64 MiB qcow2 with data, a zero cluster and a gap, written by qemu-io. */
function seededImage(name: string): string {
  const image = createQcow2(join(dir, name), 64 * MiB);
  qemuIo(image, ['write -P 0xab 0 64k', 'write -P 0xcd 1M 64k', 'write -z 2M 64k', 'write -P 0x5e 4M 1M'], ['-f', 'qcow2']);
  return image;
}

async function assertReadsModel(m: ModelledDisk, offset: number, length: number, context: string): Promise<void> {
  const got = Buffer.alloc(length);
  await m.disk.read(offset, got);
  assert.ok(got.equals(m.bytes.subarray(offset, offset + length)), `${context}: [${offset}, +${length}) differs from the model`);
}

/** blockd's map of a node, in qemu-img map's JSON terms. */
async function blockdMap(name: string): Promise<MapExtent[]> {
  const node = daemon.graph.find(name)!;
  const entries: MapExtent[] = [];
  for await (const { filename: _filename, ...entry } of mapEntries(node, 0, node.length())) entries.push(entry);
  return entries;
}

function qemuMap(uri: string): MapExtent[] {
  return JSON.parse(runQemuImg('map', '--output=json', '-f', 'raw', uri)) as MapExtent[];
}

/** Reads, every kind of write, block status and flush through an nbd node, mirrored in a model of the disk. */
async function exercise(m: ModelledDisk, server: NbdServer, node: string, context: string): Promise<void> {
  const random = new SeededRandom(7);
  await assertReadsModel(m, 0, m.size, `${context}: whole disk (two 32 MiB requests)`);
  await assertReadsModel(m, 0xffff8, 24, `${context}: across data and gap`);
  await m.write(3 * MiB, random.bytes(128 * KiB), { fua: true });
  await m.write(3 * MiB + 100, Buffer.alloc(1000, 0x22));
  // Many requests in flight at once on the one connection.
  await Promise.all(Array.from({ length: 24 }, (_, i) => m.write(6 * MiB + i * 64 * KiB + i, random.bytes(5000))));
  await m.write(16 * MiB, random.bytes(40 * MiB)); // split at 32 MiB
  await m.writeZeroes(MiB + 4096, 8192);
  await m.writeZeroes(4 * MiB, 256 * KiB, { mayUnmap: true });
  await m.write(8 * MiB, Buffer.alloc(256 * KiB, 0x33));
  await m.discard(8 * MiB, 256 * KiB);
  await m.flush();
  await assertReadsModel(m, 0, m.size, `${context}: after the writes`);
  const map = await blockdMap(node);
  assert.deepEqual(map, qemuMap(server.uri), `${context}: map as qemu-img sees it through QEMU's client`);
  const discarded = map.find((entry) => entry.start <= 8 * MiB && entry.start + entry.length > 8 * MiB)!;
  assert.equal(discarded.data, false, `${context}: the discarded clusters are no longer data`);
}

describe('against qemu-nbd and qemu-storage-daemon', () => {
  const servers: [string, (image: string) => Promise<NbdServer>][] = [
    ['qemu-nbd', (image) => startQemuNbd(image, { socket: join(dir, 'qemu-nbd.sock') }, ['--discard=unmap'])],
    ['qemu-storage-daemon', (image) => startQsdExport(dir, image)],
  ];
  for (const [kind, start] of servers) {
    test(`${kind}: read, write, zero, discard, flush and block status`, async () => {
      const image = seededImage(`${kind}.qcow2`);
      const bytes = await ModelledDisk.imageBytes(image);
      const server = await start(image);
      let m!: ModelledDisk;
      try {
        await addNbd('n0', server, { discard: 'unmap' });
        await usingNode('n0', async (user) => {
          m = new ModelledDisk(user, bytes, CLUSTER);
          await exercise(m, server, 'n0', kind);
        });
      } finally {
        await server.stop();
      }
      assertCheckClean(image, kind);
      await m.assertImageMatches(image, kind);
      qemuIoReadPatterns(image, [{ offset: 0, length: 64 * KiB, pattern: 0xab }, { offset: 3 * MiB + 100, length: 1000, pattern: 0x22 }], kind);
    });
  }

  test('TCP, and a qcow2 overlay whose backing is the nbd node: reads fall through, writes land in the overlay', async () => {
    const base = seededImage('base.qcow2');
    const overlay = createQcow2(join(dir, 'overlay.qcow2'), 64 * MiB);
    const port = await freePort();
    const baseBytes = await ModelledDisk.imageBytes(base);
    const server = await startQemuNbd(base, { port });
    try {
      await addNbd('backing', server);
      assert.equal((daemon.graph.find('backing')!.state.info().filename), `nbd://127.0.0.1:${port}/disk`);
      await daemon.runCommand('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: overlay }, backing: 'backing' });
      await usingNode('top', async (user) => {
        const disk = new ModelledDisk(user, baseBytes, CLUSTER); // writes land in baseBytes too: the expected view
        await assertReadsModel(disk, 0, 8 * MiB, 'through the overlay');
        await disk.write(MiB + 1000, Buffer.alloc(100, 0x99)); // copy-on-write of the rest of the cluster from NBD
        await disk.write(5 * MiB, Buffer.alloc(CLUSTER, 0x77));
        await assertReadsModel(disk, 0, 8 * MiB, 'after writing to the overlay');
      }, { remove: ['top', 'backing'] });
      // QEMU reads the same through the overlay on the same export.
      const json = JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: overlay }, backing: { driver: 'nbd', server: server.address, export: 'disk' } });
      const expected = join(dir, 'overlay-expected.raw');
      writeFileSync(expected, baseBytes);
      runQemuImg('compare', '-f', 'raw', expected, `json:${json}`);
    } finally {
      await server.stop();
    }
    // The overlay alone holds exactly the written clusters (with the copied-on-write bytes); the base is untouched.
    qemuIo(overlay, ['read -P 0xcd 1M 1000', 'read -P 0x99 1049576 100', 'read -P 0xcd 1049676 64436', 'read -P 0x77 5M 64k', 'read -P 0 0 64k'], ['-f', 'qcow2']);
    qemuIo(base, ['read -P 0xcd 1M 64k', 'read -P 0x5e 4M 64k', 'read -P 0 5M 64k'], ['-f', 'qcow2']);
    assertCheckClean(overlay, 'overlay');
  });
});

describe('against nbdkit', () => {
  const SIZE = 4 * MiB;

  /** A raw file with a pattern at 1 MiB, served by nbdkit with `args` (filters before the plugin). */
  async function withNbdkit(name: string, args: string[], body: (m: ModelledDisk, server: NbdServer) => Promise<void>): Promise<void> {
    const file = join(dir, `${name}.raw`);
    const initial = Buffer.alloc(SIZE);
    initial.fill(0x42, MiB, MiB + 100 * KiB);
    writeFileSync(file, initial);
    const server = await startNbdkit(join(dir, `${name}.sock`), [...args.filter((a) => a.startsWith('--')), 'file', file, ...args.filter((a) => !a.startsWith('--'))]);
    try {
      await addNbd(name, server, { discard: 'unmap' });
      await usingNode(name, (user) => body(new ModelledDisk(user, initial, 4096), server));
    } finally {
      await server.stop();
    }
    // The model wrote into `initial`: it now holds what the file must hold.
    assert.ok(readFileSync(file).equals(initial), `${name}: the file holds what was written`);
  }

  test('minimum block size 4096: unaligned requests become read-modify-write, large ones split at the maximum', async () => {
    await withNbdkit('aligned', ['--filter=blocksize-policy', 'blocksize-minimum=4096', 'blocksize-preferred=65536', 'blocksize-maximum=1048576', 'blocksize-error-policy=error'], async (m) => {
      await assertReadsModel(m, MiB - 3, 100 * KiB + 10, 'unaligned read');
      await m.write(100, Buffer.alloc(10, 0x11));
      await m.write(MiB + 4090, Buffer.alloc(3 * MiB - 8000, 0x12)); // split at 1 MiB, partial blocks at both ends
      await Promise.all([m.write(8192 + 10, Buffer.alloc(20, 0x13)), m.write(8192 + 100, Buffer.alloc(20, 0x14))]); // one block, serialised
      await m.writeZeroes(20000, 30000);
      await m.discard(3 * MiB - 100, 10000); // only whole blocks are trimmed
      await assertReadsModel(m, 0, SIZE, 'after the writes');
    });
  });

  test('no structured replies: simple replies carry the data, block status reports data everywhere', async () => {
    await withNbdkit('simple', ['--no-sr'], async (m, server) => {
      await assertReadsModel(m, 0, SIZE, 'simple read');
      await m.write(12345, Buffer.alloc(5000, 0x21));
      await m.writeZeroes(MiB, 8192);
      await assertReadsModel(m, 0, SIZE, 'after the writes');
      assert.deepEqual(await blockdMap('simple'), [{ start: 0, length: SIZE, depth: 0, present: true, zero: false, data: true, offset: 0 }]);
      assert.deepEqual(await blockdMap('simple'), qemuMap(server.uri));
    });
  });

  test('no WRITE_ZEROES: zeros are written as data, and a write that must not fall back is refused', async () => {
    await withNbdkit('nozero', ['--filter=nozero'], async (m) => {
      await m.writeZeroes(MiB, 64 * KiB);
      await assert.rejects(m.disk.writeZeroes(2 * MiB, 4096, { noFallback: true }), (error: Error & { code?: string }) => error.code === 'ENOTSUP');
      await assertReadsModel(m, 0, SIZE, 'zeros written');
    });
  });

  test('a server error fails that request only; the connection goes on', async () => {
    const trigger = join(dir, 'read-errors-on');
    writeFileSync(trigger, '');
    await withNbdkit('errors', ['--filter=error', 'error-pread=EIO', 'error-pread-rate=100%', `error-pread-file=${trigger}`], async (m) => {
      await assert.rejects(m.disk.read(0, Buffer.alloc(4096)), isEio);
      await m.write(4096, Buffer.alloc(4096, 0x31));
      rmSync(trigger);
      await assertReadsModel(m, 0, 16 * KiB, 'after the error');
    });
  });
});

describe('losing the server', () => {
  test('without reconnect-delay: requests fail with EIO at once, and again until the server is back', async () => {
    const image = seededImage('lost.qcow2');
    const socket = join(dir, 'lost.sock');
    let server = await startQemuNbd(image, { socket });
    try {
      await addNbd('lost', server);
      await usingNode('lost', async (user) => {
        const reads = Array.from({ length: 8 }, () => user.read(0, Buffer.alloc(8 * MiB)).then(() => 'ok', (error: Error & { code?: string }) => error.code));
        await server.stop('SIGKILL');
        for (const outcome of await Promise.all(reads)) assert.ok(outcome === 'ok' || outcome === 'EIO', `a read in flight ends ok or EIO, not ${outcome}`);
        await assert.rejects(user.read(0, Buffer.alloc(512)), isEio);
        // Like QEMU, a request after the loss starts reconnecting in the background; later ones use the new connection.
        server = await startQemuNbd(image, { socket });
        let data: Buffer | undefined;
        for (let attempt = 0; attempt < 100 && !data; attempt++) {
          const buffer = Buffer.alloc(512);
          data = await user.read(0, buffer).then(() => buffer, () => undefined);
          if (!data) await new Promise((resolve) => setTimeout(resolve, 100));
        }
        assert.ok(data?.equals(Buffer.alloc(512, 0xab)), 'reads work again once the server is back');
      });
    } finally {
      await server.stop();
    }
  });

  test('with reconnect-delay: a request issued during the outage waits and succeeds once the server is back', async () => {
    const image = seededImage('back.qcow2');
    const socket = join(dir, 'back.sock');
    let server = await startQemuNbd(image, { socket });
    try {
      await addNbd('back', server, { 'reconnect-delay': 20 });
      await usingNode('back', async (user) => {
        await server.stop('SIGKILL');
        const buffer = Buffer.alloc(64 * KiB);
        const read = user.read(MiB, buffer);
        const write = user.write(7 * MiB, Buffer.alloc(4096, 0x66));
        await new Promise((resolve) => setTimeout(resolve, 300));
        server = await startQemuNbd(image, { socket });
        await read;
        await write;
        assert.ok(buffer.equals(Buffer.alloc(64 * KiB, 0xcd)));
      });
    } finally {
      await server.stop();
    }
    qemuIo(image, ['read -P 0x66 7M 4k'], ['-f', 'qcow2']);
  });

  test('with reconnect-delay: requests fail with EIO once the delay has passed', async () => {
    const image = seededImage('gone.qcow2');
    const server = await startQemuNbd(image, { socket: join(dir, 'gone.sock') });
    await addNbd('gone', server, { 'reconnect-delay': 1 });
    await usingNode('gone', async (user) => {
      await server.stop('SIGKILL');
      await assert.rejects(user.read(0, Buffer.alloc(512)), isEio);
      await assert.rejects(user.read(0, Buffer.alloc(512)), isEio); // no server yet: still EIO
    });
  });

  test('open-timeout: the first connection is retried until the server appears', async () => {
    const image = seededImage('late.qcow2');
    const socket = join(dir, 'late.sock');
    const absent = { address: { type: 'unix', path: socket } } as NbdServer;
    await assert.rejects(addNbd('late', absent), /Failed to connect to '.*late\.sock': No such file or directory/);
    const opening = addNbd('late', absent, { 'open-timeout': 30 });
    await new Promise((resolve) => setTimeout(resolve, 500));
    const server = await startQemuNbd(image, { socket });
    try {
      await opening;
      await usingNode('late', async (user) => {
        const buffer = Buffer.alloc(4096);
        await user.read(0, buffer);
        assert.ok(buffer.equals(Buffer.alloc(4096, 0xab)));
      }, { write: false });
    } finally {
      await server.stop();
    }
  });
});

describe('open errors', () => {
  test('missing socket, unknown export, read-only export, missing x-dirty-bitmap context, unsupported options, unknown TLS credentials', async () => {
    const image = seededImage('errors.qcow2');
    const readOnlyImage = join(dir, 'errors-ro.qcow2');
    copyFileSync(image, readOnlyImage);
    const server = await startQemuNbd(image, { socket: join(dir, 'errors.sock') });
    const readOnly = await startQemuNbd(readOnlyImage, { socket: join(dir, 'errors-ro.sock') }, ['-r']);
    try {
      const add = (extra: Record<string, unknown>, target = server) => addNbd('x', target, extra);
      await assert.rejects(add({ server: { type: 'unix', path: join(dir, 'nosuch.sock') } }), { message: `Failed to connect to '${join(dir, 'nosuch.sock')}': No such file or directory` });
      await assert.rejects(add({ export: 'nope' }), { message: 'Requested export not available' });
      await assert.rejects(add({}, readOnly), { message: 'Could not open image: Permission denied' });
      await assert.rejects(add({ server: { type: 'vsock', cid: '3', port: '1' } }), { message: 'vsock socket addresses are not supported by blockd' });
      await assert.rejects(add({ 'tls-creds': 'tls0' }), { message: "No TLS credentials with id 'tls0'" });
      // qemu-nbd exports no bitmap here; QEMU's own text is dropped on this path.
      await assert.rejects(add({ 'x-dirty-bitmap': 'qemu:dirty-bitmap:bm0' }), { message: 'Could not open image: Invalid argument' });
      await assert.rejects(add({ 'x-dirty-bitmap': 'x'.repeat(4097) }), { message: 'x-dirty-bitmap query too long to send to server' });
      // auto-read-only takes the export as it is; the node is then read-only.
      await add({ 'auto-read-only': true }, readOnly);
      assert.equal(daemon.graph.find('x')!.readOnly, true);
      await daemon.runCommand('blockdev-del', { 'node-name': 'x' });
    } finally {
      await server.stop();
      await readOnly.stop();
    }
  });
});

/**
 * A server that negotiates correctly, then answers a READ with a data chunk outside
 * the request: no real server does that, so this one is scripted with the shared codec.
 */
async function misbehavingServer(socketPath: string): Promise<net.Server> {
  const server = net.createServer(async (socket) => {
    const reader = new SocketReader(socket);
    socket.on('error', () => {});
    try {
      socket.write(encodeGreeting());
      await reader.read(4);
      for (;;) {
        const option = decodeOptionHeader(await reader.read(16));
        await reader.read(option.length);
        if (option.option === Option.GO) {
          socket.write(encodeOptionReply(Option.GO, OptionReply.INFO, encodeInfoExport(MiB, TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH)));
          socket.write(encodeOptionReply(Option.GO, OptionReply.ACK));
          break;
        }
        socket.write(encodeOptionReply(option.option, OptionReply.ACK)); // structured replies yes, no meta context
      }
      for (;;) {
        const request = decodeRequestHeader(await reader.read(28));
        if (request.type !== Command.READ) continue;
        const data = Buffer.alloc(16);
        socket.write(Buffer.concat([encodeChunkHeader(request.cookie, ChunkType.OFFSET_DATA, true, 8 + data.length), encodeOffsetHeader(request.offset + request.length), data]));
      }
    } catch {
      socket.destroy();
    }
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  return server;
}

test('a server that breaks the protocol: the request and later ones fail with EIO, no reconnection', async () => {
  const socketPath = join(dir, 'liar.sock');
  const liar = await misbehavingServer(socketPath);
  try {
    await addNbd('liar', { address: { type: 'unix', path: socketPath } } as NbdServer, { 'reconnect-delay': 30 });
    await usingNode('liar', async (user) => {
      await assert.rejects(user.read(0, Buffer.alloc(4096)), isEio);
      await assert.rejects(user.read(0, Buffer.alloc(4096)), /Protocol error: server sent chunk exceeding requested region/);
    }, { write: false });
  } finally {
    liar.close();
  }
});
