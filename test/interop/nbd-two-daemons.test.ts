/*
 * Two blockd processes: the first exports a qcow2 image over NBD, the second
 * attaches that export with driver=nbd, re-exports it, and stacks a local
 * qcow2 overlay on it. Data written through the second (by qemu-io, through
 * its own export) must land in the first one's image; data written to the
 * overlay must stay in the overlay.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { QmpClient } from '../../src/qmp/client.js';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { assertCheckClean, createQcow2, MiB, qemuIo, runQemuImg } from '../helpers/qemu-tools.js';

const temp = makeTempDir();
const dir = temp.dir;
let storage: BlockdProcess;
let front: BlockdProcess;

before(async () => {
  createQcow2(join(dir, 'disk.qcow2'), 64 * MiB);
  qemuIo(join(dir, 'disk.qcow2'), ['write -P 0x11 0 2M', 'write -P 0x12 32M 1M'], ['-f', 'qcow2']);
  createQcow2(join(dir, 'overlay.qcow2'), 64 * MiB);
  storage = await runBlockd([
    '--blockdev', `driver=qcow2,node-name=disk,file.driver=file,file.filename=${join(dir, 'disk.qcow2')}`,
    '--nbd-server', `addr.type=unix,addr.path=${join(dir, 'storage-nbd.sock')}`,
    '--export', 'type=nbd,id=e0,node-name=disk,name=disk,writable=on',
    '--qmp', `unix:${join(dir, 'storage-qmp.sock')}`,
  ]);
  front = await runBlockd([
    '--nbd-server', `addr.type=unix,addr.path=${join(dir, 'front-nbd.sock')}`,
    '--qmp', `unix:${join(dir, 'front-qmp.sock')}`,
  ]);
});

after(async () => {
  await front.stop();
  await storage.stop();
  temp.cleanup();
});

test('a disk served by one blockd is used, written and layered on by another', async () => {
  const qmp = await QmpClient.connect(`unix:${join(dir, 'front-qmp.sock')}`);
  await qmp.execute('blockdev-add', {
    driver: 'nbd', 'node-name': 'remote', server: { type: 'unix', path: join(dir, 'storage-nbd.sock') }, export: 'disk',
  });
  await qmp.execute('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'remote', name: 'remote', writable: true });
  const throughFront = `nbd+unix:///remote?socket=${join(dir, 'front-nbd.sock')}`;
  qemuIo(throughFront, ['read -P 0x11 0 2M', 'read -P 0x12 32M 1M', 'write -P 0x21 8M 1M', 'write -z 0 64k', 'flush'], ['-f', 'raw']);

  // A local overlay over the remote disk: reads fall through, writes stay local.
  await qmp.execute('block-export-del', { id: 'e1' });
  await qmp.execute('blockdev-add', {
    driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: join(dir, 'overlay.qcow2') }, backing: 'remote',
  });
  await qmp.execute('block-export-add', { type: 'nbd', id: 'e2', 'node-name': 'top', name: 'top', writable: true });
  const top = `nbd+unix:///top?socket=${join(dir, 'front-nbd.sock')}`;
  qemuIo(top, ['read -P 0x21 8M 1M', 'read -P 0 0 64k', 'read -P 0x11 64k 1984k', 'write -P 0x31 40M 1M', 'flush'], ['-f', 'raw']);
  await qmp.close();

  await front.stop();
  await storage.stop();
  // The writes through the front reached the storage daemon's image; the overlay's stayed in the overlay.
  qemuIo(join(dir, 'disk.qcow2'), ['read -P 0 0 64k', 'read -P 0x11 64k 1984k', 'read -P 0x21 8M 1M', 'read -P 0x12 32M 1M', 'read -P 0 40M 1M'], ['-f', 'qcow2']);
  qemuIo(join(dir, 'overlay.qcow2'), ['read -P 0x31 40M 1M'], ['-f', 'qcow2']);
  assertCheckClean(join(dir, 'disk.qcow2'), 'storage image');
  assertCheckClean(join(dir, 'overlay.qcow2'), 'overlay');
  const map = JSON.parse(runQemuImg('map', '--output=json', '-f', 'qcow2', join(dir, 'overlay.qcow2'))) as { start: number; data: boolean }[];
  assert.ok(map.some((extent) => extent.start === 40 * MiB && extent.data), 'the overlay holds its own write');
});
