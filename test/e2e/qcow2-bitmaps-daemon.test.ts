/*
 * Persistent qcow2 bitmaps through the daemon, against qemu-storage-daemon on copies of the
 * same QEMU-made image: one script (bitmaps added persistent and not, removed, cleared,
 * disabled, merged, writes through an NBD export) then quit; the transcripts (query output
 * with the format-specific bitmaps list, sha256 values) are equal, both images are clean
 * for qemu-img check and list the same bitmaps, and they load bit for bit alike in blockd
 * and QEMU after a restart. While the image is open, the format-specific bitmaps list is
 * where blockd differs by design (it keeps new bitmaps and its write-intent record in the
 * image at once; QEMU writes them at close), so live transcripts mask it. After a SIGKILL
 * while open read-write, QEMU finds the bitmaps in use (inconsistent) and blockd reloads them
 * whole, covering what was written; a SIGKILL during the store at quit leaves a clean image
 * whose bitmaps are each either still in use or stored whole.
 */
import assert from 'node:assert/strict';
import { copyFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { QmpClient } from '../../src/qmp/client.js';
import { runBlockd } from '../helpers/blockd-process.js';
import { startDifferentialPeers, type DifferentialPeers } from '../helpers/differential-peers.js';
import { makeTempDir } from '../helpers/paths.js';
import { qemuImgBitmaps, qsdBitmaps } from '../helpers/qemu-bitmaps.js';
import { MiB, assertCheckClean, createQcow2, qemuImgCheck, qemuIo, runQemuImg } from '../helpers/qemu-tools.js';
import { describeDifferences, maskImageBitmaps, maskImageSizes, runTranscript, type TranscriptStep } from '../helpers/qmp-transcript.js';

/** An image whose bitmaps qemu-img and qemu-io made: enabled, disabled, merged, cleared. */
function qemuMadeImage(path: string): string {
  createQcow2(path, 16 * MiB);
  qemuIo(path, ['write -P 0x11 0 1M']);
  runQemuImg('bitmap', '--add', path, 'b0');
  runQemuImg('bitmap', '--add', '-g', '131072', path, 'b1');
  runQemuImg('bitmap', '--add', '--disable', path, 'b2');
  qemuIo(path, ['write -P 0x22 3M 64k', 'write 10M 1M']);
  runQemuImg('bitmap', '--merge', 'b1', path, 'b2');
  runQemuImg('bitmap', '--add', path, 'b3');
  qemuIo(path, ['write 12M 4k']);
  runQemuImg('bitmap', '--clear', path, 'b0');
  return path;
}

function qemuIoOverNbd(...commands: string[]): TranscriptStep {
  return {
    action: async (dir) => {
      qemuIo(`nbd+unix:///disk?socket=${join(dir, 'nbd.sock')}`, commands, ['-f', 'raw']);
      return `qemu-io ${commands.join('; ')}`;
    },
  };
}

const addImage = { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'q0', file: { driver: 'file', 'node-name': 'q0-file', filename: '$DIR/img.qcow2' } } };
const nodes = { execute: 'query-named-block-nodes', arguments: { flat: true } };
const sha256 = (name: string) => ({ execute: 'x-debug-block-dirty-bitmap-sha256', arguments: { node: 'q0', name } });
const add = (name: string, extra: object = {}) => ({ execute: 'block-dirty-bitmap-add', arguments: { node: 'q0', name, ...extra } });
const verb = (command: string, name: string) => ({ execute: `block-dirty-bitmap-${command}`, arguments: { node: 'q0', name } });
const exportDisk: TranscriptStep[] = [
  { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$DIR/nbd.sock' } } } },
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e0', 'node-name': 'q0', name: 'disk', writable: true } },
];
const NAMES_AFTER_SCRIPT = ['b0', 'b2', 'b3', 'n1', 'n2', 'n3'];

/** Image sizes, and the image's bitmaps list while it is open (blockd writes bitmaps at once, QEMU at close). */
function maskLiveImage(line: string): string {
  return maskImageBitmaps(maskImageSizes(line));
}

async function bothRun(peers: DifferentialPeers, steps: TranscriptStep[]): Promise<void> {
  const expected = await runTranscript(peers.qsd.socket, peers.qsd.dir, steps, maskLiveImage);
  const actual = await runTranscript(peers.blockd.socket, peers.blockd.dir, steps, maskLiveImage);
  assert.equal(describeDifferences(actual, expected, 8), '', peers.blockdLog());
}

/** Both images: the same bitmaps listed by qemu-img, qemu-img check's verdict equal (and no corruption), the same bits loaded by QEMU. */
async function assertImagesAgree(root: string, peers: DifferentialPeers, context: string): Promise<void> {
  const [theirs, ours] = [join(peers.qsd.dir, 'img.qcow2'), join(peers.blockd.dir, 'img.qcow2')];
  assert.deepEqual(qemuImgBitmaps(ours), qemuImgBitmaps(theirs), context);
  const [checkOurs, checkTheirs] = [qemuImgCheck(ours), qemuImgCheck(theirs)];
  assert.equal(checkOurs.corruptions, 0, `${context}: ${checkOurs.output}`);
  assert.equal(checkOurs.status, checkTheirs.status, `${context}: ${checkOurs.output} / ${checkTheirs.output}`);
  assert.deepEqual(await qsdBitmaps(ours, join(root, 'load-ours')), await qsdBitmaps(theirs, join(root, 'load-theirs')), context);
}

test('blockd stores persistent bitmaps at quit as qemu-storage-daemon does, and both load them again alike', async () => {
  const { dir: root, cleanup } = makeTempDir('blockd-bitmaps-quit-');
  try {
    const source = qemuMadeImage(join(root, 'source.qcow2'));
    const prepare = (dir: string) => copyFileSync(source, join(dir, 'img.qcow2'));
    const first = await startDifferentialPeers(join(root, 'first'), prepare);
    await bothRun(first, [
      addImage,
      nodes,
      add('n1', { persistent: true }),
      add('n2', { persistent: true, granularity: 512, disabled: true }),
      add('n3', { persistent: true, granularity: 1048576 }),
      add('memory-only'),
      ...exportDisk,
      qemuIoOverNbd('write -P 0x44 5M 300k', 'write -z 8M 64k', 'discard 0 64k', 'write 16775168 512'),
      verb('remove', 'b1'),
      verb('disable', 'b0'),
      { execute: 'block-dirty-bitmap-merge', arguments: { node: 'q0', target: 'n2', bitmaps: ['b3', 'n1'] } },
      verb('clear', 'b3'),
      qemuIoOverNbd('write 14M 4k'),
      nodes,
      ...['b0', 'b2', 'b3', 'n1', 'n2', 'n3', 'memory-only'].map(sha256),
      { execute: 'quit' },
      { untilClosed: true },
    ]);
    await first.stopBlockd();
    await first.stopQsd();
    assert.deepEqual(qemuImgBitmaps(join(first.blockd.dir, 'img.qcow2')).map((bitmap) => bitmap.name).sort(), NAMES_AFTER_SCRIPT);
    await assertImagesAgree(root, first, 'after quit');

    // A restart: each daemon opens its own image again; the bitmaps are back bit for bit.
    const restarted = await startDifferentialPeers(join(root, 'restarted'), () => {});
    try {
      for (const peer of ['qsd', 'blockd'] as const) copyFileSync(join(first[peer].dir, 'img.qcow2'), join(restarted[peer].dir, 'img.qcow2'));
      await bothRun(restarted, [addImage, nodes, ...NAMES_AFTER_SCRIPT.map(sha256), { execute: 'quit' }, { untilClosed: true }]);
    } finally {
      await restarted.stopBlockd();
      await restarted.stopQsd();
    }
    await assertImagesAgree(root, restarted, 'after the restart');
  } finally {
    cleanup();
  }
});

test('a SIGKILL while open read-write: QEMU finds the bitmaps in use, blockd reloads them whole with what was written', async () => {
  const { dir: root, cleanup } = makeTempDir('blockd-bitmaps-kill-');
  try {
    const source = qemuMadeImage(join(root, 'source.qcow2'));
    const killed = await startDifferentialPeers(join(root, 'killed'), (dir) => copyFileSync(source, join(dir, 'img.qcow2')));
    const kill: TranscriptStep = {
      action: async (dir) => {
        process.kill(Number(readFileSync(join(dir, dir.endsWith('qsd') ? 'qsd.pid' : 'blockd.pid'), 'utf8')), 'SIGKILL');
        return 'killed';
      },
    };
    await bothRun(killed, [
      addImage,
      add('n1', { persistent: true }),
      ...exportDisk,
      qemuIoOverNbd('write 2M 64k'),
      nodes,
      kill,
      { untilClosed: true },
    ]);
    await killed.stopBlockd();
    await killed.stopQsd();
    const ours = join(killed.blockd.dir, 'img.qcow2');
    // QEMU's view: the bitmaps (n1 too, stored when it was added) and blockd's record, all in use.
    assert.deepEqual(qemuImgBitmaps(ours).map((bitmap) => `${bitmap.name}:${bitmap.flags.join(',')}`).sort(),
      ['b0:in-use,auto', 'b1:in-use,auto', 'b2:in-use', 'b3:in-use,auto', 'n1:in-use,auto', 'org.blockd.write-intent:in-use']);
    const check = qemuImgCheck(ours);
    assert.equal(check.corruptions, 0, check.output);
    const seenByQemu = await qsdBitmaps(ours, join(root, 'qemu-view'));
    assert.ok(!('error' in seenByQemu) && seenByQemu.every((bitmap) => bitmap.inconsistent), JSON.stringify(seenByQemu));

    // A writer that does not know blockd's record (QEMU) clears its autoclear bit: blockd no longer trusts it.
    const qemuWrote = join(root, 'qemu-wrote.qcow2');
    copyFileSync(ours, qemuWrote);
    qemuIo(qemuWrote, ['write -P 0x33 5M 4k']);
    const afterQemu = join(root, 'after-qemu.sock');
    const untrusting = await runBlockd(['--blockdev', `driver=qcow2,node-name=q0,read-only=on,file.driver=file,file.filename=${qemuWrote}`, '--qmp', `unix:${afterQemu}`]);
    try {
      const qmp = await QmpClient.connect(`unix:${afterQemu}`);
      const [node] = (await qmp.execute('query-named-block-nodes', { flat: true })).filter((info) => info['node-name'] === 'q0');
      assert.ok((node!['dirty-bitmaps'] ?? []).every((bitmap) => bitmap.inconsistent === true), JSON.stringify(node!['dirty-bitmaps']));
      await qmp.close();
    } finally {
      await untrusting.stop();
    }

    // blockd's view: every bitmap whole; the enabled ones cover the write made before the kill.
    const socket = join(root, 'reopened.sock');
    const blockd = await runBlockd(['--blockdev', `driver=qcow2,node-name=q0,file.driver=file,file.filename=${ours}`, '--qmp', `unix:${socket}`]);
    try {
      const qmp = await QmpClient.connect(`unix:${socket}`);
      const [node] = (await qmp.execute('query-named-block-nodes', { flat: true })).filter((info) => info['node-name'] === 'q0');
      const loaded = new Map((node!['dirty-bitmaps'] ?? []).map((bitmap) => [bitmap.name, bitmap]));
      assert.deepEqual([...loaded.keys()].sort(), ['b0', 'b1', 'b2', 'b3', 'n1']);
      for (const bitmap of loaded.values()) assert.equal(bitmap.inconsistent, undefined, JSON.stringify(bitmap));
      for (const name of ['b0', 'b1', 'b3', 'n1']) assert.ok(loaded.get(name)!.count >= 64 * 1024 && loaded.get(name)!.recording, `${name}: ${JSON.stringify(loaded.get(name))}`);
      await qmp.execute('block-dirty-bitmap-remove', { node: 'q0', name: 'b1' });
      await qmp.execute('quit');
      await qmp.close().catch(() => {});
      await blockd.exited;
    } finally {
      await blockd.stop();
    }
    // Closed cleanly: QEMU trusts the bitmaps again, and the record is gone.
    assert.deepEqual(qemuImgBitmaps(ours).map((bitmap) => `${bitmap.name}:${bitmap.flags.join(',')}`).sort(), ['b0:auto', 'b2:', 'b3:auto', 'n1:auto']);
    assertCheckClean(ours);
  } finally {
    cleanup();
  }
});

test('a SIGKILL at any moment of the store at quit leaves a clean image: each bitmap either still in use or stored whole', async (t) => {
  const { dir: root, cleanup } = makeTempDir('blockd-bitmaps-kill-quit-');
  try {
    // 1 GiB at 512 bytes per bit: four data clusters per bitmap, so the store at quit takes many writes.
    const source = createQcow2(join(root, 'source.qcow2'), 1024 * MiB);
    for (const name of ['f0', 'f1', 'f2', 'f3']) runQemuImg('bitmap', '--add', '-g', '512', source, name);
    qemuIo(source, Array.from({ length: 40 }, (_, i) => `write ${i * 25 * MiB + i * 4096} 64k`));
    const expected = await qsdBitmaps(source, join(root, 'expected'));
    assert.ok(!('error' in expected));
    const start = async (i: number) => {
      const image = join(root, `k${i}.qcow2`);
      copyFileSync(source, image);
      const blockd = await runBlockd(['--blockdev', `driver=qcow2,node-name=q0,file.driver=file,file.filename=${image}`, '--qmp', `unix:${join(root, `k${i}.sock`)}`]);
      const qmp = await QmpClient.connect(`unix:${join(root, `k${i}.sock`)}`);
      return { image, blockd, qmp };
    };
    // How long a quit takes here, so the kill moments spread over it (moments to kill at, not a synchronisation).
    const timed = await start(0);
    const quitAt = performance.now();
    timed.qmp.executeRaw('quit').catch(() => {});
    await timed.blockd.exited;
    const quitMs = performance.now() - quitAt;
    for (const [i, delayMs] of [0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99].map((part, i) => [i + 1, part * quitMs] as const)) {
      const { image, blockd, qmp } = await start(i);
      qmp.executeRaw('quit').catch(() => {});
      await new Promise((resolve) => setTimeout(resolve, delayMs));
      await blockd.stop('SIGKILL');
      await qmp.close().catch(() => {});
      const context = `killed ${delayMs.toFixed(1)} ms after quit (a quit took ${quitMs.toFixed(1)} ms)`;
      const check = qemuImgCheck(image);
      assert.equal(check.corruptions, 0, `${context}: ${check.output}`);
      assert.ok(check.status === 0 || check.status === 3, `${context}: ${check.output}`);
      const loaded = await qsdBitmaps(image, join(root, `load-${i}`));
      assert.ok(!('error' in loaded), `${context}: ${JSON.stringify(loaded)}`);
      t.diagnostic(`${context}: ${loaded.filter((bitmap) => !bitmap.inconsistent).length} of ${loaded.length} stored`);
      for (const bitmap of loaded) {
        if (bitmap.inconsistent) continue; // not stored yet: still in use, as after any crash
        assert.deepEqual(bitmap, expected.find((candidate) => candidate.name === bitmap.name), context);
      }
    }
  } finally {
    cleanup();
  }
});
