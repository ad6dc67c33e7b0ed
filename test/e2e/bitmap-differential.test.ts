/*
 * Differential test of the dirty bitmap commands: one script runs against
 * qemu-storage-daemon and blockd. It adds bitmaps in every form, refuses bad ones,
 * writes, zeroes and discards through an NBD export with qemu-io, resizes, merges
 * (across nodes and granularities), clears, enables, disables and removes. The
 * transcripts (replies, query output and sha256 values, in order) must be equal.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { test } from 'node:test';
import { differentialPeers } from '../helpers/differential-peers.js';
import { describeDifferences, maskImageBitmaps, maskImageSizes, runTranscript, type TranscriptStep } from '../helpers/qmp-transcript.js';

const peers = differentialPeers((dir) => {
  const create = (name: string, ...options: string[]) => spawnSync('qemu-img', ['create', '-q', ...options, join(dir, name), '4M']);
  create('disk.qcow2', '-f', 'qcow2');
  create('small.qcow2', '-f', 'qcow2', '-o', 'cluster_size=512');
  create('big.qcow2', '-f', 'qcow2', '-o', 'cluster_size=2M');
  create('old.qcow2', '-f', 'qcow2', '-o', 'compat=0.10');
  create('disk.raw', '-f', 'raw');
  create('base.qcow2', '-f', 'qcow2');
  spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 0 192k', '-c', 'write -P 8 1M 64k', '-c', 'write -P 9 3M 4k', join(dir, 'base.qcow2')]);
  spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'top.qcow2')]);
  create('cbase.qcow2', '-f', 'qcow2');
  create('cmid.qcow2', '-f', 'qcow2');
  create('ctop.qcow2', '-f', 'qcow2');
  spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 11 128k 64k', '-c', 'write -P 12 2M 8k', join(dir, 'cmid.qcow2')]);
  spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 13 3M 64k', join(dir, 'ctop.qcow2')]);
});

/** qemu-io commands on an export through the daemon's NBD socket; what it says (without timings) goes in the transcript. */
function qemuIoOn(exportName: string, ...commands: string[]): TranscriptStep {
  return {
    action: async (dir) => {
      const args = ['-f', 'raw', ...commands.flatMap((command) => ['-c', command]), `nbd+unix:///${exportName}?socket=${join(dir, 'nbd.sock')}`];
      const result = spawnSync('qemu-io', args, { encoding: 'utf8' });
      const said = `${result.stdout}${result.stderr}`.split('\n').filter((line) => line && !line.includes(' sec (')).join(' | ');
      return `qemu-io ${commands.join('; ')}: exit ${result.status}: ${said}`;
    },
  };
}

const qemuIo = (...commands: string[]) => qemuIoOn('disk', ...commands);
const add = (node: string, name: string, extra: object = {}) => ({ execute: 'block-dirty-bitmap-add', arguments: { node, name, ...extra } });
const verb = (command: string, node: string, name: string) => ({ execute: `block-dirty-bitmap-${command}`, arguments: { node, name } });
const sha256 = (node: string, name: string) => ({ execute: 'x-debug-block-dirty-bitmap-sha256', arguments: { node, name } });
const merge = (node: string, target: string, bitmaps: unknown[]) => ({ execute: 'block-dirty-bitmap-merge', arguments: { node, target, bitmaps } });
const nodes = { execute: 'query-named-block-nodes', arguments: { flat: true } };
const qcow2 = (name: string, file: string, extra: object = {}) => ({
  execute: 'blockdev-add',
  arguments: { driver: 'qcow2', 'node-name': name, ...extra, file: { driver: 'file', 'node-name': `${name}-file`, filename: `$DIR/${file}` } },
});

const STEPS: TranscriptStep[] = [
  qcow2('q0', 'disk.qcow2', { discard: 'unmap' }),
  qcow2('small', 'small.qcow2'),
  qcow2('big', 'big.qcow2'),
  qcow2('old', 'old.qcow2'),
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'r0', file: { driver: 'file', 'node-name': 'r0-file', filename: '$DIR/disk.raw' } } },
  { execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'odd', size: 1048577 } },
  { execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'ro', 'read-only': true, size: 4194304 } },
  { execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'n4', size: 4194304 } },
  // Adding: defaults from the cluster size, every granularity rule, names, nodes.
  add('q0', 'a'),
  add('small', 'a'),
  add('big', 'a'),
  add('r0', 'a'),
  add('r0-file', 'a'),
  add('odd', 'a'),
  add('ro', 'a'),
  add('n4', 'a'),
  add('q0', 'fine', { granularity: 512 }),
  add('q0', 'coarse', { granularity: 2147483648 }),
  add('q0', 'off', { disabled: true, granularity: 4096 }),
  add('q0', 'a'),
  add('q0', ''),
  add('nosuch', 'x'),
  add('q0', 'g', { granularity: 256 }),
  add('q0', 'g', { granularity: 1000 }),
  add('q0', 'g', { granularity: 0 }),
  add('q0', 'g', { granularity: 4294967295 }),
  add('q0', 'g', { granularity: 4294967296 }),
  add('q0', 'g', { granularity: -512 }),
  add('q0', 'g', { granularity: 'big' }),
  add('q0', 'g', { persistent: 'yes' }),
  add('ro', 'p', { persistent: true }),
  add('r0', 'p', { persistent: true }),
  add('r0-file', 'p', { persistent: true }),
  add('old', 'p', { persistent: true }),
  add('small', 'p', { persistent: true, granularity: 512 }),
  add('small', 'p', { persistent: true }),
  { execute: 'block-dirty-bitmap-add', arguments: { node: 'q0' } },
  { execute: 'block-dirty-bitmap-add', arguments: { node: 'q0', name: 'x', extra: 1 } },
  nodes,
  sha256('q0', 'a'),
  sha256('small', 'a'),
  sha256('odd', 'a'),
  // Writes through an NBD export mark the recording bitmaps, not the disabled one.
  { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$DIR/nbd.sock' } } } },
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e0', 'node-name': 'q0', name: 'disk', writable: true } },
  qemuIo('write -P 1 0 1', 'write -P 2 65535 2', 'write -P 3 1048576 300k', 'write -P 4 4193792 512'),
  nodes,
  sha256('q0', 'a'),
  sha256('q0', 'fine'),
  sha256('q0', 'coarse'),
  sha256('q0', 'off'),
  verb('clear', 'q0', 'a'),
  verb('clear', 'q0', 'fine'),
  qemuIo('write -z 2097152 128k', 'discard 3145728 64k', 'write -z -u 393216 4k'),
  nodes,
  sha256('q0', 'a'),
  sha256('q0', 'fine'),
  // Enabling and disabling.
  verb('disable', 'q0', 'a'),
  verb('disable', 'q0', 'a'),
  verb('enable', 'q0', 'off'),
  verb('enable', 'q0', 'off'),
  qemuIo('write -P 5 2621440 8k'),
  nodes,
  sha256('q0', 'a'),
  sha256('q0', 'off'),
  verb('enable', 'q0', 'a'),
  verb('enable', 'nosuch', 'a'),
  verb('disable', 'q0', 'nosuch'),
  // Merging: by name and by node, across granularities and nodes, and refusals.
  merge('q0', 'a', ['fine', 'off']),
  sha256('q0', 'a'),
  merge('q0', 'fine', ['coarse']),
  sha256('q0', 'fine'),
  merge('q0', 'off', [{ node: 'n4', name: 'a' }, 'a']),
  sha256('q0', 'off'),
  merge('q0', 'a', [{ node: 'odd', name: 'a' }]),
  merge('q0', 'a', [{ node: 'r0-file', name: 'a' }]),
  merge('q0', 'a', ['nosuch']),
  merge('q0', 'nosuch', ['a']),
  merge('q0', 'a', [{ node: 'nosuch', name: 'a' }]),
  merge('q0', 'a', [{ node: 'n4', name: 'nosuch' }]),
  merge('q0', 'a', [{ node: 'n4' }]),
  merge('q0', 'a', [7]),
  merge('nosuch', 'a', ['a']),
  merge('q0', 'a', ['a']),
  sha256('q0', 'a'),
  nodes,
  // Resizing grows and shrinks every bitmap of the node.
  // An export holds its node's size: the resizes happen between exports.
  { execute: 'block_resize', arguments: { 'node-name': 'q0', size: 8388608 } },
  { execute: 'block-export-del', arguments: { id: 'e0' } },
  { awaitEvent: { event: 'BLOCK_EXPORT_DELETED', data: { id: 'e0' } } },
  { execute: 'block_resize', arguments: { 'node-name': 'q0', size: 8388608 } },
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e1', 'node-name': 'q0', name: 'disk', writable: true } },
  qemuIo('write -P 6 7340032 4k'),
  nodes,
  sha256('q0', 'a'),
  sha256('q0', 'fine'),
  { execute: 'block-export-del', arguments: { id: 'e1' } },
  { awaitEvent: { event: 'BLOCK_EXPORT_DELETED', data: { id: 'e1' } } },
  { execute: 'block_resize', arguments: { 'node-name': 'q0', size: 1048576 } },
  nodes,
  sha256('q0', 'a'),
  sha256('q0', 'fine'),
  // Removing.
  verb('remove', 'q0', 'a'),
  verb('remove', 'q0', 'a'),
  verb('remove', 'nosuch', 'a'),
  verb('clear', 'q0', 'a'),
  sha256('q0', 'a'),
  sha256('nosuch', 'a'),
  add('q0', 'a', { granularity: 1024 }),
  sha256('q0', 'a'),
  nodes,
  // Writes through a filter mark the filter's bitmaps and its child's; so do its copy-on-read
  // writes into the child, and a job's writes (stream copies the base's clusters into the top).
  qcow2('top', 'top.qcow2'),
  { execute: 'blockdev-add', arguments: { driver: 'copy-on-read', 'node-name': 'cor', file: 'top' } },
  add('top', 't'),
  add('cor', 'f', { granularity: 4096 }),
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e2', 'node-name': 'cor', name: 'filtered', writable: true } },
  qemuIoOn('filtered', 'write -P 10 2M 1k', 'read -P 7 64k 4k'),
  nodes,
  sha256('top', 't'),
  sha256('cor', 'f'),
  verb('clear', 'top', 't'),
  { execute: 'block-export-del', arguments: { id: 'e2' } },
  { awaitEvent: { event: 'BLOCK_EXPORT_DELETED', data: { id: 'e2' } } },
  { execute: 'blockdev-del', arguments: { 'node-name': 'cor' } },
  { execute: 'block-stream', arguments: { 'job-id': 's0', device: 'top' } },
  { awaitEvent: { event: 'JOB_STATUS_CHANGE', data: { id: 's0', status: 'null' } } },
  sha256('top', 't'),
  nodes,
  // Commit writes into its base mark the base's bitmaps: an intermediate commit, then an active one.
  qcow2('cbase', 'cbase.qcow2'),
  qcow2('cmid', 'cmid.qcow2', { backing: 'cbase' }),
  qcow2('ctop', 'ctop.qcow2', { backing: 'cmid' }),
  add('cbase', 'c', { granularity: 8192 }),
  { execute: 'block-commit', arguments: { 'job-id': 'c0', device: 'ctop', 'top-node': 'cmid', 'base-node': 'cbase' } },
  { awaitEvent: { event: 'JOB_STATUS_CHANGE', data: { id: 'c0', status: 'null' } } },
  sha256('cbase', 'c'),
  verb('clear', 'cbase', 'c'),
  { execute: 'block-commit', arguments: { 'job-id': 'c1', device: 'ctop' } },
  { awaitEvent: { event: 'BLOCK_JOB_READY', data: { device: 'c1' } } },
  { execute: 'job-complete', arguments: { id: 'c1' } },
  { awaitEvent: { event: 'JOB_STATUS_CHANGE', data: { id: 'c1', status: 'null' } } },
  sha256('cbase', 'c'),
  nodes,
  { execute: 'quit' },
];

test('dirty bitmap commands follow qemu-storage-daemon: replies, queries and sha256 values', async () => {
  // Where written clusters land in the qcow2 file is not what this test is about: file sizes are masked. So is the
  // image's bitmaps list: blockd writes a persistent bitmap into the image at once, QEMU at close (qcow2-bitmaps-daemon.test.ts).
  const mask = (line: string) => maskImageBitmaps(maskImageSizes(line));
  const expected = await runTranscript(peers.qsd.socket, peers.qsd.dir, STEPS, mask);
  const actual = await runTranscript(peers.blockd.socket, peers.blockd.dir, STEPS, mask);
  assert.equal(describeDifferences(actual, expected, 8), '');
});
