/* The native file ops on real files: holes, fallocate, OFD locks as QEMU sees them, and the JS fallback. */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, open, rm, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallbackFileOps, nativeFileOps as ops,
} from '../../src/blockdev/native/native-file-ops.js';

const KiB = 1024, MiB = 1024 * KiB;
let dir = '';
before(async () => { dir = await mkdtemp(join(tmpdir(), 'blockd-native-')); });
after(async () => { await rm(dir, { recursive: true, force: true }); });

/** A 4 MiB file whose only data is 4 KiB of 0xaa at 1 MiB. */
async function sparseFile(name: string): Promise<FileHandle> {
  const file = await open(join(dir, name), 'w+');
  await file.write(Buffer.alloc(4 * KiB, 0xaa), 0, 4 * KiB, MiB);
  await file.truncate(4 * MiB);
  return file;
}

async function readAt(file: FileHandle, offset: number, length: number): Promise<Buffer> {
  const { buffer, bytesRead } = await file.read(Buffer.alloc(length), 0, length, offset);
  assert.equal(bytesRead, length);
  return buffer;
}

function qemuImgInfo(path: string, ...flags: string[]): { status: number | null; stderr: string } {
  const { status, stderr } = spawnSync('qemu-img', ['info', ...flags, path], { encoding: 'utf8' });
  return { status, stderr };
}

async function eventually(check: () => Promise<boolean>, what: string): Promise<void> {
  for (let tries = 0; !(await check()); tries++) {
    assert.ok(tries < 100, `timed out waiting until ${what}`);
    await sleep(50);
  }
}

test('the addon is built and loaded (no silent fallback)', () => {
  assert.equal(ops.native, true);
});

test('seekData / seekHole find the data of a sparse file', async () => {
  const file = await sparseFile('sparse.raw');
  try {
    assert.equal(await ops.seekData(file.fd, 0), MiB);
    assert.equal(await ops.seekHole(file.fd, 0), 0);
    assert.equal(await ops.seekData(file.fd, MiB + 100), MiB + 100);
    assert.equal(await ops.seekHole(file.fd, MiB), MiB + 4 * KiB);
    assert.equal(await ops.seekData(file.fd, MiB + 4 * KiB), null);
    assert.equal(await ops.seekHole(file.fd, 4 * MiB - 1), 4 * MiB - 1);
    assert.equal(await ops.seekHole(file.fd, 4 * MiB), null);
  } finally {
    await file.close();
  }
});

test('seekNow answers as seekData / seekHole do, on the calling thread; errors throw with their errno names', async () => {
  const file = await sparseFile('sparse-now.raw');
  try {
    const seekNow = ops.seekNow!;
    for (const offset of [0, MiB - 1, MiB, MiB + 100, MiB + 4 * KiB, 4 * MiB - 1, 4 * MiB, 5 * MiB]) {
      assert.equal(seekNow(file.fd, offset, false), await ops.seekData(file.fd, offset), `SEEK_DATA at ${offset}`);
      assert.equal(seekNow(file.fd, offset, true), await ops.seekHole(file.fd, offset), `SEEK_HOLE at ${offset}`);
    }
    assert.throws(() => seekNow(-1, 0, false), { code: 'EBADF', syscall: 'lseek' });
    assert.throws(() => seekNow(file.fd, 0.5, false), { name: 'TypeError' });
  } finally {
    await file.close();
  }
});

test('fallocate punches holes, zeroes ranges, extends, and reports errno names', async () => {
  const file = await sparseFile('falloc.raw');
  try {
    await ops.fallocate(file.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MiB, 4 * KiB);
    assert.deepEqual(await readAt(file, MiB, 4 * KiB), Buffer.alloc(4 * KiB));
    assert.equal(await ops.seekData(file.fd, 0), null);
    assert.equal((await file.stat()).size, 4 * MiB);

    await file.write(Buffer.alloc(64 * KiB, 0x55), 0, 64 * KiB, 0);
    await ops.fallocate(file.fd, FALLOC_FL_ZERO_RANGE, 4 * KiB, 8 * KiB);
    const data = await readAt(file, 0, 64 * KiB);
    assert.deepEqual(data.subarray(4 * KiB, 12 * KiB), Buffer.alloc(8 * KiB));
    assert.deepEqual(data.subarray(12 * KiB), Buffer.alloc(52 * KiB, 0x55));

    await ops.fallocate(file.fd, 0, 4 * MiB, MiB);
    assert.equal((await file.stat()).size, 5 * MiB);

    await assert.rejects(ops.fallocate(1 << 30, 0, 0, 4 * KiB),
      { code: 'EBADF', errno: 9, message: 'fallocate: Bad file descriptor' });
    await assert.rejects(ops.fallocate(file.fd, 0, 0, 0), { code: 'EINVAL' });
    await assert.rejects(ops.seekData(file.fd, 0.5), { name: 'TypeError' });
  } finally {
    await file.close();
  }
});

test('startWriteback runs sync_file_range: the data stays, and errors come back with their errno names', async () => {
  const file = await open(join(dir, 'writeback.raw'), 'w+');
  try {
    await file.write(Buffer.alloc(8 * MiB, 0x3c), 0, 8 * MiB, 0);
    await ops.startWriteback(file.fd, 0, 0);
    await ops.startWriteback(file.fd, MiB, MiB);
    assert.deepEqual(await readAt(file, 0, 8 * MiB), Buffer.alloc(8 * MiB, 0x3c));
    await assert.rejects(ops.startWriteback(1 << 30, 0, 0), { code: 'EBADF', message: 'sync_file_range: Bad file descriptor' });
    await assert.rejects(ops.startWriteback(file.fd, -1, 0), { code: 'EINVAL' });
  } finally {
    await file.close();
  }
});

test('OFD locks interoperate with QEMU: shared locks as a qcow2 writer holds them', async () => {
  const path = join(dir, 'locked.qcow2');
  assert.equal(spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', path, '1M']).status, 0);
  const file = await open(path, 'r+');
  try {
    for (const byte of [100, 101, 103, 201, 203]) await ops.ofdLock(file.fd, byte, 1, 'shared');
    const locked = qemuImgInfo(path);
    assert.notEqual(locked.status, 0);
    assert.match(locked.stderr, /Failed to get shared "write" lock/);
    assert.equal(qemuImgInfo(path, '-U').status, 0);

    for (const byte of [100, 101, 103, 201, 203]) await ops.ofdLock(file.fd, byte, 1, 'unlock');
    assert.equal(qemuImgInfo(path).status, 0);
  } finally {
    await file.close();
  }
});

test('ofdTestConflict sees other open file descriptions, ours and QEMU\'s, never its own', async () => {
  const path = join(dir, 'conflict.raw');
  const first = await open(path, 'w+');
  const second = await open(path, 'r');
  try {
    await first.truncate(MiB);
    await ops.ofdLock(first.fd, 100, 1, 'shared');
    assert.equal(await ops.ofdTestConflict(second.fd, 100, 1), true);
    assert.equal(await ops.ofdTestConflict(first.fd, 100, 1), false);
    assert.equal(await ops.ofdTestConflict(second.fd, 102, 1), false);
    await ops.ofdLock(first.fd, 100, 1, 'unlock');
    assert.equal(await ops.ofdTestConflict(second.fd, 100, 1), false);

    const qemuIo = spawn('qemu-io', ['-f', 'raw', '-c', 'sleep 3000', path], { stdio: 'ignore' });
    const exited = once(qemuIo, 'exit');
    try {
      await eventually(() => ops.ofdTestConflict(first.fd, 100, 1), 'qemu-io holds byte 100');
    } finally {
      qemuIo.kill();
      await exited;
    }
    assert.equal(await ops.ofdTestConflict(first.fd, 100, 1), false);
  } finally {
    await second.close();
    await first.close();
  }
});

test('the fallback: all data up to EOF, no fallocate, no locking', async () => {
  const fallback = fallbackFileOps();
  const file = await sparseFile('fallback.raw');
  try {
    assert.equal(fallback.native, false);
    assert.equal(await fallback.seekData(file.fd, 0), 0);
    assert.equal(await fallback.seekData(file.fd, 3 * MiB), 3 * MiB);
    assert.equal(await fallback.seekData(file.fd, 4 * MiB), null);
    assert.equal(await fallback.seekHole(file.fd, 0), 4 * MiB);
    assert.equal(await fallback.seekHole(file.fd, 4 * MiB), null);
    await assert.rejects(fallback.fallocate(file.fd, FALLOC_FL_ZERO_RANGE, 0, 4 * KiB),
      { code: 'EOPNOTSUPP', errno: 95, message: 'fallocate: Operation not supported' });
    await fallback.ofdLock(file.fd, 100, 1, 'shared');
    assert.equal(await fallback.ofdTestConflict(file.fd, 100, 1), false);
  } finally {
    await file.close();
  }
});
