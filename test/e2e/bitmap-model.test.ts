/*
 * Dirty bitmaps against a model: a seeded run of writes, write-zeroes (with and
 * without NO_HOLE), trims and resizes through an NBD export, while bitmaps of several
 * granularities (in memory and persistent) are enabled, disabled, cleared and added at random moments. After
 * every step each bitmap's count and x-debug-block-dirty-bitmap-sha256 equal the
 * model's: one boolean per granule, hashed here as QEMU hashes a bitmap (lowest bit
 * first, in whole 64-bit words), independently of blockd's code.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { Command, CommandFlag } from '../../src/nbd/protocol.js';
import { QmpClient } from '../../src/qmp/client.js';
import { runBlockd } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { NbdRawClient } from '../helpers/nbd-raw-client.js';
import { assertCheckClean, createQcow2, KiB, MiB, SeededRandom, testSeeds } from '../helpers/qemu-tools.js';

const temp = makeTempDir();
after(() => temp.cleanup());

const STEPS = 150;
const GRANULARITIES = [512, 4 * KiB, 64 * KiB, 1 * MiB];

class ModelBitmap {
  granules: boolean[];
  enabled = true;
  persistent = false;

  constructor(readonly name: string, readonly granularity: number, length: number) {
    this.granules = new Array<boolean>(Math.ceil(length / granularity)).fill(false);
  }

  mark(offset: number, length: number): void {
    if (!this.enabled || length === 0) return;
    const end = Math.min(this.granules.length, Math.ceil((offset + length) / this.granularity));
    for (let i = Math.floor(offset / this.granularity); i < end; i++) this.granules[i] = true;
  }

  resize(length: number): void {
    this.granules = Array.from({ length: Math.ceil(length / this.granularity) }, (_, i) => this.granules[i] ?? false);
  }

  count(): number {
    return this.granules.filter(Boolean).length * this.granularity;
  }

  sha256(): string {
    const bytes = Buffer.alloc(Math.max(1, Math.ceil(this.granules.length / 64)) * 8);
    this.granules.forEach((dirty, i) => {
      if (dirty) bytes[i >> 3]! |= 1 << (i & 7);
    });
    return createHash('sha256').update(bytes).digest('hex');
  }
}

for (const seed of testSeeds([11, 12])) {
  test(`bitmaps record every write, zero, trim and resize through NBD as a model says (seed ${seed})`, async () => {
    const random = new SeededRandom(seed);
    const dir = join(temp.dir, `seed-${seed}`);
    const image = join(dir, 'disk.qcow2');
    const socket = join(dir, 'nbd.sock');
    mkdirSync(dir);
    let size = 8 * MiB;
    createQcow2(image, size);
    const daemon = await runBlockd([
      '--blockdev', `driver=qcow2,node-name=disk,discard=unmap,file.driver=file,file.filename=${image}`,
      '--nbd-server', `addr.type=unix,addr.path=${socket}`,
      '--qmp', `unix:${join(dir, 'qmp.sock')}`,
    ]);
    const qmp = await QmpClient.connect(`unix:${join(dir, 'qmp.sock')}`);
    const bitmaps: ModelBitmap[] = [];
    let exportNumber = 0;
    let client: NbdRawClient | undefined;
    const exportDisk = async () => {
      await qmp.execute('block-export-add', { type: 'nbd', id: `e${exportNumber}`, 'node-name': 'disk', name: 'disk', writable: true });
      client = await NbdRawClient.open(socket, 'disk', []);
    };
    const unexport = async () => {
      await client!.disconnect();
      const id = `e${exportNumber++}`;
      const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (event) => event.data?.id === id);
      await qmp.execute('block-export-del', { id });
      await deleted;
    };
    const addBitmap = async () => {
      const bitmap = new ModelBitmap(`b${bitmaps.length}`, random.pick(GRANULARITIES), size);
      bitmap.enabled = random.int(4) > 0;
      // Persistent ones (stored at once, with blockd's write-intent record before each first write into a region) must record alike.
      bitmap.persistent = random.int(2) > 0;
      await qmp.execute('block-dirty-bitmap-add', { node: 'disk', name: bitmap.name, granularity: bitmap.granularity, disabled: !bitmap.enabled, persistent: bitmap.persistent });
      bitmaps.push(bitmap);
    };
    try {
      await exportDisk();
      for (let i = 0; i < 3; i++) await addBitmap();
      for (let step = 0; step < STEPS; step++) {
        const choice = random.int(100);
        const offset = random.int(size);
        const length = Math.min(size - offset, random.pick([1, 511, 512, 4096, 65537, 300 * KiB, 2 * MiB]));
        let what: string;
        if (choice < 40) {
          what = `write ${offset}+${length}`;
          assert.equal(await client!.change(Command.WRITE, offset, length, 0, Buffer.alloc(length, step & 0xff)), 0, what);
          for (const bitmap of bitmaps) bitmap.mark(offset, length);
        } else if (choice < 55) {
          const flags = random.int(2) ? CommandFlag.NO_HOLE : 0;
          what = `write-zeroes ${offset}+${length} flags ${flags}`;
          assert.equal(await client!.change(Command.WRITE_ZEROES, offset, length, flags), 0, what);
          for (const bitmap of bitmaps) bitmap.mark(offset, length);
        } else if (choice < 65) {
          what = `trim ${offset}+${length}`;
          assert.equal(await client!.change(Command.TRIM, offset, length), 0, what);
          for (const bitmap of bitmaps) bitmap.mark(offset, length);
        } else if (choice < 80) {
          const bitmap = random.pick(bitmaps);
          bitmap.enabled = !bitmap.enabled;
          what = `${bitmap.enabled ? 'enable' : 'disable'} ${bitmap.name}`;
          await qmp.execute(bitmap.enabled ? 'block-dirty-bitmap-enable' : 'block-dirty-bitmap-disable', { node: 'disk', name: bitmap.name });
        } else if (choice < 88) {
          const bitmap = random.pick(bitmaps);
          what = `clear ${bitmap.name}`;
          await qmp.execute('block-dirty-bitmap-clear', { node: 'disk', name: bitmap.name });
          bitmap.granules.fill(false);
        } else if (choice < 94) {
          what = 'add a bitmap';
          await addBitmap();
        } else {
          // An export keeps its size: the resize happens between two exports.
          size = random.pick([2, 5, 8, 11]) * MiB + random.int(64) * 512;
          what = `resize to ${size}`;
          await unexport();
          await qmp.execute('block_resize', { 'node-name': 'disk', size });
          for (const bitmap of bitmaps) bitmap.resize(size);
          await exportDisk();
        }
        for (const bitmap of bitmaps) {
          const { sha256 } = await qmp.execute('x-debug-block-dirty-bitmap-sha256', { node: 'disk', name: bitmap.name });
          assert.equal(sha256, bitmap.sha256(), `step ${step} (${what}): ${bitmap.name} (granularity ${bitmap.granularity})`);
        }
      }
      const [info] = (await qmp.execute('query-named-block-nodes', { flat: true })).filter((node) => node['node-name'] === 'disk');
      const reported = new Map((info!['dirty-bitmaps'] ?? []).map((bitmap) => [bitmap.name, bitmap]));
      for (const bitmap of bitmaps) {
        assert.deepEqual(reported.get(bitmap.name), {
          name: bitmap.name, recording: bitmap.enabled, persistent: bitmap.persistent, busy: false, granularity: bitmap.granularity, count: bitmap.count(),
        });
      }
      await unexport();
      await qmp.close();
    } finally {
      await daemon.stop();
    }
    assertCheckClean(image);
    // Reopened, the persistent bitmaps are back bit for bit (after every resize and clear on the way).
    const reopened = await runBlockd(['--blockdev', `driver=qcow2,node-name=disk,file.driver=file,file.filename=${image}`, '--qmp', `unix:${join(dir, 'qmp2.sock')}`]);
    try {
      const again = await QmpClient.connect(`unix:${join(dir, 'qmp2.sock')}`);
      for (const bitmap of bitmaps.filter((candidate) => candidate.persistent)) {
        const { sha256 } = await again.execute('x-debug-block-dirty-bitmap-sha256', { node: 'disk', name: bitmap.name });
        assert.equal(sha256, bitmap.sha256(), `${bitmap.name} after a restart`);
      }
      await again.close();
    } finally {
      await reopened.stop();
    }
  });
}
