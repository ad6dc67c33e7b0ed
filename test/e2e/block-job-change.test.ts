/*
 * block-job-change (QEMU 8.2; qemu-storage-daemon 7.2 lacks it, so no
 * differential): QEMU 8.2's refusals in its order (the job lookup, the verb
 * table, then the job type), and the one change it allows: a mirror's copy
 * mode from background to write-blocking, after which a client's write
 * reaches the target before it completes even while the background copy
 * stands still.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { QmpClient } from '../../src/qmp/client.js';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { makePatternChain } from '../helpers/pattern-chains.js';
import { createQcow2, MiB, qemuIo } from '../helpers/qemu-tools.js';

const temp = makeTempDir();
let blockd: BlockdProcess;

before(async () => {
  makePatternChain(temp.dir, 'a');
  makePatternChain(temp.dir, 'm');
  createQcow2(join(temp.dir, 'target.qcow2'), 64 * MiB);
  blockd = await runBlockd([
    '--blockdev', `driver=qcow2,node-name=top,file.driver=file,file.filename=${join(temp.dir, 'a-top.qcow2')}`,
    '--blockdev', `driver=qcow2,node-name=source,file.driver=file,file.filename=${join(temp.dir, 'm-top.qcow2')}`,
    '--blockdev', `driver=qcow2,node-name=target,file.driver=file,file.filename=${join(temp.dir, 'target.qcow2')}`,
    '--nbd-server', `addr.type=unix,addr.path=${join(temp.dir, 'nbd.sock')}`,
    '--export', 'type=nbd,id=e,node-name=source,name=source,writable=on',
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

test('block-job-change: a mirror goes from background to write-blocking, and not back', async () => {
  const qmp = await QmpClient.connect(`unix:${join(temp.dir, 'qmp.sock')}`);
  const change = (copyMode: string) =>
    qmp.execute('block-job-change', { id: 'm', type: 'mirror', 'copy-mode': copyMode } as never).then(() => 'ok', (error: Error) => error.message);
  const progress = async () => ((await qmp.execute('query-block-jobs')) as { device: string; offset: number; len: number; busy: boolean }[]).find((job) => job.device === 'm')!;
  /**
   * The first iteration (buf-size, 16 MiB) has landed and the job sleeps. Idle alone is not
   * enough: the job sleeps under its limit while the iteration's last copies are in flight.
   */
  const settled = async () => {
    for (;;) {
      const job = await progress();
      if (!job.busy && job.offset === 16 * MiB) return job;
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  };
  // speed 1: one iteration, then the background copy stands still.
  await qmp.execute('blockdev-mirror', { 'job-id': 'm', device: 'source', target: 'target', sync: 'full', speed: 1 });
  const write = (pattern: number, offset: string) => qemuIo(`nbd+unix:///source?socket=${join(temp.dir, 'nbd.sock')}`, [`write -P ${pattern} ${offset} 64k`], ['-f', 'raw']);
  const before = await settled();
  write(0x51, '40M');
  const background = await progress();
  assert.equal(background.offset, before.offset, 'in the background a write only marks the bitmap');
  assert.equal(await change('write-blocking'), 'ok');
  assert.equal(await change('write-blocking'), 'ok', 'the mode it has already');
  assert.equal(await change('background'), "GenericError: Change to copy mode 'background' is not implemented");
  write(0x52, '44M');
  const blocking = await progress();
  assert.equal(blocking.offset, background.offset + 64 * 1024, 'write-blocking, the write reached the target before it completed');
  assert.equal(blocking.len, background.len + 64 * 1024);
  await qmp.execute('block-job-cancel', { device: 'm', force: true });
  await qmp.waitForEvent('JOB_STATUS_CHANGE', (event) => (event.data as { id: string; status: string }).id === 'm' && (event.data as { status: string }).status === 'null');
  await qmp.execute('blockdev-del', { 'node-name': 'target' }); // closed, so its metadata is on disk for qemu-io
  await qmp.close();
  qemuIo(join(temp.dir, 'target.qcow2'), ['read -P 0x52 44M 64k'], ['-f', 'qcow2']);
});
