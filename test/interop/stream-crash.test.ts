/*
 * block-stream is crash-safe: blockd is killed with SIGKILL while streaming a
 * chain (at random moments, and right after each of the job's status changes);
 * every time, the top image with whatever backing chain its header names must
 * read exactly as before the job and pass qemu-img check (leaks allowed).
 */
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { QmpClient } from '../../src/qmp/client.js';
import { runBlockd } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { createQcow2, MiB, qemuImgCheck, qemuImgCompare, qemuIo, runQemuImg, SeededRandom } from '../helpers/qemu-tools.js';

function makeChain(dir: string): void {
  createQcow2(join(dir, 'base.qcow2'), 32 * MiB);
  qemuIo(join(dir, 'base.qcow2'), ['write -P 0x11 0 12M', 'write -P 0x12 20M 4M'], ['-f', 'qcow2']);
  createQcow2(join(dir, 'mid.qcow2'), undefined, { backing: { path: 'base.qcow2', format: 'qcow2' } });
  qemuIo(join(dir, 'mid.qcow2'), ['write -P 0x21 4M 12M', 'write -z 21M 1M', 'write -P 0x22 30M 64k'], ['-f', 'qcow2']);
  createQcow2(join(dir, 'top.qcow2'), undefined, { backing: { path: 'mid.qcow2', format: 'qcow2' } });
  qemuIo(join(dir, 'top.qcow2'), ['write -P 0x31 6M 1M'], ['-f', 'qcow2']);
  runQemuImg('convert', '-O', 'raw', join(dir, 'top.qcow2'), join(dir, 'expected.raw'));
}

type KillPoint = { afterMs: number } | { afterStatus: string };

const KILL_POINTS: KillPoint[] = [
  ...[0, 15, 40, 80, 150].map((afterMs) => ({ afterMs })),
  ...['running', 'waiting', 'pending', 'concluded'].map((afterStatus) => ({ afterStatus })),
];

test('a SIGKILL at any moment of a stream leaves a chain that reads the same and passes qemu-img check', async () => {
  const random = new SeededRandom(11);
  for (const point of KILL_POINTS) {
    const temp = makeTempDir();
    try {
      makeChain(temp.dir);
      const blockd = await runBlockd([
        '--blockdev', `driver=qcow2,node-name=top,file.driver=file,file.filename=${join(temp.dir, 'top.qcow2')}`,
        '--qmp', `unix:${join(temp.dir, 'qmp.sock')}`,
      ]);
      const qmp = await QmpClient.connect(`unix:${join(temp.dir, 'qmp.sock')}`);
      const speed = random.chance(0.5) ? 64 * MiB : 0;
      if ('afterStatus' in point) {
        const reached = qmp.waitForEvent('JOB_STATUS_CHANGE', (event) => (event.data as { status: string }).status === point.afterStatus);
        await qmp.execute('block-stream', { 'job-id': 's', device: 'top', base: join(temp.dir, 'base.qcow2'), speed });
        await reached;
      } else {
        await qmp.execute('block-stream', { 'job-id': 's', device: 'top', base: join(temp.dir, 'base.qcow2'), speed });
        await new Promise((resolve) => setTimeout(resolve, point.afterMs));
      }
      blockd.child.kill('SIGKILL');
      await blockd.exited;
      await qmp.close().catch(() => {});

      const context = `killed ${JSON.stringify(point)} (speed ${speed})`;
      const check = qemuImgCheck(join(temp.dir, 'top.qcow2'));
      assert.equal(check.corruptions, 0, `${context}: ${check.output}`);
      assert.ok(check.status === 0 || check.status === 3, `${context}: qemu-img check exit ${check.status}: ${check.output}`);
      qemuImgCompare(join(temp.dir, 'top.qcow2'), join(temp.dir, 'expected.raw'), ['qcow2', 'raw'], context);
    } finally {
      rmSync(temp.dir, { recursive: true, force: true });
    }
  }
});
