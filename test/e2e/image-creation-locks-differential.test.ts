/*
 * Creating an image never touches a file another user holds, as in qemu-storage-daemon:
 * blockdev-snapshot-sync onto a file another node holds, onto the node's own file (named
 * as the node names it, and otherwise), onto a file another process (qemu-io) holds;
 * blockdev-create (file, qcow2 over an inline file, qcow2 on the holding node's file node)
 * over the same files. Both daemons must answer alike (replies, job errors, event order),
 * and afterwards every held image must have the same bytes as before and pass qemu-img
 * check. Also sizes no file can have (2^53 with preallocation full and falloc, 2^63):
 * QEMU's texts, never a Node RangeError.
 */
import assert from 'node:assert/strict';
import { existsSync, readFileSync, statSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { differentialPeers } from '../helpers/differential-peers.js';
import { describeDifferences, runTranscript, untilJob, type TranscriptStep } from '../helpers/qmp-transcript.js';
import { assertCheckClean, holdImage, qemuIo, runQemuImg, sha256File, type HeldImage } from '../helpers/qemu-tools.js';

/** a: node d's image; b: node e's, with data; c: held by qemu-io, with data. */
const HELD_IMAGES = ['a.qcow2', 'b.qcow2', 'c.qcow2'];
const hashesBefore = new Map<string, string>();

function prepare(dir: string): void {
  for (const name of HELD_IMAGES) runQemuImg('create', '-q', '-f', 'qcow2', join(dir, name), '16M');
  qemuIo(join(dir, 'b.qcow2'), ['write -q -P 0x5a 0 1M']);
  qemuIo(join(dir, 'c.qcow2'), ['write -q -P 0xc3 0 1M']);
  for (const name of HELD_IMAGES) hashesBefore.set(join(dir, name), sha256File(join(dir, name)));
}

const peers = differentialPeers(prepare);
const holders: HeldImage[] = [];
before(async () => {
  for (const dir of [peers.qsd.dir, peers.blockd.dir]) holders.push(await holdImage(join(dir, 'c.qcow2')));
});
after(async () => {
  for (const holder of holders) await holder.release();
});

const MiB = 1 << 20;
const snapshot = (file: string, overlay: string) => ({
  execute: 'blockdev-snapshot-sync', arguments: { 'node-name': 'd', 'snapshot-file': file, 'snapshot-node-name': overlay, format: 'qcow2' },
});
const create = (id: string, options: object): TranscriptStep[] => [
  { execute: 'blockdev-create', arguments: { 'job-id': id, options } },
  untilJob(id, 'concluded'),
  { execute: 'query-jobs' },
  { execute: 'job-dismiss', arguments: { id } },
];

const STEPS: TranscriptStep[] = [
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'd', file: { driver: 'file', 'node-name': 'd-file', filename: '$DIR/a.qcow2' } } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'e', file: { driver: 'file', 'node-name': 'e-file', filename: '$DIR/b.qcow2' } } },
  snapshot('$DIR/b.qcow2', 's1'),
  snapshot('$DIR/a.qcow2', 's2'),
  snapshot('$DIR/./a.qcow2', 's3'),
  snapshot('$DIR/c.qcow2', 's4'),
  ...create('c1', { driver: 'file', filename: '$DIR/b.qcow2', size: MiB }),
  ...create('c2', { driver: 'file', filename: '$DIR/c.qcow2', size: MiB }),
  ...create('c3', { driver: 'file', filename: '$DIR/a.qcow2', size: MiB, preallocation: 'full' }),
  ...create('c4', { driver: 'qcow2', file: { driver: 'file', filename: '$DIR/b.qcow2' }, size: MiB }),
  ...create('c5', { driver: 'qcow2', file: { driver: 'file', filename: '$DIR/c.qcow2' }, size: MiB }),
  ...create('c6', { driver: 'qcow2', file: 'e-file', size: MiB }),
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  // sizes no file can have
  ...create('h1', { driver: 'file', filename: '$DIR/huge', size: 2 ** 53, preallocation: 'full' }),
  ...create('h2', { driver: 'file', filename: '$DIR/huge', size: 2 ** 53, preallocation: 'falloc' }),
  ...create('h3', { driver: 'file', filename: '$DIR/huge', size: 2 ** 53 }),
  ...create('h4', { driver: 'file', filename: '$DIR/huge', size: 2 ** 63 }),
  ...create('h5', { driver: 'file', filename: '$DIR/huge', size: 2 ** 63, preallocation: 'falloc' }),
  ...create('h6', { driver: 'file', filename: '$DIR/huge', size: 1000, preallocation: 'metadata' }),
  // what nobody holds is still created
  snapshot('$DIR/new.qcow2', 's5'),
  ...create('c7', { driver: 'file', filename: '$DIR/made.raw', size: MiB, preallocation: 'full' }),
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
];

/**
 * A watchdog, not a wait: were preallocation to write zeros up to 2^53 again, it would fill
 * the disk. Past 64 MiB the file is emptied and blockd killed (its pid file names it), and
 * the transcript fails.
 */
function killWhenHuge(path: string, pidfile: string): { disarm(): void; tripped(): boolean } {
  let tripped = false;
  const timer = setInterval(() => {
    if (!existsSync(path) || statSync(path).size <= 64 * MiB) return;
    truncateSync(path, 0);
    if (!tripped) process.kill(Number(readFileSync(pidfile, 'utf8')), 'SIGKILL');
    tripped = true;
  }, 50);
  return { disarm: () => clearInterval(timer), tripped: () => tripped };
}

test('creation refuses, unchanged, every file another node or process holds, as qemu-storage-daemon does', async () => {
  const theirs = await runTranscript(peers.qsd.socket, peers.qsd.dir, STEPS);
  const watchdog = killWhenHuge(join(peers.blockd.dir, 'huge'), peers.blockd.pidfile);
  const ours = await runTranscript(peers.blockd.socket, peers.blockd.dir, STEPS).catch((error: Error) => {
    const cause = watchdog.tripped() ? 'blockd wrote zeros towards 2^53 bytes (stopped at 64 MiB)' : error.message;
    throw new Error(`${cause}; blockd said: ${peers.blockdLog().slice(-3000)}`);
  }).finally(() => watchdog.disarm());
  assert.equal(describeDifferences(ours, theirs), '');
  assert.ok(ours.filter((line) => line.includes('Failed to get \\"write\\" lock')).length >= 8, ours.join('\n'));
  assert.doesNotMatch(ours.join('\n'), /RangeError|out of range|ERR_/);

  await peers.stopBlockd();
  await peers.stopQsd();
  for (const holder of holders) await holder.release();
  for (const dir of [peers.blockd.dir, peers.qsd.dir]) {
    for (const name of HELD_IMAGES) {
      const path = join(dir, name);
      assert.equal(sha256File(path), hashesBefore.get(path), `${path} changed`);
      assertCheckClean(path, path);
    }
    qemuIo(join(dir, 'b.qcow2'), ['read -q -P 0x5a 0 1M']);
    qemuIo(join(dir, 'c.qcow2'), ['read -q -P 0xc3 0 1M']);
    assert.equal(statSync(join(dir, 'huge')).size, 0, `${dir}: a failed creation leaves the file empty`);
    assertCheckClean(join(dir, 'new.qcow2'), 'the overlay made meanwhile');
  }
});
