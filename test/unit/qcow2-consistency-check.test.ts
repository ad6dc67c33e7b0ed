/*
 * checkQcow2 against qemu-img check on images made by qemu-img/qemu-io and then damaged
 * with small byte edits: the same counters as its JSON, the same stderr lines in the same
 * order, the same verdict; and the check never writes.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { checkQcow2, readQcow2Metadata, type Qcow2CheckResult } from '../../src/blockdev/drivers/qcow2/consistency-check.js';
import { openImage } from '../../src/blockdev/image-session.js';
import { makeTempDir } from '../helpers/paths.js';

const { dir, cleanup } = makeTempDir('blockd-qcow2-check-');
after(cleanup);

function run(command: string, ...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const { status, stdout, stderr, error } = spawnSync(command, args, { cwd: dir, encoding: 'utf8' });
  if (error) throw error;
  return { status, stdout, stderr };
}

function succeed(command: string, ...args: string[]): void {
  const result = run(command, ...args);
  assert.equal(result.status, 0, `${command} ${args.join(' ')}: ${result.stderr}`);
}

/** A new image after `qemu-io -c` commands. */
function image(name: string, createOptions: string[], ioCommands: string[], size = '64M'): string {
  const path = join(dir, name);
  succeed('qemu-img', 'create', '-q', '-f', 'qcow2', ...createOptions, path, size);
  if (ioCommands.length) succeed('qemu-io', ...ioCommands.flatMap((command) => ['-c', command]), path);
  return path;
}

function poke(path: string, offset: number, bytes: number[]): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, Buffer.from(bytes), 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

function exitStatus(result: Qcow2CheckResult): number {
  if (result.failure || result.checkErrors) return 1;
  return result.corruptions ? 2 : result.leaks ? 3 : 0;
}

/** Runs both checks and requires the same counters, stderr lines and exit status; returns ours. */
async function sameAsQemu(path: string): Promise<Qcow2CheckResult> {
  const before = readFileSync(path);
  const theirs = run('qemu-img', 'check', '--output=json', path);
  const ours = await checkQcow2(path);
  assert.ok(readFileSync(path).equals(before), 'the check changed the image');
  const json = JSON.parse(theirs.stdout) as Record<string, number>;
  const counters: [keyof Qcow2CheckResult, string][] = [
    ['corruptions', 'corruptions'], ['leaks', 'leaks'], ['checkErrors', 'check-errors'], ['imageEndOffset', 'image-end-offset'],
    ['allocatedClusters', 'allocated-clusters'], ['totalClusters', 'total-clusters'],
    ['fragmentedClusters', 'fragmented-clusters'], ['compressedClusters', 'compressed-clusters'],
  ];
  for (const [ours_, theirs_] of counters) assert.equal(ours[ours_], json[theirs_] ?? 0, theirs_);
  const theirLines = theirs.stderr.split('\n').filter((line) => line !== '' && !line.startsWith('qemu-img:'));
  assert.deepEqual(ours.messages, theirLines);
  assert.equal(exitStatus(ours), theirs.status);
  return ours;
}

const REFCOUNT_BLOCK = 0x20000; // 64 KiB clusters, 16-bit refcounts: cluster N's count is at +2N
const L2_TABLE = 0x40000;

describe('clean images', () => {
  test('data, zero clusters, compressed clusters, far writes', async () => {
    const path = image('clean.qcow2', [], ['write -P 0xab 0 64k', 'write -P 0xcd 1M 4k', 'write -z 2M 64k', 'write -c -P 3 4M 128k', 'write -P 1 600M 64k'], '1G');
    const result = await sameAsQemu(path);
    assert.equal(result.corruptions + result.leaks, 0);
    assert.equal(result.compressedClusters, 2);
  });
  test('preallocated zero clusters and discarded ranges', async () => {
    await sameAsQemu(image('zeros.qcow2', [], ['write -P 1 0 256k', 'write -z 64k 64k', 'write -z -u 128k 64k', 'discard 192k 64k']));
  });
  test('an internal snapshot (qemu-img snapshot -c) shares clusters until they are rewritten', async () => {
    const path = image('snap.qcow2', [], ['write -P 1 0 128k', 'write -c -P 2 1M 64k']);
    succeed('qemu-img', 'snapshot', '-c', 's1', path);
    succeed('qemu-io', '-c', 'write -P 7 0 64k', path);
    succeed('qemu-img', 'snapshot', '-c', 's2', path);
    await sameAsQemu(path);
    const { snapshots } = await readQcow2Metadata(path);
    assert.deepEqual(snapshots.map((sn) => [sn.id, sn.name]), [['1', 's1'], ['2', 's2']]);
  });
  test('persistent bitmaps', async () => {
    const path = image('bitmap.qcow2', [], []);
    succeed('qemu-img', 'bitmap', '--add', path, 'b0');
    succeed('qemu-img', 'bitmap', '--add', '-g', '131072', path, 'b1');
    succeed('qemu-io', '-c', 'write -P 1 3M 64k', path);
    await sameAsQemu(path);
    const { bitmaps } = await readQcow2Metadata(path);
    assert.deepEqual(bitmaps.map((bitmap) => [bitmap.name, bitmap.granularityBits]), [['b0', 16], ['b1', 17]]);
  });
  test('v2, 4 KiB clusters, 1-bit and 64-bit refcounts, extended L2', async () => {
    await sameAsQemu(image('v2.qcow2', ['-o', 'compat=0.10'], ['write -P 1 0 1M', 'write -c 2M 64k']));
    await sameAsQemu(image('4k.qcow2', ['-o', 'cluster_size=4096'], ['write -P 1 0 1M', 'write -P 2 9M 12k', 'write -c 20M 8k']));
    await sameAsQemu(image('rc1.qcow2', ['-o', 'refcount_bits=1'], ['write -P 1 0 1M']));
    await sameAsQemu(image('rc64.qcow2', ['-o', 'refcount_bits=64'], ['write -P 1 0 1M', 'write -c 2M 128k']));
    await sameAsQemu(image('ext.qcow2', ['-o', 'extended_l2=on'], ['write -P 1 4k 4k', 'write -z 64k 8k', 'write 128k 64k']));
  });
  test('through a file edge instead of a path', async () => {
    const path = image('edge.qcow2', [], ['write -P 1 0 64k']);
    const session = await openImage(path, { format: 'raw' });
    try {
      const result = await checkQcow2(session.disk);
      assert.deepEqual([result.corruptions, result.leaks, result.allocatedClusters, result.imageEndOffset], [0, 0, 1, 0x60000]);
    } finally {
      await session.close();
    }
  });
});

describe('damaged images', () => {
  test('leak: a freed cluster inside the file with refcount 1 (exit 3)', async () => {
    const path = image('leak.qcow2', [], ['write 0 64k', 'write 64k 64k', 'write -z -u 0 64k']);
    poke(path, REFCOUNT_BLOCK + 2 * 5, [0, 1]);
    const result = await sameAsQemu(path);
    assert.deepEqual([result.leaks, result.messages], [1, ['Leaked cluster 5 refcount=1 reference=0']]);
  });
  test('a refcount for a cluster past the end of the file is not compared', async () => {
    const path = image('past-eof.qcow2', [], ['write 0 64k']);
    poke(path, REFCOUNT_BLOCK + 2 * 40, [0, 1]);
    assert.equal((await sameAsQemu(path)).leaks, 0);
  });
  test('corruption: a used data cluster with refcount 0 (and so a wrong COPIED flag)', async () => {
    const path = image('corrupt.qcow2', [], ['write 0 64k']);
    poke(path, REFCOUNT_BLOCK + 2 * 5, [0, 0]);
    const result = await sameAsQemu(path);
    assert.deepEqual(result.messages, ['ERROR cluster 5 refcount=0 reference=1', 'ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=0']);
  });
  test('corruption: COPIED cleared on an L2 entry whose cluster has refcount 1', async () => {
    const path = image('copied.qcow2', [], ['write 0 64k']);
    poke(path, L2_TABLE, [0]);
    assert.equal((await sameAsQemu(path)).corruptions, 1);
  });
  test('corruption: COPIED set on a compressed cluster, reserved bits in L1 and L2 entries', async () => {
    const path = image('bits.qcow2', [], ['write -c 0 64k', 'write 64k 64k']);
    poke(path, L2_TABLE, [0xc0]);
    poke(path, L2_TABLE + 15, [0x02]);
    poke(path, 0x30007, [0x01]);
    await sameAsQemu(path);
  });
  test('a shared cluster counted once: snapshot refcount lowered to 1', async () => {
    const path = image('shared.qcow2', [], ['write -P 1 0 64k']);
    succeed('qemu-img', 'snapshot', '-c', 's1', path);
    poke(path, REFCOUNT_BLOCK + 2 * 5, [0, 1]);
    await sameAsQemu(path);
  });
  test('a refcount block referenced twice, a table entry pointing outside the file', async () => {
    const path = image('refblock.qcow2', [], ['write 0 64k']);
    poke(path, L2_TABLE + 8, [0x80, 0, 0, 0, 0, 0x02, 0, 0]); // guest cluster 1 -> the refcount block
    poke(path, 0x10008, [0, 0, 0, 0, 0x10, 0, 0, 0]); // refcount table entry 1 -> 256 MiB
    await sameAsQemu(path);
  });
});
