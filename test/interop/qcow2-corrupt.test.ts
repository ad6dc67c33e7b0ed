/*
 * Corrupt qcow2 images through blockd: a clear error at open (file untouched) or on the request (EIO),
 * never a crash or an unhandled rejection; found at run time in a writable image: reported and marked.
 */
import assert from 'node:assert/strict';
import { copyFileSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { after, afterEach, before, describe, test } from 'node:test';
import { EventBus, type RaisedEvent } from '../../src/event-bus.js';
import { openImage, type ImageSession } from '../../src/blockdev/image-session.js';
import { makeTempDir } from '../helpers/paths.js';
import {
  KiB, MiB, assertDiskMatchesRaw, convertToRaw, createQcow2, qemuImgCheck, qemuIo, readAt, readU64, runQemuImg, sha256File, writeAt, writeU64,
} from '../helpers/qemu-tools.js';
import { OFLAG_COPIED, qcow2Layout } from '../helpers/qcow2-layout.js';

const { dir, cleanup } = makeTempDir('blockd-qcow2-corrupt-');
after(cleanup);

const unhandled: unknown[] = [];
const onUnhandled = (reason: unknown) => unhandled.push(reason);
before(() => process.on('unhandledRejection', onUnhandled));
after(() => process.off('unhandledRejection', onUnhandled));
afterEach(async () => {
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(unhandled.splice(0), [], 'no unhandled rejection');
});

const CS = 64 * KiB;

interface Layout {
  l1Offset: number;
  refcountTableOffset: number;
  /** The L2 table mapping guest cluster 0 and the L2 entry of guest cluster 1. */
  l2Offset: number;
  l2Entry1: number;
}

/** A 64K-cluster image with data in guest clusters 0-3, and where its tables are. */
function makeImage(name: string): { path: string; layout: Layout } {
  const path = createQcow2(join(dir, `${name}.qcow2`), 4 * MiB);
  qemuIo(path, [`write -P 0x5a 0 ${4 * CS}`]);
  const { l1, refcountTable, l2 } = qcow2Layout(path);
  return { path, layout: { l1Offset: l1, refcountTableOffset: refcountTable, l2Offset: l2, l2Entry1: l2 + 8 } };
}

function captureEvents(): { bus: EventBus; events: RaisedEvent[] } {
  const bus = new EventBus();
  const events: RaisedEvent[] = [];
  bus.subscribe((event) => events.push(event));
  return { bus, events };
}

/** Opening fails with `message`, read-only and writable, and the file is not touched. */
async function assertRefusedAtOpen(path: string, message: RegExp): Promise<void> {
  const digest = sha256File(path);
  for (const writable of [false, true]) {
    const { bus, events } = captureEvents();
    await assert.rejects(openImage(path, { format: 'qcow2', writable, bus }), message, `open writable=${writable}`);
    assert.deepEqual(events, [], 'no event for an image that never opened');
  }
  assert.equal(sha256File(path), digest, 'the file is unchanged');
}

async function withSession(path: string, writable: boolean, bus: EventBus, body: (session: ImageSession) => Promise<void>): Promise<void> {
  const session = await openImage(path, { format: 'qcow2', writable, bus, formatOptions: { discard: 'unmap' } });
  try {
    await body(session);
  } finally {
    await session.close();
  }
}

/** The header's corrupt bit (incompatible feature bit 1). */
function corruptBit(path: string): boolean {
  return (readU64(path, 72) & 2n) !== 0n;
}

/**
 * A writable session finds the corruption on a request: that request fails with EIO, one fatal
 * BLOCK_IMAGE_CORRUPTED is raised, the corrupt bit reaches the disk, and like QEMU (which takes
 * the driver away from the node) every later request, reads too, fails with ENOMEDIUM.
 */
async function assertCorruptionFoundAtRunTime(path: string, request: (session: ImageSession) => Promise<void>, message: RegExp): Promise<void> {
  const { bus, events } = captureEvents();
  await withSession(path, true, bus, async (session) => {
    await assert.rejects(request(session), (error: NodeJS.ErrnoException) => error.code === 'EIO' && message.test(error.message));
    await assert.rejects(session.disk.write(3 * CS, Buffer.alloc(512, 1)), (error: NodeJS.ErrnoException) => error.code === 'ENOMEDIUM');
    await assert.rejects(session.disk.read(0, Buffer.alloc(512)), (error: NodeJS.ErrnoException) => error.code === 'ENOMEDIUM');
  });
  const corrupted = events.filter((event) => event.event === 'BLOCK_IMAGE_CORRUPTED');
  assert.equal(corrupted.length, 1, `one BLOCK_IMAGE_CORRUPTED event: ${JSON.stringify(events)}`);
  const data = corrupted[0]!.data as { 'node-name': string; fatal: boolean; msg: string };
  assert.equal(data['node-name'], 'image');
  assert.equal(data.fatal, true);
  assert.match(data.msg, message);
  assert.ok(corruptBit(path), 'the corrupt bit is set on disk');
  await assert.rejects(openImage(path, { format: 'qcow2', writable: true }), /Image is corrupt; cannot be opened read\/write/);
}

describe('refused at open', () => {
  test('bad magic', async () => {
    const { path } = makeImage('magic');
    writeAt(path, 0, Buffer.from('QFIX'));
    await assertRefusedAtOpen(path, /Image is not in qcow2 format/);
  });

  test('an unknown incompatible feature bit', async () => {
    const { path } = makeImage('feature');
    writeU64(path, 72, readU64(path, 72) | (1n << 10n));
    await assertRefusedAtOpen(path, /Unsupported qcow2 feature\(s\): Unknown incompatible feature: 400/);
  });

  test('the L1 table offset past the end of the file', async () => {
    const { path } = makeImage('l1-eof');
    writeU64(path, 40, 256n * BigInt(CS));
    await assertRefusedAtOpen(path, /L1 table .*past the end of the image file/);
  });

  test('reserved bits set in an L1 entry', async () => {
    const { path, layout } = makeImage('l1-reserved');
    writeU64(path, layout.l1Offset, readU64(path, layout.l1Offset) | (1n << 56n));
    await assertRefusedAtOpen(path, /L1 entry 0x[0-9a-f]+ has reserved bits set \(L1 index: 0x0\)/);
  });

  test('the corrupt bit: refused read-write, read-only reads what QEMU reads', async () => {
    const { path } = makeImage('corrupt-bit');
    writeU64(path, 72, readU64(path, 72) | 2n);
    const digest = sha256File(path);
    await assert.rejects(openImage(path, { format: 'qcow2', writable: true }), /Image is corrupt; cannot be opened read\/write/);
    const raw = join(dir, 'corrupt-bit.raw');
    convertToRaw(path, raw);
    const session = await openImage(path, { format: 'qcow2' });
    try {
      await assertDiskMatchesRaw(session.disk, raw, 'corrupt bit, read-only');
      await assert.rejects(session.disk.write(0, Buffer.alloc(512)), /read-only|permission/);
    } finally {
      await session.close();
    }
    assert.equal(sha256File(path), digest, 'the file is unchanged');
  });
});

describe('found at run time', () => {
  test('an L2 entry pointing into the L1 table: reads as QEMU reads, writes are refused', async () => {
    const { path, layout } = makeImage('l2-into-l1');
    writeU64(path, layout.l2Entry1, BigInt(layout.l1Offset) | OFLAG_COPIED);
    const l1Before = readU64(path, layout.l1Offset);
    const raw = join(dir, 'l2-into-l1.raw');
    convertToRaw(path, raw);
    await withSession(path, false, new EventBus(), (session) => assertDiskMatchesRaw(session.disk, raw, 'L2 entry into the L1 table'));
    await assertCorruptionFoundAtRunTime(path, (session) => session.disk.write(CS + 100, Buffer.alloc(100, 0xee)),
      /Preventing invalid write on metadata \(overlaps with active L1 table\)/);
    assert.equal(readU64(path, layout.l1Offset), l1Before, 'the L1 table was not overwritten');
    assert.equal(qemuImgCheck(path).status, 2, 'qemu-img check still sees the corruption');
  });

  for (const request of ['write', 'writeZeroes', 'discard'] as const) {
    test(`an L2 entry pointing into the refcount table (shared, not COPIED): ${request} drops its refcount as QEMU does, the next allocation there is refused`, async () => {
      const { path, layout } = makeImage(`l2-into-reftable-${request}`);
      writeU64(path, layout.l2Entry1, BigInt(layout.refcountTableOffset));
      const reftableBefore = readAt(path, layout.refcountTableOffset, CS);
      await assertCorruptionFoundAtRunTime(path, async (session) => {
        if (request === 'write') await session.disk.write(CS + 100, Buffer.alloc(100, 0xee));
        else if (request === 'writeZeroes') await session.disk.writeZeroes(CS, CS, { mayUnmap: true });
        else await session.disk.discard(CS, CS);
        // The reference is dropped once the new entry is durable; the freed cluster is neither discarded nor overwritten.
        await session.disk.flush();
        assert.ok(readAt(path, layout.refcountTableOffset, CS).equals(reftableBefore), 'the refcount table is intact after the release');
        // Its refcount is 0 now, so the next allocation picks it: the overlap check refuses that write.
        await session.disk.write(8 * CS, Buffer.alloc(CS, 0xdd));
      }, /Preventing invalid write on metadata \(overlaps with refcount table\)/);
      assert.ok(readAt(path, layout.refcountTableOffset, CS).equals(reftableBefore), 'the refcount table was not overwritten');
    });
  }

  test('reserved bits set in an L2 entry: reads fail with EIO, a writable image is marked corrupt', async () => {
    const { path, layout } = makeImage('l2-reserved');
    writeU64(path, layout.l2Entry1, readU64(path, layout.l2Entry1) | 0x2n);
    const { bus, events } = captureEvents();
    await withSession(path, false, bus, async (session) => {
      await assert.rejects(session.disk.read(CS, Buffer.alloc(512)), (error: NodeJS.ErrnoException) => error.code === 'EIO' && /reserved bits set/.test(error.message));
      const fine = Buffer.alloc(512);
      await session.disk.read(0, fine);
      assert.ok(fine.equals(Buffer.alloc(512, 0x5a)), 'the rest of the disk still reads');
    });
    assert.equal((events[0]?.data as { fatal?: boolean } | undefined)?.fatal, false, 'read-only: a non-fatal report');
    assert.ok(!corruptBit(path), 'a read-only session does not write the corrupt bit');
    await assertCorruptionFoundAtRunTime(path, (session) => session.disk.write(CS + 7, Buffer.alloc(3, 1)), /reserved bits set/);
  });

  test('a truncated L2 table: reads fail with EIO instead of returning zeros', async () => {
    const { path, layout } = makeImage('l2-truncated');
    truncateSync(path, layout.l2Offset + 4 * KiB);
    await withSession(path, false, new EventBus(), async (session) => {
      await assert.rejects(session.disk.read(0, Buffer.alloc(CS)), (error: NodeJS.ErrnoException) => error.code === 'EIO' && /past the end of the image file/.test(error.message));
    });
    await assertCorruptionFoundAtRunTime(path, (session) => session.disk.write(100, Buffer.alloc(100, 1)), /past the end of the image file/);
  });

  test('a copy of a corrupt image can be repaired by qemu-img and opened again', async () => {
    const { path, layout } = makeImage('repair');
    writeU64(path, layout.l2Entry1, readU64(path, layout.l2Entry1) | 0x2n);
    await assertCorruptionFoundAtRunTime(path, (session) => session.disk.write(CS, Buffer.alloc(CS, 1)), /reserved bits set/);
    const copy = join(dir, 'repaired.qcow2');
    copyFileSync(path, copy);
    writeU64(copy, layout.l2Entry1, 0n);
    runQemuImg('check', '-q', '-r', 'all', copy);
    assert.ok(!corruptBit(copy), 'qemu-img check -r all cleared the corrupt bit');
    await withSession(copy, true, new EventBus(), (session) => session.disk.write(CS, Buffer.alloc(CS, 2)));
    assert.equal(qemuImgCheck(copy).status, 0);
  });
});
