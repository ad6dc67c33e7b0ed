/*
 * BlockCopy on real qcow2 images: what it copies (all dirty clusters, only the
 * top layer's with skipUnallocated), that two requests for the same clusters
 * copy them once (the second waits), and that a failed copy leaves its
 * clusters dirty for a retry. Images are compared with qemu-img afterwards.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { BlockCopy, blockCopyClusterSize } from '../../src/blockdev/block-copy.js';
import { IoError } from '../../src/blockdev/io-error.js';
import { openImage, type ImageSession } from '../../src/blockdev/image-session.js';
import { makeTempDir } from '../helpers/paths.js';
import { createQcow2, MiB, qemuImgCompare, qemuImgMap, qemuIo, assertCheckClean } from '../helpers/qemu-tools.js';

interface Pair {
  source: ImageSession;
  target: ImageSession;
  sourcePath: string;
  targetPath: string;
}

/** A 4 MiB source with data at 0, 1 MiB (in its backing file) and 3 MiB, and an empty target. */
async function withPair(use: (pair: Pair) => Promise<void>): Promise<void> {
  const temp = makeTempDir();
  const basePath = createQcow2(join(temp.dir, 'base.qcow2'), 4 * MiB);
  qemuIo(basePath, ['write -P 0x11 1M 128k']);
  const sourcePath = createQcow2(join(temp.dir, 'source.qcow2'), 4 * MiB, { backing: { path: basePath, format: 'qcow2' } });
  qemuIo(sourcePath, ['write -P 0x22 0 64k', 'write -P 0x33 3M 192k']);
  const targetPath = createQcow2(join(temp.dir, 'target.qcow2'), 4 * MiB);
  const pair: Pair = {
    source: await openImage(sourcePath, { format: 'qcow2' }),
    target: await openImage(targetPath, { format: 'qcow2', writable: true }),
    sourcePath,
    targetPath,
  };
  try {
    await use(pair);
  } finally {
    // A test may have closed the target to inspect it, and reopened it.
    await pair.target.close();
    await pair.source.close();
    temp.cleanup();
  }
}

test('the copy cluster is at least 64 KiB, or the target\'s cluster', () => withPair(async ({ target }) => {
  assert.equal(blockCopyClusterSize(target.disk), 65536);
}));

test('copying every dirty cluster makes the target read as the source; the bitmap ends clean', () => withPair(async (pair) => {
  const copy = new BlockCopy(pair.source.disk, pair.target.disk, 65536);
  copy.bitmap.set(0, 4 * MiB);
  let copied = 0;
  copy.onCopied = (bytes) => (copied += bytes);
  await copy.copy(0, 4 * MiB);
  assert.equal(copy.remaining(), 0);
  assert.equal(copied, 4 * MiB, 'zero clusters count as copied too');
  await pair.target.close();
  qemuImgCompare(pair.sourcePath, pair.targetPath, ['qcow2', 'qcow2']);
  assertCheckClean(pair.targetPath);
  pair.target = await openImage(pair.targetPath, { format: 'qcow2', writable: true });
}));

test('only dirty clusters are copied', () => withPair(async (pair) => {
  const copy = new BlockCopy(pair.source.disk, pair.target.disk, 65536);
  copy.bitmap.set(3 * MiB, 65536);
  await copy.copy(0, 4 * MiB);
  await pair.target.close();
  const data = qemuImgMap(pair.targetPath).filter((extent) => extent.data);
  assert.deepEqual(data.map((extent) => [extent.start, extent.length]), [[3 * MiB, 65536]]);
  qemuIo(pair.targetPath, ['read -P 0x33 3M 64k', 'read -P 0 0 64k']);
  pair.target = await openImage(pair.targetPath, { format: 'qcow2', writable: true });
}));

test('with skipUnallocated only the top layer\'s clusters reach the target', () => withPair(async (pair) => {
  const copy = new BlockCopy(pair.source.disk, pair.target.disk, 65536);
  copy.configure({ skipUnallocated: true });
  copy.bitmap.set(0, 4 * MiB);
  for (let offset = 0; offset < 4 * MiB;) offset += await copy.resetUnallocated(offset);
  assert.equal(copy.remaining(), 64 * 1024 + 192 * 1024, 'the first pass leaves the top layer\'s clusters');
  await copy.copy(0, 4 * MiB);
  await pair.target.close();
  const data = qemuImgMap(pair.targetPath).filter((extent) => extent.data);
  assert.deepEqual(data.map((extent) => [extent.start, extent.length]), [[0, 65536], [3 * MiB, 192 * 1024]]);
  pair.target = await openImage(pair.targetPath, { format: 'qcow2', writable: true });
}));

test('a second request for clusters being copied waits for that copy and copies nothing again', () => withPair(async (pair) => {
  const copy = new BlockCopy(pair.source.disk, pair.target.disk, 65536);
  copy.bitmap.set(0, 4 * MiB);
  const reads: number[] = [];
  const sourceState = pair.source.node.state;
  const driverRead = sourceState.read.bind(sourceState);
  sourceState.read = (offset, buffer) => {
    reads.push(offset);
    return driverRead(offset, buffer);
  };
  const first = copy.copy(3 * MiB, 192 * 1024);
  // Inside the first copy's range: the second must not return before the first's data is in.
  await copy.copy(3 * MiB + 4096, 4096);
  assert.equal(copy.remaining(), 4 * MiB - 192 * 1024, 'nothing is in flight: the first copy had finished');
  await first;
  const reread = reads.filter((offset) => offset >= 3 * MiB && offset < 3 * MiB + 192 * 1024);
  assert.ok(reread.length > 0);
  assert.equal(new Set(reread).size, reread.length, 'no cluster was read twice');
}));

test('a failed copy leaves its clusters dirty, and the next request copies them', () => withPair(async (pair) => {
  const copy = new BlockCopy(pair.source.disk, pair.target.disk, 65536);
  copy.bitmap.set(0, 65536);
  const targetState = pair.target.node.state;
  const driverWrite = targetState.write!.bind(targetState);
  let failNext = true;
  targetState.write = (offset, buffer, flags) => {
    if (failNext) {
      failNext = false;
      return Promise.reject(new IoError('EIO'));
    }
    return driverWrite(offset, buffer, flags);
  };
  await assert.rejects(copy.copy(0, 65536), (error: Error & { operation?: string }) => error.operation === 'write');
  assert.equal(copy.remaining(), 65536, 'the cluster is dirty again');
  await copy.copy(0, 65536);
  assert.equal(copy.remaining(), 0);
  await pair.target.close();
  qemuIo(pair.targetPath, ['read -P 0x22 0 64k']);
  pair.target = await openImage(pair.targetPath, { format: 'qcow2', writable: true });
}));

/** Counts the reads of a node's driver (the offload path never reads data into memory). */
function countReads(session: ImageSession): { count: number } {
  const counter = { count: 0 };
  for (let node = session.node as typeof session.node | undefined; node; node = node.backing()?.child) {
    const state = node.state;
    const driverRead = state.read.bind(state);
    state.read = (offset, buffer) => {
      counter.count++;
      return driverRead(offset, buffer);
    };
  }
  return counter;
}

test('with useCopyRange the copy is offloaded: nothing is read into memory, the target reads as the source and is clean', () => withPair(async (pair) => {
  // The target already holds data, in clusters it owns and in an allocated zero cluster: filled in place.
  await pair.target.close();
  qemuIo(pair.targetPath, ['write -P 0x44 0 128k', 'write -P 0x44 3M 192k', 'write -z 3M 64k']);
  pair.target = await openImage(pair.targetPath, { format: 'qcow2', writable: true });
  const copy = new BlockCopy(pair.source.disk, pair.target.disk, 65536);
  copy.configure({ useCopyRange: true });
  copy.bitmap.set(0, 4 * MiB);
  const reads = countReads(pair.source);
  await copy.copy(0, 4 * MiB);
  assert.equal(copy.remaining(), 0);
  assert.equal(reads.count, 0, 'the data went from file to file');
  await pair.target.close();
  qemuImgCompare(pair.sourcePath, pair.targetPath, ['qcow2', 'qcow2']);
  assertCheckClean(pair.targetPath);
  pair.target = await openImage(pair.targetPath, { format: 'qcow2', writable: true });
}));

test('with useCopyRange a compressed cluster is read and written, and copies stay read and write from then on', () => withPair(async (pair) => {
  await pair.source.close();
  qemuIo(pair.sourcePath, ['write -c -P 0x55 2M 64k']);
  pair.source = await openImage(pair.sourcePath, { format: 'qcow2' });
  const copy = new BlockCopy(pair.source.disk, pair.target.disk, 65536);
  copy.configure({ useCopyRange: true });
  copy.bitmap.set(2 * MiB, 2 * MiB);
  const reads = countReads(pair.source);
  await copy.copy(2 * MiB, 64 * 1024);
  assert.ok(reads.count > 0, 'the compressed cluster was read');
  const afterFallback = reads.count;
  await copy.copy(3 * MiB, MiB);
  assert.ok(reads.count > afterFallback, 'plain clusters are read too once an offload failed');
  copy.bitmap.set(0, 2 * MiB);
  await copy.copy(0, 2 * MiB);
  await pair.target.close();
  qemuImgCompare(pair.sourcePath, pair.targetPath, ['qcow2', 'qcow2']);
  assertCheckClean(pair.targetPath);
  pair.target = await openImage(pair.targetPath, { format: 'qcow2', writable: true });
}));
