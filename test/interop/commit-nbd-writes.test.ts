/*
 * block-commit while a client writes through an NBD export. Active commit:
 * the export serves the top; writes land before READY, while READY, and after
 * job-complete switched the export over to the base; the base must then equal
 * a model (the chain's contents with every write applied) and pass qemu-img
 * check. Intermediate commit: the export serves the top while its middle layer
 * is committed; the top must read as the model through its new, shorter chain
 * (qemu-img info --backing-chain). Patterns at every layer come from qemu-io.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { QmpClient } from '../../src/qmp/client.js';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { makePatternChain } from '../helpers/pattern-chains.js';
import { assertCheckClean, qemuImgCompare, runQemuImg, SeededRandom } from '../helpers/qemu-tools.js';
import { writeBatch as writeBatchTo } from '../helpers/write-batches.js';

const temp = makeTempDir();
const dir = temp.dir;
const path = (name: string) => join(dir, name);
let blockd: BlockdProcess;

before(async () => {
  for (const chain of ['act', 'mid']) makePatternChain(dir, chain);
  blockd = await runBlockd([
    '--blockdev', `driver=qcow2,node-name=act,file.driver=file,file.filename=${path('act-top.qcow2')}`,
    '--blockdev', `driver=qcow2,node-name=mid,file.driver=file,file.filename=${path('mid-top.qcow2')}`,
    '--nbd-server', `addr.type=unix,addr.path=${path('nbd.sock')}`,
    '--export', 'type=nbd,id=e-act,node-name=act,name=act,writable=on',
    '--export', 'type=nbd,id=e-mid,node-name=mid,name=mid,writable=on',
    '--qmp', `unix:${path('qmp.sock')}`,
  ]);
});

after(async () => {
  await blockd.stop();
  temp.cleanup();
});

/** Random writes (some zeroes) through the export, applied to the model too. */
function writeBatch(random: SeededRandom, exportName: string, model: string): void {
  writeBatchTo(random, `nbd+unix:///${exportName}?socket=${path('nbd.sock')}`, model);
}

async function jobStatus(qmp: QmpClient, id: string): Promise<string | undefined> {
  return ((await qmp.execute('query-jobs')) as { id: string; status: string }[]).find((job) => job.id === id)?.status;
}

async function waitFor(qmp: QmpClient, id: string, wanted: (status: string | undefined) => boolean): Promise<void> {
  for (let i = 0; i < 400 && !wanted(await jobStatus(qmp, id)); i++) await new Promise((resolve) => setTimeout(resolve, 25));
  assert.ok(wanted(await jobStatus(qmp, id)), `job ${id} reached the expected status (now ${await jobStatus(qmp, id)})`);
}

test('writes through an NBD export before and after READY and after the switch all end up in the base', async () => {
  const qmp = await QmpClient.connect(`unix:${path('qmp.sock')}`);
  const model = path('act-expected.raw');
  const random = new SeededRandom(11);
  // One iteration, then it waits (speed 1) until set-speed lets it go: the first writes land during the initial copy.
  await qmp.execute('block-commit', { 'job-id': 'ac', device: 'act', speed: 1 });
  writeBatch(random, 'act', model);
  assert.equal(await jobStatus(qmp, 'ac'), 'running', 'the first writes landed during the initial copy');
  await qmp.execute('block-job-set-speed', { device: 'ac', speed: 0 });
  await waitFor(qmp, 'ac', (status) => status === 'ready');
  for (let batch = 0; batch < 3; batch++) writeBatch(random, 'act', model);
  assert.equal(await jobStatus(qmp, 'ac'), 'ready');
  await qmp.execute('job-complete', { id: 'ac' });
  await waitFor(qmp, 'ac', (status) => status === undefined);
  const exports = (await qmp.execute('query-block-exports')) as { id: string; 'node-name': string }[];
  const baseNode = exports.find((entry) => entry.id === 'e-act')!['node-name'];
  const nodes = (await qmp.execute('query-named-block-nodes', { flat: true })) as { 'node-name': string; file: string; drv: string }[];
  assert.equal(nodes.find((node) => node['node-name'] === baseNode)?.file, path('act-base.qcow2'), 'the export now serves the base');
  writeBatch(random, 'act', model);
  await qmp.close();

  // The old top stays (the user added it) with its chain; once it and the export go, the base is closed.
  const client = await QmpClient.connect(`unix:${path('qmp.sock')}`);
  await client.execute('block-export-del', { id: 'e-act' });
  for (let i = 0; i < 100 && ((await client.execute('query-block-exports')) as unknown[]).some((entry) => (entry as { id: string }).id === 'e-act'); i++) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  await client.execute('blockdev-del', { 'node-name': 'act' });
  assert.ok(!((await client.execute('query-named-block-nodes', { flat: true })) as { file: string }[]).some((node) => node.file === path('act-base.qcow2')));
  await client.close();
  qemuImgCompare(path('act-base.qcow2'), model, ['qcow2', 'raw'], 'base after active commit with client writes');
  assertCheckClean(path('act-base.qcow2'), 'act-base');
});

test('writes to the top through an NBD export during an intermediate commit keep reading as the model', async () => {
  const qmp = await QmpClient.connect(`unix:${path('qmp.sock')}`);
  const model = path('mid-expected.raw');
  const random = new SeededRandom(12);
  const chain = (JSON.parse(runQemuImg('info', '--force-share', '--output=json', '--backing-chain', path('mid-top.qcow2'))) as { filename: string }[]);
  assert.deepEqual(chain.map((image) => image.filename), ['mid-top', 'mid-mid', 'mid-base'].map((name) => path(`${name}.qcow2`)));
  const nodes = (await qmp.execute('query-named-block-nodes', { flat: true })) as { 'node-name': string; file: string; drv: string }[];
  const midNode = nodes.find((node) => node.drv === 'qcow2' && node.file === path('mid-mid.qcow2'))!['node-name'];
  // One chunk, then it waits (speed 1) until set-speed lets it go: however slow the machine, the writes land while it runs.
  await qmp.execute('block-commit', { 'job-id': 'ic', device: 'mid', 'top-node': midNode, speed: 1 });
  for (let batch = 0; batch < 3; batch++) writeBatch(random, 'mid', model);
  assert.equal(await jobStatus(qmp, 'ic'), 'running', 'the client wrote while the job ran');
  await qmp.execute('block-job-set-speed', { device: 'ic', speed: 0 });
  await waitFor(qmp, 'ic', (status) => status === undefined);
  writeBatch(random, 'mid', model);
  await qmp.close();
  await blockd.stop();

  qemuImgCompare(path('mid-top.qcow2'), model, ['qcow2', 'raw'], 'top after intermediate commit with client writes');
  for (const layer of ['top', 'base']) assertCheckClean(path(`mid-${layer}.qcow2`), `mid-${layer}`);
  const after = (JSON.parse(runQemuImg('info', '--output=json', '--backing-chain', path('mid-top.qcow2'))) as { filename: string }[]);
  assert.deepEqual(after.map((image) => image.filename), [path('mid-top.qcow2'), path('mid-base.qcow2')]);
});
