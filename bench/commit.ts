/*
 * block-commit, blockd against qemu-storage-daemon in the same run, on 1 GiB
 * chains whose committed layer is dense or 90 % sparse (job-timing.ts):
 * - intermediate: base <- mid <- top, mid's data committed into the empty
 *   base; time from the command to BLOCK_JOB_COMPLETED;
 * - active: base <- top, the top's data committed into the empty base; time
 *   from the command to READY, then job-complete, to BLOCK_JOB_COMPLETED
 *   (its copy phase: up to READY).
 * The sparse cases show whether time follows the allocated data.
 * Run: node dist/bench/commit.js [--quick]
 */
import { join } from 'node:path';
import { QmpClient } from '../src/qmp/client.js';
import { compareDaemons, copySeconds, makeLayer, SIZE, type JobCase, type JobTiming } from './job-timing.js';

type EventData = { error?: string };

async function commitTiming(socket: string, dir: string, active: boolean): Promise<JobTiming> {
  const qmp = await QmpClient.connect(`unix:${socket}`);
  await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: join(dir, 'top.qcow2') } });
  const start = process.hrtime.bigint();
  const done = qmp.waitForEvent('BLOCK_JOB_COMPLETED', () => true);
  if (active) {
    const ready = qmp.waitForEvent('BLOCK_JOB_READY', () => true);
    await qmp.execute('block-commit', { 'job-id': 'c', device: 'top' });
    await ready;
    await qmp.execute('job-complete', { id: 'c' });
  } else {
    await qmp.execute('block-commit', { 'job-id': 'c', device: 'top', top: join(dir, 'mid.qcow2') });
  }
  const event = await done;
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  if ((event.data as EventData).error) throw new Error(`commit failed: ${(event.data as EventData).error}`);
  const copy = copySeconds(qmp);
  await qmp.execute('blockdev-del', { 'node-name': 'top' });
  await qmp.close();
  return { total: seconds, copy };
}

const intermediate = (fill: 'dense' | 'sparse'): JobCase => ({
  job: 'commit intermediate',
  fill,
  prepare: (dir) => {
    makeLayer(dir, 'base.qcow2', 'empty');
    makeLayer(dir, 'mid.qcow2', fill, 'base.qcow2');
    makeLayer(dir, 'top.qcow2', 'empty', 'mid.qcow2');
  },
  measure: (socket, dir) => commitTiming(socket, dir, false),
});

const active = (fill: 'dense' | 'sparse'): JobCase => ({
  job: 'commit active',
  fill,
  prepare: (dir) => {
    makeLayer(dir, 'base.qcow2', 'empty');
    makeLayer(dir, 'top.qcow2', fill, 'base.qcow2');
  },
  measure: (socket, dir) => commitTiming(socket, dir, true),
});

await compareDaemons(`block-commit of a ${SIZE >> 20} MiB chain`, [intermediate('dense'), intermediate('sparse'), active('dense'), active('sparse')]);
