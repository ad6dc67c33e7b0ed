/*
 * Fuzz test of the NBD server: connections that send random bytes, truncated
 * or oversized handshakes and requests, stall, or vanish mid-request, while a
 * well-behaved client keeps writing and reading back its own pattern on the
 * same export. The daemon must survive every one, the good client must never
 * see an error, and QMP must keep answering.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { QmpClient } from '../../src/qmp/client.js';
import { encodeInfoRequest, encodeMetaContextRequest, encodeOption, encodeRequestHeader } from '../../src/nbd/messages.js';
import { ClientFlag, Command, Option } from '../../src/nbd/protocol.js';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { NbdRawClient } from '../helpers/nbd-raw-client.js';
import { makeTempDir } from '../helpers/paths.js';
import { MiB, runQemuImg, SeededRandom } from '../helpers/qemu-tools.js';

const temp = makeTempDir();
const socket = join(temp.dir, 'nbd.sock');
let blockd: BlockdProcess;

before(async () => {
  runQemuImg('create', '-q', '-f', 'raw', join(temp.dir, 'disk.raw'), String(4 * MiB));
  blockd = await runBlockd([
    '--blockdev', 'driver=null-co,node-name=n0,size=67108864,read-zeroes=on',
    '--blockdev', `driver=file,node-name=f0,filename=${join(temp.dir, 'disk.raw')}`,
    '--nbd-server', `addr.type=unix,addr.path=${socket}`,
    '--export', 'type=nbd,id=e0,node-name=n0,name=null,writable=on',
    '--qmp', `unix:${join(temp.dir, 'qmp.sock')}`,
  ]);
});

after(async () => {
  await blockd.stop();
  temp.cleanup();
});

/** Opens a socket, lets `misbehave` write to it, and closes it after a short while (or when the server does). */
async function badConnection(misbehave: (socket: net.Socket) => void, lingerMs: number): Promise<void> {
  const connection = net.connect(socket);
  connection.on('error', () => {});
  connection.on('data', () => {});
  await new Promise<void>((resolve) => connection.once('connect', () => resolve()));
  misbehave(connection);
  await new Promise<void>((resolve) => {
    const timer = setTimeout(resolve, lingerMs);
    connection.once('close', () => {
      clearTimeout(timer);
      resolve();
    });
  });
  connection.destroy();
}

const handshakeStart = () => {
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES, 0);
  return Buffer.concat([flags, encodeOption(Option.STRUCTURED_REPLY), encodeOption(Option.SET_META_CONTEXT, encodeMetaContextRequest('null', ['base:allocation']))]);
};
const go = () => encodeOption(Option.GO, encodeInfoRequest('null', []));

test('garbage, truncated and oversized messages end only their own connection', async () => {
  const random = new SeededRandom(4242);
  const bytes = (length: number) => Buffer.from(Array.from({ length }, () => random.int(256)));
  const header = (type: number, offset: number, length: number, flags = 0) => encodeRequestHeader({ flags, type, cookie: 1n, offset, length });

  // A good client on a file-backed export (added over QMP) writes and verifies its pattern throughout.
  const qmp = await QmpClient.connect(`unix:${join(temp.dir, 'qmp.sock')}`);
  await qmp.execute('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'f0', name: 'good', writable: true });
  const good = await NbdRawClient.open(socket, 'good');
  let stop = false;
  let goodRounds = 0;
  const goodLoop = (async () => {
    while (!stop) {
      const offset = (goodRounds % 64) * 65536;
      good.request(Command.WRITE, offset, 65536, 0, Buffer.alloc(65536, goodRounds & 0xff));
      const reply = await good.readReply();
      assert.equal(reply.kind === 'simple' ? reply.error : -1, 0, 'the good client write failed');
      const data = await good.read(offset, 65536);
      assert.ok(data.every((byte) => byte === (goodRounds & 0xff)), 'the good client reads back what it wrote');
      goodRounds++;
    }
  })();

  const cases: (() => Promise<void>)[] = [];
  for (let i = 0; i < 150; i++) {
    const kind = i % 10;
    cases.push(() => badConnection((s) => {
      switch (kind) {
        case 0: s.write(bytes(1 + random.int(300))); break; // noise instead of client flags
        case 1: s.write(Buffer.concat([handshakeStart(), bytes(random.int(100))])); break; // noise among options
        case 2: s.write(Buffer.concat([handshakeStart().subarray(0, random.int(40))])); break; // truncated handshake, then gone
        case 3: { // an option claiming a huge payload
          const option = encodeOption(Option.GO, Buffer.alloc(0));
          option.writeUInt32BE(0xffffffff, 12);
          s.write(Buffer.concat([handshakeStart(), option]));
          break;
        }
        case 4: s.write(Buffer.concat([handshakeStart(), go(), bytes(28 + random.int(200))])); break; // noise as requests
        case 5: s.write(Buffer.concat([handshakeStart(), go(), header(Command.WRITE, 0, 1 << 20), bytes(1000)])); break; // write payload cut short
        case 6: s.write(Buffer.concat([handshakeStart(), go(), header(Command.WRITE, 0, 0xffffffff)])); break; // oversized write
        case 7: s.write(Buffer.concat([handshakeStart(), go(), ...Array.from({ length: 40 }, () => header(Command.READ, 0, 1 << 20))])); break; // never reads replies, then gone
        case 8: s.write(Buffer.concat([handshakeStart(), go(), header(Command.READ, 2 ** 52, 512), header(Command.BLOCK_STATUS, 0, 0xffffffff, 1 << 3)])); break;
        case 9: s.write(Buffer.concat([handshakeStart(), go(), header(Command.READ, 0, 1 << 20)]).subarray(0, 60 + random.int(40))); break;
      }
    }, kind === 7 ? 200 : 30));
  }
  // Several at a time, like a storm.
  for (let i = 0; i < cases.length; i += 5) await Promise.all(cases.slice(i, i + 5).map((run) => run()));

  stop = true;
  await goodLoop;
  assert.ok(goodRounds > 10, `the good client made progress (${goodRounds} rounds)`);
  // Still serving: a new client and QMP.
  const fresh = await NbdRawClient.open(socket, 'null');
  assert.equal((await fresh.read(0, 512)).length, 512);
  fresh.close();
  good.close();
  const exports = (await qmp.execute('query-block-exports')) as { id: string }[];
  assert.deepEqual(exports.map((entry) => entry.id).sort(), ['e0', 'e1']);
  await qmp.close();
  assert.equal(blockd.child.exitCode, null, 'blockd is still running');
});

test('a stalled client that never reads replies does not block the others', async () => {
  const stalled = await NbdRawClient.open(socket, 'null');
  stalled.socket.pause();
  for (let i = 0; i < 64; i++) stalled.request(Command.READ, 0, 32 * MiB);
  const other = await NbdRawClient.open(socket, 'null');
  for (let i = 0; i < 20; i++) assert.equal((await other.read(i * MiB, 65536)).length, 65536);
  other.close();
  stalled.close();
});
