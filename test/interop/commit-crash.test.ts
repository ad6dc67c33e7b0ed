/*
 * block-commit is crash-safe: blockd is killed with SIGKILL while committing
 * (an intermediate commit of the middle layer, and an active commit of the
 * top) at random moments and right after each of the job's status changes
 * (for the active commit also after READY and after job-complete). Every
 * time, the top image with whatever backing chain its header names must read
 * exactly as before the job, and no image may be corrupt (leaks allowed).
 * Once an active commit has concluded, the base holds what the top showed.
 */
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { QmpClient } from '../../src/qmp/client.js';
import { runBlockd } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { makePatternChain } from '../helpers/pattern-chains.js';
import { MiB, qemuImgCheck, qemuImgCompare, SeededRandom } from '../helpers/qemu-tools.js';

type KillPoint = { afterMs: number } | { afterStatus: string; completeFirst?: boolean } | { duringFinalizeMs: number };

const TIMED: KillPoint[] = [0, 15, 40, 80, 150].map((afterMs) => ({ afterMs }));
/** The moments inside job-finalize, where the base is flushed and the overlay's header rewritten. */
const FINALIZING: KillPoint[] = [0, 0, 1, 1, 2, 3, 5].map((duringFinalizeMs) => ({ duringFinalizeMs }));
const INTERMEDIATE_POINTS: KillPoint[] = [...TIMED, ...['running', 'waiting', 'pending', 'concluded'].map((afterStatus) => ({ afterStatus })), ...FINALIZING];
const ACTIVE_POINTS: KillPoint[] = [
  ...TIMED,
  { afterStatus: 'running' },
  { afterStatus: 'ready' },
  ...['ready', 'waiting', 'pending', 'concluded'].map((afterStatus) => ({ afterStatus, completeFirst: true })),
];

function assertSafe(dir: string, context: string, baseHoldsTop: boolean): void {
  for (const layer of ['top', 'mid', 'base']) {
    const check = qemuImgCheck(join(dir, `k-${layer}.qcow2`));
    assert.equal(check.corruptions, 0, `${context}, ${layer}: ${check.output}`);
    assert.ok(check.status === 0 || check.status === 3, `${context}, ${layer}: qemu-img check exit ${check.status}: ${check.output}`);
  }
  qemuImgCompare(join(dir, 'k-top.qcow2'), join(dir, 'k-expected.raw'), ['qcow2', 'raw'], context);
  if (baseHoldsTop) qemuImgCompare(join(dir, 'k-base.qcow2'), join(dir, 'k-expected.raw'), ['qcow2', 'raw'], `${context}: the base after the switch`);
}

async function killDuringCommit(point: KillPoint, speed: number, active: boolean): Promise<void> {
  const temp = makeTempDir();
  try {
    makePatternChain(temp.dir, 'k');
    // The chain below the top comes from the headers: the base is reopened read-write for the job.
    const blockd = await runBlockd([
      '--blockdev', `driver=qcow2,node-name=top,file.driver=file,file.filename=${join(temp.dir, 'k-top.qcow2')}`,
      '--qmp', `unix:${join(temp.dir, 'qmp.sock')}`,
    ]);
    const qmp = await QmpClient.connect(`unix:${join(temp.dir, 'qmp.sock')}`);
    const args = active
      ? { 'job-id': 'c', device: 'top', speed }
      : { 'job-id': 'c', device: 'top', top: join(temp.dir, 'k-mid.qcow2'), speed };
    const statusIs = (status: string) => qmp.waitForEvent('JOB_STATUS_CHANGE', (event) => (event.data as { status: string }).status === status);
    if ('duringFinalizeMs' in point) {
      const pending = statusIs('pending');
      await qmp.execute('block-commit', { ...args, 'auto-finalize': false });
      await pending;
      qmp.execute('job-finalize', { id: 'c' }).catch(() => {});
      await new Promise((resolve) => setTimeout(resolve, point.duringFinalizeMs));
    } else if ('afterStatus' in point) {
      if (point.completeFirst) {
        const ready = statusIs('ready');
        await qmp.execute('block-commit', args);
        await ready;
        const reached = point.afterStatus === 'ready' ? undefined : statusIs(point.afterStatus);
        await qmp.execute('job-complete', { id: 'c' });
        await reached;
      } else {
        const reached = statusIs(point.afterStatus);
        await qmp.execute('block-commit', args);
        await reached;
      }
    } else {
      await qmp.execute('block-commit', args);
      await new Promise((resolve) => setTimeout(resolve, point.afterMs));
    }
    blockd.child.kill('SIGKILL');
    await blockd.exited;
    await qmp.close().catch(() => {});
    const context = `${active ? 'active' : 'intermediate'} commit killed ${JSON.stringify(point)} (speed ${speed})`;
    assertSafe(temp.dir, context, active && 'afterStatus' in point && point.completeFirst === true && point.afterStatus === 'concluded');
  } finally {
    rmSync(temp.dir, { recursive: true, force: true });
  }
}

test('a SIGKILL at any moment of an intermediate commit leaves a chain that reads the same and no corrupt image', async () => {
  const random = new SeededRandom(21);
  for (const point of INTERMEDIATE_POINTS) await killDuringCommit(point, random.chance(0.5) ? 64 * MiB : 0, false);
});

test('a SIGKILL at any moment of an active commit, before and after job-complete, leaves a chain that reads the same', async () => {
  const random = new SeededRandom(22);
  for (const point of ACTIVE_POINTS) await killDuringCommit(point, random.chance(0.5) ? 64 * MiB : 0, true);
});
