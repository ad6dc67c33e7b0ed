/*
 * The qcow2 snapshot table: what blockd writes is byte for byte what qemu-img wrote for the
 * same entries; ids and lookups follow QEMU's rules; and extra data a newer writer left in
 * an entry survives when blockd rewrites the table (a snapshot taken through the driver),
 * which qemu-img then lists and checks clean.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { readQcow2Metadata, readSnapshotTable } from '../../src/blockdev/drivers/qcow2/consistency-check.js';
import { findSnapshot, nextSnapshotId, serializeSnapshotTable } from '../../src/blockdev/drivers/qcow2/snapshot-table.js';
import { openImage } from '../../src/blockdev/image-session.js';
import { makeTempDir } from '../helpers/paths.js';
import { assertCheckClean, createQcow2, MiB, qemuIo, readAt, runQemuImg, writeAt } from '../helpers/qemu-tools.js';

const { dir, cleanup } = makeTempDir('blockd-snapshot-table-');
after(cleanup);

/** An image with two snapshots taken by qemu-img, and its table's bytes. */
async function imageWithSnapshots(name: string) {
  const path = createQcow2(join(dir, name), 4 * MiB);
  qemuIo(path, ['write -P 1 0 64k']);
  runQemuImg('snapshot', '-c', 'first', path);
  qemuIo(path, ['write -P 2 0 64k']);
  runQemuImg('snapshot', '-c', 'a-longer-name', path);
  const { header } = await readQcow2Metadata(path);
  const table = await readSnapshotTable(path, header);
  return { path, header, table, bytes: readAt(path, header.snapshotsOffset, table.size) };
}

test("the table blockd writes is qemu-img's, byte for byte", async () => {
  const { table, bytes } = await imageWithSnapshots('same.qcow2');
  assert.equal(table.snapshots.length, 2);
  assert.deepEqual(serializeSnapshotTable(table.snapshots), bytes);
  assert.deepEqual(serializeSnapshotTable([]), Buffer.alloc(0));
});

test("ids and lookups as QEMU's", () => {
  const entry = (id: string, name: string) => ({ id, name }) as Parameters<typeof nextSnapshotId>[0][number];
  const list = [entry('1', 'a'), entry('7', 'b'), entry('x', 'c'), entry('3', 'b')];
  assert.equal(nextSnapshotId(list), '8');
  assert.equal(nextSnapshotId([]), '1');
  assert.equal(findSnapshot(list, undefined, 'b'), 1);
  assert.equal(findSnapshot(list, '3', 'b'), 3);
  assert.equal(findSnapshot(list, '3', 'a'), -1);
  assert.equal(findSnapshot(list, 'x', undefined), 2);
});

test('extra data another writer left in an entry survives a table rewrite by blockd', async () => {
  const { path, header, table } = await imageWithSnapshots('extra.qcow2');
  // The first entry gains 8 bytes of extra data blockd does not know; the table stays inside its cluster.
  const unknown = Buffer.from('0123456789abcdef', 'hex');
  const rewritten = serializeSnapshotTable(table.snapshots.map((sn, i) => (i === 0 ? { ...sn, unknownExtra: unknown } : sn)));
  assert.ok(rewritten.length <= 2 ** header.clusterBits);
  writeAt(path, header.snapshotsOffset, rewritten);
  assertCheckClean(path, 'with the extra data');
  assert.match(runQemuImg('snapshot', '-l', path), /^1\s+first\s/m);

  const session = await openImage(path, { format: 'qcow2', writable: true });
  try {
    await session.node.state.createSnapshot!({ name: 'third', dateSec: 1, dateNsec: 2, vmClockNsec: 3n });
  } finally {
    await session.close();
  }
  const after = await readQcow2Metadata(path);
  assert.deepEqual(after.snapshots.map((sn) => sn.name), ['first', 'a-longer-name', 'third']);
  assert.deepEqual(after.snapshots[0]!.unknownExtra, unknown);
  assert.deepEqual(after.snapshots[2]!.id, '3');
  assert.equal(after.snapshots[2]!.icount, undefined); // stored as -1: no icount
  assertCheckClean(path, 'after blockd rewrote the table');
  assert.match(runQemuImg('snapshot', '-l', path), /^3\s+third\s/m);
  const first = join(dir, 'first.raw');
  runQemuImg('convert', '-l', 'snapshot.name=first', '-O', 'raw', path, first);
  qemuIo(first, ['read -P 1 0 64k'], ['-f', 'raw']);
});
