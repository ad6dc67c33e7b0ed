/*
 * blockd's NBD exports driven by the real clients: nbdinfo and nbdcopy
 * (libnbd, strict), qemu-img and qemu-io (QEMU's client). Exports of qcow2
 * (with a backing file) and raw nodes; reads compared with the image files,
 * writes checked in the images after blockd has shut down, maps compared with
 * qemu-storage-daemon exporting identical copies.
 */
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { assertCheckClean, createQcow2, MiB, qemuImgCompare, qemuIo, runQemuImg, runTool } from '../helpers/qemu-tools.js';
import { startQsd, type QsdProcess } from '../helpers/qsd-process.js';

const temp = makeTempDir();
const dir = temp.dir;
let blockd: BlockdProcess;
let qsd: QsdProcess;

const uri = (socket: string, name: string) => `nbd+unix:///${name}?socket=${socket}`;
const BLOCKD_NBD = join(dir, 'blockd-nbd.sock');
const QSD_NBD = join(dir, 'qsd', 'nbd.sock');

/** The layers: base.qcow2 <- top.qcow2, plus a raw image; whole 64 KiB clusters so both servers see the same allocation. */
function makeImages(where: string): void {
  createQcow2(join(where, 'base.qcow2'), 64 * MiB);
  qemuIo(join(where, 'base.qcow2'), ['write -P 0x11 0 1M', 'write -P 0x12 8M 2M', 'write -z 16M 1M'], ['-f', 'qcow2']);
  createQcow2(join(where, 'top.qcow2'), undefined, { backing: { path: 'base.qcow2', format: 'qcow2' } });
  qemuIo(join(where, 'top.qcow2'), ['write -P 0x21 512k 1M', 'write -z 9M 64k', 'write -P 0x22 32M 64k'], ['-f', 'qcow2']);
  runQemuImg('create', '-q', '-f', 'raw', join(where, 'disk.raw'), String(16 * MiB));
  qemuIo(join(where, 'disk.raw'), ['write -P 0x33 1M 1M'], ['-f', 'raw']);
}

function exportArgs(where: string, socket: string): string[] {
  return [
    '--blockdev', `driver=qcow2,node-name=top,file.driver=file,file.filename=${join(where, 'top.qcow2')}`,
    '--blockdev', `driver=file,node-name=rawfile,filename=${join(where, 'disk.raw')}`,
    '--nbd-server', `addr.type=unix,addr.path=${socket}`,
    '--export', 'type=nbd,id=e0,node-name=top,name=disk,writable=on,description=the top layer,allocation-depth=on',
    '--export', 'type=nbd,id=e1,node-name=rawfile,name=raw',
  ];
}

before(async () => {
  // Made twice rather than copied: a copy may fill the holes the maps should show.
  makeImages(dir);
  mkdirSync(join(dir, 'qsd'));
  makeImages(join(dir, 'qsd'));
  blockd = await runBlockd([...exportArgs(dir, BLOCKD_NBD), '--qmp', `unix:${join(dir, 'qmp.sock')}`]);
  qsd = await startQsd(join(dir, 'qsd'), exportArgs(join(dir, 'qsd'), QSD_NBD));
});

after(async () => {
  await blockd.stop();
  await qsd.stop();
  temp.cleanup();
});

/** qemu-img compare of an export with an image file blockd holds open (hence -U). */
function compareWithImage(first: string, image: string, format: string): void {
  tool('qemu-img', ['compare', '-U', '-f', 'raw', '-F', format, first, image]);
}

function tool(command: string, args: string[]): string {
  const result = runTool(command, args);
  assert.equal(result.status, 0, `${command} ${args.join(' ')}: ${result.stderr}${result.stdout}`);
  return result.stdout;
}

test('nbdinfo --list shows the exports, descriptions, contexts and flags as qemu-storage-daemon does', () => {
  const listing = (socket: string) => JSON.parse(tool('nbdinfo', ['--json', '--list', `nbd+unix:///?socket=${socket}`])) as { exports: Record<string, unknown>[] };
  const ours = listing(BLOCKD_NBD).exports.map(({ uri: _uri, ...rest }) => rest);
  const theirs = listing(QSD_NBD).exports.map(({ uri: _uri, ...rest }) => rest);
  assert.deepEqual(ours, theirs);
  assert.deepEqual(ours.map((entry) => entry['export-name']), ['disk', 'raw']);
  assert.equal(ours[1]!.is_read_only, true);
});

test('nbdinfo --map (base:allocation and qemu:allocation-depth) equals qemu-storage-daemon', () => {
  for (const context of ['base:allocation', 'qemu:allocation-depth']) {
    for (const name of ['disk', 'raw']) {
      if (name === 'raw' && context !== 'base:allocation') continue;
      const map = (socket: string) => tool('nbdinfo', ['--json', `--map=${context}`, uri(socket, name)]);
      assert.deepEqual(JSON.parse(map(BLOCKD_NBD)), JSON.parse(map(QSD_NBD)), `${context} of ${name}`);
    }
  }
  const depth = JSON.parse(tool('nbdinfo', ['--json', '--map=qemu:allocation-depth', uri(BLOCKD_NBD, 'disk')])) as { offset: number; type: number }[];
  assert.ok(depth.some((extent) => extent.type === 2), 'some ranges come from the backing file');
});

test('qemu-img compare and map read the exports as the image files', () => {
  compareWithImage(uri(BLOCKD_NBD, 'disk'), join(dir, 'top.qcow2'), 'qcow2');
  compareWithImage(uri(BLOCKD_NBD, 'raw'), join(dir, 'disk.raw'), 'raw');
  const map = (socket: string) => tool('qemu-img', ['map', '--output=json', '-f', 'raw', uri(socket, 'disk')]);
  assert.equal(map(BLOCKD_NBD), map(QSD_NBD));
});

test('nbdcopy reads an export with several connections and skips nothing', () => {
  const out = join(dir, 'copy.raw');
  tool('nbdcopy', ['--connections=4', '--requests=16', uri(BLOCKD_NBD, 'disk'), out]);
  compareWithImage(out, join(dir, 'top.qcow2'), 'qcow2');
});

test('the read-only export: QEMU refuses to open it for writing, libnbd sees it read-only, the data stays', () => {
  const result = runTool('qemu-io', ['-f', 'raw', '-c', 'write -P 0x99 0 4k', uri(BLOCKD_NBD, 'raw')]);
  assert.notEqual(result.status, 0);
  assert.match(result.stderr, /Permission denied/);
  assert.equal(runTool('nbdinfo', ['--is', 'read-only', uri(BLOCKD_NBD, 'raw')]).status, 0);
  qemuIo(uri(BLOCKD_NBD, 'raw'), ['read -P 0x33 1M 1M', 'read -P 0 0 1M'], ['-r', '-f', 'raw']);
});

test('writes through the export (qemu-io, qemu-img convert, nbdcopy) land in the qcow2 image', async () => {
  const target = uri(BLOCKD_NBD, 'disk');
  qemuIo(target, [
    'write -P 0x41 40M 1M', 'write -f -P 0x42 41M 4k', 'write -z 8M 64k', 'write -z -u 10M 128k', 'discard 512k 64k',
    'aio_write -P 0x43 44M 64k', 'aio_write -P 0x44 45M 64k', 'aio_flush', 'flush',
  ], ['-f', 'raw', '-t', 'writeback']);
  qemuIo(target, ['read -P 0x41 40M 1M', 'read -P 0x42 41M 4k', 'read -P 0 8M 64k', 'read -P 0 10M 128k', 'read -P 0x43 44M 64k', 'read -P 0x44 45M 64k'], ['-f', 'raw']);

  // A whole image through qemu-img convert, then part of another with nbdcopy.
  const source = join(dir, 'source.qcow2');
  createQcow2(source, 64 * MiB);
  qemuIo(source, ['write -P 0x51 48M 2M', 'write -P 0x52 60M 64k'], ['-f', 'qcow2']);
  const sourceRaw = join(dir, 'source.raw');
  runQemuImg('convert', '-O', 'raw', source, sourceRaw);
  tool('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', sourceRaw, target]);
  qemuImgCompare(target, source, ['raw', 'qcow2'], 'after convert');
  tool('nbdcopy', ['--flush', sourceRaw, target]);

  await blockd.stop();
  assertCheckClean(join(dir, 'top.qcow2'), 'after the export was written');
  qemuImgCompare(join(dir, 'top.qcow2'), source, ['qcow2', 'qcow2'], 'image after shutdown');
  blockd = await runBlockd([...exportArgs(dir, BLOCKD_NBD), '--qmp', `unix:${join(dir, 'qmp.sock')}`]);
});
