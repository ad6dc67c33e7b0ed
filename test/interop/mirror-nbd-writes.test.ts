/*
 * blockdev-mirror while a guest writes through an NBD export of the source (issue 13,
 * acceptance "Data"). For sync full, top and none, in both copy modes (and one job changed
 * from background to write-blocking while READY), three NBD connections keep writes in
 * flight (random offsets and lengths, some unaligned, write-zeroes, FUA, flushes, overlapping
 * one another over time) before READY, while READY, through job-complete and after the pivot,
 * when the export serves the target. The model is the writes the server acknowledged, applied
 * in order (no two overlapping writes are ever in flight together, so the order is exact):
 * - after the pivot the target reads as the model;
 * - after a soft cancel in READY the target reads as the model at the cancel, and the source
 *   (which the guest goes on writing) as the whole model;
 * - qemu-img check is clean on every image, and qemu-img info --backing-chain names the
 *   expected chains (sync=top and none: the target shares the source's backing);
 * - write-blocking: once READY, the job is in sync (offset == len) whenever it is asked
 *   after an acknowledged write.
 * The source is the top of a three-layer chain; sync=none onto a target backed by the
 * source's backing sees the layers below the top and the new writes, which land where the top
 * has no data. A target whose backing is the source itself is refused, as QEMU refuses it.
 */
import assert from 'node:assert/strict';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test, type TestContext } from 'node:test';
import type { MirrorCopyMode } from '../../src/generated/qapi-types.js';
import type { QmpClient } from '../../src/qmp/client.js';
import { applyAcked } from '../helpers/acked-write-model.js';
import { runBlockdWithNbd, type BlockdWithNbd } from '../helpers/blockd-process.js';
import { backingChain, mirrorChainTemplate, mirrorNodes, qcow2Node, WRITE_REGIONS, type MirrorRunImages, type MirrorSync } from '../helpers/mirror-images.js';
import { AckedWriter } from '../helpers/nbd-acked-writes.js';
import { makeTempDir } from '../helpers/paths.js';
import { assertCheckClean, createQcow2, MiB, qemuImgCompare, SeededRandom, testSeeds } from '../helpers/qemu-tools.js';
import { waitUntil } from '../helpers/wait-until.js';

/** Acknowledged writes per phase of the job. */
const PHASE = 80;

interface Scenario {
  sync: MirrorSync;
  mode: MirrorCopyMode;
  /** Changed from background to write-blocking while READY (block-job-change). */
  changeToWriteBlocking?: boolean;
  /** The target opened with discard=unmap: sync=full zeroes it first and copies only what the source has allocated. */
  unmapTarget?: boolean;
  /** The bitmap's granularity, when not the target's cluster size (64 KiB). */
  granularity?: number;
  end: 'pivot' | 'cancel';
}

interface BlockJob {
  device: string;
  offset: number;
  len: number;
  ready: boolean;
  status: string;
}

// One daemon serves every run, each on its own copy of the images and its own nodes and export.
const root = makeTempDir('blockd-mirror-writes-');
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

/**
 * A run's folder with the source chain and the target for `sync`, opened as nodes `<run>-src`
 * ... and `<run>-tgt`, the source exported as `<run>`.
 */
async function openRun(sync: MirrorSync, unmapTarget = false): Promise<{ run: string; dir: string } & MirrorRunImages> {
  const run = `r${runs++}`;
  const dir = join(root.dir, run);
  const images = copyImages(dir, sync);
  const { target } = images;
  const nodes = mirrorNodes(dir, target, sync, `${run}-`);
  if (unmapTarget) nodes.at(-1)!.discard = 'unmap';
  for (const node of nodes) await qmp.execute('blockdev-add', node as never);
  await qmp.execute('block-export-add', { type: 'nbd', id: run, name: run, 'node-name': `${run}-src`, writable: true });
  return { run, dir, ...images };
}

/** The export and every node of the run go: the images are closed. */
async function closeRun(run: string): Promise<void> {
  const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (event) => (event.data as { id: string }).id === run);
  deleted.catch(() => {}); // awaited below unless the command fails
  await qmp.execute('block-export-del', { id: run });
  await deleted;
  for (const node of ['tgt', 'src', 'mid', 'base']) await qmp.execute('blockdev-del', { 'node-name': `${run}-${node}` });
}

async function blockJob(run: string): Promise<BlockJob | undefined> {
  return ((await qmp.execute('query-block-jobs')) as BlockJob[]).find((job) => job.device === run);
}

/** What the mirror's own bitmap (on the source, unnamed) still marks to copy. */
async function mirrorDirtyBytes(run: string): Promise<number> {
  const nodes = (await qmp.execute('query-named-block-nodes', { flat: true })) as { 'node-name': string; 'dirty-bitmaps'?: { name?: string; count: number }[] }[];
  const bitmaps = nodes.find((node) => node['node-name'] === `${run}-src`)?.['dirty-bitmaps']?.filter((bitmap) => bitmap.name === undefined) ?? [];
  assert.equal(bitmaps.length, 1, `the mirror's bitmap on ${run}-src: ${JSON.stringify(bitmaps)}`);
  return bitmaps[0]!.count;
}

async function exportedNode(run: string): Promise<string | undefined> {
  return ((await qmp.execute('query-block-exports')) as { id: string; 'node-name': string }[]).find((entry) => entry.id === run)?.['node-name'];
}

/** The job's next event `name` (a run that fails first leaves it unawaited, which is no failure of its own). */
function jobEvent(name: string, run: string): Promise<unknown> {
  const event = qmp.waitForEvent(name, (candidate) => (candidate.data as { device?: string }).device === run);
  event.catch(() => {});
  return event;
}

/** Write-blocking's promise: asked right after each of `samples` acknowledgements, the job is in sync. */
async function assertStaysInSync(run: string, writer: AckedWriter, samples: number, context: string): Promise<void> {
  for (let i = 0; i < samples; i++) {
    await writer.acknowledged(writer.acked.length + 1 + (i % 7));
    const job = await blockJob(run);
    assert.ok(job && job.ready, `${context}: the job is READY (${JSON.stringify(job)})`);
    assert.equal(job.offset, job.len, `${context}: after ${writer.acked.length} acknowledged writes, a write-blocking mirror is out of sync: ${JSON.stringify(job)}`);
  }
}

async function mirrorWhileWriting(t: TestContext, scenario: Scenario, seed: number): Promise<void> {
  const context = `seed ${seed}, ${JSON.stringify(scenario)}`;
  const random = new SeededRandom(seed);
  const { run, dir, target, targetInitial: targetInitialRaw } = await openRun(scenario.sync, scenario.unmapTarget);
  const path = (name: string) => join(dir, name);
  const sourceInitial = readFileSync(path('m-expected.raw'));
  // sync=none copies only new writes: the target keeps what it read before (the layers below the top).
  const targetInitial = scenario.sync === 'none' ? readFileSync(targetInitialRaw) : sourceInitial;
  let writer: AckedWriter | undefined;
  try {
    const ready = jobEvent('BLOCK_JOB_READY', run);
    // Slow, in small steps, so that the first writes land while the initial copy runs.
    await qmp.execute('blockdev-mirror', {
      'job-id': run, device: `${run}-src`, target: `${run}-tgt`, sync: scenario.sync, 'copy-mode': scenario.mode,
      speed: 64 * 1024, 'buf-size': 1 * MiB, ...(scenario.granularity ? { granularity: scenario.granularity } : {}),
    });
    writer = await AckedWriter.start({ socket: nbdSocket, exportName: run, regions: WRITE_REGIONS, random, exclusive: true });
    await writer.acknowledged(PHASE);
    if (scenario.sync !== 'none') assert.equal((await blockJob(run))?.status, 'running', `${context}: the first writes landed during the initial copy`);
    // Background mode converges once the guest lets it: the guest waits; write-blocking converges under the writes.
    if (scenario.mode === 'background') await writer.pause();
    await qmp.execute('block-job-set-speed', { device: run, speed: 0 });
    await ready;
    writer.resume();
    if (scenario.mode === 'write-blocking') await assertStaysInSync(run, writer, 20, `${context}, READY`);
    else await writer.acknowledged(writer.acked.length + PHASE);
    if (scenario.changeToWriteBlocking) {
      await qmp.execute('block-job-change', { id: run, type: 'mirror', 'copy-mode': 'write-blocking' });
      // Once the writes sent before the change are done, what the background left dirty is copied
      // (the job's bitmap empties; len, recounted only as the job loops, may lag until then) ...
      await writer.pause();
      await waitUntil(async () => {
        const job = await blockJob(run);
        return (await mirrorDirtyBytes(run)) === 0 && job !== undefined && job.offset === job.len;
      }, 'the changed job caught up');
      writer.resume();
      // ... and from then on every write keeps the job in sync.
      await assertStaysInSync(run, writer, 20, `${context}, after the change`);
    }
    assert.equal((await blockJob(run))?.status, 'ready', context);

    if (scenario.end === 'pivot') {
      const completed = jobEvent('BLOCK_JOB_COMPLETED', run);
      const ackedBefore = writer.acked.length;
      const inFlight = writer.sent.length - ackedBefore;
      await qmp.execute('job-complete', { id: run });
      const event = ((await completed) as { data: Record<string, unknown> }).data;
      const duringPivot = writer.acked.length - ackedBefore;
      assert.equal(event.error, undefined, `${context}: ${JSON.stringify(event)}`);
      assert.equal(event.offset, event.len, `${context}: ${JSON.stringify(event)}`);
      assert.equal(await exportedNode(run), `${run}-tgt`, `${context}: the export serves the target after the pivot`);
      await writer.acknowledged(writer.acked.length + PHASE);
      writer.stop();
      await writer.finished();
      t.diagnostic(`${context}: ${writer.acked.length} writes acknowledged, ${inFlight} in flight at job-complete, ${duringPivot} acknowledged until BLOCK_JOB_COMPLETED`);
    } else {
      await writer.pause();
      const completed = jobEvent('BLOCK_JOB_COMPLETED', run);
      await qmp.execute('block-job-cancel', { device: run });
      const event = ((await completed) as { data: Record<string, unknown> }).data;
      assert.equal(event.error, undefined, `${context}: ${JSON.stringify(event)}`);
      const atCancel = writer.acked.length;
      writer.resume();
      await writer.acknowledged(atCancel + PHASE);
      writer.stop();
      await writer.finished();
      assert.equal(await exportedNode(run), `${run}-src`, `${context}: the export still serves the source`);
      writeFileSync(path('model-at-cancel.raw'), applyAcked(targetInitial, writer.acked.slice(0, atCancel)));
      t.diagnostic(`${context}: ${atCancel} writes acknowledged before the cancel, ${writer.acked.length - atCancel} after`);
    }
    assert.equal(await blockJob(run), undefined, `${context}: the job is gone`);
  } catch (error) {
    writer?.stop();
    await qmp.execute('job-cancel', { id: run }).catch(() => {});
    await closeRun(run).catch(() => {}); // the failure above is the one to report
    throw error;
  }
  await closeRun(run);

  if (scenario.end === 'pivot') {
    writeFileSync(path('model.raw'), applyAcked(targetInitial, writer.acked));
    qemuImgCompare(path('model.raw'), target, ['raw', 'qcow2'], `${context}: the target after the pivot`);
  } else {
    writeFileSync(path('model.raw'), applyAcked(sourceInitial, writer.acked));
    qemuImgCompare(path('model.raw'), path('m-top.qcow2'), ['raw', 'qcow2'], `${context}: the source, written on after the cancel`);
    qemuImgCompare(path('model-at-cancel.raw'), target, ['raw', 'qcow2'], `${context}: the target as the source was at the cancel`);
  }
  for (const image of ['m-base', 'm-mid', 'm-top', 'm-target']) assertCheckClean(path(`${image}.qcow2`), `${context}: ${image}`);
  assert.deepEqual(backingChain(path('m-top.qcow2')), ['m-top', 'm-mid', 'm-base'].map((image) => path(`${image}.qcow2`)), `${context}: the source's chain`);
  const targetChain = scenario.sync === 'full' ? ['m-target'] : ['m-target', 'm-mid', 'm-base'];
  assert.deepEqual(backingChain(target), targetChain.map((image) => path(`${image}.qcow2`)), `${context}: the target's chain`);
  rmSync(dir, { recursive: true }); // a failed run stays until the end of the file, for a look
}

const SCENARIOS: Scenario[] = [
  { sync: 'full', mode: 'background', end: 'pivot' },
  { sync: 'full', mode: 'write-blocking', end: 'pivot' },
  { sync: 'top', mode: 'background', granularity: 8 * 1024, end: 'pivot' },
  { sync: 'top', mode: 'write-blocking', end: 'pivot' },
  { sync: 'none', mode: 'background', end: 'pivot' },
  { sync: 'none', mode: 'write-blocking', granularity: 512 * 1024, end: 'pivot' },
  { sync: 'full', mode: 'write-blocking', unmapTarget: true, end: 'pivot' },
  { sync: 'top', mode: 'background', changeToWriteBlocking: true, end: 'pivot' },
  { sync: 'full', mode: 'background', end: 'cancel' },
  { sync: 'top', mode: 'write-blocking', end: 'cancel' },
  { sync: 'none', mode: 'background', changeToWriteBlocking: true, end: 'cancel' },
];

for (const [index, scenario] of SCENARIOS.entries()) {
  const name = `sync=${scenario.sync}, ${scenario.mode}${scenario.changeToWriteBlocking ? ' then write-blocking' : ''}${scenario.unmapTarget ? ', target zeroed by unmap' : ''}` +
    `${scenario.granularity ? `, granularity ${scenario.granularity / 1024} KiB` : ''}: ` +
    (scenario.end === 'pivot' ? 'after the pivot the target reads as the acknowledged writes' : 'after a soft cancel the target reads as the source at the cancel');
  test(name, async (t) => {
    for (const seed of testSeeds([1300 + index])) await mirrorWhileWriting(t, scenario, seed);
  });
}

test('a target whose backing is the source is refused: the source is no longer a root node', async () => {
  const { run, dir } = await openRun('top');
  try {
    createQcow2(join(dir, 'point-in-time.qcow2'), undefined, { backing: { path: 'm-top.qcow2', format: 'qcow2' } });
    await qmp.execute('blockdev-add', qcow2Node(`${run}-pit`, join(dir, 'point-in-time.qcow2'), `${run}-src`) as never);
    await assert.rejects(qmp.execute('blockdev-mirror', { 'job-id': run, device: `${run}-src`, target: `${run}-pit`, sync: 'none' }), { message: 'GenericError: Need a root block node' });
    assert.equal(await blockJob(run), undefined);
    await qmp.execute('blockdev-del', { 'node-name': `${run}-pit` });
  } finally {
    await closeRun(run);
  }
});
