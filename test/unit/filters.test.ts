/*
 * The filter drivers doing their jobs, set up through blockdev-add and
 * object-add on an in-process daemon: blkdebug injects errors by event,
 * iotype, sector, once and state; copy-on-read copies backing data into the
 * top image (checked with qemu-img map and qemu-io on the file); throttle
 * holds requests back once a group's bucket is full (checked by admission
 * order, not by timing).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { pino } from 'pino';
import { Daemon } from '../../src/daemon.js';
import type { ChildEdge } from '../../src/blockdev/child-edge.js';
import type { JsonObject } from '../../src/json/value.js';
import { ThrottleGroup } from '../../src/objects/throttle-group.js';
import { makeTempDir } from '../helpers/paths.js';

const temp = makeTempDir();
const daemon = new Daemon(pino({ level: 'silent' }));

after(async () => {
  await daemon.shutdown('test');
  temp.cleanup();
});

async function userOf(name: string, write = false): Promise<ChildEdge> {
  const node = daemon.graph.find(name)!;
  return daemon.graph.attachUser({ describe: () => 'test user' }, node, 'root', { perm: write ? 0x3 : 0x1, shared: 0xf });
}

test('blkdebug: errors by event, iotype, sector, once and state', async () => {
  await daemon.runCommand('blockdev-add', {
    driver: 'blkdebug', 'node-name': 'dbg',
    image: { driver: 'null-co', size: 1 << 20, 'read-zeroes': true },
    'inject-error': [
      { event: 'read_aio', iotype: 'read', sector: 8, errno: 5 },
      { event: 'write_aio', iotype: 'write', errno: 28, once: true },
      { event: 'read_aio', state: 2, errno: 1 },
    ],
    'set-state': [{ event: 'flush_to_disk', state: 1, new_state: 2 }],
  });
  const disk = await userOf('dbg', true);
  const buffer = Buffer.alloc(512);
  await disk.read(0, buffer); // sector 0 is fine
  await assert.rejects(disk.read(4096, buffer), (error: Error & { code: string }) => error.code === 'EIO');
  await assert.rejects(disk.write(0, buffer), (error: Error & { code: string }) => error.code === 'ENOSPC');
  await disk.write(0, buffer); // once: disarmed
  await disk.flush(); // state 1 -> 2: the state-2 rule now fails every read
  await assert.rejects(disk.read(0, buffer), (error: Error & { code: string }) => error.code === 'EPERM');
  // A rule without iotype fails every request but block status, as QEMU's default does.
  await disk.child.blockStatus(0, 512);
  await assert.rejects(disk.read(0, buffer), (error: Error & { code: string }) => error.code === 'EPERM');
  await daemon.graph.detach(disk);
  await assert.rejects(daemon.runCommand('blockdev-add', { driver: 'blkdebug', 'node-name': 'x', image: 'dbg', 'inject-error': [{ event: 'l1_update' }] }),
    /blkdebug event 'l1_update' is not supported by blockd/);
  await daemon.runCommand('blockdev-del', { 'node-name': 'dbg' });
});

test('copy-on-read: backing data ends up in the top image', async () => {
  const base = join(temp.dir, 'base.qcow2');
  const top = join(temp.dir, 'top.qcow2');
  spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, '4M']);
  spawnSync('qemu-io', ['-c', 'write -P 0x5a 1M 128k', base]);
  spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  await daemon.runCommand('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: top } });
  await daemon.runCommand('blockdev-add', { driver: 'copy-on-read', 'node-name': 'cor', file: 'top' });
  const disk = await userOf('cor');
  const buffer = Buffer.alloc(256 * 1024);
  await disk.read(1 << 20, buffer);
  assert.equal(buffer.subarray(0, 128 * 1024).every((byte) => byte === 0x5a), true);
  await daemon.graph.detach(disk);
  await daemon.runCommand('blockdev-del', { 'node-name': 'cor' });
  await daemon.runCommand('blockdev-del', { 'node-name': 'top' });
  const map = JSON.parse(spawnSync('qemu-img', ['map', '--output=json', top], { encoding: 'utf8' }).stdout) as { start: number; length: number; depth: number; data: boolean }[];
  const copied = map.find((entry) => entry.start <= (1 << 20) && entry.start + entry.length > (1 << 20))!;
  assert.equal(copied.depth, 0, 'the data read through the filter now lives in the top image');
  assert.equal(spawnSync('qemu-io', ['-c', 'read -P 0x5a 1M 128k', '-f', 'qcow2', '-o', 'backing.driver=null-co', top], { encoding: 'utf8' }).stdout.includes('Pattern verification failed'), false);
  assert.equal(spawnSync('qemu-img', ['check', top]).status, 0);
});

test('throttle: requests beyond the bucket wait, in order', async () => {
  const group = new ThrottleGroup('unit', { 'iops-total': 10 });
  const admitted: number[] = [];
  const requests = Array.from({ length: 5 }, (_, i) => group.admit(i % 2 === 1, 4096).then(() => admitted.push(i)));
  await new Promise((resolve) => setImmediate(resolve));
  // A bucket of iops-total=10 holds avg/10 = 1 operation: the first request goes at once, the rest wait.
  assert.ok(admitted.length >= 1 && admitted.length < 5, `admitted at once: ${admitted.length}`);
  await Promise.all(requests);
  assert.deepEqual([...admitted].filter((i) => i % 2 === 0), [0, 2, 4], 'reads leave the queue in order');
  assert.throws(() => new ThrottleGroup('bad', { 'bps-total': 1, 'bps-read': 1 }), /cannot be used at the same time/);
  assert.throws(() => new ThrottleGroup('bad', { 'iops-size': 512 }), /iops size requires an iops value/);

  await daemon.runCommand('object-add', { 'qom-type': 'throttle-group', id: 'tg', limits: { 'bps-total': 1 << 20 } });
  await daemon.runCommand('blockdev-add', { driver: 'throttle', 'node-name': 'thr', 'throttle-group': 'tg', file: { driver: 'null-co', size: 1 << 20 } });
  const disk = await userOf('thr');
  await disk.read(0, Buffer.alloc(4096));
  await assert.rejects(daemon.runCommand('object-del', { id: 'tg' }), /object 'tg' is in use, can not be deleted/);
  await daemon.graph.detach(disk);
  await daemon.runCommand('blockdev-del', { 'node-name': 'thr' });
  await daemon.runCommand('object-del', { id: 'tg' });
});

test('a qcow2 image over a filter over its file allocates: the filter grows as its file does', async () => {
  await daemon.runCommand('object-add', { 'qom-type': 'throttle-group', id: 'grow-tg', limits: { 'iops-total': 100000 } });
  const filters: Record<string, Record<string, string>> = {
    throttle: { driver: 'throttle', 'throttle-group': 'grow-tg' },
    'copy-on-read': { driver: 'copy-on-read' },
    blkdebug: { driver: 'blkdebug' },
  };
  for (const [name, filter] of Object.entries(filters)) {
    const path = join(temp.dir, `grow-${name}.qcow2`);
    spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', path, '4M']);
    const file = { driver: 'file', filename: path };
    await daemon.runCommand('blockdev-add', {
      driver: 'qcow2', 'node-name': `grow-${name}`,
      file: { ...filter, [name === 'blkdebug' ? 'image' : 'file']: file } as JsonObject,
    });
    const disk = await userOf(`grow-${name}`, true);
    await disk.write(1 << 20, Buffer.alloc(65536, 0x6b)); // a new cluster: past the file's end
    await disk.flush();
    await daemon.graph.detach(disk);
    await daemon.runCommand('blockdev-del', { 'node-name': `grow-${name}` });
    const read = spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x6b 1M 64k', path], { encoding: 'utf8' });
    assert.ok(read.status === 0 && !/fail/i.test(read.stdout), `${name}: ${read.stdout}${read.stderr}`);
    const check = spawnSync('qemu-img', ['check', path], { encoding: 'utf8' });
    assert.equal(check.status, 0, `${name}: ${check.stdout}`);
  }
  await daemon.runCommand('object-del', { id: 'grow-tg' });
});
