/*
 * Differential test of the export commands: the same script (QMP commands,
 * NBD clients connecting and leaving, pauses for asynchronous events) runs
 * against qemu-storage-daemon and blockd, each in its own directory; the
 * transcripts (replies and events, in order) must be equal once directories
 * and timestamps are normalised.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { NbdRawClient } from '../helpers/nbd-raw-client.js';
import { makeTempDir } from '../helpers/paths.js';
import { startQsd, type QsdProcess } from '../helpers/qsd-process.js';
import { RawConnection } from '../helpers/raw-connection.js';

const temp = makeTempDir();
let qsd: QsdProcess;
let blockd: BlockdProcess;
const qsdDir = join(temp.dir, 'qsd');
const blockdDir = join(temp.dir, 'blockd');

before(async () => {
  for (const dir of [qsdDir, blockdDir]) {
    mkdirSync(dir, { recursive: true });
    spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'disk.qcow2'), '4M']);
  }
  qsd = await startQsd(qsdDir);
  blockd = await runBlockd(['--qmp', `unix:${join(blockdDir, 'blockd.sock')}`]);
});

after(async () => {
  await qsd.stop();
  await blockd.stop();
  temp.cleanup();
});

type Step = object | { client: 'connect'; export: string } | { client: 'disconnect' } | { pause: number };

const exportArgs = (extra: object) => ({ execute: 'block-export-add', arguments: { type: 'nbd', id: 'e0', 'node-name': 'q0', ...extra } });

/** The script; "$DIR" is each server's own directory. */
const STEPS: Step[] = [
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
  { client: 'connect', export: 'disk' },
  { execute: 'block-export-del', arguments: { id: 'e0' } },
  { execute: 'block-export-del', arguments: { id: 'nosuch' } },
  { execute: 'block-export-del', arguments: { id: 'e0', mode: 'hard' } },
  { pause: 300 },
  { execute: 'query-block-exports' },
  { execute: 'nbd-server-remove', arguments: { name: 'legacy' } },
  { execute: 'nbd-server-remove', arguments: { name: 'legacy' } },
  { pause: 300 },
  { client: 'disconnect' },
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e3', 'node-name': 'q0', name: 'again', writable: true } },
  { execute: 'query-block-exports' },
  { client: 'connect', export: 'again' },
  { client: 'disconnect' },
  { pause: 300 },
  { execute: 'nbd-server-stop' },
  { pause: 300 },
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

async function run(socket: string, dir: string): Promise<string[]> {
  const connection = await RawConnection.negotiated(socket);
  const transcript: string[] = [];
  const record = (line: string) => transcript.push(
    line.replaceAll(dir, '$DIR').replace(/"timestamp": \{[^}]*\}/, '"timestamp": {}').replace(/#block\d+/g, '#blockN'),
  );
  const drainEvents = async () => {
    for (;;) {
      try {
        record(await connection.readLine(100));
      } catch {
        return;
      }
    }
  };
  let client: NbdRawClient | undefined;
  for (const step of STEPS) {
    if ('pause' in step) {
      await new Promise((resolve) => setTimeout(resolve, step.pause));
      await drainEvents();
    } else if ('client' in step) {
      if (step.client === 'connect') {
        client = await NbdRawClient.open(join(dir, 'nbd.sock'), step.export);
        transcript.push(`client connected to ${step.export}`);
      } else {
        client?.close();
        transcript.push('client closed');
      }
    } else {
      connection.send(JSON.stringify(step).replaceAll('$DIR', dir));
      for (;;) {
        const line = await connection.readLine(10_000);
        record(line);
        if (!line.startsWith('{"timestamp"')) break;
      }
    }
  }
  connection.end();
  return transcript;
}

test('export commands and their events follow qemu-storage-daemon', async () => {
  const expected = await run(qsd.socket, qsdDir);
  const actual = await run(join(blockdDir, 'blockd.sock'), blockdDir);
  const differences = expected.map((theirs, i) => ({ i, ours: actual[i], theirs })).filter((d) => d.ours !== d.theirs);
  assert.deepEqual(differences, []);
  assert.equal(actual.length, expected.length);
});
