/*
 * Dirty bitmaps over NBD, differential: the same script runs against qemu-storage-daemon
 * and blockd. Bitmaps are added over QMP on a qcow2 overlay and its backing file, exported
 * (names found down the chain, {node, name} pairs, refusals), written through the export
 * with qemu-io; then nbdinfo --map=qemu:dirty-bitmap:NAME, qemu-img map over x-dirty-bitmap,
 * a raw client's LIST/SET replies (context ids) and BLOCK_STATUS chunks (order, REQ_ONE,
 * unaligned ranges) must read the same from both. Exported bitmaps are busy until the
 * export is gone, also when it is deleted under a connected client. Finally each daemon's
 * own nbd client opens a third server's bitmap with x-dirty-bitmap and re-exports it: qemu-img
 * map and nbdinfo over that re-export agree too.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { decodeMetaContextReply, encodeInfoRequest, encodeMetaContextRequest } from '../../src/nbd/messages.js';
import { ClientFlag, Command, CommandFlag, Info, Option, OptionReply } from '../../src/nbd/protocol.js';
import { differentialPeers } from '../helpers/differential-peers.js';
import { NbdRawClient } from '../helpers/nbd-raw-client.js';
import { startQemuNbd, type NbdServer } from '../helpers/nbd-servers.js';
import { makeTempDir } from '../helpers/paths.js';
import { createQcow2, MiB, qemuIo, runQemuImg } from '../helpers/qemu-tools.js';
import { describeDifferences, maskImageSizes, runTranscript, transcriptDifferences, type TranscriptStep } from '../helpers/qmp-transcript.js';

const peers = differentialPeers((dir) => {
  createQcow2(join(dir, 'base.qcow2'), 4 * MiB);
  qemuIo(join(dir, 'base.qcow2'), ['write -P 0x11 0 1M'], ['-f', 'qcow2']);
  spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', join(dir, 'base.qcow2'), '-F', 'qcow2', join(dir, 'top.qcow2')]);
});

/** A third server, qemu-nbd, with a persistent bitmap dirtied by qemu-io before it started: both daemons' nbd clients read it. */
const external = makeTempDir();
let remote: NbdServer;
before(async () => {
  const image = join(external.dir, 'remote.qcow2');
  createQcow2(image, 4 * MiB);
  runQemuImg('bitmap', '--add', '-g', '65536', image, 'rbm');
  qemuIo(image, ['write -P 0x22 100k 10k', 'write -P 0x23 1M 300k', 'write -z 3M 64k'], ['-f', 'qcow2']);
  remote = await startQemuNbd(image, { socket: join(external.dir, 'remote.sock') }, ['-r', '-B', 'rbm']);
});
after(async () => {
  await remote.stop();
  external.cleanup();
});

const tool = (command: string, args: string[]) => {
  const result = spawnSync(command, args, { encoding: 'utf8' });
  return `$ ${command} ${args.join(' ')}\n${result.stdout}${result.stderr}exit ${result.status}`;
};
const uri = (dir: string, name: string) => `nbd+unix:///${name}?socket=${dir}/nbd.sock`;
const nbdinfoMap = (name: string, context: string): TranscriptStep => ({
  action: async (dir) => tool('nbdinfo', [`--map=${context}`, uri(dir, name)]).replaceAll(dir, '$DIR'),
});
const qemuImgMapBitmap = (name: string, bitmap: string): TranscriptStep => ({
  action: async (dir) =>
    tool('qemu-img', ['map', '--output=json', '--image-opts', `driver=nbd,export=${name},server.type=unix,server.path=${dir}/nbd.sock,x-dirty-bitmap=qemu:dirty-bitmap:${bitmap}`]).replaceAll(dir, '$DIR'),
});
const qemuIoThrough = (name: string, commands: string[]): TranscriptStep => ({
  action: async (dir) => tool('qemu-io', ['-f', 'raw', ...commands.flatMap((command) => ['-c', command]), uri(dir, name)])
    .replaceAll(dir, '$DIR').replace(/\d+\.\d+ sec.*$/gm, '(timing)'),
});

/** The contexts a raw client is offered and given, with their ids, and BLOCK_STATUS chunks as they come. */
let held: NbdRawClient | undefined;
const rawClientSession: TranscriptStep = {
  action: async (dir) => {
    const client = await NbdRawClient.connect(join(dir, 'nbd.sock'));
    client.sendClientFlags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES);
    const log: string[] = [];
    const contexts = async (option: number, queries: string[]) => {
      const replies = await client.option(option, encodeMetaContextRequest('disk', queries));
      const named = replies.filter((reply) => reply.type === OptionReply.META_CONTEXT).map((reply) => decodeMetaContextReply(reply.data));
      log.push(`${option === Option.LIST_META_CONTEXT ? 'LIST' : 'SET'} ${JSON.stringify(queries)}: ${named.map((c) => `${c.id} ${c.name}`).join(', ')} / final ${replies[replies.length - 1]!.type}`);
    };
    await contexts(Option.LIST_META_CONTEXT, []);
    await contexts(Option.LIST_META_CONTEXT, ['qemu:dirty-bitmap:']);
    await contexts(Option.LIST_META_CONTEXT, ['qemu:']);
    await contexts(Option.LIST_META_CONTEXT, ['qemu:dirty-bitmap:bb', 'qemu:dirty-bitmap:nosuch']);
    await client.option(Option.STRUCTURED_REPLY);
    await contexts(Option.SET_META_CONTEXT, ['qemu:dirty-bitmap:']);
    await contexts(Option.SET_META_CONTEXT, ['qemu:dirty-bitmap:bb', 'qemu:dirty-bitmap:big', 'base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:bm0', 'qemu:dirty-bitmap:off']);
    const go = await client.option(Option.GO, encodeInfoRequest('disk', [Info.BLOCK_SIZE]));
    log.push(`GO final ${go[go.length - 1]!.type}`);
    for (const [offset, length, flags] of [[0, 4 * MiB, 0], [0, 4 * MiB, CommandFlag.REQ_ONE], [1000, 100_000, 0], [65536 + 7, 2 * MiB, CommandFlag.REQ_ONE], [2 * MiB - 512, 1, 0]] as const) {
      client.request(Command.BLOCK_STATUS, offset, length, flags);
      const chunks = await client.readChunks();
      log.push(`BLOCK_STATUS ${offset}+${length} f${flags}: ${chunks.map((chunk) => `[type ${chunk.type} done ${chunk.done} ${chunk.payload.toString('hex')}]`).join(' ')}`);
    }
    held = client; // stays connected: the export is deleted under it
    return log.join('\n');
  },
};
const disconnectHeld: TranscriptStep = {
  action: async () => {
    await held?.closed();
    return 'the server closed the held client';
  },
};

const exportArgs = (id: string, extra: object) => ({ execute: 'block-export-add', arguments: { type: 'nbd', id, 'node-name': 'q0', ...extra } });
const bitmapCommand = (verb: string, node: string, name: string) => ({ execute: `block-dirty-bitmap-${verb}`, arguments: { node, name } });

const STEPS: TranscriptStep[] = [
  { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$DIR/nbd.sock' } } } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'base', file: { driver: 'file', 'node-name': 'fb', filename: '$DIR/base.qcow2' } } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'q0', backing: 'base', file: { driver: 'file', 'node-name': 'f0', filename: '$DIR/top.qcow2' } } },
  { execute: 'block-dirty-bitmap-add', arguments: { node: 'q0', name: 'bm0' } },
  { execute: 'block-dirty-bitmap-add', arguments: { node: 'q0', name: 'big', granularity: 1048576 } },
  { execute: 'block-dirty-bitmap-add', arguments: { node: 'q0', name: 'off', disabled: true } },
  { execute: 'block-dirty-bitmap-add', arguments: { node: 'base', name: 'bb', granularity: 4096 } },
  { execute: 'block-dirty-bitmap-add', arguments: { node: 'f0', name: 'onfile' } },
  // Refusals: a name is not looked for in a format's file child; enabled bitmaps with a read-only export.
  exportArgs('e0', { name: 'disk', bitmaps: ['onfile'] }),
  exportArgs('e0', { name: 'disk', bitmaps: ['bm0'] }),
  exportArgs('e0', { name: 'disk', bitmaps: ['bb'] }),
  exportArgs('e0', { name: 'disk', bitmaps: [{ node: 'f0', name: 'nosuch' }] }),
  exportArgs('e0', { name: 'ro', bitmaps: ['off', { node: 'f0', name: 'onfile' }] }),
  { execute: 'query-block-exports' },
  { execute: 'block-export-del', arguments: { id: 'e0' } },
  { awaitEvent: { event: 'BLOCK_EXPORT_DELETED', data: { id: 'e0' } } },
  // bb lives on the backing file; the export finds it there.
  exportArgs('e2', { name: 'again', bitmaps: ['off'] }),
  exportArgs('e1', { name: 'disk', writable: true, 'allocation-depth': true, bitmaps: ['bm0', { node: 'q0', name: 'big' }, 'bb', 'off'] }),
  exportArgs('e1', { name: 'disk', writable: true, 'allocation-depth': true, bitmaps: ['bm0', { node: 'q0', name: 'big' }, 'bb', 'bm0'] }),
  { execute: 'nbd-server-add', arguments: { device: 'q0', name: 'legacy', bitmap: 'bm0', writable: true } },
  bitmapCommand('remove', 'q0', 'bm0'),
  bitmapCommand('clear', 'q0', 'big'),
  bitmapCommand('enable', 'q0', 'off'),
  bitmapCommand('remove', 'f0', 'onfile'),
  qemuIoThrough('disk', ['write -P 0x31 100k 10k', 'write -z 1M 320k', 'discard 3M 64k', 'write -P 0x32 2097000 1000']),
  nbdinfoMap('disk', 'qemu:dirty-bitmap:bm0'),
  nbdinfoMap('disk', 'qemu:dirty-bitmap:big'),
  nbdinfoMap('disk', 'qemu:dirty-bitmap:bb'),
  nbdinfoMap('disk', 'qemu:dirty-bitmap:nosuch'),
  qemuImgMapBitmap('disk', 'bm0'),
  qemuImgMapBitmap('disk', 'big'),
  qemuImgMapBitmap('disk', 'nosuch'),
  { execute: 'x-debug-block-dirty-bitmap-sha256', arguments: { node: 'q0', name: 'bm0' } },
  rawClientSession,
  { execute: 'block-export-del', arguments: { id: 'e1' } },
  { execute: 'block-export-del', arguments: { id: 'e1', mode: 'hard' } },
  { awaitEvent: { event: 'BLOCK_EXPORT_DELETED', data: { id: 'e1' } } },
  disconnectHeld,
  // e1 is gone: its bitmaps are free again (bm0 and big), off still belongs to e2.
  bitmapCommand('clear', 'q0', 'big'),
  bitmapCommand('remove', 'q0', 'bm0'),
  bitmapCommand('enable', 'q0', 'off'),
  bitmapCommand('remove', 'base', 'bb'),
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  { execute: 'block-export-del', arguments: { id: 'e2' } },
  { awaitEvent: { event: 'BLOCK_EXPORT_DELETED', data: { id: 'e2' } } },
  bitmapCommand('enable', 'q0', 'off'),
  // The daemon's own nbd client reading a third server's bitmap, re-exported.
  { execute: 'blockdev-add', arguments: { driver: 'nbd', 'node-name': 'c0', server: { type: 'unix', path: join(external.dir, 'remote.sock') }, export: 'disk', 'x-dirty-bitmap': 'qemu:dirty-bitmap:nosuch' } },
  { execute: 'blockdev-add', arguments: { driver: 'nbd', 'node-name': 'c0', server: { type: 'unix', path: join(external.dir, 'remote.sock') }, export: 'disk', 'x-dirty-bitmap': 'x'.repeat(4097) } },
  { execute: 'blockdev-add', arguments: { driver: 'nbd', 'node-name': 'c0', server: { type: 'unix', path: join(external.dir, 'remote.sock') }, export: 'disk', 'x-dirty-bitmap': 'qemu:dirty-bitmap:rbm' } },
  { execute: 'blockdev-add', arguments: { driver: 'nbd', 'node-name': 'c1', server: { type: 'unix', path: join(external.dir, 'remote.sock') }, export: 'disk', 'x-dirty-bitmap': 'qemu:allocation-depth' } },
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e3', 'node-name': 'c0', name: 'client', 'allocation-depth': true } },
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'e4', 'node-name': 'c1', name: 'depth' } },
  { action: async (dir) => tool('qemu-img', ['map', '--output=json', '-f', 'raw', uri(dir, 'client')]).replaceAll(dir, '$DIR') },
  { action: async (dir) => tool('qemu-img', ['map', '--output=json', '-f', 'raw', uri(dir, 'depth')]).replaceAll(dir, '$DIR') },
  nbdinfoMap('client', 'base:allocation'),
  nbdinfoMap('client', 'qemu:allocation-depth'),
  { execute: 'quit' },
];

test('dirty bitmaps over NBD read the same from blockd as from qemu-storage-daemon', async () => {
  // Where the host allocates the overlay's clusters is not the subject here: image file sizes are masked.
  const expected = await runTranscript(peers.qsd.socket, peers.qsd.dir, STEPS, maskImageSizes);
  const actual = await runTranscript(peers.blockd.socket, peers.blockd.dir, STEPS, maskImageSizes);
  assert.deepEqual(transcriptDifferences(actual, expected), [], describeDifferences(actual, expected));
});
