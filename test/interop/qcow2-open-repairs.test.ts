/*
 * What opening a qcow2 image read-write changes, as QEMU does: an image left dirty by a
 * writer with lazy refcounts (killed before it closed) has its refcounts rebuilt and the
 * dirty bit cleared; unknown autoclear bits are cleared. A read-only open changes nothing.
 */
import assert from 'node:assert/strict';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { openImage } from '../../src/blockdev/image-session.js';
import { makeTempDir } from '../helpers/paths.js';
import {
  KiB, MiB, assertCheckClean, convertToRaw, createQcow2, assertDiskMatchesRaw, qemuImgCheck, qemuIoReadPatterns, readAt, runQemuImg,
  runTool, sha256File, writeAt,
} from '../helpers/qemu-tools.js';

const { dir, cleanup } = makeTempDir('blockd-qcow2-open-');
after(cleanup);

const DIRTY_BIT = 1n;
const incompatibleFeatures = (path: string) => readAt(path, 72, 8).readBigUInt64BE();
const autoclearFeatures = (path: string) => readAt(path, 88, 8).readBigUInt64BE();
const dirtyFlag = (path: string) => (JSON.parse(runQemuImg('info', '--output=json', path)) as { 'dirty-flag': boolean })['dirty-flag'];

const PATTERNS = (cs: number) => [
  { offset: 0, length: 3 * cs + 17, pattern: 0x11 },
  { offset: 40 * cs, length: 5 * cs, pattern: 0x22 },
  { offset: 2 * MiB + 512, length: 4 * KiB, pattern: 0x33 },
];

/** A lazy-refcounts image whose writer (qemu-io) is killed with SIGKILL after writing: dirty, refcounts stale. */
function makeDirtyImage(name: string, clusterSize: number, refcountBits: number): string {
  const path = createQcow2(join(dir, name), 8 * MiB, { clusterSize, refcountBits, extra: ['lazy_refcounts=on'] });
  const writes = PATTERNS(clusterSize).map((r) => `write -q -P 0x${r.pattern.toString(16)} ${r.offset} ${r.length}`);
  const result = runTool('qemu-io', ['-f', 'qcow2', ...[...writes, 'sigraise 9'].flatMap((command) => ['-c', command]), path]);
  assert.equal(result.status, null, `qemu-io was killed: ${result.stderr}`);
  assert.equal(incompatibleFeatures(path) & DIRTY_BIT, DIRTY_BIT, 'the image is left dirty');
  assert.ok(qemuImgCheck(path).corruptions > 0, 'its refcounts are stale');
  return path;
}

describe('qcow2 images changed on a read-write open', () => {
  for (const [clusterSize, refcountBits] of [[65536, 16], [512, 1], [4096, 64]] as const) {
    test(`a dirty image is repaired (cluster ${clusterSize}, refcount_bits ${refcountBits})`, async () => {
      const path = makeDirtyImage(`dirty-${clusterSize}-${refcountBits}.qcow2`, clusterSize, refcountBits);
      const session = await openImage(path, { format: 'qcow2', writable: true });
      try {
        await session.disk.write(6 * MiB, Buffer.alloc(clusterSize * 3, 0x44));
      } finally {
        await session.close();
      }
      assertCheckClean(path, 'after the repair and a write');
      assert.equal(dirtyFlag(path), false);
      qemuIoReadPatterns(path, [...PATTERNS(clusterSize), { offset: 6 * MiB, length: clusterSize * 3, pattern: 0x44 }, { offset: 4 * MiB, length: 2 * MiB, pattern: 0 }], 'repaired');
    });
  }

  test('a dirty image opened read-only is read as it is and not written', async () => {
    const path = makeDirtyImage('dirty-ro.qcow2', 65536, 16);
    const copy = join(dir, 'dirty-ro-copy.qcow2');
    copyFileSync(path, copy);
    const raw = join(dir, 'dirty-ro.raw');
    convertToRaw(copy, raw);
    const before = sha256File(path);
    const session = await openImage(path, { format: 'qcow2', writable: false });
    try {
      await assertDiskMatchesRaw(session.disk, raw, 'dirty, read-only');
    } finally {
      await session.close();
    }
    assert.equal(sha256File(path), before, 'the file is unchanged');
  });

  test('unknown autoclear bits are cleared before the first write', async () => {
    const path = createQcow2(join(dir, 'autoclear.qcow2'), 4 * MiB);
    const bits = Buffer.alloc(8);
    bits.writeBigUInt64BE(0x8000_0000_0000_0000n);
    writeAt(path, 88, bits);
    const session = await openImage(path, { format: 'qcow2', writable: true });
    try {
      await session.disk.write(0, Buffer.alloc(4096, 0x55));
    } finally {
      await session.close();
    }
    assert.equal(autoclearFeatures(path), 0n);
    assertCheckClean(path, 'autoclear');
    qemuIoReadPatterns(path, [{ offset: 0, length: 4096, pattern: 0x55 }], 'autoclear');
  });
});
