/*
 * block-job-change (QEMU 8.2; qemu-storage-daemon 7.2 lacks it, so no
 * differential): only a mirror has something to change, so for the jobs
 * blockd runs it answers with QEMU 8.2's refusals, in its order: the job
 * lookup, the verb table, then the job type.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { QmpClient } from '../../src/qmp/client.js';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { makePatternChain } from '../helpers/pattern-chains.js';

const temp = makeTempDir();
let blockd: BlockdProcess;

before(async () => {
  makePatternChain(temp.dir, 'a');
  blockd = await runBlockd([
    '--blockdev', `driver=qcow2,node-name=top,file.driver=file,file.filename=${join(temp.dir, 'a-top.qcow2')}`,
    '--qmp', `unix:${join(temp.dir, 'qmp.sock')}`,
  ]);
});

after(async () => {
  await blockd.stop();
  temp.cleanup();
});

test('block-job-change: unknown job, a verb the status refuses, a job type with nothing to change', async () => {
  const qmp = await QmpClient.connect(`unix:${join(temp.dir, 'qmp.sock')}`);
  const change = (id: string, extra: object = { type: 'stream' }) =>
    qmp.execute('block-job-change', { id, ...extra } as never).then(() => 'ok', (error: Error) => error.message);
  assert.equal(await change('nosuch'), "DeviceNotActive: Block job 'nosuch' not found");
  await qmp.execute('block-stream', { 'job-id': 's', device: 'top', speed: 1, 'auto-dismiss': false });
  assert.equal(await change('s'), "GenericError: Job type 'stream' does not support changing");
  assert.equal(await change('s', { type: 'mirror' }), "GenericError: Parameter 'copy-mode' is missing");
  assert.equal(await change('s', { type: 'mirror', 'copy-mode': 'write-blocking' }), "GenericError: Job type 'stream' does not support changing");
  await qmp.execute('block-job-set-speed', { device: 's', speed: 0 });
  await qmp.waitForEvent('JOB_STATUS_CHANGE', (event) => (event.data as { status: string }).status === 'concluded');
  assert.equal(await change('s'), "GenericError: Job 's' in state 'concluded' cannot accept command verb 'change'");
  await qmp.execute('job-dismiss', { id: 's' });
  await qmp.close();
});
