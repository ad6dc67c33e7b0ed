/*
 * A compressed cluster whose deflate stream would inflate to far more than a cluster (a
 * corrupt or crafted image) costs one cluster to read: blockd stops inflating once the
 * cluster is full and reads what QEMU reads (the first cluster's worth), instead of
 * allocating what the stream asks for.
 */
import assert from 'node:assert/strict';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { constants, deflateRawSync } from 'node:zlib';
import { openImage } from '../../src/blockdev/image-session.js';
import { makeTempDir } from '../helpers/paths.js';
import { MiB, createQcow2, qemuIo, readAt, writeAt } from '../helpers/qemu-tools.js';

const { dir, cleanup } = makeTempDir('blockd-qcow2-bomb-');
after(cleanup);

const CLUSTER_BITS = 21; // 2 MiB clusters: a compressed descriptor may then span 4 MiB of stream
const CLUSTER = 1 << CLUSTER_BITS;

/** A raw deflate stream of `copies` x 64 MiB of zeros (each copy a full-flushed block, so copies concatenate), then a final block. */
function deflateBomb(copies: number): Buffer {
  const block = deflateRawSync(Buffer.alloc(64 * MiB), { level: 9, finishFlush: constants.Z_FULL_FLUSH });
  const end = deflateRawSync(Buffer.alloc(0));
  return Buffer.concat([...Array.from({ length: copies }, () => block), end]);
}

test('a compressed cluster that would inflate to 1 GiB is read as one cluster', async () => {
  const path = join(dir, 'bomb.qcow2');
  createQcow2(path, 2 * CLUSTER, { clusterSize: CLUSTER });
  qemuIo(path, ['write -c -P 0x11 0 2M']);
  // Point the first L2 entry at a stream appended to the file, sized to cover all of it.
  const bomb = deflateBomb(16);
  const streamOffset = Math.ceil(statSync(path).size / 512) * 512;
  writeAt(path, streamOffset, bomb);
  const sectors = Math.ceil(bomb.length / 512);
  assert.ok(sectors <= 1 << (CLUSTER_BITS - 8), 'the stream fits a compressed descriptor');
  const l1Offset = Number(readAt(path, 40, 8).readBigUInt64BE());
  const l2Offset = Number(readAt(path, l1Offset, 8).readBigUInt64BE() & 0x00fffffffffffe00n);
  const descriptor = (1n << 62n) | (BigInt(sectors - 1) << BigInt(62 - (CLUSTER_BITS - 8))) | BigInt(streamOffset);
  const entry = Buffer.alloc(8);
  entry.writeBigUInt64BE(descriptor);
  writeAt(path, l2Offset, entry);

  qemuIo(path, ['read -q -P 0 0 2M'], ['-r', '-f', 'qcow2']); // QEMU reads the first cluster's worth: zeros

  const session = await openImage(path);
  try {
    const peakBefore = process.resourceUsage().maxRSS * 1024;
    const cluster = Buffer.alloc(CLUSTER, 0xff);
    await session.disk.read(0, cluster);
    assert.ok(cluster.equals(Buffer.alloc(CLUSTER)), 'blockd reads what QEMU reads');
    const grown = process.resourceUsage().maxRSS * 1024 - peakBefore;
    assert.ok(grown < 128 * MiB, `reading one compressed cluster raised the peak RSS by ${grown >> 20} MiB`);
  } finally {
    await session.close();
  }
});
