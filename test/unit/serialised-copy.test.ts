/*
 * A job's copy (read the range, write it back) and a client write to the same
 * bytes must not interleave, or the copy would write stale data over the
 * client's: with serialising on, the client write waits for the copy, and so
 * does a write to another part of a cluster being copied. A real qcow2 image,
 * and an interleaving forced by holding the copy between its read and its write.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { openImage, type ImageSession } from '../../src/blockdev/image-session.js';
import { makeTempDir } from '../helpers/paths.js';
import { createQcow2, MiB } from '../helpers/qemu-tools.js';

/** A fresh 4 MiB qcow2 image (64 KiB clusters), open read-write with serialising on. */
async function withSerialisingDisk(use: (session: ImageSession) => Promise<void>): Promise<void> {
  const temp = makeTempDir();
  try {
    const session = await openImage(createQcow2(join(temp.dir, 'disk.qcow2'), 4 * MiB), { format: 'qcow2', writable: true });
    const end = session.disk.child.beginSerialising();
    await use(session);
    end();
    await session.close();
  } finally {
    temp.cleanup();
  }
}

test('a write to a range being copied waits for the copy, so the copy never overwrites it', () => withSerialisingDisk(async (session) => {
  let letCopyWrite!: () => void;
  const copyMayWrite = new Promise<void>((resolve) => (letCopyWrite = resolve));
  const copy = session.disk.child.serialisedCopy(0, 65536, async () => {
    const stale = Buffer.alloc(65536);
    await session.disk.read(0, stale);
    await copyMayWrite;
    await session.disk.write(0, stale, { serialisedCopy: true });
  });
  const clientWrite = session.disk.write(0, Buffer.alloc(65536, 0x5a));
  // Real I/O elsewhere: by the time it completes, a client write nothing holds back has gone through.
  await session.disk.read(1 << 20, Buffer.alloc(65536));
  letCopyWrite();
  await Promise.all([copy, clientWrite]);
  const data = Buffer.alloc(65536);
  await session.disk.read(0, data);
  assert.ok(data.every((byte) => byte === 0x5a), 'the client write is what the range holds');
}));

test('a copy holds whole clusters: a write to another part of the cluster waits for it too', () => withSerialisingDisk(async (session) => {
  const node = session.disk.child;
  // Which writes reached the qcow2 driver, in order.
  const reached: string[] = [];
  const driverWrite = node.state.write!.bind(node.state);
  node.state.write = (offset, buffer, flags) => {
    reached.push(`write ${offset}`);
    return driverWrite(offset, buffer, flags);
  };
  let clientWrite: Promise<void> | undefined;
  await node.serialisedCopy(0, 4096, async () => {
    clientWrite = session.disk.write(8192, Buffer.alloc(4096, 0x5a));
    // Real I/O: by the time it completes, a client write nothing holds back has reached the driver.
    const data = Buffer.alloc(4096);
    await session.disk.read(0, data);
    await session.disk.read(65536, Buffer.alloc(65536));
    await session.disk.write(0, data, { serialisedCopy: true });
  });
  await clientWrite;
  assert.deepEqual(reached, ['write 0', 'write 8192'], 'the client write to the same cluster went after the copy');
}));
