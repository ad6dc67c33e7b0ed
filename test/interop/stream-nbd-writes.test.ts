/*
 * block-stream while a client writes through an NBD export of the node being
 * streamed into: the writes (qemu-io over NBD, during the job) and the streamed
 * data must both be in the final image, which must equal a model (the chain's
 * contents with the same writes applied), pass qemu-img check, and have the
 * base as its backing file.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { QmpClient } from '../../src/qmp/client.js';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { assertCheckClean, createQcow2, MiB, qemuImgCompare, qemuIo, runQemuImg, SeededRandom } from '../helpers/qemu-tools.js';

const temp = makeTempDir();
const dir = temp.dir;
const path = (name: string) => join(dir, name);
let blockd: BlockdProcess;

before(async () => {
  createQcow2(path('base.qcow2'), 64 * MiB);
  qemuIo(path('base.qcow2'), ['write -P 0x11 0 16M', 'write -P 0x12 40M 8M'], ['-f', 'qcow2']);
  createQcow2(path('mid.qcow2'), undefined, { backing: { path: 'base.qcow2', format: 'qcow2' } });
  qemuIo(path('mid.qcow2'), ['write -P 0x21 8M 24M', 'write -z 44M 1M'], ['-f', 'qcow2']);
  createQcow2(path('top.qcow2'), undefined, { backing: { path: 'mid.qcow2', format: 'qcow2' } });
  qemuIo(path('top.qcow2'), ['write -P 0x31 10M 1M'], ['-f', 'qcow2']);
  runQemuImg('convert', '-O', 'raw', path('top.qcow2'), path('model.raw'));
  blockd = await runBlockd([
    '--blockdev', `driver=qcow2,node-name=top,file.driver=file,file.filename=${path('top.qcow2')}`,
    '--nbd-server', `addr.type=unix,addr.path=${path('nbd.sock')}`,
    '--export', 'type=nbd,id=e0,node-name=top,name=top,writable=on',
    '--qmp', `unix:${path('qmp.sock')}`,
  ]);
});

after(async () => {
  await blockd.stop();
  temp.cleanup();
});

test('writes through an NBD export during block-stream end up in the streamed image', async () => {
  const qmp = await QmpClient.connect(`unix:${path('qmp.sock')}`);
  // Slow enough (8 MiB/s over ~24 MiB) that the writes below land while the job runs.
  await qmp.execute('block-stream', { 'job-id': 's', device: 'top', base: path('base.qcow2'), speed: 8 * MiB });
  // Batches of random writes (some zeroes) over the streamed range, applied to the model too.
  const random = new SeededRandom(7);
  let statusDuringWrites: string | undefined;
  for (let batch = 0; batch < 6; batch++) {
    const writes = Array.from({ length: 25 }, () => {
      const offset = random.int(48 * 16) * 64 * 1024 + random.int(16) * 4096;
      const length = (1 + random.int(16)) * 4096;
      return random.chance(0.2) ? `write -z ${offset} ${length}` : `write -P 0x${(0x40 + random.int(0x30)).toString(16)} ${offset} ${length}`;
    });
    qemuIo(`nbd+unix:///top?socket=${path('nbd.sock')}`, writes, ['-f', 'raw']);
    qemuIo(path('model.raw'), writes, ['-f', 'raw']);
    statusDuringWrites ??= ((await qmp.execute('query-jobs')) as { status: string }[])[0]?.status;
  }

  for (let i = 0; i < 200 && ((await qmp.execute('query-jobs')) as unknown[]).length > 0; i++) await new Promise((resolve) => setTimeout(resolve, 50));
  assert.deepEqual(await qmp.execute('query-jobs'), [], 'the job finished');
  await qmp.close();
  await blockd.stop();

  assert.equal(statusDuringWrites, 'running', 'the client wrote while the job ran');
  qemuImgCompare(path('top.qcow2'), path('model.raw'), ['qcow2', 'raw'], 'streamed image with the client writes');
  assertCheckClean(path('top.qcow2'), 'top');
  const info = JSON.parse(runQemuImg('info', '--output=json', path('top.qcow2'))) as { 'backing-filename'?: string };
  assert.equal(info['backing-filename'], path('base.qcow2'));
  const chain = JSON.parse(runQemuImg('info', '--output=json', '--backing-chain', path('top.qcow2'))) as { filename: string }[];
  assert.deepEqual(chain.map((image) => image.filename), [path('top.qcow2'), path('base.qcow2')], 'mid left the chain');
});
