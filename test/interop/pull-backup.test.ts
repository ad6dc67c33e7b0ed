/*
 * Pull backups (image fleecing, QEMU 7.x style) while a guest writes (issue 14, acceptance
 * "Data"). The live disk is a three-layer qcow2 chain; the guest writes through an NBD
 * export of a copy-before-write filter over it (three connections, writes in flight, some
 * unaligned, write-zeroes, FUA, flushes), and a backup program reads a snapshot-access node
 * over the filter, exported with the checkpoint bitmap. The guest pauses only while a
 * fleecing session is set up, so the model of that moment is exact.
 *   - full: nbdcopy (which skips what base:allocation calls zero) pulls the whole view while
 *     the guest writes: it is the disk at the session's start;
 *   - incremental: the next session's filter copies only the checkpoint bitmap's clusters; the
 *     program asks nbdinfo --map=qemu:dirty-bitmap:NAME for the dirty extents, reads only
 *     those and lays them over the full backup: that is the disk at the second start.
 * Finally the live chain reads as every acknowledged write, and qemu-img check is clean on it
 * and on the fleecing images.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import type { QmpClient } from '../../src/qmp/client.js';
import { applyAcked } from '../helpers/acked-write-model.js';
import { runBlockdWithNbd, type BlockdWithNbd } from '../helpers/blockd-process.js';
import { mirrorChainTemplate, qcow2Node, WRITE_REGIONS } from '../helpers/mirror-images.js';
import { AckedWriter } from '../helpers/nbd-acked-writes.js';
import { NbdRawClient } from '../helpers/nbd-raw-client.js';
import { makeTempDir } from '../helpers/paths.js';
import { assertCheckClean, createQcow2, qemuImgCompare, SeededRandom, testSeeds } from '../helpers/qemu-tools.js';

const run = promisify(execFile);
/** Acknowledged guest writes per phase. */
const PHASE = 60;

const root = makeTempDir('blockd-pull-backup-');
const nbdSocket = join(root.dir, 'nbd.sock');
const uri = (name: string) => `nbd+unix:///${name}?socket=${nbdSocket}`;
let daemon: BlockdWithNbd;
let qmp: QmpClient;
let copyChain: ReturnType<typeof mirrorChainTemplate>;

before(async () => {
  copyChain = mirrorChainTemplate(join(root.dir, 'template'));
  daemon = await runBlockdWithNbd(root.dir);
  qmp = daemon.qmp;
});

after(async () => {
  await daemon?.stop();
  root.cleanup();
});

async function exportDel(id: string): Promise<void> {
  const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (event) => (event.data as { id: string }).id === id);
  await qmp.execute('block-export-del', { id });
  await deleted;
}

interface Session {
  /** The guest, writing through the filter's export. */
  writer: AckedWriter;
  /** The disk when the session started. */
  atStart: Buffer;
}

/**
 * Starts fleecing session `n` over node `src` (the guest paused: its export is gone): a
 * fleecing image backed by the disk, the filter (copying only `bitmap`'s clusters, if given),
 * the view exported as `pull<n>` with `bitmap`, and the guest writing again through `guest<n>`.
 */
async function startSession(dir: string, n: number, atStart: Buffer, seed: number, bitmap?: string): Promise<Session> {
  const fleece = createQcow2(join(dir, `fleece${n}.qcow2`), undefined, { backing: { path: 'm-top.qcow2', format: 'qcow2' } });
  await qmp.execute('blockdev-add', qcow2Node(`fl${n}`, fleece, 'src') as never);
  await qmp.execute('blockdev-add', { driver: 'copy-before-write', 'node-name': `cbw${n}`, file: 'src', target: `fl${n}`, ...(bitmap ? { bitmap: { node: 'src', name: bitmap } } : {}) } as never);
  await qmp.execute('blockdev-add', { driver: 'snapshot-access', 'node-name': `view${n}`, file: `cbw${n}` } as never);
  await qmp.execute('block-export-add', { type: 'nbd', id: `pull${n}`, name: `pull${n}`, 'node-name': `view${n}`, ...(bitmap ? { bitmaps: [{ node: 'src', name: bitmap }] } : {}) } as never);
  await qmp.execute('block-export-add', { type: 'nbd', id: `guest${n}`, name: `guest${n}`, 'node-name': `cbw${n}`, writable: true });
  const writer = await AckedWriter.start({ socket: nbdSocket, exportName: `guest${n}`, regions: WRITE_REGIONS, random: new SeededRandom(seed), exclusive: true });
  return { writer, atStart };
}

/** The guest pauses; the session's exports and nodes go. Returns the disk now. */
async function endSession(n: number, session: Session): Promise<Buffer> {
  await session.writer.pause();
  session.writer.stop();
  await session.writer.finished();
  await exportDel(`guest${n}`);
  await exportDel(`pull${n}`);
  for (const node of [`view${n}`, `cbw${n}`, `fl${n}`]) await qmp.execute('blockdev-del', { 'node-name': node });
  return applyAcked(session.atStart, session.writer.acked);
}

/** nbdinfo's dirty extents of `bitmap` on an export. */
async function dirtyExtents(name: string, bitmap: string): Promise<{ offset: number; length: number }[]> {
  const { stdout } = await run('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${bitmap}`, uri(name)]);
  const extents = JSON.parse(stdout) as { offset: number; length: number; type: number }[];
  return extents.filter((extent) => extent.type & 1).map(({ offset, length }) => ({ offset, length }));
}

test('full and incremental pull backups while the guest writes: each is the disk at its session start', async () => {
  for (const seed of testSeeds([1600])) {
    const dir = join(root.dir, `s${seed}`);
    copyChain(dir, 'full');
    const path = (name: string) => join(dir, name);
    await qmp.execute('blockdev-add', qcow2Node('base', path('m-base.qcow2')) as never);
    await qmp.execute('blockdev-add', qcow2Node('mid', path('m-mid.qcow2'), 'base') as never);
    await qmp.execute('blockdev-add', qcow2Node('src', path('m-top.qcow2'), 'mid') as never);

    // Before any backup: the guest writes straight to the disk.
    await qmp.execute('block-export-add', { type: 'nbd', id: 'guest0', name: 'guest0', 'node-name': 'src', writable: true });
    const early = await AckedWriter.start({ socket: nbdSocket, exportName: 'guest0', regions: WRITE_REGIONS, random: new SeededRandom(seed), exclusive: true });
    await early.acknowledged(PHASE);
    await early.pause();
    early.stop();
    await early.finished();
    await exportDel('guest0');
    const atFull = applyAcked(readFileSync(path('m-expected.raw')), early.acked);

    // Session 1, full: the checkpoint bitmap starts with it and records every write since.
    await qmp.execute('block-dirty-bitmap-add', { node: 'src', name: 'ck1' });
    const full = await startSession(dir, 1, atFull, seed + 1);
    await full.writer.acknowledged(PHASE);
    const beforeFull = full.writer.acked.length;
    await run('nbdcopy', [uri('pull1'), path('full.raw')]);
    assert.ok(full.writer.acked.length > beforeFull, `seed ${seed}: the guest wrote while nbdcopy pulled`);
    await full.writer.acknowledged(full.writer.acked.length + PHASE);
    const atIncrement = await endSession(1, full);
    assert.ok(readFileSync(path('full.raw')).equals(atFull), `seed ${seed}: the full pull is the disk at its start`);

    // Session 2, incremental: ck1 frozen for this backup, ck2 records for the next one.
    await qmp.execute('block-dirty-bitmap-add', { node: 'src', name: 'ck2' });
    await qmp.execute('block-dirty-bitmap-disable', { node: 'src', name: 'ck1' });
    const increment = await startSession(dir, 2, atIncrement, seed + 2, 'ck1');
    await increment.writer.acknowledged(PHASE);
    const beforeIncrement = increment.writer.acked.length;
    const extents = await dirtyExtents('pull2', 'ck1');
    assert.ok(extents.length > 0, `seed ${seed}: the guest's writes left ck1 dirty`);
    const restored = readFileSync(path('full.raw'));
    const reader = await NbdRawClient.open(nbdSocket, 'pull2', []);
    for (const { offset, length } of extents) {
      for (let at = offset; at < offset + length; at += 4 << 20) {
        const piece = Math.min(4 << 20, offset + length - at);
        (await reader.read(at, piece)).copy(restored, at);
      }
    }
    await reader.disconnect();
    assert.ok(increment.writer.acked.length > beforeIncrement, `seed ${seed}: the guest wrote while the increment was pulled`);
    await increment.writer.acknowledged(increment.writer.acked.length + PHASE);
    const final = await endSession(2, increment);
    assert.ok(restored.equals(atIncrement), `seed ${seed}: the full backup with the increment's dirty extents laid over it is the disk at the second start`);

    for (const node of ['src', 'mid', 'base']) await qmp.execute('blockdev-del', { 'node-name': node });
    writeFileSync(path('final.raw'), final);
    qemuImgCompare(path('final.raw'), path('m-top.qcow2'), ['raw', 'qcow2'], `seed ${seed}: the live disk`);
    for (const image of ['m-top', 'm-mid', 'm-base', 'fleece1', 'fleece2']) assertCheckClean(path(`${image}.qcow2`), `seed ${seed}: ${image}`);
  }
});
