/*
 * blockd's qcow2 driver against an in-memory model: thousands of random, partly concurrent writes, zero-writes,
 * discards, resizes and flushes; reads match the model, and QEMU reads the model's bytes from a clean image.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { openImage } from '../../src/blockdev/image-session.js';
import { ModelledDisk } from '../helpers/disk-model.js';
import { makeTempDir } from '../helpers/paths.js';
import {
  KiB, MiB, SeededRandom, assertCheckClean, convertToRaw, createQcow2, firstDifference, qemuImgCompare, qemuIo, runQemuImg, testSeeds,
} from '../helpers/qemu-tools.js';

const { dir, cleanup } = makeTempDir('blockd-qcow2-model-');
after(cleanup);

interface ModelConfig {
  name: string;
  clusterSize: number;
  size: number;
  /** Size of a backing file the image starts over, if any. */
  backingSize?: number;
  steps: number;
  /** A small L2 cache makes tables leave the cache while requests use them. */
  l2CacheSize?: number;
  /** Start from data (compressed clusters too) kept by an internal snapshot: every first write copies. */
  snapshot?: boolean;
}

const CONFIGS: ModelConfig[] = [
  { name: '64K clusters', clusterSize: 64 * KiB, size: 24 * MiB, steps: 1200 },
  { name: '4K clusters over a backing file', clusterSize: 4 * KiB, size: 6 * MiB, backingSize: 5 * MiB + 512, steps: 1200 },
  { name: '512-byte clusters, small L2 cache, over a backing file', clusterSize: 512, size: 2 * MiB, backingSize: 3 * MiB, steps: 1200, l2CacheSize: 8 * KiB },
  { name: '4K clusters shared with an internal snapshot', clusterSize: 4 * KiB, size: 4 * MiB, steps: 800, snapshot: true },
];

type Operation =
  | { kind: 'write'; offset: number; data: Buffer }
  | { kind: 'zero'; offset: number; length: number; mayUnmap: boolean }
  | { kind: 'discard'; offset: number; length: number }
  | { kind: 'read'; offset: number; length: number };

/** A length from 1 byte to a few clusters, biased towards the interesting sizes. */
function randomLength(random: SeededRandom, cs: number): number {
  switch (random.int(5)) {
    case 0: return 1 + random.int(64);
    case 1: return 1 + random.int(cs);
    case 2: return cs;
    case 3: return cs * (1 + random.int(4));
    default: return 1 + random.int(4 * cs);
  }
}

function randomOperation(random: SeededRandom, cs: number, size: number, within?: [number, number]): Operation {
  const [low, high] = within ?? [0, size];
  const aligned = random.chance(0.3);
  let offset = low + random.int(high - low);
  if (aligned) offset = Math.min(high - 1, Math.ceil(offset / cs) * cs);
  const length = Math.max(1, Math.min(randomLength(random, cs), high - offset));
  const roll = random.next();
  if (roll < 0.55) return { kind: 'write', offset, data: random.bytes(length) };
  if (roll < 0.7) return { kind: 'zero', offset, length, mayUnmap: random.chance(0.5) };
  if (roll < 0.8) return { kind: 'discard', offset, length };
  return { kind: 'read', offset, length };
}

async function apply(disk: ModelledDisk, op: Operation, context: string): Promise<void> {
  switch (op.kind) {
    case 'write': return disk.write(op.offset, op.data, { fua: op.data.length % 7 === 0 });
    case 'zero': return disk.writeZeroes(op.offset, op.length, { mayUnmap: op.mayUnmap });
    case 'discard': return disk.discard(op.offset, op.length);
    case 'read': {
      const buffer = Buffer.alloc(op.length);
      // Model bytes are taken before the read: a batch never writes what it reads.
      const expected = Buffer.from(disk.bytes.subarray(op.offset, op.offset + op.length));
      await disk.disk.read(op.offset, buffer);
      if (!buffer.equals(expected)) {
        const at = firstDifference(buffer, expected);
        assert.fail(`${context}: read [${op.offset}, +${op.length}) differs from the model at byte ${op.offset + at}`);
      }
    }
  }
}

function describeOperation(op: Operation): string {
  return op.kind === 'write' ? `write ${op.offset}+${op.data.length}` : `${op.kind} ${op.offset}+${op.length}`;
}

/**
 * A batch of requests run concurrently: disjoint byte ranges, several of them inside one
 * cluster, so allocations of the same cluster race.
 */
function randomBatch(random: SeededRandom, cs: number, size: number): Operation[] {
  const count = 2 + random.int(7);
  const span = Math.min(size, cs * (1 + random.int(8)));
  const start = random.int(size - span + 1);
  const slice = Math.floor(span / count);
  const ops: Operation[] = [];
  for (let i = 0; i < count && slice > 0; i++) ops.push(randomOperation(random, cs, size, [start + i * slice, start + (i + 1) * slice]));
  return ops;
}

async function runModel(config: ModelConfig, seed: number): Promise<void> {
  const cs = config.clusterSize;
  const random = new SeededRandom(seed);
  const name = `${config.clusterSize}-${config.backingSize ?? 0}-${seed}`;
  let backing: { path: string; format: string } | undefined;
  if (config.backingSize) {
    const base = createQcow2(join(dir, `${name}-base.qcow2`), config.backingSize, { clusterSize: 64 * KiB });
    qemuIo(base, Array.from({ length: 24 }, (_, i) => {
      const offset = random.int(config.backingSize! - 1);
      return `write -P 0x${(0x10 + i).toString(16)} ${offset} ${1 + random.int(Math.min(256 * KiB, config.backingSize! - offset))}`;
    }));
    backing = { path: base, format: 'qcow2' };
  }
  const image = createQcow2(join(dir, `${name}.qcow2`), config.size, { clusterSize: cs, backing });
  let snapshotRaw: string | undefined;
  if (config.snapshot) {
    const clusters = config.size / cs;
    qemuIo(image, [
      ...Array.from({ length: 32 }, (_, i) => `write -c -P 0x${(0x40 + i).toString(16)} ${i * 4 * cs} ${cs}`),
      `write -P 0x61 ${clusters / 2 * cs} ${clusters / 4 * cs}`,
      `write -z ${clusters / 2 * cs + 8 * cs} ${8 * cs}`,
    ]);
    runQemuImg('snapshot', '-c', 'model', image);
    snapshotRaw = join(dir, `${name}-snapshot.raw`);
    convertToRaw(image, snapshotRaw);
  }
  const bytes = await ModelledDisk.imageBytes(image);
  const formatOptions = { discard: 'unmap', ...(config.l2CacheSize ? { 'l2-cache-size': config.l2CacheSize } : {}) };
  const session = await openImage(image, { writable: true, formatOptions });
  const disk = new ModelledDisk(session.disk, bytes, cs);
  const context = `${config.name} seed=${seed}`;
  let step = 0;
  let last = '';
  try {
    for (; step < config.steps; step++) {
      const roll = random.next();
      if (roll < 0.3) {
        const batch = randomBatch(random, cs, disk.size);
        last = `batch [${batch.map(describeOperation).join(', ')}]`;
        await Promise.all(batch.map((op) => apply(disk, op, `${context} step ${step}`)));
      } else if (roll < 0.33) {
        let size = Math.max(cs, Math.min(2 * config.size, Math.round((disk.size * (0.5 + random.next())) / 512) * 512));
        if (config.snapshot) size = Math.max(size, disk.size); // images with snapshots cannot shrink
        last = `resize ${disk.size} -> ${size}`;
        await disk.truncate(size);
      } else if (roll < 0.37) {
        last = 'flush';
        await disk.flush();
      } else {
        // Overlapping requests one after the other.
        const op = randomOperation(random, cs, disk.size);
        last = describeOperation(op);
        await apply(disk, op, `${context} step ${step}`);
      }
    }
  } catch (error) {
    throw new Error(`${context}: step ${step} (${last}) failed: ${(error as Error).stack}`);
  } finally {
    await session.close();
  }
  assertCheckClean(image, context);
  await disk.assertImageMatches(image, context);
  if (snapshotRaw) {
    runQemuImg('snapshot', '-a', 'model', image);
    assertCheckClean(image, `${context}, snapshot applied`);
    qemuImgCompare(snapshotRaw, image, ['raw', 'qcow2'], `${context}: the snapshot still holds its data`);
  }
}

describe('qcow2 driver against an in-memory model', () => {
  for (const seed of testSeeds([1, 2, 3])) {
    for (const config of CONFIGS) {
      test(`${config.name}, seed=${seed}`, () => runModel(config, seed));
    }
  }
});
