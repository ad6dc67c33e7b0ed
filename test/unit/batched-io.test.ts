/* Batched writes on real files: every byte lands where it was sent, errors reach only their own request, reads stay whole. */
import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
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
