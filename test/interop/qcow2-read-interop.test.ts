/*
 * Images written by qemu-img/qemu-io read through blockd exactly as `qemu-img convert` reads them (cluster sizes,
 * refcount widths, compressed and zero clusters, v2, backing chains up to 20 deep); block status matches `qemu-img map`.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { openImage } from '../../src/blockdev/image-session.js';
import type { BlockNode } from '../../src/blockdev/node.js';
import { makeTempDir } from '../helpers/paths.js';
import {
  KiB, MiB, SeededRandom, assertDiskMatchesRaw, convertToRaw, createQcow2, qemuImgMap, qemuIo, runQemuImg, type MapExtent,
} from '../helpers/qemu-tools.js';

const { dir, cleanup } = makeTempDir('blockd-qcow2-read-');
after(cleanup);

interface WorkloadOptions {
  compress?: boolean;
}

/**
 * qemu-io commands that leave data, compressed, zero (allocated and plain) and unallocated
 * clusters behind, some overwritten, some only partly; then random writes from the seed.
 * QEMU compresses only into unallocated clusters, so compressed writes come first.
 */
function workload(size: number, cs: number, random: SeededRandom, { compress = true }: WorkloadOptions = {}): string[] {
  const commands: string[] = [];
  if (compress) {
    const clusters = new Set([10, 11, 13, 14]);
    while (clusters.size < 8) clusters.add(random.int(Math.floor(size / cs)));
    commands.push(...[...clusters].map((c, i) => `write -c -P 0x${(0x70 + i).toString(16)} ${c * cs} ${cs}`));
  }
  commands.push(
    `write -P 0x11 ${cs / 2 + 7} ${2 * cs + 100}`,
    `write -P 0x22 ${3 * cs} ${cs}`,
    `write -z ${3 * cs} ${cs}`,
    `write -P 0x23 ${4 * cs} ${2 * cs}`,
    `write -z -u ${4 * cs} ${cs}`,
    `write -z ${8 * cs + 512} ${cs}`,
    `write -P 0x44 ${size - 700} 700`,
    `write -P 0x34 ${10 * cs + 100} 200`,
    `write -z -u ${11 * cs} ${cs}`,
    `write -z ${13 * cs} ${cs}`,
  );
  for (let i = 0; i < 12; i++) {
    const offset = random.int(size - 1);
    const length = 1 + random.int(Math.min(3 * cs, size - offset));
    commands.push(`write -P 0x${(0x50 + i).toString(16)} ${offset} ${length}`);
  }
  return commands;
}

/** blockd reads `image` (with its backing chain) exactly as qemu-img convert does. */
async function assertReadsLikeQemu(image: string, context: string): Promise<void> {
  const raw = `${image}.raw`;
  convertToRaw(image, raw);
  const session = await openImage(image);
  try {
    await assertDiskMatchesRaw(session.disk, raw, context);
  } finally {
    await session.close();
  }
}

/** blockd's blockStatusAbove over the whole disk agrees with `qemu-img map` on presence, data, zeros and depth. */
async function assertStatusMatchesMap(image: string, context: string): Promise<void> {
  const map = qemuImgMap(image);
  const session = await openImage(image);
  try {
    const ours = await statusExtents(session.node);
    const boundaries = [...new Set([...map, ...ours].flatMap((e) => [e.start, e.start + e.length]))].sort((a, b) => a - b);
    for (let i = 0; i + 1 < boundaries.length; i++) {
      const at = boundaries[i]!;
      const qemu = map.find((e) => e.start <= at && at < e.start + e.length);
      const blockd = ours.find((e) => e.start <= at && at < e.start + e.length);
      assert.ok(qemu && blockd, `${context}: offset ${at} missing from ${qemu ? 'blockd' : 'qemu-img map'}`);
      const where = `${context}: offset ${at}: blockd ${JSON.stringify(blockd)} vs qemu-img map ${JSON.stringify(qemu)}`;
      assert.equal(blockd.present, qemu.present, where);
      assert.equal(blockd.data, qemu.data, where);
      assert.equal(blockd.depth, qemu.depth, where);
      // QEMU also asks the host file whether a data cluster is a hole, so compare "zero" only where there is no data.
      if (!qemu.data) assert.equal(blockd.zero, qemu.zero, where);
    }
  } finally {
    await session.close();
  }
}

async function statusExtents(node: BlockNode): Promise<MapExtent[]> {
  const extents: MapExtent[] = [];
  for (let offset = 0; offset < node.length();) {
    const extent = await node.blockStatusAbove(offset, node.length() - offset);
    assert.ok(extent.length > 0, `block status made no progress at ${offset}`);
    extents.push({ start: offset, length: extent.length, depth: extent.depth, present: extent.allocated, zero: extent.zero, data: extent.data });
    offset += extent.length;
  }
  return extents;
}

describe('cluster sizes', () => {
  for (const cs of [512, KiB, 4 * KiB, 64 * KiB, 2 * MiB]) {
    test(`cluster_size=${cs}`, async () => {
      const seed = 1000 + cs;
      const size = Math.max(4 * MiB, 24 * cs) + 1536;
      const image = createQcow2(join(dir, `cs-${cs}.qcow2`), size, { clusterSize: cs });
      qemuIo(image, workload(size, cs, new SeededRandom(seed)));
      await assertReadsLikeQemu(image, `cluster_size=${cs} seed=${seed}`);
      if (cs === 512 || cs === 64 * KiB) await assertStatusMatchesMap(image, `cluster_size=${cs} seed=${seed}`);
    });
  }
});

describe('refcount widths', () => {
  for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
    test(`refcount_bits=${bits}`, async () => {
      const seed = 2000 + bits;
      const size = 8 * MiB;
      const image = createQcow2(join(dir, `rc-${bits}.qcow2`), size, { refcountBits: bits, clusterSize: 4 * KiB });
      qemuIo(image, workload(size, 4 * KiB, new SeededRandom(seed)));
      await assertReadsLikeQemu(image, `refcount_bits=${bits} seed=${seed}`);
    });
  }
});

describe('versions', () => {
  for (const compat of ['0.10', '1.1'] as const) {
    for (const cs of [4 * KiB, 64 * KiB]) {
      test(`compat=${compat} cluster_size=${cs}`, async () => {
        const seed = 3000 + cs + (compat === '1.1' ? 1 : 0);
        const size = 6 * MiB + 512;
        const image = createQcow2(join(dir, `v-${compat}-${cs}.qcow2`), size, { compat, clusterSize: cs });
        qemuIo(image, workload(size, cs, new SeededRandom(seed)));
        await assertReadsLikeQemu(image, `compat=${compat} cluster_size=${cs} seed=${seed}`);
        if (cs === 64 * KiB) await assertStatusMatchesMap(image, `compat=${compat} seed=${seed}`);
      });
    }
  }

  test('zero clusters written with and without unmap, over data, compressed and unallocated clusters', async () => {
    const cs = 64 * KiB;
    const image = createQcow2(join(dir, 'zeroes.qcow2'), 2 * MiB);
    qemuIo(image, [
      `write -P 0x61 0 ${8 * cs}`, `write -c -P 0x62 ${8 * cs} ${4 * cs}`,
      `write -z 0 ${cs}`, `write -z -u ${cs} ${cs}`, `write -z ${8 * cs} ${cs}`, `write -z -u ${9 * cs} ${cs}`,
      `write -z ${16 * cs} ${cs}`, `write -z -u ${17 * cs} ${cs}`, `write -z ${2 * cs + 4096} ${cs}`,
      `write -P 0x63 ${cs + 10} 10`,
    ]);
    const map = qemuImgMap(image);
    assert.ok(map.some((e) => e.zero && e.present && e.depth === 0), 'the image has zero clusters');
    await assertReadsLikeQemu(image, 'zero clusters');
    await assertStatusMatchesMap(image, 'zero clusters');
  });
});

interface Layer {
  path: string;
  format: 'qcow2' | 'raw';
}

/** A chain of `depth` backing files under a top image, each layer of its own size and geometry. */
function buildChain(name: string, depth: number, seed: number): Layer {
  const random = new SeededRandom(seed);
  let below: Layer | undefined;
  for (let i = 0; i <= depth; i++) {
    const size = 2 * MiB + random.int(5) * 512 * KiB + random.int(4) * 512;
    const cs = random.pick([512, 4 * KiB, 32 * KiB, 64 * KiB]);
    const compat = random.chance(0.2) ? '0.10' as const : '1.1' as const;
    const path = join(dir, `${name}-${i}`);
    let layer: Layer;
    if (i === 0 && seed % 2 === 1) {
      runQemuImg('create', '-q', '-f', 'raw', path, String(size));
      layer = { path, format: 'raw' };
    } else {
      createQcow2(path, size, { clusterSize: cs, compat, ...(below ? { backing: { path: below.path, format: below.format } } : {}) });
      layer = { path, format: 'qcow2' };
    }
    const commands: string[] = [];
    if (layer.format === 'qcow2' && random.chance(0.5)) commands.push(`write -c -P 0xc${i % 10} ${random.int(Math.floor(size / cs)) * cs} ${cs}`);
    for (let w = 0; w < 4 + random.int(5); w++) {
      const offset = random.int(size - 1);
      const length = 1 + random.int(Math.min(3 * cs, size - offset));
      commands.push(`write -P 0x${(1 + ((i * 16 + w) % 254)).toString(16)} ${offset} ${length}`);
    }
    for (let z = 0; z < 1 + random.int(2); z++) {
      const offset = random.int(size / 512 - 1) * 512;
      commands.push(`write -z${random.chance(0.5) ? ' -u' : ''} ${offset} ${Math.min(size - offset, 512 * (1 + random.int(3 * cs / 512)))}`);
    }
    qemuIo(path, commands, ['-f', layer.format]);
    below = layer;
  }
  return below!;
}

describe('backing chains', () => {
  for (const depth of [1, 2, 3, 5, 8, 13, 20]) {
    test(`depth ${depth}`, async () => {
      const seed = 4000 + depth;
      const top = buildChain(`chain${depth}`, depth, seed);
      await assertReadsLikeQemu(top.path, `chain depth ${depth} seed=${seed}`);
      if (depth === 3 || depth === 8) await assertStatusMatchesMap(top.path, `chain depth ${depth} seed=${seed}`);
    });
  }

  test('a backing file smaller than its overlay reads as zeros past its end, a larger one is cut off', async () => {
    const base = createQcow2(join(dir, 'small-base.qcow2'), MiB);
    qemuIo(base, [`write -P 0x71 0 ${MiB}`]);
    const middle = createQcow2(join(dir, 'small-mid.qcow2'), 3 * MiB, { backing: { path: base, format: 'qcow2' } });
    qemuIo(middle, [`write -P 0x72 ${2 * MiB} ${512 * KiB}`]);
    const top = createQcow2(join(dir, 'small-top.qcow2'), 2 * MiB + 512, { backing: { path: middle, format: 'qcow2' }, clusterSize: 4 * KiB });
    qemuIo(top, [`write -P 0x73 ${MiB - 100} 200`]);
    await assertReadsLikeQemu(top, 'short backing file');
    await assertStatusMatchesMap(top, 'short backing file');
  });
});
