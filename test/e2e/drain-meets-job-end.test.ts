/*
 * A command that drains every job (a snapshot, as QEMU's transactions drain all) while a job
 * with no pause point is still running (blockdev-create writing a preallocated file): the drain
 * waits for the job to park or to finish its run, and a run that finishes meanwhile must end
 * the wait. blockd once waited on forever (the job's end needs the command's section), and the
 * daemon then answered no one: the graph fuzz found it.
 */
import assert from 'node:assert/strict';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { QmpClient } from '../../src/qmp/client.js';
import { runBlockd } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { assertCheckClean, createQcow2, MiB, runQemuImg } from '../helpers/qemu-tools.js';

const temp = makeTempDir();
after(() => temp.cleanup());

test('a snapshot taken while blockdev-create is still writing answers once the create job has run', async () => {
  const { dir } = temp;
  createQcow2(join(dir, 'disk.qcow2'), 16 * MiB);
  const socket = join(dir, 'blockd.sock');
  const daemon = await runBlockd(['--qmp', `unix:${socket}`]);
  try {
    const client = await QmpClient.connect(socket);
    await client.executeRaw('blockdev-add', { driver: 'qcow2', 'node-name': 'disk', file: { driver: 'file', filename: join(dir, 'disk.qcow2') } });
    // Long enough to be running when the snapshot arrives: zeros are written chunk by chunk, with no pause point.
    await client.executeRaw('blockdev-create', { 'job-id': 'create', options: { driver: 'file', filename: join(dir, 'big.raw'), size: 512 * MiB, preallocation: 'full' } });
    const snapshot = client.executeRaw('blockdev-snapshot-sync', { 'node-name': 'disk', 'snapshot-file': join(dir, 'overlay.qcow2'), 'snapshot-node-name': 'overlay' });
    const noAnswer = new Promise((_, reject) => setTimeout(() => reject(new Error('blockdev-snapshot-sync got no answer in 60 s')), 60_000).unref());
    await Promise.race([snapshot, noAnswer]);
    await client.waitForEvent('JOB_STATUS_CHANGE', (event) => (event.data as { id: string; status: string }).id === 'create' && (event.data as { status: string }).status === 'concluded', 60_000);
    const jobs = (await client.executeRaw('query-jobs')) as { id: string; status: string; error?: string }[];
    assert.deepEqual(jobs.map((job) => [job.id, job.status, job.error]), [['create', 'concluded', undefined]]);
    await client.close();
  } finally {
    // A daemon stuck in the snapshot would not honour SIGTERM: the test fails, not hangs.
    const exit = await daemon.stop('SIGTERM', 10_000);
    assert.equal(exit.signal, null, 'blockd ended on SIGTERM');
  }
  assert.equal(statSync(join(dir, 'big.raw')).size, 512 * MiB);
  assertCheckClean(join(dir, 'overlay.qcow2'), 'overlay');
  const overlay = JSON.parse(runQemuImg('info', '--output=json', join(dir, 'overlay.qcow2'))) as { 'backing-filename'?: string };
  assert.equal(overlay['backing-filename'], join(dir, 'disk.qcow2'));
});
