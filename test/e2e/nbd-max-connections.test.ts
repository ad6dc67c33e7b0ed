/*
 * nbd-server-start's max-connections: with a limit of 1, multi-conn is not
 * advertised and a second client waits (no greeting yet) until the first
 * leaves, as it waits in QEMU's listen backlog; then it is served.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { TransmissionFlag } from '../../src/nbd/protocol.js';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { NbdRawClient } from '../helpers/nbd-raw-client.js';
import { makeTempDir } from '../helpers/paths.js';

const temp = makeTempDir();
const socket = join(temp.dir, 'nbd.sock');
let blockd: BlockdProcess;

before(async () => {
  blockd = await runBlockd([
    '--blockdev', 'driver=null-co,node-name=n0,size=1048576',
    '--nbd-server', `addr.type=unix,addr.path=${socket},max-connections=1`,
    '--export', 'type=nbd,id=e0,node-name=n0,name=disk',
    '--qmp', `unix:${join(temp.dir, 'qmp.sock')}`,
  ]);
});

after(async () => {
  await blockd.stop();
  temp.cleanup();
});

test('with max-connections=1 a second client waits for the first to leave', async () => {
  const first = await NbdRawClient.open(socket, 'disk');
  assert.equal(first.transmissionFlags & TransmissionFlag.CAN_MULTI_CONN, 0);

  const waiting = net.connect(socket);
  let received = 0;
  waiting.on('data', (chunk: Buffer) => (received += chunk.length));
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal(received, 0, 'no greeting while the only slot is taken');

  first.close();
  const deadline = Date.now() + 5000;
  while (received < 18 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(received, 18, 'the greeting arrives once the slot is free');
  waiting.destroy();
});
