/*
 * The qcow2 overlap index: lookups name the structure QEMU's check names first, ranges that
 * share clusters (a corrupt image) are counted, and random adds and removes agree with a
 * plain per-cluster model.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MetadataIndex, MetadataKind } from '../../src/blockdev/drivers/qcow2/metadata-index.js';

const CS = 65536;

test('a lookup names the first structure in QEMU order, apart from the one being written', () => {
  const index = new MetadataIndex(CS);
  index.add(MetadataKind.Header, 0, CS);
  index.add(MetadataKind.RefcountTable, CS, CS);
  index.add(MetadataKind.ActiveL2, CS, CS); // an L1 entry naming the refcount table
  index.add(MetadataKind.ActiveL1, 3 * CS, 16);
  assert.equal(index.overlap(100, 100), MetadataKind.Header);
  assert.equal(index.overlap(CS + 8, 8), MetadataKind.RefcountTable);
  assert.equal(index.overlap(CS, CS, MetadataKind.RefcountTable), MetadataKind.ActiveL2);
  assert.equal(index.overlap(CS, CS, MetadataKind.ActiveL2), MetadataKind.RefcountTable);
  assert.equal(index.overlap(2 * CS, CS), undefined);
  assert.equal(index.overlap(2 * CS + CS - 1, 2), MetadataKind.ActiveL1, 'a write touching the table\'s cluster overlaps it');
  assert.equal(index.overlap(2 * CS, 0), undefined, 'an empty write overlaps nothing');
  index.remove(MetadataKind.ActiveL2, CS, CS);
  assert.equal(index.overlap(CS, CS, MetadataKind.RefcountTable), undefined);
  assert.deepEqual(index.describe(), [[0, 1, ['qcow2_header']], [1, 2, ['refcount table']], [3, 4, ['active L1 table']]]);
});

test('random adds and removes agree with a per-cluster model', () => {
  let seed = 7;
  const random = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % n);
  const index = new MetadataIndex(CS);
  const model = new Map<number, number[]>();
  const live: [MetadataKind, number, number][] = [];
  const apply = (kind: MetadataKind, offset: number, length: number, delta: number) => {
    for (let c = Math.floor(offset / CS); c < Math.ceil((offset + length) / CS); c++) {
      const counts = model.get(c) ?? new Array<number>(8).fill(0);
      counts[kind]! += delta;
      model.set(c, counts);
    }
  };
  for (let step = 0; step < 3000; step++) {
    if (live.length && random(3) === 0) {
      const [kind, offset, length] = live.splice(random(live.length), 1)[0]!;
      index.remove(kind, offset, length);
      apply(kind, offset, length, -1);
    } else {
      const entry: [MetadataKind, number, number] = [random(8), random(200) * CS + random(2) * 512, 1 + random(5 * CS)];
      live.push(entry);
      index.add(...entry);
      apply(...entry, 1);
    }
    const offset = random(210 * CS);
    const length = 1 + random(3 * CS);
    const ignore = random(2) ? undefined : random(8);
    let expected: MetadataKind | undefined;
    for (let c = Math.floor(offset / CS); c < Math.ceil((offset + length) / CS); c++) {
      (model.get(c) ?? []).forEach((count, kind) => {
        if (count > 0 && kind !== ignore && (expected === undefined || kind < expected)) expected = kind;
      });
    }
    assert.equal(index.overlap(offset, length, ignore), expected, `step ${step}: ${offset}+${length}`);
  }
  for (const [kind, offset, length] of live) index.remove(kind, offset, length);
  assert.deepEqual(index.describe(), [], 'nothing is left once every range is removed');
});
