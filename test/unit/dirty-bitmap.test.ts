/*
 * The bitmaps' representation against a model (one boolean per granule): seeded random
 * set, clear, merge and resize, with count, nextRun and the searches checked after each
 * step; a whole-disk bitmap (1 TiB at 64 KiB) works by ranges; the registry marks every
 * recording bitmap (or its successor) and follows the node's size.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BitmapRegistry } from '../../src/blockdev/bitmaps/bitmap-registry.js';
import { DirtyBitmap } from '../../src/blockdev/bitmaps/dirty-bitmap.js';
import { createSuccessor } from '../../src/blockdev/bitmaps/successor.js';
import { GranuleBits } from '../../src/blockdev/bitmaps/granule-bits.js';
import { SeededRandom } from '../helpers/qemu-tools.js';

function modelFind(model: boolean[], from: number, to: number, value: boolean): number {
  for (let i = Math.max(0, from); i < Math.min(to, model.length); i++) if (model[i] === value) return i;
  return -1;
}

for (const seed of [1, 2, 3]) {
  test(`GranuleBits follows a model of one boolean per bit (seed ${seed})`, () => {
    const random = new SeededRandom(seed);
    let size = 70_000 + random.int(5000); // more than two blocks of words
    const bits = new GranuleBits(size);
    let model = new Array<boolean>(size).fill(false);
    for (let step = 0; step < 400; step++) {
      const first = random.int(size);
      const end = Math.min(size, first + random.pick([1, 2, 31, 32, 33, 1000, 40_000]));
      const choice = random.int(10);
      if (choice < 4) {
        bits.set(first, end);
        for (let i = first; i < end; i++) model[i] = true;
      } else if (choice < 8) {
        bits.clear(first, end);
        for (let i = first; i < end; i++) model[i] = false;
      } else if (choice < 9) {
        const other = new GranuleBits(size);
        other.set(first, end);
        bits.or(other);
        for (let i = first; i < end; i++) model[i] = true;
      } else {
        size = random.int(80_000) + 1;
        bits.resize(size);
        model = Array.from({ length: size }, (_, i) => model[i] ?? false);
      }
      assert.equal(bits.count(), model.filter(Boolean).length, `step ${step}: count`);
      const from = random.int(size);
      const to = from + random.int(size - from + 1);
      assert.equal(bits.findSet(from, to), modelFind(model, from, to, true), `step ${step}: findSet(${from}, ${to})`);
      assert.equal(bits.findClear(from, to), modelFind(model, from, to, false), `step ${step}: findClear(${from}, ${to})`);
      assert.equal(bits.has(from), model[from], `step ${step}: has(${from})`);
      const at = Math.floor(from / 32) * 32;
      const bytes = bits.toBytes(at, size - at);
      for (let i = at; i < size; i++) assert.equal((bytes[(i - at) >> 3]! >> ((i - at) & 7)) & 1, model[i] ? 1 : 0, `step ${step}: toBytes bit ${i}`);
      const copy = new GranuleBits(size);
      copy.orBytes(at, bytes);
      assert.equal(copy.count(), model.slice(at).filter(Boolean).length, `step ${step}: orBytes`);
    }
  });
}

test('a 1 TiB disk at 64 KiB granularity: ranges, count and runs without a loop over bits', () => {
  const TiB = 2 ** 40;
  const bitmap = new DirtyBitmap(TiB, 65536, 'big');
  bitmap.set(0, TiB);
  assert.equal(bitmap.count(), TiB);
  bitmap.clear(65536, TiB - 2 * 65536);
  assert.equal(bitmap.count(), 2 * 65536);
  assert.deepEqual(bitmap.nextRun(65536, 1 << 20), { offset: TiB - 65536, length: 65536 });
  assert.deepEqual(bitmap.nextRun(TiB - 1, 1 << 20), { offset: TiB - 65536, length: 65536 });
  bitmap.clear(TiB - 65536, 65536);
  assert.deepEqual(bitmap.nextRun(TiB - 1, 1 << 20), { offset: 0, length: 65536 });
});

test('runs stop at the end of a disk that ends inside a granule; count is in whole granules, as in QEMU', () => {
  const bitmap = new DirtyBitmap(100_000, 65536, 'tail');
  bitmap.set(70_000, 10);
  assert.equal(bitmap.count(), 65536);
  assert.deepEqual(bitmap.nextRun(0, 1 << 20), { offset: 65536, length: 100_000 - 65536 });
  bitmap.resize(200_000);
  assert.equal(bitmap.count(), 65536, 'the granule is whole now');
  bitmap.resize(65536);
  assert.equal(bitmap.count(), 0, 'the granule is gone');
});

test('the registry marks recording bitmaps, or their successor, and refuses a duplicate name', () => {
  const registry = new BitmapRegistry();
  const a = new DirtyBitmap(1 << 20, 65536, 'a');
  const b = new DirtyBitmap(1 << 20, 65536, 'b');
  const job = new DirtyBitmap(1 << 20, 65536);
  registry.add(a);
  registry.add(b);
  registry.add(job);
  assert.throws(() => registry.add(new DirtyBitmap(1 << 20, 65536, 'a')), /Bitmap already exists: a/);
  assert.deepEqual(registry.list().map((bitmap) => bitmap.name), [undefined, 'b', 'a']);
  b.enabled = false;
  const successor = createSuccessor(registry, a);
  registry.markDirty(0, 1);
  assert.deepEqual([a.count(), successor.count(), b.count(), job.count()], [0, 65536, 0, 65536]);
  // Frozen, a still reports recording: its successor records for it (QEMU's bdrv_dirty_bitmap_recording).
  assert.deepEqual(a.info(), { name: 'a', count: 0, granularity: 65536, recording: true, busy: true, persistent: false });
  assert.deepEqual(b.info().recording, false);
  registry.resize(2 << 20);
  registry.markDirty((2 << 20) - 1, 1);
  assert.deepEqual([job.length, job.count(), successor.length, a.length], [2 << 20, 2 * 65536, 2 << 20, 2 << 20]);
  registry.remove(job);
  assert.equal(registry.size, 3);
});
