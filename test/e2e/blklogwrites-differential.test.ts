/*
 * Differential test of the blklogwrites filter: the same script against
 * qemu-storage-daemon and blockd must get the same replies. Covers its option
 * errors, a qcow2 image over it (query-named-block-nodes, flat and not: json
 * filenames, sizes that leave the log out, the backing file named relative
 * to the file under the filter, a log QEMU began continued), the refusal to reopen it read-write for a commit, and blockdev-del.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { differentialPeers } from '../helpers/differential-peers.js';
import { describeDifferences, runTranscript } from '../helpers/qmp-transcript.js';

const peers = differentialPeers((dir) => {
  const qemuImg = (...args: string[]) => spawnSync('qemu-img', args);
  qemuImg('create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '4M');
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'top.qcow2'));
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'over.qcow2'));
  qemuImg('create', '-q', '-f', 'qcow2', join(dir, 'snap.qcow2'), '4M');
  qemuImg('create', '-q', '-f', 'raw', join(dir, 'junk.raw'), '64k');
  spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 7 0 64k', join(dir, 'junk.raw')]);
  for (const log of ['top.log', 'base.log', 'empty.log']) writeFileSync(join(dir, log), '');
  // A log QEMU began, which the nodes below continue (log-append): the filter's size must leave it out.
  const image = `driver=qcow2,file.driver=blklogwrites,file.file.driver=file,file.file.filename=${join(dir, 'top.qcow2')},file.log.driver=file,file.log.filename=${join(dir, 'top.log')}`;
  spawnSync('qemu-io', ['--image-opts', '-c', 'write -P 1 0 64k', image]);
});

const file = (name: string) => ({ driver: 'file', filename: `$DIR/${name}` });
const logged = (extra: object) => ({ driver: 'blklogwrites', 'node-name': 'x', file: file('top.qcow2'), log: file('empty.log'), ...extra });

const STEPS: object[] = [
  ...[{ 'log-sector-size': 1000 }, { 'log-sector-size': 16 }, { 'log-sector-size': 33554432 }, { 'log-sector-size': -1 },
    { 'log-append': true, 'log-sector-size': 512 }, { 'log-super-update-interval': 0 }, { log: file('junk.raw'), 'log-append': true }, { log: undefined }]
    .map((extra) => ({ execute: 'blockdev-add', arguments: logged(extra) })),
  {
    execute: 'blockdev-add',
    arguments: { driver: 'qcow2', 'node-name': 'top', file: { driver: 'blklogwrites', 'node-name': 'top-log', 'log-append': true, file: file('top.qcow2'), log: file('top.log') } },
  },
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  { execute: 'query-named-block-nodes' },
  // The snapshot's reopen of the old node read-only fails, and QEMU keeps the node writable.
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'snap', file: file('snap.qcow2'), backing: null } },
  { execute: 'blockdev-snapshot', arguments: { node: 'top', overlay: 'snap' } },
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  {
    execute: 'blockdev-add',
    arguments: { driver: 'qcow2', 'node-name': 'base', 'read-only': true, file: { driver: 'blklogwrites', 'node-name': 'base-log', 'log-sector-size': 4096, file: file('base.qcow2'), log: file('base.log') } },
  },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'over', file: file('over.qcow2'), backing: 'base' } },
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  { execute: 'block-commit', arguments: { 'job-id': 'c', device: 'over' } },
  { execute: 'query-jobs' },
  ...['snap', 'top', 'over', 'base'].map((name) => ({ execute: 'blockdev-del', arguments: { 'node-name': name } })),
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
];

test('blklogwrites nodes answer exactly as in qemu-storage-daemon', async () => {
  const expected = await runTranscript(peers.qsd.socket, peers.qsd.dir, STEPS);
  const actual = await runTranscript(peers.blockd.socket, peers.blockd.dir, STEPS);
  assert.ok(expected.some((line) => line.includes('"drv": "blklogwrites"')), 'QEMU lists the filter');
  assert.deepEqual(actual, expected, describeDifferences(actual, expected));
});
