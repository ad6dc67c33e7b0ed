/*
 * Dirty bitmaps over NBD, below the wire: a bitmap's dirty areas (QEMU's
 * next_dirty_area) and the qemu:dirty-bitmap extents built from them against a
 * model of one boolean per granule, with REQ_ONE and the per-chunk extent cap;
 * and which contexts LIST and SET select, with their ids, as QEMU's server does.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DirtyBitmap } from '../../src/blockdev/bitmaps/dirty-bitmap.js';
import { bitmapExtents } from '../../src/exports/nbd/export-block-status.js';
import { selectContexts, selectedContexts } from '../../src/exports/nbd/meta-contexts.js';
import { decodeBlockStatusPayload, type StatusExtent } from '../../src/nbd/messages.js';
import { SeededRandom } from '../helpers/qemu-tools.js';

/** The extents a model says [offset, offset+length) has: dirty (1) and clean (0) runs, clean past the bitmap's end. */
function modelExtents(model: boolean[], granularity: number, size: number, offset: number, length: number): StatusExtent[] {
  const extents: StatusExtent[] = [];
  for (let at = offset; at < offset + length; ) {
    const granule = Math.floor(at / granularity);
    const next = Math.min(offset + length, at < size ? Math.min(size, (granule + 1) * granularity) : Infinity);
    const flags = at < size && model[granule] ? 1 : 0;
    const last = extents[extents.length - 1];
    if (last && last.flags === flags) last.length += next - at;
    else extents.push({ length: next - at, flags });
    at = next;
  }
  return extents;
}

function extentsOf(payload: Buffer, contextId: number): StatusExtent[] {
  const decoded = decodeBlockStatusPayload(payload);
  assert.equal(decoded.contextId, contextId);
  return decoded.extents;
}

for (const seed of [1, 2, 3, 4]) {
  test(`qemu:dirty-bitmap extents follow a model of the granules (seed ${seed})`, () => {
    const random = new SeededRandom(seed);
    const granularity = random.pick([512, 4096, 65536]);
    // An end inside a granule, as a disk whose size is not a multiple of the granularity.
    const size = granularity * (200 + random.int(100)) + random.pick([0, 512, 1000]);
    const bitmap = new DirtyBitmap(size, granularity, 'bm');
    const model = new Array<boolean>(Math.ceil(size / granularity)).fill(false);
    for (let step = 0; step < 60; step++) {
      const offset = random.int(size);
      const length = Math.min(size - offset, 1 + random.int(granularity * 8));
      const first = Math.floor(offset / granularity);
      const end = Math.ceil((offset + length) / granularity);
      if (random.int(3) === 0) {
        bitmap.clear(offset, length);
        for (let i = first; i < end; i++) model[i] = false;
      } else {
        bitmap.set(offset, length);
        for (let i = first; i < end; i++) model[i] = true;
      }
      // Queries at any byte, past the bitmap's end too (a bitmap of a smaller backing node).
      const queryOffset = random.int(size);
      const queryLength = 1 + random.int(size + granularity * 4 - queryOffset);
      const expected = modelExtents(model, granularity, size, queryOffset, queryLength);
      assert.deepEqual(extentsOf(bitmapExtents(bitmap, 7, queryOffset, queryLength, false), 7), expected);
      assert.deepEqual(extentsOf(bitmapExtents(bitmap, 7, queryOffset, queryLength, true), 7), expected.slice(0, 1));
    }
  });
}

test('a reply chunk holds at most 131072 extents, as QEMU caps it', () => {
  const granularity = 512;
  const bitmap = new DirtyBitmap(granularity * 300_000, granularity, 'bm');
  for (let granule = 0; granule < 300_000; granule += 2) bitmap.set(granule * granularity, granularity);
  const extents = extentsOf(bitmapExtents(bitmap, 2, 0, granularity * 300_000, false), 2);
  assert.equal(extents.length, 131072);
  assert.deepEqual(extents.slice(0, 3), [{ length: 512, flags: 1 }, { length: 512, flags: 0 }, { length: 512, flags: 1 }]);
  assert.deepEqual(extents[131071], { length: 512, flags: 0 });
});

test('an all-clean bitmap is one clean extent; a 4 GiB - 1 request is one dirty extent of that length', () => {
  const size = 2 ** 33;
  const bitmap = new DirtyBitmap(size, 65536, 'bm');
  assert.deepEqual(extentsOf(bitmapExtents(bitmap, 2, 4096, 2 ** 32 - 1, false), 2), [{ length: 2 ** 32 - 1, flags: 0 }]);
  bitmap.set(0, size);
  assert.deepEqual(extentsOf(bitmapExtents(bitmap, 2, 1, 2 ** 32 - 1, false), 2), [{ length: 2 ** 32 - 1, flags: 1 }]);
});

test('LIST and SET select contexts as QEMU does, bitmaps from id 2 in the export order', () => {
  const a = new DirtyBitmap(1 << 20, 65536, 'a');
  const b = new DirtyBitmap(1 << 20, 65536, 'b');
  const offer = { allocationDepth: true, bitmaps: [b, a, b] };
  const names = (queries: string[], listing: boolean) =>
    selectedContexts(offer, selectContexts(offer, queries, listing)).map(({ id, name }) => `${id} ${name}`);
  const everything = ['0 base:allocation', '1 qemu:allocation-depth', '2 qemu:dirty-bitmap:b', '3 qemu:dirty-bitmap:a', '4 qemu:dirty-bitmap:b'];
  assert.deepEqual(names([], true), everything);
  assert.deepEqual(names(['qemu:'], true), everything.slice(1));
  assert.deepEqual(names(['qemu:dirty-bitmap:'], true), everything.slice(2));
  assert.deepEqual(names(['qemu:dirty-bitmap:'], false), []);
  assert.deepEqual(names(['qemu:'], false), []);
  assert.deepEqual(names([], false), []);
  // Reply order is the ids' order whatever the query order; a name selects its first listing only; unknown ones are ignored.
  assert.deepEqual(names(['qemu:dirty-bitmap:a', 'qemu:dirty-bitmap:b', 'qemu:dirty-bitmap:nosuch', 'qemu:dirty-bitmap:a', 'base:allocation'], false), [
    '0 base:allocation', '2 qemu:dirty-bitmap:b', '3 qemu:dirty-bitmap:a',
  ]);
  assert.deepEqual(names(['qemu:dirty-bitmap:a'], true), ['3 qemu:dirty-bitmap:a']);
  const withoutDepth = { allocationDepth: false, bitmaps: [a] };
  assert.deepEqual(selectedContexts(withoutDepth, selectContexts(withoutDepth, ['qemu:allocation-depth', 'qemu:dirty-bitmap:a'], false)).map((c) => c.id), [2]);
});
