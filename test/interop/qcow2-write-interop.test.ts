/*
 * Images written by blockd's qcow2 driver pass `qemu-img check` and read back in QEMU as written: cluster sizes,
 * refcount widths, COW from backing files, compressed and zero clusters, zeroing, discard, resize, snapshots, v2.
 */
import assert from 'node:assert/strict';
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { openImage } from '../../src/blockdev/image-session.js';
import { ModelledDisk } from '../helpers/disk-model.js';
import { makeTempDir } from '../helpers/paths.js';
import {
  KiB, MiB, SeededRandom, assertCheckClean, convertToRaw, createQcow2, qemuImgCompare, qemuIo, qemuIoReadPatterns, runQemuImg,
  type PatternRange,
} from '../helpers/qemu-tools.js';

const { dir, cleanup } = makeTempDir('blockd-qcow2-write-');
after(cleanup);

const fill = (length: number, byte: number) => Buffer.alloc(length, byte);

/**
 * Opens `image` writable in blockd (discard=unmap), runs `body` on a model that starts from
 * the image's current contents, closes, then requires a clean `qemu-img check` and
 * `qemu-img compare` with the model.
 */
async function writeThroughBlockd(image: string, cs: number, context: string, body: (disk: ModelledDisk) => Promise<void>): Promise<ModelledDisk> {
  const bytes = await ModelledDisk.imageBytes(image);
  const session = await openImage(image, { writable: true, formatOptions: { discard: 'unmap' } });
  const model = new ModelledDisk(session.disk, bytes, cs);
  try {
    await body(model);
  } finally {
    await session.close();
  }
  assertCheckClean(image, context);
  await model.assertImageMatches(image, context);
  return model;
}

/** Partial, whole, in-place, zero, unmapped and discarded clusters, and concurrent allocations. */
async function mixedWrites(m: ModelledDisk, cs: number, seed: number): Promise<void> {
  const random = new SeededRandom(seed);
  await m.write(cs / 2 + 3, fill(2 * cs, 0x11));
  await m.write(5 * cs, fill(cs, 0x12));
  await m.write(5 * cs + 100, fill(50, 0x13));
  await m.writeZeroes(8 * cs, 2 * cs);
  await m.write(8 * cs + cs / 2, fill(10, 0x14));
  await m.writeZeroes(5 * cs, cs);
  await m.write(5 * cs + 7, fill(3, 0x15));
  await m.writeZeroes(cs / 2 + 3, cs, { mayUnmap: true });
  await m.write(12 * cs, fill(3 * cs, 0x16));
  await m.discard(12 * cs + 1, 2 * cs);
  await m.writeZeroes(15 * cs + 5, 3 * cs - 10, { mayUnmap: true });
  await Promise.all(Array.from({ length: 16 }, (_, i) => {
    const offset = (20 + i) * cs + random.int(cs / 2);
    return m.write(offset, random.bytes(1 + random.int(cs)));
  }));
  await m.write(m.size - 300, fill(300, 0x17));
}

describe('cluster sizes and refcount widths', () => {
  const cases: { cs: number; bits: number }[] = [
    ...[512, KiB, 4 * KiB, 64 * KiB, 2 * MiB].map((cs) => ({ cs, bits: 16 })),
    ...[1, 2, 4, 8, 32, 64].map((bits) => ({ cs: 4 * KiB, bits })),
    { cs: 64 * KiB, bits: 1 },
    { cs: 512, bits: 64 },
  ];
  for (const { cs, bits } of cases) {
    test(`cluster_size=${cs} refcount_bits=${bits}`, async () => {
      const seed = cs + bits;
      const context = `cluster_size=${cs} refcount_bits=${bits} seed=${seed}`;
      const image = createQcow2(join(dir, `matrix-${cs}-${bits}.qcow2`), Math.max(4 * MiB, 44 * cs) + 1536, { clusterSize: cs, refcountBits: bits });
      await writeThroughBlockd(image, cs, context, (m) => mixedWrites(m, cs, seed));
      qemuIoReadPatterns(image, [
        { offset: 5 * cs + 7, length: 3, pattern: 0x15 },
        { offset: 8 * cs + cs / 2, length: 10, pattern: 0x14 },
        { offset: 12 * cs, length: cs, pattern: 0x16 },
        { offset: 13 * cs, length: cs, pattern: 0 },
        { offset: 14 * cs + 1, length: cs - 1, pattern: 0x16 },
      ], context);
    });
  }

  test('a 512-byte-cluster image written past 8 MiB of file grows its refcount table', async () => {
    // One cluster of 16-bit refcount table covers 64 blocks of 256 clusters: 8 MiB of file.
    const cs = 512;
    const image = createQcow2(join(dir, 'reftable-growth.qcow2'), 16 * MiB, { clusterSize: cs });
    const ranges: PatternRange[] = [];
    await writeThroughBlockd(image, cs, 'refcount table growth', async (m) => {
      for (let chunk = 0; statSync(image).size < 9 * MiB; chunk += 8) {
        assert.ok(chunk < 256, 'the file grows as clusters are allocated');
        await Promise.all(Array.from({ length: 8 }, (_, i) => {
          const range = { offset: (chunk + i) * 64 * KiB + 100, length: 64 * KiB - 200, pattern: 1 + ((chunk + i) % 250) };
          ranges.push(range);
          return m.write(range.offset, fill(range.length, range.pattern));
        }));
      }
    });
    const header = readFileSync(image).subarray(0, 64);
    assert.ok(header.readUInt32BE(56) > 1, `the refcount table grew (${header.readUInt32BE(56)} cluster)`);
    qemuIoReadPatterns(image, ranges, 'refcount table growth');
  });
});

describe('backing files', () => {
  for (const cs of [512, 4 * KiB, 64 * KiB]) {
    test(`partial writes into unallocated clusters copy head and tail from the backing file (cluster_size=${cs})`, async () => {
      const base = createQcow2(join(dir, `cow-base-${cs}.qcow2`), 4 * MiB, { clusterSize: 64 * KiB });
      qemuIo(base, [`write -P 0x31 0 ${4 * MiB}`, `write -z ${MiB} ${64 * KiB}`]);
      const middle = createQcow2(join(dir, `cow-mid-${cs}.qcow2`), 4 * MiB, { backing: { path: base, format: 'qcow2' } });
      qemuIo(middle, [`write -P 0x32 ${2 * MiB} ${MiB}`, `write -c -P 0x33 ${3 * MiB} ${256 * KiB}`]);
      const top = createQcow2(join(dir, `cow-top-${cs}.qcow2`), 4 * MiB, { clusterSize: cs, backing: { path: middle, format: 'qcow2' } });
      const random = new SeededRandom(cs);
      await writeThroughBlockd(top, cs, `backing cs=${cs}`, async (m) => {
        await m.write(cs / 2 + 1, fill(10, 0x41));
        await m.write(MiB - 100, fill(64 * KiB + 300, 0x42));
        await m.write(2 * MiB + cs + 17, fill(3 * cs, 0x43));
        await m.write(3 * MiB + 5, fill(cs, 0x44));
        await m.writeZeroes(2 * MiB + 8 * cs, 4 * cs, { mayUnmap: true });
        await m.writeZeroes(2 * MiB + 16 * cs, 2 * cs);
        await m.discard(3 * MiB + 64 * KiB, 128 * KiB);
        await m.writeZeroes(3 * MiB + 256 * KiB + 3, cs + 7);
        await Promise.all(Array.from({ length: 12 }, (_, i) => m.write(i * 300 * KiB + random.int(cs), random.bytes(1 + random.int(2 * cs)))));
      });
    });
  }

  test('a raw backing file smaller than the overlay: COW reads zeros past its end', async () => {
    const base = join(dir, 'short-base.raw');
    runQemuImg('create', '-q', '-f', 'raw', base, String(MiB + 4 * KiB));
    qemuIo(base, [`write -P 0x51 0 ${MiB + 4 * KiB}`], ['-f', 'raw']);
    const top = createQcow2(join(dir, 'short-top.qcow2'), 3 * MiB, { backing: { path: base, format: 'raw' } });
    await writeThroughBlockd(top, 64 * KiB, 'short raw backing', async (m) => {
      await m.write(MiB + 100, fill(10, 0x52));
      await m.write(MiB - 10, fill(20, 0x53));
      await m.write(2 * MiB + 5, fill(5, 0x54));
    });
  });

  test('growing an overlay over a larger backing file shows zeros, not the backing file', async () => {
    const base = createQcow2(join(dir, 'large-base.qcow2'), 8 * MiB);
    qemuIo(base, [`write -P 0x61 0 ${8 * MiB}`]);
    const top = createQcow2(join(dir, 'large-top.qcow2'), 2 * MiB + 1536, { clusterSize: 4 * KiB, backing: { path: base, format: 'qcow2' } });
    await writeThroughBlockd(top, 4 * KiB, 'grow over larger backing', async (m) => {
      await m.write(2 * MiB + 100, fill(10, 0x62));
      await m.truncate(6 * MiB);
      await m.write(5 * MiB + 3, fill(10, 0x63));
      await m.truncate(3 * MiB + 512);
      await m.truncate(7 * MiB);
    });
  });
});

describe('compressed and zero clusters', () => {
  for (const cs of [512, 4 * KiB, 64 * KiB]) {
    test(`overwriting, zeroing and discarding compressed clusters (cluster_size=${cs})`, async () => {
      const image = createQcow2(join(dir, `compressed-${cs}.qcow2`), 64 * cs, { clusterSize: cs });
      qemuIo(image, Array.from({ length: 16 }, (_, i) => `write -c -P 0x${(0x70 + i).toString(16)} ${i * cs} ${cs}`));
      const random = new SeededRandom(7 * cs);
      await writeThroughBlockd(image, cs, `compressed cs=${cs}`, async (m) => {
        await m.write(10, fill(20, 0x21));
        await m.write(cs, fill(cs, 0x22));
        await m.writeZeroes(2 * cs, cs);
        await m.writeZeroes(3 * cs, cs, { mayUnmap: true });
        await m.discard(4 * cs, cs);
        await m.write(5 * cs + cs / 2, fill(2 * cs, 0x23));
        await m.writeZeroes(8 * cs + 1, cs - 2);
        await Promise.all(Array.from({ length: 7 }, (_, i) => m.write((9 + i) * cs + random.int(cs / 2), random.bytes(1 + random.int(cs / 2)))));
      });
    });
  }

  test('writes into zero clusters made by qemu-io, with and without a backing file', async () => {
    const cs = 64 * KiB;
    const base = createQcow2(join(dir, 'zero-base.qcow2'), 2 * MiB);
    qemuIo(base, [`write -P 0x71 0 ${2 * MiB}`]);
    for (const backing of [undefined, { path: base, format: 'qcow2' }]) {
      const image = createQcow2(join(dir, `zero-${backing ? 'over' : 'alone'}.qcow2`), 2 * MiB, { backing });
      qemuIo(image, [`write -P 0x72 0 ${8 * cs}`, `write -z 0 ${2 * cs}`, `write -z -u ${2 * cs} ${2 * cs}`, `write -z ${8 * cs} ${4 * cs}`, `write -z -u ${12 * cs} ${cs}`]);
      await writeThroughBlockd(image, cs, `zero clusters backing=${Boolean(backing)}`, async (m) => {
        for (const cluster of [0, 2, 8, 12]) await m.write(cluster * cs + 1000, fill(100, 0x73 + cluster));
        await m.write(cs - 50, fill(100, 0x74));
        await m.write(9 * cs, fill(cs, 0x75));
        await m.writeZeroes(cs + 512, cs, { mayUnmap: true });
        await m.writeZeroes(10 * cs, 2 * cs);
      });
    }
  });
});

describe('resize', () => {
  test('growing past the L1 table, writing there, shrinking and growing again (512-byte clusters)', async () => {
    const cs = 512;
    const image = createQcow2(join(dir, 'resize-512.qcow2'), MiB, { clusterSize: cs });
    qemuIo(image, [`write -P 0x81 0 ${MiB}`]);
    await writeThroughBlockd(image, cs, 'resize 512', async (m) => {
      await m.truncate(5 * MiB);
      await m.write(4 * MiB + 300, fill(70 * KiB, 0x82));
      await m.write(MiB - 7, fill(20, 0x83));
      await m.truncate(3 * MiB + 1536);
      await m.truncate(6 * MiB);
      await m.write(6 * MiB - 600, fill(600, 0x84));
    });
    const info = JSON.parse(runQemuImg('info', '--output=json', image)) as { 'virtual-size': number };
    assert.equal(info['virtual-size'], 6 * MiB);
  });

  test('a shrink that cuts a cluster in two, then a grow: the cut part reads as zeros', async () => {
    const cs = 64 * KiB;
    const image = createQcow2(join(dir, 'resize-cut.qcow2'), 4 * MiB);
    qemuIo(image, [`write -P 0x91 0 ${4 * MiB}`]);
    await writeThroughBlockd(image, cs, 'resize cut', async (m) => {
      await m.truncate(MiB + 1536);
      await m.truncate(4 * MiB);
    });
  });

  test('growing a 4K-cluster image several L1 entries at a time', async () => {
    const cs = 4 * KiB;
    const image = createQcow2(join(dir, 'resize-4k.qcow2'), 8 * MiB + 512, { clusterSize: cs });
    await writeThroughBlockd(image, cs, 'resize 4k', async (m) => {
      await m.write(8 * MiB - 10, fill(522, 0xa1));
      await m.truncate(40 * MiB);
      await m.write(39 * MiB, fill(MiB, 0xa2));
      await m.truncate(64 * MiB);
      await m.write(63 * MiB + 1, fill(MiB - 1, 0xa3));
      await m.truncate(20 * MiB);
    });
  });
});

describe('internal snapshots', () => {
  for (const cs of [4 * KiB, 64 * KiB]) {
    test(`writes copy clusters and L2 tables shared with a snapshot; the snapshot stays intact (cluster_size=${cs})`, async () => {
      const image = createQcow2(join(dir, `snap-${cs}.qcow2`), 4 * MiB, { clusterSize: cs });
      qemuIo(image, [`write -P 0xb1 0 ${2 * MiB}`, `write -c -P 0xb2 ${2 * MiB} ${4 * cs}`, `write -z ${2 * MiB + 8 * cs} ${2 * cs}`]);
      runQemuImg('snapshot', '-c', 'before', image);
      const before = join(dir, `snap-${cs}-before.raw`);
      convertToRaw(image, before);
      const random = new SeededRandom(cs + 1);
      await writeThroughBlockd(image, cs, `snapshot cs=${cs}`, async (m) => {
        await m.write(100, fill(10, 0xc1));
        await m.write(cs, fill(cs, 0xc2));
        await m.write(2 * MiB + 10, fill(cs, 0xc3));
        await m.writeZeroes(4 * cs, 2 * cs);
        await m.writeZeroes(8 * cs, 2 * cs, { mayUnmap: true });
        await m.discard(12 * cs, 2 * cs);
        await m.write(2 * MiB + 8 * cs + 5, fill(5, 0xc4));
        await m.write(3 * MiB, fill(cs + 1, 0xc5));
        await Promise.all(Array.from({ length: 10 }, (_, i) => m.write((20 + 3 * i) * cs + random.int(cs), random.bytes(1 + random.int(cs)))));
        await assert.rejects(m.disk.truncate(MiB), /shrink/i, 'an image with snapshots cannot shrink');
      });
      qemuIoReadPatterns(image, [{ offset: 100, length: 10, pattern: 0xc1 }, { offset: cs, length: cs, pattern: 0xc2 }], `snapshot cs=${cs}`);
      runQemuImg('snapshot', '-a', 'before', image);
      assertCheckClean(image, `snapshot cs=${cs} after snapshot -a`);
      qemuImgCompare(before, image, ['raw', 'qcow2'], `snapshot cs=${cs}: snapshot -a restores the old contents`);
    });
  }
});

describe('v2 images', () => {
  for (const cs of [4 * KiB, 64 * KiB]) {
    test(`compat=0.10 without a backing file (cluster_size=${cs})`, async () => {
      const image = createQcow2(join(dir, `v2-${cs}.qcow2`), Math.max(4 * MiB, 44 * cs) + 1536, { clusterSize: cs, compat: '0.10' });
      qemuIo(image, [`write -P 0xd1 0 ${8 * cs}`, `write -c -P 0xd2 ${24 * cs} ${2 * cs}`]);
      await writeThroughBlockd(image, cs, `v2 cs=${cs}`, async (m) => {
        await mixedWrites(m, cs, cs);
        await m.write(24 * cs + 3, fill(3, 0xd3));
        await m.truncate(m.size + 10 * cs);
      });
      const info = JSON.parse(runQemuImg('info', '--output=json', image)) as { 'format-specific': { data: { compat: string } } };
      assert.equal(info['format-specific'].data.compat, '0.10');
    });
  }

  test('compat=0.10 over a backing file: zero writes hide the backing data', async () => {
    const cs = 64 * KiB;
    const base = createQcow2(join(dir, 'v2-base.qcow2'), 2 * MiB, { compat: '0.10' });
    qemuIo(base, [`write -P 0xe1 0 ${2 * MiB}`]);
    const top = createQcow2(join(dir, 'v2-top.qcow2'), 2 * MiB, { compat: '0.10', backing: { path: base, format: 'qcow2' } });
    await writeThroughBlockd(top, cs, 'v2 over backing', async (m) => {
      await m.write(100, fill(10, 0xe2));
      await m.writeZeroes(2 * cs, 2 * cs, { mayUnmap: true });
      await m.writeZeroes(5 * cs + 10, 100);
      await m.write(8 * cs - 5, fill(10, 0xe3));
    });
  });
});
