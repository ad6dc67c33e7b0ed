/*
 * A job's copy (read the range, write it back) and a client write to the same
 * bytes must not interleave, or the copy would write stale data over the
 * client's: with serialising on, the client write waits for the copy. A real
 * qcow2 image, and an interleaving forced by holding the copy between its
 * read and its write.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { openImage } from '../../src/blockdev/image-session.js';
import { makeTempDir } from '../helpers/paths.js';
import { createQcow2, MiB } from '../helpers/qemu-tools.js';

test('a write to a range being copied waits for the copy, so the copy never overwrites it', async () => {
  const temp = makeTempDir();
  try {
    const path = createQcow2(join(temp.dir, 'disk.qcow2'), 4 * MiB);
    const session = await openImage(path, { format: 'qcow2', writable: true });
    const node = session.disk.child;
    const end = node.beginSerialising();
    let letCopyWrite!: () => void;
    const copyMayWrite = new Promise<void>((resolve) => (letCopyWrite = resolve));
    const copy = node.serialisedCopy(0, 65536, async () => {
      const stale = Buffer.alloc(65536);
      await session.disk.read(0, stale);
      await copyMayWrite;
      await session.disk.write(0, stale, { serialisedCopy: true });
    });
    const clientWrite = session.disk.write(0, Buffer.alloc(65536, 0x5a));
    await new Promise((resolve) => setTimeout(resolve, 20));
    letCopyWrite();
    await Promise.all([copy, clientWrite]);
    end();
    const data = Buffer.alloc(65536);
    await session.disk.read(0, data);
    assert.ok(data.every((byte) => byte === 0x5a), 'the client write is what the range holds');
    await session.close();
  } finally {
    temp.cleanup();
  }
});
