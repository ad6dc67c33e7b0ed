/*
 * The nbd driver seen over QMP, differentially: the same script runs against
 * qemu-storage-daemon and blockd (as processes, each with its own directory),
 * both connecting to the same qemu-nbd servers; replies must be equal once the
 * directories are normalised. Covers blockdev-add errors, --blockdev on the
 * command line, pseudo-filenames (unix, TCP, json: over an overlay), block_resize,
 * and a server killed mid-run: both daemons keep answering and delete the nodes.
 */
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { freePort, startQemuNbd, type NbdServer } from '../helpers/nbd-servers.js';
import { makeTempDir } from '../helpers/paths.js';
import { createQcow2, qemuIo } from '../helpers/qemu-tools.js';
import { startQsd, type QsdProcess } from '../helpers/qsd-process.js';
import { RawConnection } from '../helpers/raw-connection.js';

const temp = makeTempDir('blockd-nbd-qmp-');
const qsdDir = join(temp.dir, 'qsd');
const blockdDir = join(temp.dir, 'blockd');
const servers: NbdServer[] = [];
let writable: NbdServer;
let readOnly: NbdServer;
let port: number;
let qsd: QsdProcess;
let blockd: BlockdProcess;

before(async () => {
  const image = createQcow2(join(temp.dir, 'disk.qcow2'), 64 << 20);
  qemuIo(image, ['write -P 0xab 0 64k'], ['-f', 'qcow2']);
  copyFileSync(image, join(temp.dir, 'ro.qcow2'));
  copyFileSync(image, join(temp.dir, 'tcp.qcow2'));
  port = await freePort();
  servers.push(writable = await startQemuNbd(image, { socket: join(temp.dir, 'rw.sock') }, ['-e', '16']));
  servers.push(readOnly = await startQemuNbd(join(temp.dir, 'ro.qcow2'), { socket: join(temp.dir, 'ro.sock') }, ['-r', '-e', '16']));
  servers.push(await startQemuNbd(join(temp.dir, 'tcp.qcow2'), { port }, ['-e', '16']));
  const cli = ['--blockdev', `driver=nbd,node-name=cli,server.type=unix,server.path=${writable.address.type === 'unix' ? writable.address.path : ''},export=disk`];
  for (const dir of [qsdDir, blockdDir]) {
    mkdirSync(dir);
    createQcow2(join(dir, 'ov.qcow2'), 64 << 20);
  }
  qsd = await startQsd(qsdDir, cli);
  blockd = await runBlockd(['--qmp', `unix:${join(blockdDir, 'blockd.sock')}`, ...cli]);
});

after(async () => {
  await qsd?.stop();
  await blockd?.stop();
  for (const server of servers) await server.stop();
  temp.cleanup();
});

const nbd = (name: string, server: object, extra: object = {}) =>
  ({ execute: 'blockdev-add', arguments: { driver: 'nbd', 'node-name': name, server, export: 'disk', ...extra } });

function beforeTheLoss(): object[] {
  const rw = writable.address;
  const ro = readOnly.address;
  return [
    nbd('n0', rw),
    nbd('n1', { type: 'unix', path: '$DIR/nosuch.sock' }),
    nbd('n2', rw, { export: 'nope' }),
    nbd('n3', ro),
    nbd('n4', ro, { 'auto-read-only': true }),
    nbd('n5', ro, { 'read-only': true }),
    nbd('n6', { type: 'inet', host: '127.0.0.1', port: '1' }),
    nbd('n7', { type: 'inet', host: '127.0.0.1', port: String(port) }),
    { execute: 'blockdev-add', arguments: { driver: 'nbd', 'node-name': 'n8', server: rw } },
    nbd('n9', { type: 'fd', str: '3' }),
    nbd('n10', rw, { 'reconnect-delay': 2, 'open-timeout': 5 }), // its flush at blockdev-del waits 2 s for the killed server, in both daemons
    nbd('n11', { type: 'inet', host: '127.0.0.1', port: String(port), ipv4: true }),
    nbd('n12', { type: 'inet', host: 'nosuchhost.invalid', port: '10809' }),
    nbd('n13', { type: 'inet', host: '127.0.0.1', port: 'nbd' }),
    { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'ov', file: { driver: 'file', filename: '$DIR/ov.qcow2' }, backing: 'n0' } },
    { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'r1', file: 'n5', size: 1048576, 'read-only': true } },
    { execute: 'query-named-block-nodes', arguments: { flat: true } },
    { execute: 'query-named-block-nodes' },
    { execute: 'block_resize', arguments: { 'node-name': 'n7', size: 1048576 } },
    { execute: 'block_resize', arguments: { 'node-name': 'n7', size: 134217728 } },
    { execute: 'block_resize', arguments: { 'node-name': 'n7', size: 67108864 } },
    { execute: 'block_resize', arguments: { 'node-name': 'n4', size: 1048576 } },
    { execute: 'block_resize', arguments: { 'node-name': 'n0', size: 1048576 } },
    ...['r1', 'n4', 'n5', 'n7', 'n11'].map((name) => ({ execute: 'blockdev-del', arguments: { 'node-name': name } })),
  ];
}

const AFTER_THE_LOSS: object[] = [
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  ...['ov', 'n0', 'n10', 'cli'].map((name) => ({ execute: 'blockdev-del', arguments: { 'node-name': name } })),
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
];

async function run(connection: RawConnection, dir: string, steps: object[]): Promise<string[]> {
  const replies: string[] = [];
  for (const step of steps) {
    connection.send(JSON.stringify(step).replaceAll('$DIR', dir));
    replies.push((await connection.readLine(20_000)).replaceAll(dir, '$DIR').replace(/#block\d+/g, '#blockN'));
  }
  return replies;
}

async function negotiated(socket: string): Promise<RawConnection> {
  const connection = await RawConnection.open(socket);
  await connection.readLine();
  connection.send('{"execute":"qmp_capabilities"}');
  await connection.readLine();
  return connection;
}

function assertSameReplies(steps: object[], ours: string[], theirs: string[]): void {
  const differences = steps.map((step, i) => ({ step, ours: ours[i], theirs: theirs[i] })).filter((d) => d.ours !== d.theirs);
  assert.deepEqual(differences, []);
}

test('nbd nodes over QMP answer exactly as qemu-storage-daemon, also after the server is killed', async () => {
  const theirs = await negotiated(qsd.socket);
  const ours = await negotiated(join(blockdDir, 'blockd.sock'));
  const steps = beforeTheLoss();
  assertSameReplies(steps, await run(ours, blockdDir, steps), await run(theirs, qsdDir, steps));
  await writable.stop('SIGKILL');
  assertSameReplies(AFTER_THE_LOSS, await run(ours, blockdDir, AFTER_THE_LOSS), await run(theirs, qsdDir, AFTER_THE_LOSS));
  ours.end();
  theirs.end();
});
