/*
 * Differential test of the node-graph commands: the same script runs against
 * qemu-storage-daemon and blockd, each in its own directory holding the same
 * files; replies must be equal once the directory and generated node names
 * (#blockNNN) are normalised. Covers blockdev-add/del on file, raw and
 * null-co with their error cases, block_resize, block-set-write-threshold and
 * query-named-block-nodes.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { differentialPeers } from '../helpers/differential-peers.js';
import { runTranscript, transcriptDifferences } from '../helpers/qmp-transcript.js';

const peers = differentialPeers((dir) => {
  mkdirSync(join(dir, 'sub'), { recursive: true });
  writeFileSync(join(dir, 'disk.raw'), Buffer.alloc(8192, 1));
  for (const name of ['base0.qcow2', 'base.qcow2', 'o2.qcow2', 'o3.qcow2', 'o5.qcow2']) spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, name), '4M']);
});

/** The script; "$DIR" is each server's own directory. */
const STEPS: object[] = [
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'f', filename: '$DIR/disk.raw' } },
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'r', file: 'f' } },
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'r2', file: { driver: 'file', filename: '$DIR/disk.raw' } } },
  { execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'n', size: 1048576 } },
  { execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'n2', 'read-zeroes': true, 'latency-ns': 10 } },
  { execute: 'blockdev-add', arguments: { driver: 'raw', file: 'f' } },
  { execute: 'blockdev-add', arguments: { 'node-name': 'x' } },
  { execute: 'blockdev-add', arguments: { driver: 'bogus', 'node-name': 'x' } },
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'x' } },
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'x', filename: '$DIR/nonexist.raw' } },
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'x', filename: '$DIR/sub' } },
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'f', filename: '$DIR/disk.raw' } },
  ...['1abc', '', 'a b', '_x', '#block1', 'a'.repeat(32)].map((name) => ({ execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': name } })),
  { execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'A-b.c_d', size: 512 } },
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'x', file: 'nonode' } },
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'x', file: 5 } },
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'x', file: 'f', offset: 9000 } },
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'x', file: 'f', offset: 4096, size: 8192 } },
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'x', file: 'f', size: 1000 } },
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'w', file: 'f', offset: 512, size: 4096 } },
  { execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'x', 'force-share': true } },
  { execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'x', 'detect-zeroes': 'unmap' } },
  { execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'x', 'latency-ns': -1 } },
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'x', filename: '$DIR/disk.raw', aio: 'native' } },
  { execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'ro', 'read-only': true, 'force-share': true, 'detect-zeroes': 'on' } },
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  { execute: 'query-named-block-nodes' },
  { execute: 'blockdev-del', arguments: { 'node-name': 'nosuch' } },
  { execute: 'blockdev-del', arguments: { 'node-name': 'f' } },
  { execute: 'block_resize', arguments: { 'node-name': 'n', size: 4096 } },
  { execute: 'block_resize', arguments: { 'node-name': 'n', size: -1 } },
  { execute: 'block_resize', arguments: { size: 4096 } },
  { execute: 'block_resize', arguments: { device: 'f', size: 4096 } },
  { execute: 'block_resize', arguments: { 'node-name': 'w', size: 8192 } },
  { execute: 'block_resize', arguments: { 'node-name': 'r2', size: 16384 } },
  { execute: 'block-set-write-threshold', arguments: { 'node-name': 'nosuch', 'write-threshold': 1 } },
  { execute: 'block-set-write-threshold', arguments: { 'node-name': 'r', 'write-threshold': 4096 } },
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  { execute: 'object-add', arguments: { 'qom-type': 'throttle-group', id: 'tg0', limits: { 'iops-total': 1000 } } },
  { execute: 'object-add', arguments: { 'qom-type': 'throttle-group', id: 'tg0' } },
  { execute: 'object-add', arguments: { 'qom-type': 'throttle-group', id: '1x' } },
  { execute: 'object-add', arguments: { 'qom-type': 'bogus', id: 'x' } },
  { execute: 'object-add', arguments: { 'qom-type': 'throttle-group', id: 'tg1', limits: { 'bps-total': 10, 'bps-read': 5 } } },
  { execute: 'object-add', arguments: { 'qom-type': 'throttle-group', id: 'tg1', limits: { 'bps-total-max': 10 } } },
  { execute: 'object-add', arguments: { 'qom-type': 'throttle-group', id: 'tg1', limits: { 'iops-total': 10000000000000000 } } },
  { execute: 'object-add', arguments: { 'qom-type': 'throttle-group', id: 'tg1', 'x-bps-total': 1048576 } },
  { execute: 'blockdev-add', arguments: { driver: 'throttle', 'node-name': 'x', 'throttle-group': 'nosuch', file: 'n' } },
  { execute: 'blockdev-add', arguments: { driver: 'throttle', 'node-name': 't', 'throttle-group': 'tg0', file: 'n' } },
  { execute: 'blockdev-add', arguments: { driver: 'copy-on-read', 'node-name': 'c', file: 'r2' } },
  { execute: 'blockdev-add', arguments: { driver: 'blkdebug', 'node-name': 'b', image: 'n2', 'inject-error': [{ event: 'read_aio', errno: 5 }] } },
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  { execute: 'object-del', arguments: { id: 'tg0' } },
  { execute: 'object-del', arguments: { id: 'nosuch' } },
  ...['t', 'c', 'b'].map((name) => ({ execute: 'blockdev-del', arguments: { 'node-name': name } })),
  { execute: 'object-del', arguments: { id: 'tg0' } },
  { execute: 'object-del', arguments: { id: 'tg1' } },
  ...['w', 'r', 'r2', 'f', 'n', 'n2', 'A-b.c_d', 'ro'].map((name) => ({ execute: 'blockdev-del', arguments: { 'node-name': name } })),
  { execute: 'query-named-block-nodes' },
  // external snapshots
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'base', file: { driver: 'file', filename: '$DIR/base.qcow2' } } },
  { execute: 'blockdev-snapshot-sync', arguments: { 'node-name': 'base', 'snapshot-file': '$DIR/ov1.qcow2' } },
  { execute: 'blockdev-snapshot-sync', arguments: { device: 'base', 'snapshot-file': '$DIR/ov1.qcow2' } },
  { execute: 'blockdev-snapshot-sync', arguments: { 'node-name': 'nosuch', 'snapshot-file': '$DIR/ov1.qcow2', 'snapshot-node-name': 'ov1' } },
  { execute: 'blockdev-snapshot-sync', arguments: { 'node-name': 'base', 'snapshot-file': '$DIR/ov1.qcow2', 'snapshot-node-name': 'base' } },
  { execute: 'blockdev-snapshot-sync', arguments: { 'node-name': 'base', 'snapshot-file': '$DIR/nodir/ov1.qcow2', 'snapshot-node-name': 'ov1' } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'base0', file: { driver: 'file', filename: '$DIR/base0.qcow2' } } },
  { execute: 'blockdev-snapshot-sync', arguments: { 'node-name': 'base0', 'snapshot-file': '$DIR/ov0.qcow2', 'snapshot-node-name': 'ov0' } },
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  { execute: 'object-add', arguments: { 'qom-type': 'throttle-group', id: 'tg2' } },
  { execute: 'blockdev-add', arguments: { driver: 'throttle', 'node-name': 'user', 'throttle-group': 'tg2', file: 'base' } },
  { execute: 'blockdev-snapshot-sync', arguments: { 'node-name': 'base', 'snapshot-file': '$DIR/ov1.qcow2', 'snapshot-node-name': 'ov1' } },
  { execute: 'query-named-block-nodes' },
  { execute: 'blockdev-snapshot', arguments: { node: 'base', overlay: 'ov1' } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'o2', file: { driver: 'file', filename: '$DIR/o2.qcow2' }, backing: null } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'o3', file: { driver: 'file', filename: '$DIR/o3.qcow2' } } },
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'o4', file: { driver: 'file', filename: '$DIR/disk.raw' } } },
  { execute: 'blockdev-snapshot', arguments: { node: 'nosuch', overlay: 'o2' } },
  { execute: 'blockdev-snapshot', arguments: { node: 'ov1', overlay: 'nosuch' } },
  { execute: 'blockdev-snapshot', arguments: { node: 'ov1', overlay: 'user' } },
  { execute: 'blockdev-snapshot', arguments: { node: 'ov1', overlay: 'o4' } },
  { execute: 'blockdev-snapshot', arguments: { node: 'ov1', overlay: 'o2' } },
  { execute: 'query-named-block-nodes' },
  // an overlay put under a node that already stands on it would close a cycle
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'o5', file: { driver: 'file', filename: '$DIR/o5.qcow2' }, backing: null } },
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'o5-raw', file: 'o5' } },
  { execute: 'blockdev-snapshot', arguments: { node: 'o5-raw', overlay: 'o5' } },
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  ...['o5-raw', 'o5'].map((name) => ({ execute: 'blockdev-del', arguments: { 'node-name': name } })),
  // an overlay standing on the node it is put on: the parents below the overlay keep the node
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'o6-file', filename: '$DIR/o5.qcow2' } },
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'o6-raw', file: 'o6-file' } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'o6', file: 'o6-raw', backing: null } },
  { execute: 'blockdev-snapshot', arguments: { node: 'o6-file', overlay: 'o6' } },
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  ...['o6', 'o6-raw', 'o6-file'].map((name) => ({ execute: 'blockdev-del', arguments: { 'node-name': name } })),
  // a snapshot of a file node names "file" as the backing format; the overlay opens with it
  { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'o7-file', filename: '$DIR/o5.qcow2' } },
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'o7-raw', file: 'o7-file' } },
  { execute: 'blockdev-snapshot-sync', arguments: { 'node-name': 'o7-file', 'snapshot-file': '$DIR/o7.qcow2', 'snapshot-node-name': 'o7' } },
  ...['o7-raw'].map((name) => ({ execute: 'blockdev-del', arguments: { 'node-name': name } })),
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'o7', file: { driver: 'file', filename: '$DIR/o7.qcow2' }, 'read-only': true } },
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  { execute: 'blockdev-del', arguments: { 'node-name': 'o7' } },
  { execute: 'blockdev-del', arguments: { 'node-name': 'base' } },
  { execute: 'blockdev-del', arguments: { 'node-name': 'user' } },
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  ...['o2', 'o3', 'o4', 'base', 'base0'].map((name) => ({ execute: 'blockdev-del', arguments: { 'node-name': name } })),
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
];

test('node-graph commands answer exactly as qemu-storage-daemon', async () => {
  const expected = await runTranscript(peers.qsd.socket, peers.qsd.dir, STEPS);
  const actual = await runTranscript(peers.blockd.socket, peers.blockd.dir, STEPS);
  assert.deepEqual(transcriptDifferences(actual, expected), []);
});
