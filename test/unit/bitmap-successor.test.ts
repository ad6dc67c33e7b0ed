/*
 * A job's hold on a bitmap (successor.ts) and what a backup leaves in it
 * (bitmap-sync-mode.ts), on real registries: the frozen bitmap and its successor as
 * query-named-block-nodes lists them, writes during the job going to the successor only,
 * abdicate and reclaim, and the six ends of bitmap-mode × outcome as QEMU 7.2's
 * backup_cleanup_sync_bitmap leaves them.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BitmapRegistry } from '../../src/blockdev/bitmaps/bitmap-registry.js';
import { settleSyncBitmap } from '../../src/blockdev/bitmaps/bitmap-sync-mode.js';
import { DirtyBitmap } from '../../src/blockdev/bitmaps/dirty-bitmap.js';
import { abdicate, createSuccessor, reclaim } from '../../src/blockdev/bitmaps/successor.js';
import type { BitmapSyncMode } from '../../src/generated/qapi-types.js';

const G = 65536;
const LENGTH = 16 * G;

/** The granules a bitmap marks. */
const granules = (bitmap: DirtyBitmap) => [...bitmap.dirtyRuns()].flatMap(({ offset, length }) => Array.from({ length: length / G }, (_, i) => offset / G + i));

/** A node's registry with an older bitmap, the synced one (granules 0 and 1 dirty), and a newer one. */
function setUp(): { registry: BitmapRegistry; bitmap: DirtyBitmap } {
  const registry = new BitmapRegistry();
  registry.add(new DirtyBitmap(LENGTH, G, 'older'));
  const bitmap = new DirtyBitmap(LENGTH, G, 'bm');
  registry.add(bitmap);
  registry.add(new DirtyBitmap(LENGTH, G, 'newer'));
  bitmap.set(0, 2 * G);
  return { registry, bitmap };
}

test('a successor freezes the bitmap: busy, disabled, and an anonymous bitmap marks the writes in its place', () => {
  const { registry, bitmap } = setUp();
  const successor = createSuccessor(registry, bitmap);
  assert.deepEqual(registry.list().map((entry) => entry.name), [undefined, 'newer', 'bm', 'older'], 'listed newest first, as QEMU lists it');
  registry.markDirty(5 * G, 1);
  assert.deepEqual(granules(bitmap), [0, 1], 'the frozen bitmap does not change');
  assert.deepEqual(granules(successor), [5]);
  assert.deepEqual(bitmap.info(), { name: 'bm', count: 2 * G, granularity: G, recording: true, busy: true, persistent: false });
  assert.deepEqual(successor.info(), { count: G, granularity: G, recording: true, busy: false, persistent: false });
  assert.throws(() => createSuccessor(registry, bitmap), { message: "Bitmap 'bm' is currently in use by another operation and cannot be used" });
});

test('the successor of a disabled bitmap records nothing either, and reclaim leaves it disabled', () => {
  const { registry, bitmap } = setUp();
  bitmap.enabled = false;
  const successor = createSuccessor(registry, bitmap);
  registry.markDirty(5 * G, 1);
  assert.deepEqual([granules(successor), bitmap.info().recording], [[], false]);
  reclaim(registry, bitmap);
  assert.deepEqual([bitmap.enabled, bitmap.busy, granules(bitmap)], [false, false, [0, 1]]);
});

test('abdicate: the successor takes the name, the persistence and the place; the frozen bits go', () => {
  const { registry, bitmap } = setUp();
  bitmap.persistent = true;
  createSuccessor(registry, bitmap);
  registry.markDirty(7 * G, 1);
  const result = abdicate(registry, bitmap);
  assert.notEqual(result, bitmap);
  assert.deepEqual(registry.list().map((entry) => entry.name), ['bm', 'newer', 'older'], 'the successor was the newest');
  assert.deepEqual(result.info(), { name: 'bm', count: G, granularity: G, recording: true, busy: false, persistent: true });
  assert.equal(registry.find('bm'), result);
  registry.markDirty(9 * G, 1);
  assert.deepEqual(granules(result), [7, 9], 'it records from now on');
  assert.throws(() => abdicate(registry, result), { message: "Cannot relinquish control if there's no successor present" });
});

test('reclaim: the successor merges back and goes; the bitmap records again', () => {
  const { registry, bitmap } = setUp();
  createSuccessor(registry, bitmap);
  registry.markDirty(7 * G, 1);
  assert.equal(reclaim(registry, bitmap), bitmap);
  assert.deepEqual(registry.list().map((entry) => entry.name), ['newer', 'bm', 'older']);
  assert.deepEqual(bitmap.info(), { name: 'bm', count: 3 * G, granularity: G, recording: true, busy: false, persistent: false });
  registry.markDirty(9 * G, 1);
  assert.deepEqual(granules(bitmap), [0, 1, 7, 9]);
  assert.throws(() => reclaim(registry, bitmap), { message: 'Cannot reclaim a successor when none is present' });
});

/**
 * The bitmap marks granules 0 and 1; the job copied 0 and not 1 (its copy bitmap, at
 * another granularity, still marks part of 1); granule 3 was written during the job.
 */
const ENDS: { mode: BitmapSyncMode; succeeded: boolean; left: number[] }[] = [
  { mode: 'on-success', succeeded: true, left: [3] },
  { mode: 'on-success', succeeded: false, left: [0, 1, 3] },
  { mode: 'always', succeeded: true, left: [3] },
  { mode: 'always', succeeded: false, left: [1, 3] },
  { mode: 'never', succeeded: true, left: [0, 1, 3] },
  { mode: 'never', succeeded: false, left: [0, 1, 3] },
];

for (const { mode, succeeded, left } of ENDS) {
  test(`bitmap-mode ${mode}, job ${succeeded ? 'succeeded' : 'failed or cancelled'}: the bitmap marks ${left.join(', ')}`, () => {
    const { registry, bitmap } = setUp();
    createSuccessor(registry, bitmap);
    registry.markDirty(3 * G, 1);
    const notCopied = new DirtyBitmap(LENGTH, G / 2);
    notCopied.set(G, G / 2);
    const result = settleSyncBitmap(registry, bitmap, mode, succeeded, notCopied);
    assert.equal(registry.find('bm'), result);
    assert.deepEqual(granules(result), left);
    assert.deepEqual([result.busy, result.recording, result.successor], [false, true, undefined]);
    assert.deepEqual(registry.list().map((entry) => entry.name).sort(), ['bm', 'newer', 'older'], 'no anonymous bitmap is left');
  });
}
