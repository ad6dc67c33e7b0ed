/*
 * Push backups while a guest writes through an NBD export of the source (issue 14,
 * acceptance "Data"). Three NBD connections keep writes in flight (random offsets and
 * lengths, some unaligned, write-zeroes, FUA, flushes) before each backup starts, while it
 * runs (slowed by a speed limit so that the writes land during the copy) and after it. The
 * guest pauses at each backup's start, so the model of that moment is exact: the
 * acknowledged writes so far, applied in order.
 * - sync=full: the target reads as the source at the start, also with x-perf use-copy-range;
 * - sync=top: the target, backed by the source's backing image, reads as the source at the start;
 * - sync=none (the old fleecing layout): an overlay backed by the source, read over NBD
 *   while the guest writes, reads as the source at the start;
 * - incremental: a full backup and a bitmap at the same moment, then two increments in a
 *   row and a last one after the guest stopped; the full backup with the increments
 *   rebased onto it reads as the source at each increment's start, and the last chain as
 *   everything the guest wrote: the bitmap lost no write.
 * qemu-img check is clean on every image.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import type { QmpClient } from '../../src/qmp/client.js';
import { applyAcked } from '../helpers/acked-write-model.js';
import { runBlockdWithNbd, type BlockdWithNbd } from '../helpers/blockd-process.js';
import { mirrorChainTemplate, qcow2Node, WRITE_REGIONS } from '../helpers/mirror-images.js';
import { AckedWriter } from '../helpers/nbd-acked-writes.js';
import { makeTempDir } from '../helpers/paths.js';
import { assertCheckClean, createQcow2, MiB, qemuImgCompare, runQemuImg, SeededRandom, testSeeds } from '../helpers/qemu-tools.js';

/** Acknowledged writes per phase. */
const PHASE = 60;
/** Slow enough that a phase of writes lands while the job copies. */
const SLOW = 256 * 1024;

const root = makeTempDir('blockd-backup-writes-');
const nbdSocket = join(root.dir, 'nbd.sock');
let copyImages: ReturnType<typeof mirrorChainTemplate>;
let daemon: BlockdWithNbd;
let qmp: QmpClient;
let runs = 0;

before(async () => {
  copyImages = mirrorChainTemplate(join(root.dir, 'template'));
  daemon = await runBlockdWithNbd(root.dir);
  qmp = daemon.qmp;
});

after(async () => {
  await daemon?.stop();
  root.cleanup();
});

interface Run {
  run: string;
  dir: string;
  path: (name: string) => string;
  writer: AckedWriter;
  initial: Buffer;
}

/** A run's copy of the source chain (`<run>-base`, `-mid`, `-src`), the source exported as `<run>`, a guest writing to it. */
async function openRun(seed: number): Promise<Run> {
  const run = `r${runs++}`;
  const dir = join(root.dir, run);
  copyImages(dir, 'full');
  const path = (name: string) => join(dir, name);
  await qmp.execute('blockdev-add', qcow2Node(`${run}-base`, path('m-base.qcow2')) as never);
  await qmp.execute('blockdev-add', qcow2Node(`${run}-mid`, path('m-mid.qcow2'), `${run}-base`) as never);
  await qmp.execute('blockdev-add', qcow2Node(`${run}-src`, path('m-top.qcow2'), `${run}-mid`) as never);
  await qmp.execute('block-export-add', { type: 'nbd', id: run, name: run, 'node-name': `${run}-src`, writable: true });
  const writer = await AckedWriter.start({ socket: nbdSocket, exportName: run, regions: WRITE_REGIONS, random: new SeededRandom(seed), exclusive: true });
  return { run, dir, path, writer, initial: readFileSync(path('m-expected.raw')) };
}

async function closeRun(run: Run, extraNodes: string[]): Promise<void> {
  run.writer.stop();
  await run.writer.finished();
  const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (event) => (event.data as { id: string }).id === run.run);
  await qmp.execute('block-export-del', { id: run.run });
  await deleted;
  for (const node of [...extraNodes, 'src', 'mid', 'base']) await qmp.execute('blockdev-del', { 'node-name': `${run.run}-${node}` });
}

/** The guest stops (nothing in flight); returns what the source reads now. */
async function pauseAndModel(run: Run): Promise<Buffer> {
  await run.writer.pause();
  return applyAcked(run.initial, run.writer.acked);
}

/** Runs a backup job `id` to its end while the guest writes a phase during it. */
async function backupWhileWriting(run: Run, id: string, args: Record<string, unknown>): Promise<void> {
  const completed = qmp.waitForEvent('BLOCK_JOB_COMPLETED', (event) => (event.data as { device: string }).device === id, 120_000);
  await qmp.execute('blockdev-backup', { 'job-id': id, speed: SLOW, ...args } as never);
  run.writer.resume();
  await run.writer.acknowledged(run.writer.acked.length + PHASE);
  const jobs = (await qmp.execute('query-block-jobs')) as { device: string; offset: number; len: number }[];
  const job = jobs.find((candidate) => candidate.device === id);
  assert.ok(job && job.offset < job.len, `the writes landed while ${id} copied: ${JSON.stringify(jobs)}`);
  await qmp.execute('block-job-set-speed', { device: id, speed: 0 });
  const event = (await completed).data as Record<string, unknown>;
  assert.equal(event.error, undefined, JSON.stringify(event));
  assert.equal(event.offset, event.len, JSON.stringify(event));
}

function newTarget(run: Run, name: string, backing?: string): string {
  return createQcow2(run.path(name), backing ? undefined : 64 * MiB, backing ? { backing: { path: backing, format: 'qcow2' } } : {});
}

test('sync=full and sync=top (and full with copies offloaded to the kernel): the target is the disk as it was when the job started', async () => {
  const variants = [{ sync: 'full' }, { sync: 'top' }, { sync: 'full', 'x-perf': { 'use-copy-range': true } }] as const;
  for (const seed of testSeeds([1400])) {
    for (const { sync, ...perf } of variants) {
      const run = await openRun(seed);
      await run.writer.acknowledged(PHASE);
      const target = newTarget(run, 'target.qcow2', sync === 'top' ? 'm-mid.qcow2' : undefined);
      await qmp.execute('blockdev-add', qcow2Node(`${run.run}-tgt`, target, sync === 'top' ? `${run.run}-mid` : undefined) as never);
      const atStart = await pauseAndModel(run);
      await backupWhileWriting(run, `${run.run}-job`, { device: `${run.run}-src`, target: `${run.run}-tgt`, sync, ...perf });
      const final = await pauseAndModel(run);
      await closeRun(run, ['tgt']);
      writeFileSync(run.path('at-start.raw'), atStart);
      writeFileSync(run.path('final.raw'), final);
      qemuImgCompare(run.path('at-start.raw'), target, ['raw', 'qcow2'], `seed ${seed}, sync=${sync}: the backup`);
      qemuImgCompare(run.path('final.raw'), run.path('m-top.qcow2'), ['raw', 'qcow2'], `seed ${seed}, sync=${sync}: the source`);
      for (const image of ['target', 'm-top', 'm-mid', 'm-base']) assertCheckClean(run.path(`${image}.qcow2`), `seed ${seed}, sync=${sync}: ${image}`);
    }
  }
});

test('sync=none into an overlay backed by the disk (the old fleecing): the overlay reads as the disk at the start', async () => {
  for (const seed of testSeeds([1410])) {
    const run = await openRun(seed);
    await run.writer.acknowledged(PHASE);
    const overlay = newTarget(run, 'fleece.qcow2', 'm-top.qcow2');
    await qmp.execute('blockdev-add', qcow2Node(`${run.run}-fleece`, overlay, `${run.run}-src`) as never);
    const atStart = await pauseAndModel(run);
    const id = `${run.run}-job`;
    await qmp.execute('blockdev-backup', { 'job-id': id, device: `${run.run}-src`, target: `${run.run}-fleece`, sync: 'none' });
    await qmp.execute('block-export-add', { type: 'nbd', id: `${run.run}-pull`, name: `${run.run}-pull`, 'node-name': `${run.run}-fleece` });
    run.writer.resume();
    await run.writer.acknowledged(run.writer.acked.length + PHASE);
    // The backup program reads the frozen view while the guest goes on writing.
    runQemuImg('convert', '-f', 'raw', '-O', 'raw', `nbd+unix:///${run.run}-pull?socket=${nbdSocket}`, run.path('pulled.raw'));
    await run.writer.acknowledged(run.writer.acked.length + PHASE);
    const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (event) => (event.data as { id: string }).id === `${run.run}-pull`);
    await qmp.execute('block-export-del', { id: `${run.run}-pull` });
    await deleted;
    const cancelled = qmp.waitForEvent('BLOCK_JOB_CANCELLED', (event) => (event.data as { device: string }).device === id);
    await qmp.execute('job-cancel', { id });
    await cancelled;
    const final = await pauseAndModel(run);
    await closeRun(run, ['fleece']);
    assert.ok(readFileSync(run.path('pulled.raw')).equals(atStart), `seed ${seed}: what the backup program pulled is the disk at the start`);
    writeFileSync(run.path('final.raw'), final);
    qemuImgCompare(run.path('final.raw'), run.path('m-top.qcow2'), ['raw', 'qcow2'], `seed ${seed}: the source`);
    for (const image of ['fleece', 'm-top']) assertCheckClean(run.path(`${image}.qcow2`), `seed ${seed}: ${image}`);
  }
});

test('incremental: a full backup and two increments while the guest writes restore the disk at each point; the bitmap loses no write', async () => {
  for (const seed of testSeeds([1420])) {
    const run = await openRun(seed);
    await run.writer.acknowledged(PHASE);
    const models: Buffer[] = [];
    const images = ['full', 'inc1', 'inc2', 'inc3'];
    for (const [index, image] of images.entries()) {
      const target = newTarget(run, `${image}.qcow2`);
      await qmp.execute('blockdev-add', qcow2Node(`${run.run}-${image}`, target) as never);
      models.push(await pauseAndModel(run));
      const args = { device: `${run.run}-src`, target: `${run.run}-${image}` };
      if (index === 0) {
        // The bitmap starts where the full backup does (the guest is paused: no write between them).
        await qmp.execute('block-dirty-bitmap-add', { node: `${run.run}-src`, name: 'b0' });
        await backupWhileWriting(run, `${run.run}-${image}`, { ...args, sync: 'full' });
      } else if (index < images.length - 1) {
        await backupWhileWriting(run, `${run.run}-${image}`, { ...args, sync: 'incremental', bitmap: 'b0' });
      } else {
        // The last increment, with the guest stopped: what every write since the last one changed.
        const completed = qmp.waitForEvent('BLOCK_JOB_COMPLETED', (event) => (event.data as { device: string }).device === `${run.run}-${image}`);
        await qmp.execute('blockdev-backup', { 'job-id': `${run.run}-${image}`, ...args, sync: 'incremental', bitmap: 'b0' });
        assert.equal(((await completed).data as { error?: string }).error, undefined);
      }
    }
    await closeRun(run, [...images].reverse());
    for (let index = 1; index < images.length; index++) {
      runQemuImg('rebase', '-u', '-f', 'qcow2', '-b', `${images[index - 1]}.qcow2`, '-F', 'qcow2', run.path(`${images[index]}.qcow2`));
    }
    for (const [index, image] of images.entries()) {
      writeFileSync(run.path(`model-${image}.raw`), models[index]!);
      qemuImgCompare(run.path(`model-${image}.raw`), run.path(`${image}.qcow2`), ['raw', 'qcow2'], `seed ${seed}: the chain up to ${image}`);
      assertCheckClean(run.path(`${image}.qcow2`), `seed ${seed}: ${image}`);
    }
  }
});
