/*
 * The copy-before-write filter's snapshot API on an in-process daemon, where the order of
 * requests can be seen: the live disk is an nbdkit memory disk whose reads take a second
 * (the delay filter; its writes and block status are immediate). A read of the frozen view
 * of a cluster not copied yet goes to that disk, so a guest write to the cluster gets its
 * old data into the target at once (a hole: no read) and would overwrite the disk long
 * before the view's read reaches it. The guest write must wait for the read (QEMU's frozen
 * read requests); afterwards the view reads the cluster from the target.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { pino } from 'pino';
import { Daemon } from '../../src/daemon.js';
import type { ChildEdge } from '../../src/blockdev/child-edge.js';
import { startNbdkit, type NbdServer } from '../helpers/nbd-servers.js';
import { makeTempDir } from '../helpers/paths.js';
import { createQcow2, MiB } from '../helpers/qemu-tools.js';

const temp = makeTempDir('blockd-cbw-snapshot-');
const daemon = new Daemon(pino({ level: 'silent' }));
let nbdkit: NbdServer;

before(async () => {
  nbdkit = await startNbdkit(join(temp.dir, 'nbdkit.sock'), ['--filter=delay', 'memory', 'size=4M', 'delay-read=1']);
});

after(async () => {
  await daemon.shutdown('test');
  await nbdkit?.stop();
  temp.cleanup();
});

function userOf(name: string, write: boolean): Promise<ChildEdge> {
  return daemon.graph.attachUser({ describe: () => 'test user' }, daemon.graph.find(name)!, 'root', { perm: write ? 0x3 : 0x1, shared: 0xf });
}

/** Resolves to the order in which the promises settled, by label. */
function settleOrder(promises: Record<string, Promise<unknown>>): Promise<string[]> {
  const order: string[] = [];
  return Promise.all(Object.entries(promises).map(([label, promise]) => promise.then(() => order.push(label)))).then(() => order);
}

test('a guest write to a cluster the view is reading from the disk waits for that read; the view then reads the target', async () => {
  const fleece = createQcow2(join(temp.dir, 'fleece.qcow2'), 4 * MiB);
  await daemon.runCommand('blockdev-add', { driver: 'nbd', 'node-name': 'live', server: { type: 'unix', path: join(temp.dir, 'nbdkit.sock') }, export: 'disk' });
  await daemon.runCommand('blockdev-add', { driver: 'qcow2', 'node-name': 'fleece', file: { driver: 'file', filename: fleece } });
  await daemon.runCommand('blockdev-add', { driver: 'copy-before-write', 'node-name': 'cbw', file: 'live', target: 'fleece' });
  await daemon.runCommand('blockdev-add', { driver: 'snapshot-access', 'node-name': 'view', file: 'cbw' });
  const guest = await userOf('cbw', true);
  const reader = await userOf('view', false);

  const viewed = Buffer.alloc(64 * 1024, 0xff);
  const read = reader.read(0, viewed);
  // One turn of the event loop: the read has taken its range and is on its way to the disk.
  await new Promise((resolve) => setImmediate(resolve));
  const write = guest.write(0, Buffer.alloc(64 * 1024, 0x55), {});
  assert.deepEqual(await settleOrder({ read, write }), ['read', 'write'], 'the guest write waited for the read of the view');
  assert.ok(viewed.equals(Buffer.alloc(64 * 1024)), 'the view read the disk as it was (zeros)');

  // The cluster is copied now: the view reads it from the target, the disk has the new data.
  const again = Buffer.alloc(64 * 1024, 0xff);
  await reader.read(0, again);
  assert.ok(again.equals(Buffer.alloc(64 * 1024)), 'the view reads the copied cluster from the target');
  const now = Buffer.alloc(64 * 1024);
  await guest.read(0, now);
  assert.ok(now.equals(Buffer.alloc(64 * 1024, 0x55)), 'the disk has the guest write');

  await daemon.graph.detach(guest);
  await daemon.graph.detach(reader);
  for (const node of ['view', 'cbw', 'fleece', 'live']) await daemon.runCommand('blockdev-del', { 'node-name': node });
});
