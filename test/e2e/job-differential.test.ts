/*
 * Differential test of the job commands with blockdev-create jobs: the same
 * script runs against qemu-storage-daemon and blockd; the transcripts (events
 * in order, replies, job errors in query-jobs) must be equal. The images both
 * created must then be identical files, and clean for qemu-img check.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { differentialPeers } from '../helpers/differential-peers.js';
import { runTranscript, transcriptDifferences, untilJob, type TranscriptStep } from '../helpers/qmp-transcript.js';
import { assertCheckClean } from '../helpers/qemu-tools.js';

const peers = differentialPeers();

const create = (id: string, options: object) => ({ execute: 'blockdev-create', arguments: { 'job-id': id, options } });

const STEPS: TranscriptStep[] = [
  { execute: 'query-jobs' },
  { execute: 'query-block-jobs' },
  create('c1', { driver: 'file', filename: '$DIR/disk.qcow2', size: 0 }),
  untilJob('c1', 'concluded'),
  { execute: 'query-jobs' },
  { execute: 'query-block-jobs' },
  create('c1', { driver: 'file', filename: '$DIR/other', size: 0 }),
  { execute: 'job-cancel', arguments: { id: 'c1' } },
  { execute: 'job-pause', arguments: { id: 'c1' } },
  { execute: 'job-resume', arguments: { id: 'c1' } },
  { execute: 'job-complete', arguments: { id: 'c1' } },
  { execute: 'job-finalize', arguments: { id: 'c1' } },
  { execute: 'block-job-pause', arguments: { device: 'c1' } },
  { execute: 'block-job-dismiss', arguments: { id: 'c1' } },
  { execute: 'block-job-set-speed', arguments: { device: 'c1', speed: 1 } },
  { execute: 'job-dismiss', arguments: { id: 'nosuch' } },
  { execute: 'job-dismiss', arguments: { id: 'c1' } },
  { execute: 'query-jobs' },
  create('1x', { driver: 'file', filename: '$DIR/x', size: 0 }),
  create('', { driver: 'file', filename: '$DIR/x', size: 0 }),
  create('c2', { driver: 'raw', file: 'nothing' }),
  create('c2', { driver: 'null-co' }),
  create('c2', { driver: 'file', filename: '$DIR/nodir/x', size: 0 }),
  untilJob('c2', 'concluded'),
  { execute: 'query-jobs' },
  { execute: 'job-dismiss', arguments: { id: 'c2' } },
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'f', filename: '$DIR/disk.qcow2' } },
  create('c3', { driver: 'qcow2', file: 'f', size: 67108864 }),
  untilJob('c3', 'concluded'),
  { execute: 'job-dismiss', arguments: { id: 'c3' } },
  create('c4', { driver: 'qcow2', file: 'nosuch', size: 67108864 }),
  untilJob('c4', 'concluded'),
  { execute: 'query-jobs' },
  { execute: 'job-dismiss', arguments: { id: 'c4' } },
  create('c5', { driver: 'qcow2', file: 'f', size: 67108864, 'cluster-size': 1000 }),
  untilJob('c5', 'concluded'),
  { execute: 'query-jobs' },
  { execute: 'job-dismiss', arguments: { id: 'c5' } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'q', file: 'f' } },
  create('c6', { driver: 'qcow2', file: 'f', size: 1048576 }),
  untilJob('c6', 'concluded'),
  { execute: 'query-jobs' },
  { execute: 'job-dismiss', arguments: { id: 'c6' } },
  { execute: 'blockdev-del', arguments: { 'node-name': 'q' } },
  create('c7', { driver: 'file', filename: '$DIR/small.qcow2', size: 0 }),
  untilJob('c7', 'concluded'),
  { execute: 'job-dismiss', arguments: { id: 'c7' } },
  create('c8', { driver: 'qcow2', file: { driver: 'file', filename: '$DIR/small.qcow2' }, size: 1048576, 'cluster-size': 4096, 'refcount-bits': 8, 'lazy-refcounts': true, 'backing-file': 'disk.qcow2', 'backing-fmt': 'qcow2' }),
  untilJob('c8', 'concluded'),
  { execute: 'job-dismiss', arguments: { id: 'c8' } },
  create('c9', { driver: 'file', filename: '$DIR/prealloc.raw', size: 1048576, preallocation: 'full' }),
  untilJob('c9', 'concluded'),
  { execute: 'job-dismiss', arguments: { id: 'c9' } },
  create('c10', { driver: 'file', filename: '$DIR/meta.qcow2', size: 0 }),
  untilJob('c10', 'concluded'),
  { execute: 'job-dismiss', arguments: { id: 'c10' } },
  create('c11', { driver: 'qcow2', file: { driver: 'file', filename: '$DIR/meta.qcow2' }, size: 8388608, 'cluster-size': 4096, preallocation: 'metadata' }),
  untilJob('c11', 'concluded'),
  { execute: 'job-dismiss', arguments: { id: 'c11' } },
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
];

test('blockdev-create jobs and the job verbs follow qemu-storage-daemon', async () => {
  const theirs = await runTranscript(peers.qsd.socket, peers.qsd.dir, STEPS);
  const ours = await runTranscript(peers.blockd.socket, peers.blockd.dir, STEPS);
  assert.deepEqual(transcriptDifferences(ours, theirs), []);
  await peers.stopBlockd(); // releases the image locks for qemu-img check
  const [blockdDir, qsdDir] = [peers.blockd.dir, peers.qsd.dir];
  for (const name of ['disk.qcow2', 'small.qcow2', 'meta.qcow2']) {
    assert.ok(readFileSync(join(blockdDir, name)).equals(readFileSync(join(qsdDir, name))), `${name}: the same bytes as QEMU's`);
    assertCheckClean(join(blockdDir, name), name);
  }
  assert.ok(readFileSync(join(blockdDir, 'prealloc.raw')).equals(readFileSync(join(qsdDir, 'prealloc.raw'))));
});
