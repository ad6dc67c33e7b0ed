/*
 * Storage migration: blockd mirrors a disk into an NBD export served by
 * another process — a second blockd, qemu-storage-daemon or qemu-nbd — while
 * a client writes through blockd's own export of the disk: during the
 * initial copy, while READY, and after job-complete, when the export serves
 * the nbd node and so the other host. The destination image must then hold
 * exactly what the client wrote on top of the disk's data, and pass qemu-img
 * check.
 */
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { QmpClient } from '../../src/qmp/client.js';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { startQemuNbd, startQsdExport, type NbdServer } from '../helpers/nbd-servers.js';
import { makeTempDir } from '../helpers/paths.js';
import { assertCheckClean, createQcow2, MiB, qemuImgCompare, qemuIo, runQemuImg, SeededRandom } from '../helpers/qemu-tools.js';
import { writeBatch } from '../helpers/write-batches.js';

const temp = makeTempDir();
after(() => temp.cleanup());

/** The destination's NBD server, serving `image` as export "disk". */
type Destination = (dir: string, image: string) => Promise<NbdServer>;

const blockdDestination: Destination = async (dir, image) => {
  const socket = join(dir, 'dst-nbd.sock');
  const daemon = await runBlockd([
    '--blockdev', `driver=qcow2,node-name=dst,file.driver=file,file.filename=${image}`,
    '--nbd-server', `addr.type=unix,addr.path=${socket}`,
    '--export', 'type=nbd,id=e0,node-name=dst,name=disk,writable=on',
  ]);
  return { uri: `nbd+unix:///disk?socket=${socket}`, address: { type: 'unix', path: socket }, stop: async () => {
    await daemon.stop();
  } };
};

const DESTINATIONS: [string, Destination][] = [
  ['another blockd', blockdDestination],
  ['qemu-storage-daemon', (dir, image) => startQsdExport(dir, image)],
  ['qemu-nbd', (dir, image) => startQemuNbd(image, { socket: join(dir, 'qemu-nbd.sock') })],
];

async function jobStatus(qmp: QmpClient, id: string): Promise<string | undefined> {
  return ((await qmp.execute('query-jobs')) as { id: string; status: string }[]).find((job) => job.id === id)?.status;
}

async function waitForJob(qmp: QmpClient, id: string, wanted: string | undefined): Promise<void> {
  for (let i = 0; i < 2000 && (await jobStatus(qmp, id)) !== wanted; i++) await new Promise((resolve) => setTimeout(resolve, 10));
  assert.equal(await jobStatus(qmp, id), wanted, `job ${id}`);
}

for (const [name, startDestination] of DESTINATIONS) {
  test(`a disk moves to ${name} over NBD while a client writes, and the export follows it`, async () => {
    const dir = join(temp.dir, name.replaceAll(' ', '-'));
    mkdirSync(dir);
    const source = join(dir, 'source.qcow2');
    const destination = join(dir, 'destination.qcow2');
    const model = join(dir, 'model.raw');
    createQcow2(source, 64 * MiB);
    qemuIo(source, ['write -P 0x11 0 20M', 'write -P 0x12 40M 4M', 'write -z 50M 1M'], ['-f', 'qcow2']);
    runQemuImg('convert', '-O', 'raw', source, model);
    createQcow2(destination, 64 * MiB);
    // A destination that held something else: where the disk reads zeroes, it must come to read zeroes too.
    qemuIo(destination, ['write -P 0xee 0 64M'], ['-f', 'qcow2']);
    const server = await startDestination(dir, destination);
    let blockd: BlockdProcess | undefined;
    try {
      const nbdSocket = join(dir, 'src-nbd.sock');
      blockd = await runBlockd([
        '--blockdev', `driver=qcow2,node-name=disk,file.driver=file,file.filename=${source}`,
        '--nbd-server', `addr.type=unix,addr.path=${nbdSocket}`,
        '--export', 'type=nbd,id=e-disk,node-name=disk,name=disk,writable=on',
        '--qmp', `unix:${join(dir, 'qmp.sock')}`,
      ]);
      const exported = `nbd+unix:///disk?socket=${nbdSocket}`;
      const random = new SeededRandom(name.length);
      const qmp = await QmpClient.connect(`unix:${join(dir, 'qmp.sock')}`);
      await qmp.execute('blockdev-add', { driver: 'nbd', 'node-name': 'remote', server: server.address, export: 'disk' });
      // One iteration, then it waits (speed 1) until set-speed lets it go: the first writes land during the initial copy.
      await qmp.execute('blockdev-mirror', { 'job-id': 'migrate', device: 'disk', target: 'remote', sync: 'full', speed: 1 });
      writeBatch(random, exported, model);
      assert.equal(await jobStatus(qmp, 'migrate'), 'running');
      await qmp.execute('block-job-set-speed', { device: 'migrate', speed: 0 });
      await waitForJob(qmp, 'migrate', 'ready');
      writeBatch(random, exported, model);
      await qmp.execute('job-complete', { id: 'migrate' });
      await waitForJob(qmp, 'migrate', undefined);
      const exports = (await qmp.execute('query-block-exports')) as { id: string; 'node-name': string }[];
      assert.equal(exports.find((entry) => entry.id === 'e-disk')?.['node-name'], 'remote', 'the export serves the other host now');
      writeBatch(random, exported, model);
      await qmp.close();
    } finally {
      await blockd?.stop();
      await server.stop();
    }
    qemuImgCompare(destination, model, ['qcow2', 'raw'], `the disk on ${name}`);
    assertCheckClean(destination, `${name} destination`);
  });
}
