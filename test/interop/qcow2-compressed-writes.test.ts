/*
 * Compressed writes by blockd's qcow2 driver (the `compress` write flag, what backup and
 * convert use), checked against QEMU: images blockd compressed into pass `qemu-img check`,
 * read as written in QEMU, show compressed clusters where QEMU would store them, pack
 * several compressed clusters into one host cluster as QEMU's qcow2_alloc_bytes does, and
 * stay writable by QEMU and by blockd; the same writes land exactly where qemu-io puts them
 * (refcount widths, v2). Refusals (allocated clusters, unaligned requests)
 * are compared with qemu-io `write -c` on a twin image. Images from `qemu-img convert -c`
 * read back identically and take more compressed clusters from blockd.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { inflateRawSync } from 'node:zlib';
import { checkQcow2 } from '../../src/blockdev/drivers/qcow2/consistency-check.js';
import { openImage } from '../../src/blockdev/image-session.js';
import { describeErrno, errnoOf } from '../../src/blockdev/io-error.js';
import { compressible, incompressible } from '../helpers/compressible-data.js';
import { ModelledDisk } from '../helpers/disk-model.js';
import { makeTempDir } from '../helpers/paths.js';
import { compressedClusters, type CompressedCluster } from '../helpers/qcow2-layout.js';
import {
  KiB, MiB, SeededRandom, assertCheckClean, assertDiskMatchesRaw, createQcow2, qemuImgCompare, qemuImgMap, qemuIo, qemuIoReadPatterns,
  readAt, runQemuImg, runTool,
} from '../helpers/qemu-tools.js';

const { dir, cleanup } = makeTempDir('blockd-qcow2-compress-');
after(cleanup);

const COMPRESS = { compress: true } as const;

/** Guest clusters qemu-img map shows as stored data without a host offset: compressed (QEMU 7.2's map has no "compressed" field). */
function compressedInMap(image: string, cs: number): number[] {
  const clusters: number[] = [];
  for (const extent of qemuImgMap(image)) {
    if (!extent.data || extent.offset !== undefined) continue;
    for (let at = extent.start; at < extent.start + extent.length; at += cs) clusters.push(Math.floor(at / cs));
  }
  return clusters;
}

/** `qemu-img check`'s count of compressed clusters. */
function checkedCompressedCount(image: string): number {
  const result = runTool('qemu-img', ['check', '--output=json', image]);
  return (JSON.parse(result.stdout) as { 'compressed-clusters'?: number })['compressed-clusters'] ?? 0;
}

/** The exact length of a compressed stream: inflate from its offset and count the bytes consumed. */
function streamLength(image: string, stream: CompressedCluster, cs: number): number {
  const bytes = readAt(image, stream.hostOffset, stream.sectors * 512 - (stream.hostOffset % 512));
  const { buffer, engine } = inflateRawSync(bytes, { info: true }) as unknown as { buffer: Buffer; engine: { bytesWritten: number } };
  assert.equal(buffer.length, cs, `the stream of guest cluster ${stream.cluster} inflates to one cluster`);
  return engine.bytesWritten;
}

/**
 * QEMU's packing (qcow2_alloc_bytes), for streams written in one session: each starts where
 * the one before it (in the file) ends when it fits in the rest of that host cluster;
 * otherwise it starts a host cluster, or runs on into the adjacent one.
 */
function assertPackedAsQemu(image: string, streams: CompressedCluster[], cs: number, context: string): void {
  const ordered = [...streams].sort((a, b) => a.hostOffset - b.hostOffset);
  for (let i = 1; i < ordered.length; i++) {
    const previous = ordered[i - 1]!;
    const stream = ordered[i]!;
    const end = previous.hostOffset + streamLength(image, previous, cs);
    const length = streamLength(image, stream, cs);
    const fits = end % cs !== 0 && cs - (end % cs) >= length;
    const where = `${context}: guest cluster ${stream.cluster} at ${stream.hostOffset}, after guest cluster ${previous.cluster} ending at ${end}`;
    if (fits) assert.equal(stream.hostOffset, end, `${where}: packed right after the one before`);
    else assert.ok(stream.hostOffset === end || stream.hostOffset % cs === 0, `${where}: starts a host cluster or runs on from the one before`);
  }
}

describe('compressed clusters written by blockd', () => {
  for (const cs of [512, 4 * KiB, 64 * KiB, 2 * MiB]) {
    test(`packed, counted and read as QEMU does; QEMU and blockd write on (cluster_size=${cs})`, async () => {
      const context = `cluster_size=${cs}`;
      const tail = cs > 512 ? cs / 2 : 0; // a partial last cluster (sizes are whole sectors)
      const size = 40 * cs + tail;
      const image = createQcow2(join(dir, `fresh-${cs}.qcow2`), size, { clusterSize: cs });
      const random = new SeededRandom(cs);
      const compressedAt = [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 21, 23, 24, 26, 30, 31, 32, 33, 34, 35, 36, 37, 38];
      if (tail) compressedAt.push(40);

      const session = await openImage(image, { writable: true });
      const model = new ModelledDisk(session.disk, Buffer.alloc(size), cs);
      try {
        // One request of eight clusters, then single clusters one after another.
        await model.write(0, Buffer.concat(Array.from({ length: 8 }, () => compressible(random, cs))), COMPRESS);
        for (let c = 10; c < 20; c++) await model.write(c * cs, compressible(random, cs), COMPRESS);
        // Data that does not shrink is written plainly, alone or inside a request with others.
        await model.write(20 * cs, incompressible(random, cs), COMPRESS);
        await model.write(21 * cs, Buffer.concat([compressible(random, cs), incompressible(random, cs), Buffer.alloc(cs), compressible(random, cs)]), COMPRESS);
        // A plain zero cluster is no host cluster: a compressed one replaces it.
        await model.writeZeroes(26 * cs, cs);
        await model.write(26 * cs, compressible(random, cs), COMPRESS);
        await Promise.all(Array.from({ length: 8 }, (_, i) => model.write((30 + i) * cs, compressible(random, cs), COMPRESS)));
        await model.write(38 * cs, compressible(random, cs), { compress: true, fua: true });
        if (tail) await model.write(40 * cs, compressible(random, tail), COMPRESS);
      } finally {
        await session.close();
      }
      assertCheckClean(image, context);
      await model.assertImageMatches(image, context);
      assert.deepEqual(compressedInMap(image, cs), compressedAt, `${context}: qemu-img map`);
      const streams = compressedClusters(image);
      assert.deepEqual(streams.map((stream) => stream.cluster), compressedAt, `${context}: compressed L2 entries`);
      assert.equal(checkedCompressedCount(image), compressedAt.length, `${context}: qemu-img check's compressed clusters`);
      const ours = await checkQcow2(image);
      assert.deepEqual([ours.corruptions, ours.leaks, ours.compressedClusters], [0, 0, compressedAt.length], `${context}: blockd's consistency check`);
      assertPackedAsQemu(image, streams, cs, context);
      const hostClusters = new Set(streams.map((stream) => Math.floor(stream.hostOffset / cs)));
      assert.ok(hostClusters.size < streams.length / 2, `${context}: ${streams.length} compressed clusters share ${hostClusters.size} host clusters`);

      // QEMU writes into and around them: into a compressed cluster, a compressed cluster of its own, discard, zeroes.
      qemuIo(image, [`write -P 0x61 ${3 * cs + 100} 200`, `write -c -P 0x62 ${27 * cs} ${cs}`, `discard ${11 * cs} ${cs}`, `write -z ${12 * cs} ${cs}`]);
      model.bytes.fill(0x61, 3 * cs + 100, 3 * cs + 300);
      model.bytes.fill(0x62, 27 * cs, 28 * cs);
      model.bytes.fill(0, 11 * cs, 13 * cs);
      assertCheckClean(image, `${context} after qemu-io`);
      await model.assertImageMatches(image, `${context} after qemu-io`);

      // blockd again: compressed clusters into free and discarded clusters, a refusal, a plain write into a compressed cluster.
      const again = await openImage(image, { writable: true });
      const second = new ModelledDisk(again.disk, model.bytes, cs);
      try {
        await second.write(28 * cs, Buffer.concat([compressible(random, cs), compressible(random, cs)]), COMPRESS);
        await second.write(11 * cs, compressible(random, cs), COMPRESS);
        await assert.rejects(again.disk.write(3 * cs, compressible(random, cs), COMPRESS), { code: 'EIO' });
        await second.write(14 * cs + 7, Buffer.alloc(10, 0x63));
      } finally {
        await again.close();
      }
      assertCheckClean(image, `${context} second session`);
      await second.assertImageMatches(image, `${context} second session`);
      qemuIoReadPatterns(image, [
        { offset: 3 * cs + 100, length: 200, pattern: 0x61 },
        { offset: 27 * cs, length: cs, pattern: 0x62 },
        { offset: 14 * cs + 7, length: 10, pattern: 0x63 },
      ], context);
      assert.ok(compressedInMap(image, cs).includes(11) && compressedInMap(image, cs).includes(29), `${context}: the second session's clusters are compressed`);
      if (tail) {
        // QEMU keeps a compressed last cluster when it grows the image: what it padded the cluster with shows.
        runQemuImg('resize', '-q', '-f', 'qcow2', image, String(41 * cs));
        qemuIoReadPatterns(image, [{ offset: size, length: 41 * cs - size, pattern: 0 }], `${context}: the padding of the last cluster`);
        assert.ok(compressedInMap(image, cs).includes(40), `${context}: the grown image keeps its compressed last cluster`);
      }
    });
  }

  for (const flushed of [false, true]) {
    test(`a host cluster freed under the packing point is not packed into once handed out again (${flushed ? 'freed by a flush' : 'release pending'})`, async () => {
      // QEMU 7.2 goes on packing into it after a plain write took it (qemu-io: write -c 0, write 0, write 128k, write -c 64k):
      // the plain cluster is overwritten and its refcount becomes 2 (`qemu-img check`: ERROR OFLAG_COPIED data cluster).
      const cs = 64 * KiB;
      const image = createQcow2(join(dir, `freed-packing-${flushed}.qcow2`), 16 * cs);
      const session = await openImage(image, { writable: true });
      const model = new ModelledDisk(session.disk, Buffer.alloc(16 * cs), cs);
      try {
        await model.write(0, Buffer.alloc(cs, 1), COMPRESS);
        await model.write(0, Buffer.alloc(cs, 2));
        if (flushed) await model.flush();
        await model.write(2 * cs, Buffer.alloc(cs, 4));
        await model.write(cs, Buffer.alloc(cs, 3), COMPRESS);
      } finally {
        await session.close();
      }
      assertCheckClean(image);
      await model.assertImageMatches(image, `freed packing cluster, flushed=${flushed}`);
    });
  }

  test('a zero-length compressed write does nothing (qemu-img convert ends with one)', async () => {
    const image = createQcow2(join(dir, 'empty-write.qcow2'), MiB);
    const session = await openImage(image, { writable: true });
    try {
      await session.disk.write(MiB, Buffer.alloc(0), COMPRESS);
    } finally {
      await session.close();
    }
    assertCheckClean(image);
    assert.deepEqual(compressedClusters(image), []);
  });
});

describe('where compressed clusters go, as qemu-io write -c puts them', () => {
  // Patterns deflate to the same stream in node's zlib and QEMU's; with refcount_bits=1 a host cluster
  // takes one compressed cluster (its refcount is at its maximum), with 2 bits three, with 16 all of them.
  for (const options of [{ refcountBits: 1 }, { refcountBits: 2 }, { refcountBits: 16 }, { compat: '0.10' as const }]) {
    test(`the same single-cluster compressed writes get the same L2 entries (${JSON.stringify(options)})`, async () => {
      const cs = 64 * KiB;
      const images = { qemu: join(dir, `placed-qemu-${JSON.stringify(options)}.qcow2`), blockd: join(dir, `placed-blockd-${JSON.stringify(options)}.qcow2`) };
      const patterns = Array.from({ length: 12 }, (_, i) => 0x30 + i);
      for (const image of Object.values(images)) {
        createQcow2(image, 16 * cs, options);
        qemuIo(image, [`write -P 0x2f ${15 * cs} ${cs}`]); // the L2 table and one data cluster first, as both sides allocate those differently
      }
      qemuIo(images.qemu, patterns.map((pattern, i) => `write -c -P 0x${pattern.toString(16)} ${i * cs} ${cs}`));
      const session = await openImage(images.blockd, { writable: true });
      try {
        for (const [i, pattern] of patterns.entries()) await session.disk.write(i * cs, Buffer.alloc(cs, pattern), COMPRESS);
      } finally {
        await session.close();
      }
      assertCheckClean(images.blockd);
      qemuImgCompare(images.qemu, images.blockd, ['qcow2', 'qcow2']);
      assert.deepEqual(compressedClusters(images.blockd), compressedClusters(images.qemu));
    });
  }
});

describe('what compressed writes refuse, as qemu-io write -c does', () => {
  test('allocated clusters refuse compressed data (EIO) but take data that does not shrink; zero, unallocated and backed clusters take it; unaligned requests fail (EINVAL)', async () => {
    const cs = 64 * KiB;
    const size = 16 * cs + 8 * KiB;
    const base = createQcow2(join(dir, 'refusal-base.qcow2'), size);
    qemuIo(base, [`write -P 0x11 0 ${size}`]);
    const random = new SeededRandom(77);
    const payloads: Buffer[] = [];
    const payload = (data: Buffer) => {
      const path = join(dir, `payload-${payloads.length}.bin`);
      writeFileSync(path, data);
      payloads.push(data);
      return { path, data };
    };
    const prepare = (name: string) => {
      const image = createQcow2(join(dir, `refusal-${name}.qcow2`), size, { backing: { path: base, format: 'qcow2' } });
      qemuIo(image, [
        `write -P 0x21 0 ${cs}`, // normal
        `write -z ${cs} ${cs}`, // plain zero (over the backing file)
        `write -P 0x22 ${2 * cs} ${cs}`, `write -z ${2 * cs} ${cs}`, // preallocated zero
        `write -c -P 0x23 ${3 * cs} ${cs}`, // compressed
        `write -P 0x24 ${9 * cs} ${cs}`, // normal, inside a three-cluster request below
      ]);
      return image;
    };
    const cases: { offset: number; data: { path: string; data: Buffer } }[] = [
      { offset: 0, data: payload(compressible(random, cs)) },
      { offset: 0, data: payload(incompressible(random, cs)) },
      { offset: cs, data: payload(compressible(random, cs)) },
      { offset: 2 * cs, data: payload(compressible(random, cs)) },
      { offset: 3 * cs, data: payload(compressible(random, cs)) },
      { offset: 4 * cs, data: payload(compressible(random, cs)) },
      { offset: 5 * cs + 512, data: payload(compressible(random, cs)) },
      { offset: 6 * cs, data: payload(compressible(random, cs / 2)) },
      { offset: 8 * cs, data: payload(Buffer.concat([compressible(random, cs), compressible(random, cs), compressible(random, cs)])) },
      { offset: 12 * cs, data: payload(Buffer.concat([incompressible(random, cs), compressible(random, cs)])) },
      { offset: 16 * cs, data: payload(compressible(random, 8 * KiB)) },
    ];
    const qemuImage = prepare('qemu');
    const ours = prepare('blockd');

    const output = runTool('qemu-io', [...cases.flatMap(({ offset, data }) => ['-c', `write -c -s ${data.path} ${offset} ${data.data.length}`]), qemuImage]).stdout;
    const qemuOutcomes = [...output.matchAll(/^(?:wrote \d+\/\d+ bytes at offset \d+|write failed: (.*))$/gm)].map((match) => match[1] ?? 'ok');
    assert.equal(qemuOutcomes.length, cases.length, `one outcome per write: ${output}`);
    const session = await openImage(ours, { writable: true });
    const blockdOutcomes: string[] = [];
    try {
      for (const { offset, data } of cases) {
        blockdOutcomes.push(await session.disk.write(offset, data.data, COMPRESS).then(() => 'ok', (error: unknown) => describeErrno(errnoOf(error))));
      }
    } finally {
      await session.close();
    }
    assert.deepEqual(blockdOutcomes, qemuOutcomes);
    // What each side refused is the same; a refused request that QEMU carries out in part (the
    // three-cluster one) writes nothing in blockd, so the twins are compared without it.
    assert.deepEqual(qemuOutcomes, ['Input/output error', 'ok', 'ok', 'Input/output error', 'Input/output error', 'ok', 'Invalid argument', 'Invalid argument', 'Input/output error', 'ok', 'ok']);
    qemuIo(qemuImage, [`write -P 0x24 ${8 * cs} ${3 * cs}`]);
    qemuIo(ours, [`write -P 0x24 ${8 * cs} ${3 * cs}`]);
    for (const image of [qemuImage, ours]) assertCheckClean(image, image);
    qemuImgCompare(qemuImage, ours, ['qcow2', 'qcow2'], 'the twins after the same compressed writes');
    assert.deepEqual(compressedInMap(ours, cs), compressedInMap(qemuImage, cs), 'the same clusters are compressed');
  });
});

describe('images compressed by qemu-img convert -c', () => {
  for (const cs of [4 * KiB, 64 * KiB]) {
    test(`read back identically, and take more compressed clusters from blockd (cluster_size=${cs})`, async () => {
      const context = `convert -c cluster_size=${cs}`;
      const random = new SeededRandom(cs + 5);
      const clusters = 48;
      const size = clusters * cs + 3 * 512; // a partial last cluster
      const data = Buffer.alloc(size);
      for (let c = 0; c * cs < size; c++) {
        const length = Math.min(cs, size - c * cs);
        if (c % 6 === 5) continue; // zeroes: convert leaves them unallocated
        (c % 4 === 3 ? incompressible(random, length) : compressible(random, length)).copy(data, c * cs);
      }
      const raw = join(dir, `convert-${cs}.raw`);
      writeFileSync(raw, data);
      const image = join(dir, `convert-${cs}.qcow2`);
      runQemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cs}`, raw, image);
      assert.ok(checkedCompressedCount(image) > clusters / 2, `${context}: convert compressed most clusters`);

      const session = await openImage(image, { writable: true });
      const model = new ModelledDisk(session.disk, Buffer.from(data), cs);
      try {
        await assertDiskMatchesRaw(session.disk, raw, context);
        for (let c = 5; c < clusters; c += 6) await model.write(c * cs, compressible(random, cs), COMPRESS);
      } finally {
        await session.close();
      }
      assertCheckClean(image, context);
      await model.assertImageMatches(image, context);
      for (let c = 5; c < clusters; c += 6) assert.ok(compressedInMap(image, cs).includes(c), `${context}: cluster ${c} compressed by blockd`);
    });
  }
});
