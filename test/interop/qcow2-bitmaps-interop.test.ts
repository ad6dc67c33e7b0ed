/*
 * Persistent bitmaps in qcow2, both ways with QEMU: images whose bitmaps qemu-img bitmap
 * (add, remove, clear, enable, disable, merge) and qemu-io writes made load in blockd,
 * read-only and read-write, with the bits, counts and states qemu-storage-daemon loads
 * (its x-debug-block-dirty-bitmap-sha256 against the same hash of blockd's bits); what
 * blockd records and stores at close, qemu-img info lists, qemu-img check finds clean and
 * qemu-storage-daemon loads bit for bit; bitmaps survive a close and reopen; removal frees
 * at once; and damaged directories and tables are refused as QEMU refuses them.
 */
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { DirtyBitmap } from '../../src/blockdev/bitmaps/dirty-bitmap.js';
import { readQcow2Metadata } from '../../src/blockdev/drivers/qcow2/consistency-check.js';
import { openImage } from '../../src/blockdev/image-session.js';
import { QmpClient, QmpCommandError } from '../../src/qmp/client.js';
import { makeTempDir } from '../helpers/paths.js';
import { blockdBitmaps, qemuImgBitmaps, qsdBitmaps, type LoadedBitmap } from '../helpers/qemu-bitmaps.js';
import {
  KiB, MiB, SeededRandom, assertCheckClean, createQcow2, qemuImgCheck, qemuIo, readAt, readU64, runQemuImg, sha256File, writeAt, writeU64,
} from '../helpers/qemu-tools.js';
import { qcow2BitmapLayout } from '../helpers/qcow2-layout.js';
import { startQsd } from '../helpers/qsd-process.js';

const { dir, cleanup } = makeTempDir('blockd-qcow2-bitmaps-');
after(cleanup);

let qemuMade: string;
let smallClusters: string;
/** What qemu-storage-daemon loads from each, read-only. */
const reference = new Map<string, LoadedBitmap[]>();
let scratch = 0;

function copy(image: string, label: string): string {
  const path = join(dir, `${label}-${scratch++}.qcow2`);
  copyFileSync(image, path);
  return path;
}

async function qsdLoads(image: string): Promise<LoadedBitmap[]> {
  const loaded = await qsdBitmaps(image, join(dir, `qsd-${scratch++}`));
  if ('error' in loaded) assert.fail(`qemu-storage-daemon refused ${image}: ${loaded.error}`);
  return loaded;
}

before(async () => {
  // Data before any bitmap exists, then bitmaps changed by every qemu-img bitmap verb, with writes by qemu-io between.
  qemuMade = createQcow2(join(dir, 'qemu-made.qcow2'), 64 * MiB);
  qemuIo(qemuMade, ['write -P 0x11 0 1M']);
  runQemuImg('bitmap', '--add', qemuMade, 'b0');
  runQemuImg('bitmap', '--add', '-g', '131072', qemuMade, 'b1');
  runQemuImg('bitmap', '--add', '--disable', qemuMade, 'b2');
  qemuIo(qemuMade, ['write -P 0x22 3M 64k', 'write -P 0x33 10M 1M', 'write 40M 512']);
  runQemuImg('bitmap', '--add', qemuMade, 'b3');
  qemuIo(qemuMade, ['write 50M 128k']);
  runQemuImg('bitmap', '--disable', qemuMade, 'b3');
  runQemuImg('bitmap', '--merge', 'b0', qemuMade, 'b2');
  runQemuImg('bitmap', '--enable', qemuMade, 'b2');
  runQemuImg('bitmap', '--add', qemuMade, 'cleared');
  qemuIo(qemuMade, ['write 20M 64k']);
  runQemuImg('bitmap', '--clear', qemuMade, 'cleared');
  runQemuImg('bitmap', '--add', qemuMade, 'gone');
  runQemuImg('bitmap', '--remove', qemuMade, 'gone');
  // Several data clusters per bitmap, some of them clean (table entry 0).
  smallClusters = createQcow2(join(dir, 'small-clusters.qcow2'), 64 * MiB, { clusterSize: 4 * KiB });
  runQemuImg('bitmap', '--add', '-g', '512', smallClusters, 'fine');
  runQemuImg('bitmap', '--add', smallClusters, 'coarse');
  qemuIo(smallClusters, ['write 0 4k', 'write 40M 1M', 'write 63M 512']);
  for (const image of [qemuMade, smallClusters]) reference.set(image, await qsdLoads(image));
});

test('the QEMU-made images hold what the test means them to', () => {
  assert.deepEqual(qemuImgBitmaps(qemuMade).map(({ name, flags }) => `${name}:${flags.join(',')}`),
    ['b0:auto', 'b1:auto', 'b2:auto', 'b3:', 'cleared:auto']);
  const byName = new Map(reference.get(qemuMade)!.map((bitmap) => [bitmap.name, bitmap]));
  assert.ok(byName.get('b0')!.count > 0 && byName.get('b3')!.count > 0);
  assert.equal(byName.get('b2')!.sha256, byName.get('b0')!.sha256, 'b2 was merged from b0');
  assert.equal(byName.get('cleared')!.count, 0);
  assert.ok(reference.get(smallClusters)!.every((bitmap) => bitmap.count > 0));
});

describe('blockd loads the bitmaps QEMU stored, as qemu-storage-daemon loads them', () => {
  for (const writable of [false, true]) {
    test(writable ? 'read-write' : 'read-only', async () => {
      for (const source of [qemuMade, smallClusters]) {
        const image = copy(source, writable ? 'load-rw' : 'load-ro');
        const before = sha256File(image);
        const session = await openImage(image, { writable });
        try {
          assert.deepEqual(blockdBitmaps(session.node.bitmaps.list()), reference.get(source), image);
          assert.ok(session.node.bitmaps.list().every((bitmap) => bitmap.readonly === !writable));
          // A writer marks them in use on disk before anything else can happen.
          const flags = qemuImgBitmaps(image, true).map((bitmap) => bitmap.flags.includes('in-use'));
          assert.deepEqual(flags, flags.map(() => writable), image);
        } finally {
          await session.close();
        }
        if (!writable) assert.equal(sha256File(image), before, 'a read-only open changes nothing');
        assertCheckClean(image, image);
        assert.deepEqual(qemuImgBitmaps(image), qemuImgBitmaps(source));
        assert.deepEqual(await qsdLoads(image), reference.get(source));
      }
    });
  }
});

test('blockd stores what it recorded at close: qemu-img lists it, check is clean, qemu-storage-daemon loads the same bits', async () => {
  const image = copy(qemuMade, 'store');
  const session = await openImage(image, { writable: true });
  let expected: LoadedBitmap[];
  try {
    const { node, disk } = session;
    const fresh = new DirtyBitmap(node.length(), 64 * KiB, 'fresh');
    fresh.persistent = true;
    node.bitmaps.add(fresh);
    const frozen = new DirtyBitmap(node.length(), 512, 'frozen');
    frozen.persistent = true;
    frozen.enabled = false;
    frozen.set(5 * MiB + 512, 3 * KiB);
    node.bitmaps.add(frozen);
    const kept = new DirtyBitmap(node.length(), 64 * KiB, 'memory-only');
    node.bitmaps.add(kept);
    const random = new SeededRandom(12);
    for (let i = 0; i < 20; i++) await disk.write(random.int(63 * MiB), random.bytes(1 + random.int(200 * KiB)));
    await disk.write(64 * MiB - 512, Buffer.alloc(512, 7));
    expected = blockdBitmaps(node.bitmaps.list().filter((bitmap) => bitmap.persistent));
    assert.ok(fresh.count() > 0 && frozen.count() === 3 * KiB);
  } finally {
    await session.close();
  }
  assertCheckClean(image, 'after blockd stored its bitmaps');
  // The directory keeps QEMU's order; new bitmaps follow, newest first (as QEMU walks a node's bitmaps).
  assert.deepEqual(qemuImgBitmaps(image), [
    ...qemuImgBitmaps(qemuMade),
    { name: 'frozen', granularity: 512, flags: [] },
    { name: 'fresh', granularity: 65536, flags: ['auto'] },
  ]);
  const sorted = (list: LoadedBitmap[]) => [...list].sort((a, b) => a.name.localeCompare(b.name));
  assert.deepEqual(sorted(await qsdLoads(image)), sorted(expected));
  // And QEMU writes on top of what blockd stored, then blockd loads QEMU's result.
  qemuIo(image, ['write 30M 64k']);
  assertCheckClean(image, 'after QEMU wrote over blockd-stored bitmaps');
  const reopened = await openImage(image);
  try {
    assert.deepEqual(sorted(blockdBitmaps(reopened.node.bitmaps.list())), sorted(await qsdLoads(image)));
  } finally {
    await reopened.close();
  }
});

test('restart: bitmaps survive close and reopen bit for bit, clean data clusters are not written', async () => {
  const image = createQcow2(join(dir, 'restart.qcow2'), 1024 * MiB);
  // 1 GiB at 512 bytes per bit: 256 KiB of bits, four data clusters.
  const coverage = 64 * KiB * 8 * 512;
  const bits: Buffer[] = [];
  for (let round = 0; round < 2; round++) {
    const session = await openImage(image, { writable: true });
    try {
      const { node } = session;
      let bitmap = node.bitmaps.find('fine');
      if (round === 0) {
        bitmap = new DirtyBitmap(node.length(), 512, 'fine');
        bitmap.persistent = true;
        node.bitmaps.add(bitmap);
        const random = new SeededRandom(5);
        for (let i = 0; i < 300; i++) bitmap.set(random.int(coverage), 1 + random.int(64 * KiB));
        bitmap.set(2 * coverage, coverage); // a cluster of all ones
        bitmap.set(1024 * MiB - 512, 512);
      }
      bits.push(bitmap!.granuleBytes(0, bitmap!.granules));
    } finally {
      await session.close();
    }
    assertCheckClean(image, `round ${round}`);
  }
  assert.ok(bits[0]!.equals(bits[1]!), 'the bits after a reopen equal those before the close');
  const { bitmaps } = await readQcow2Metadata(image);
  const tableEntries = [0, 1, 2, 3].map((i) => readU64(image, bitmaps[0]!.tableOffset + 8 * i));
  assert.equal(tableEntries[1], 0n, 'the clean second quarter has no data cluster');
  assert.ok(tableEntries[0]! > 0n && tableEntries[2]! > 1n && tableEntries[3]! > 1n);
  const loaded = await qsdLoads(image);
  const session = await openImage(image);
  try {
    assert.deepEqual(loaded, blockdBitmaps(session.node.bitmaps.list()));
  } finally {
    await session.close();
  }
});

test('a table entry of 1 loads as a cluster of all ones', async () => {
  const image = copy(smallClusters, 'ones');
  const { bitmaps } = await readQcow2Metadata(image);
  const fine = bitmaps.find((bitmap) => bitmap.name === 'fine')!;
  writeU64(image, fine.tableOffset + 8, 1n);
  const session = await openImage(image);
  try {
    const bitmap = session.node.bitmaps.find('fine')!;
    const coverage = 4 * KiB * 8 * 512;
    assert.equal(bitmap.granuleBytes(4 * KiB * 8, 4 * KiB * 8).toString('hex'), 'ff'.repeat(4 * KiB));
    assert.ok(bitmap.count() >= coverage);
    assert.deepEqual(blockdBitmaps(session.node.bitmaps.list()), await qsdLoads(image));
  } finally {
    await session.close();
  }
});

test('removePersistentDirtyBitmap takes the bitmap out of the image at once and frees its clusters', async () => {
  const image = copy(qemuMade, 'remove');
  const session = await openImage(image, { writable: true });
  try {
    const { node } = session;
    const remove = async (name: string) => {
      await node.state.removePersistentDirtyBitmap!(name);
      node.bitmaps.remove(node.bitmaps.find(name)!);
    };
    await remove('b1');
    // While blockd writes the image, its write-intent record sits beside the bitmaps; it goes with the last one.
    assert.deepEqual(qemuImgBitmaps(image, true).map((bitmap) => bitmap.name), ['b0', 'b2', 'b3', 'cleared', 'org.blockd.write-intent']);
    await node.state.removePersistentDirtyBitmap!('no-such-bitmap');
    for (const name of ['b0', 'b2', 'b3', 'cleared']) await remove(name);
    assert.deepEqual(qemuImgBitmaps(image, true), []);
  } finally {
    await session.close();
  }
  const check = qemuImgCheck(image);
  assert.equal(check.status, 0, check.output);
  const { header } = await readQcow2Metadata(image);
  assert.equal(header.bitmaps, undefined);
  assert.equal(header.autoclearFeatures & 1n, 0n, 'no bitmaps: the autoclear bit goes with the extension');
});

describe('canStoreNewDirtyBitmap refuses what qemu-storage-daemon refuses, with its text', () => {
  const cases: { label: string; make: () => string; name: string; granularity?: number }[] = [
    { label: 'an existing name', make: () => copy(qemuMade, 'can'), name: 'b1' },
    { label: 'a v2 image', make: () => createQcow2(join(dir, 'v2.qcow2'), 64 * MiB, { compat: '0.10' }), name: 'new' },
    { label: 'a name over 1023 bytes', make: () => copy(qemuMade, 'can'), name: 'n'.repeat(1024) },
    { label: 'too many bits', make: () => createQcow2(join(dir, 'huge.qcow2'), 8 * 1024 * 1024 * MiB), name: 'new', granularity: 512 },
  ];
  for (const { label, make, name, granularity = 65536 } of cases) {
    test(label, async () => {
      const image = make();
      const work = join(dir, `qsd-${scratch++}`);
      mkdirSync(work, { recursive: true });
      const qsd = await startQsd(work);
      const qmp = await QmpClient.connect(`unix:${join(work, 'qsd-qmp.sock')}`);
      let expected: string | undefined;
      try {
        await qmp.executeRaw('blockdev-add', { 'node-name': 'image', driver: 'qcow2', file: { driver: 'file', filename: image } });
        await qmp.executeRaw('block-dirty-bitmap-add', { node: 'image', name, granularity, persistent: true });
      } catch (error) {
        if (!(error instanceof QmpCommandError)) throw error;
        expected = error.desc;
      } finally {
        await qmp.close();
        await qsd.stop();
      }
      assert.ok(expected, 'qemu-storage-daemon refuses it');
      const session = await openImage(image, { writable: true });
      try {
        await assert.rejects(session.node.state.canStoreNewDirtyBitmap!(name, granularity), { desc: expected });
        if (label !== 'a v2 image') await session.node.state.canStoreNewDirtyBitmap!('acceptable', 1 << 30);
      } finally {
        await session.close();
      }
    });
  }
});

describe('damaged bitmap metadata is refused as qemu-storage-daemon refuses it, read-only too', () => {
  const directory = async (image: string) => {
    const { header } = await readQcow2Metadata(image);
    return header.bitmaps!.directoryOffset;
  };
  const table = async (image: string, name: string) => (await readQcow2Metadata(image)).bitmaps.find((bitmap) => bitmap.name === name)!.tableOffset;
  // Entry 0 is b0 (name 2 bytes: 32 bytes long), entry 1 b1.
  const damages: { label: string; damage: (image: string) => Promise<void> }[] = [
    { label: 'granularity under the minimum', damage: async (image) => writeAt(image, (await directory(image)) + 32 + 17, Buffer.from([8])) },
    { label: 'an unknown flag', damage: async (image) => writeAt(image, (await directory(image)) + 12, Buffer.from([0, 0, 0, 6])) },
    { label: 'a wrong type', damage: async (image) => writeAt(image, (await directory(image)) + 16, Buffer.from([2])) },
    { label: 'a table too small for the disk', damage: async (image) => writeAt(image, (await directory(image)) + 32 + 8, Buffer.from([0, 0, 0, 0])) },
    { label: 'a table of the wrong size', damage: async (image) => writeAt(image, (await directory(image)) + 8, Buffer.from([0, 0, 0, 2])) },
    { label: 'extra data', damage: async (image) => writeAt(image, (await directory(image)) + 23, Buffer.from([8])) },
    { label: 'a name running past the directory', damage: async (image) => writeAt(image, (await directory(image)) + 18, Buffer.from([0x10, 0])) },
    { label: 'a duplicate name', damage: async (image) => writeAt(image, (await directory(image)) + 32 + 24, Buffer.from('b0')) },
    { label: 'a reserved bit in a table entry', damage: async (image) => writeU64(image, await table(image, 'b0'), readU64(image, await table(image, 'b0')) | 2n) },
    { label: 'an unaligned data cluster', damage: async (image) => writeU64(image, await table(image, 'b1'), readU64(image, await table(image, 'b1')) + 512n) },
    {
      label: 'more bitmaps in the header than in the directory',
      damage: async (image) => {
        const at = readAt(image, 0, 4096).indexOf(Buffer.from([0x23, 0x85, 0x28, 0x75]));
        writeAt(image, at + 8, Buffer.from([0, 0, 0, 6]));
      },
    },
  ];
  for (const { label, damage } of damages) {
    test(label, async () => {
      const image = copy(qemuMade, 'damaged');
      await damage(image);
      const refused = await qsdBitmaps(image, join(dir, `qsd-${scratch++}`));
      assert.ok('error' in refused, `qemu-storage-daemon loads it: ${JSON.stringify(refused)}`);
      for (const writable of [false, true]) {
        const before = sha256File(image);
        await assert.rejects(openImage(image, { writable }), { desc: refused.error }, `writable=${writable}`);
        assert.equal(sha256File(image), before, 'a refused open writes nothing');
      }
    });
  }
});

test('bitmaps left in use load inconsistent and disabled, stay in use, and stop a resize as in QEMU', async () => {
  const image = copy(qemuMade, 'in-use');
  const { header } = await readQcow2Metadata(image);
  writeAt(image, header.bitmaps!.directoryOffset + 12, Buffer.from([0, 0, 0, 3]));
  const session = await openImage(image, { writable: true });
  try {
    const b0 = session.node.bitmaps.find('b0')!;
    assert.deepEqual([b0.inconsistent, b0.enabled, b0.recording, b0.count()], [true, false, false, 0]);
    await assert.rejects(session.node.truncate(128 * MiB), { desc: "Bitmap 'b0' is inconsistent and cannot be used" });
  } finally {
    await session.close();
  }
  assertCheckClean(image, 'after closing an image with an inconsistent bitmap');
  assert.deepEqual(qemuImgBitmaps(image)[0], { name: 'b0', granularity: 65536, flags: ['in-use', 'auto'] });
  const sorted = (list: LoadedBitmap[]) => [...list].sort((a, b) => a.name.localeCompare(b.name));
  const loaded = await qsdLoads(image);
  assert.deepEqual(loaded.find((bitmap) => bitmap.name === 'b0'), { name: 'b0', granularity: 65536, count: 0, recording: false, persistent: true, inconsistent: true });
  assert.deepEqual(sorted(loaded.filter((bitmap) => bitmap.name !== 'b0')), sorted(reference.get(qemuMade)!.filter((bitmap) => bitmap.name !== 'b0')));
});

test('reopening read-write marks the bitmaps in use; reopening read-only stores them and makes them read-only again', async () => {
  const image = copy(qemuMade, 'reopen');
  const session = await openImage(image);
  try {
    const { node, graph } = session;
    const b0 = node.bitmaps.find('b0')!;
    assert.equal(b0.readonly, true);
    await graph.reopenReadWrite(node);
    assert.equal(b0.readonly, false);
    assert.ok(qemuImgBitmaps(image, true).every((bitmap) => bitmap.flags.includes('in-use')));
    b0.set(7 * MiB, 5 * KiB);
    const expected = blockdBitmaps(node.bitmaps.list());
    await graph.reopenReadOnly(node);
    assert.equal(b0.readonly, true);
    assert.deepEqual(qemuImgBitmaps(image, true), qemuImgBitmaps(qemuMade));
    assert.deepEqual(await qsdLoads(image), expected);
  } finally {
    await session.close();
  }
  assertCheckClean(image, 'after reopening read-write and back');
});

test('a bitmap name that is not UTF-8 keeps its bytes through a read-write session', async () => {
  const image = createQcow2(join(dir, 'raw-name.qcow2'), 16 * MiB);
  runQemuImg('bitmap', '--add', image, 'xname');
  const bytes = readFileSync(image);
  const [entry] = qcow2BitmapLayout(bytes).entries;
  writeAt(image, entry!.at + 24, Buffer.from([0xff])); // 'x' becomes a byte no UTF-8 text holds
  const session = await openImage(image, { writable: true });
  await session.close();
  const [stored] = qcow2BitmapLayout(readFileSync(image)).entries;
  const nameBytes = readFileSync(image).subarray(stored!.at + 24, stored!.at + 24 + stored!.nameSize);
  assert.deepEqual([...nameBytes], [0xff, ...Buffer.from('name')]);
  assertCheckClean(image);
});
