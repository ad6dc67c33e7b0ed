/*
 * Batched writes on real files: every byte lands where it was sent, errors reach only their own request,
 * reads stay whole, and small reads of cached data skip the thread pool.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, fsyncSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { constants, tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { preadFull, pwriteFull } from '../../src/blockdev/native/batched-io.js';
import { nativeFileOps } from '../../src/blockdev/native/native-file-ops.js';
import { errnoOf } from '../../src/blockdev/io-error.js';

const KiB = 1024;
let dir = '';
before(async () => { dir = await mkdtemp(join(tmpdir(), 'blockd-batched-')); });
after(async () => { await rm(dir, { recursive: true, force: true }); });

test('the addon offers batched writes (no silent fallback)', () => {
  assert.equal(typeof nativeFileOps.writeBatch, 'function');
});

test('many writes issued at once, small and large, over two files, all land', async () => {
  const paths = [join(dir, 'a'), join(dir, 'b')];
  const fds = paths.map((path) => openSync(path, 'w+'));
  try {
    // 40 small writes and two of 1 MiB, interleaved: several batches per file, each file's batches one after the other.
    const expected = paths.map(() => Buffer.alloc(3 * 1024 * KiB));
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 40; i++) {
      const file = i % 2;
      const data = Buffer.alloc(4 * KiB + i, i + 1);
      const offset = i * 17 * KiB;
      data.copy(expected[file]!, offset);
      writes.push(pwriteFull(fds[file]!, data, offset));
      if (i === 20) {
        for (const f of [0, 1]) {
          const big = Buffer.alloc(1024 * KiB, 0xa0 + f);
          big.copy(expected[f]!, 2 * 1024 * KiB);
          writes.push(pwriteFull(fds[f]!, big, 2 * 1024 * KiB));
        }
      }
    }
    await Promise.all(writes);
    paths.forEach((path, f) => assert.ok(readFileSync(path).equals(expected[f]!.subarray(0, readFileSync(path).length)), `file ${f} holds every write`));
    paths.forEach((path) => assert.equal(readFileSync(path).length, 3 * 1024 * KiB));
  } finally {
    fds.forEach((fd) => closeSync(fd));
  }
});

test('a failing write fails alone, with its errno name, and the others of its batch land', async () => {
  const good = openSync(join(dir, 'good'), 'w+');
  writeFileSync(join(dir, 'readonly'), 'x');
  const readOnly = openSync(join(dir, 'readonly'), 'r');
  try {
    const results = await Promise.allSettled([
      pwriteFull(good, Buffer.alloc(512, 1), 0),
      pwriteFull(readOnly, Buffer.alloc(512, 2), 0),
      pwriteFull(good, Buffer.alloc(512, 3), 512),
    ]);
    assert.deepEqual(results.map((result) => result.status), ['fulfilled', 'rejected', 'fulfilled']);
    assert.equal(errnoOf((results[1] as PromiseRejectedResult).reason), 'EBADF');
    assert.ok(readFileSync(join(dir, 'good')).equals(Buffer.concat([Buffer.alloc(512, 1), Buffer.alloc(512, 3)])));
    assert.equal(readFileSync(join(dir, 'readonly'), 'utf8'), 'x');
  } finally {
    closeSync(good);
    closeSync(readOnly);
  }
});

test('reads fill the whole buffer and report a short count only at the end of the file', async () => {
  const path = join(dir, 'short');
  writeFileSync(path, Buffer.alloc(3000, 7));
  const fd = openSync(path, 'r');
  try {
    const buffer = Buffer.alloc(4096, 0xff);
    assert.equal(await preadFull(fd, buffer, 0), 3000);
    assert.ok(buffer.subarray(0, 3000).equals(Buffer.alloc(3000, 7)));
    assert.equal(await preadFull(fd, Buffer.alloc(512), 8192), 0);
  } finally {
    closeSync(fd);
  }
});

/** Drops a file's pages from the page cache (GNU dd: `iflag=nocache count=0` does it for the whole file; the pages must be clean). */
function dropFromCache(path: string): void {
  const result = spawnSync('dd', [`if=${path}`, 'iflag=nocache', 'count=0', 'status=none']);
  assert.equal(result.status, 0, `dd could not drop ${path} from the page cache: ${result.stderr}`);
}

test('small reads of what the page cache holds are copied at once (RWF_NOWAIT); others wait for the pool, and then are cached', async () => {
  const readCached = nativeFileOps.readCached!;
  assert.equal(typeof readCached, 'function', 'the addon offers cached reads (no silent fallback)');
  const path = join(dir, 'cached');
  const data = randomBytes(256 * KiB);
  writeFileSync(path, data);
  const fd = openSync(path, 'r');
  try {
    fsyncSync(fd);
    const buffer = Buffer.alloc(data.length);
    assert.equal(readCached(fd, buffer, 0), data.length);
    assert.ok(buffer.equals(data));
    assert.equal(readCached(fd, buffer.subarray(0, 100), data.length - 44), 44, 'a short count at the end of the file');
    assert.equal(readCached(fd, buffer, data.length + 4096), 0, 'nothing past the end');

    dropFromCache(path);
    assert.equal(readCached(fd, Buffer.alloc(64 * KiB), 64 * KiB), -constants.errno.EAGAIN, 'not cached: the read would wait for the disk');
    const read = Buffer.alloc(64 * KiB);
    assert.equal(await preadFull(fd, read, 64 * KiB), 64 * KiB, 'preadFull reads what is not cached through the pool');
    assert.ok(read.equals(data.subarray(64 * KiB, 128 * KiB)));
    assert.equal(readCached(fd, Buffer.alloc(64 * KiB), 64 * KiB), 64 * KiB, 'and then it is cached');
    assert.throws(() => readCached(fd, 'x' as unknown as Buffer, 0), { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE' });
  } finally {
    closeSync(fd);
  }
});
