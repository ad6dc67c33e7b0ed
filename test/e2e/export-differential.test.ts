/*
 * Differential test of the export commands: the same script (QMP commands,
 * NBD clients connecting and leaving, waits for asynchronous events) runs
 * against qemu-storage-daemon and blockd, each in its own directory; the
 * transcripts (replies and events, in order) must be equal once directories
 * and timestamps are normalised.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { test } from 'node:test';
import { differentialPeers } from '../helpers/differential-peers.js';
import { NbdRawClient } from '../helpers/nbd-raw-client.js';
import { runTranscript, transcriptDifferences, type TranscriptStep } from '../helpers/qmp-transcript.js';

const peers = differentialPeers((dir) => {
  spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'disk.qcow2'), '4M']);
});

let client: NbdRawClient | undefined;
const connect = (name: string): TranscriptStep => ({
  action: async (dir) => {
    client = await NbdRawClient.open(join(dir, 'nbd.sock'), name);
    return `client connected to ${name}`;
  },
});
/** A client leaving with NBD_CMD_DISC; once the server has closed the connection, it has let the client go. */
const disconnect: TranscriptStep = {
  action: async () => {
    await client?.disconnect();
    return 'client closed';
  },
};

const exportArgs = (extra: object) => ({ execute: 'block-export-add', arguments: { type: 'nbd', id: 'e0', 'node-name': 'q0', ...extra } });

/** The script; "$DIR" is each server's own directory. */
const STEPS: TranscriptStep[] = [
  exportArgs({}),
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'q0', file: { driver: 'file', 'node-name': 'f0', filename: '$DIR/disk.qcow2' } } },
  { execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'ro', 'read-only': true, size: 1048576 } },
  exportArgs({}),
  { execute: 'nbd-server-stop' },
  { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$DIR/nbd.sock' } } } },
  { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$DIR/nbd2.sock' } } } },
  exportArgs({ id: '1x' }),
  exportArgs({ id: 'a b' }),
  exportArgs({ 'node-name': 'nosuch' }),
  exportArgs({ 'node-name': 'ro', writable: true }),
  exportArgs({ name: 'n'.repeat(4097) }),
  exportArgs({ description: 'd'.repeat(4097) }),
  exportArgs({ bitmaps: ['bm0'] }),
  exportArgs({ bitmaps: [{ node: 'q0', name: 'bm0' }] }),
  exportArgs({ bitmaps: [{ node: 'nosuch', name: 'bm0' }] }),
  exportArgs({ iothread: 'io0' }),
  exportArgs({ type: 'fuse' }),
  exportArgs({ name: 'disk', writable: true, description: 'the disk', 'allocation-depth': true }),
  exportArgs({ name: 'other' }),
  exportArgs({ id: 'e1', name: 'disk' }),
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e2', 'node-name': 'ro' } },
  { execute: 'query-block-exports' },
  { execute: 'blockdev-del', arguments: { 'node-name': 'q0' } },
  { execute: 'blockdev-del', arguments: { 'node-name': 'ro' } },
  { execute: 'block_resize', arguments: { 'node-name': 'q0', size: 8388608 } },
  { execute: 'nbd-server-add', arguments: { device: 'nosuch' } },
  { execute: 'nbd-server-add', arguments: { device: 'ro', writable: true, name: 'legacy' } },
  { execute: 'nbd-server-add', arguments: { device: 'q0' } },
  { execute: 'query-block-exports' },
  connect('disk'),
  { execute: 'block-export-del', arguments: { id: 'e0' } },
  { execute: 'block-export-del', arguments: { id: 'nosuch' } },
  { execute: 'block-export-del', arguments: { id: 'e0', mode: 'hard' } },
  { awaitEvent: { event: 'BLOCK_EXPORT_DELETED', data: { id: 'e0' } } },
  { execute: 'query-block-exports' },
  { execute: 'nbd-server-remove', arguments: { name: 'legacy' } },
  { execute: 'nbd-server-remove', arguments: { name: 'legacy' } },
  disconnect,
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e3', 'node-name': 'q0', name: 'again', writable: true } },
  { execute: 'query-block-exports' },
  connect('again'),
  disconnect,
  { execute: 'nbd-server-stop' },
  { execute: 'query-block-exports' },
  { execute: 'nbd-server-stop' },
  { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$DIR/nbd.sock' } }, 'tls-creds': 'tls0' } },
  { execute: 'nbd-server-start', arguments: { addr: { type: 'inet', data: { host: '127.0.0.1', port: 'abc' } } } },
  { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$DIR/nodir/nbd.sock' } } } },
  { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$DIR/nbd.sock' } }, 'max-connections': 1 } },
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e4', 'node-name': 'ro' } },
  { execute: 'blockdev-del', arguments: { 'node-name': 'q0' } },
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  { execute: 'nbd-server-add', arguments: { device: 'ro', name: 'last' } },
  { execute: 'quit' },
];

test('export commands and their events follow qemu-storage-daemon', async () => {
  const expected = await runTranscript(peers.qsd.socket, peers.qsd.dir, STEPS);
  const actual = await runTranscript(peers.blockd.socket, peers.blockd.dir, STEPS);
  assert.deepEqual(transcriptDifferences(actual, expected), []);
});
