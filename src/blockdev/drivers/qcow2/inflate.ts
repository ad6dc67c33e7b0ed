/*
 * Compressed clusters: qcow2 stores one cluster as a raw deflate stream whose length is
 * known only to the sector, so decoding stops once a cluster is full.
 */
import { constants, createInflateRaw } from 'node:zlib';

/**
 * Inflates a raw deflate stream up to `limit` bytes and stops there, as QEMU fills one cluster
 * and ignores the rest: a corrupt stream that would inflate to gigabytes costs one cluster.
 * The stream may be followed by other data (its length is known to a sector only).
 */
export function inflateAtMost(input: Buffer, limit: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const inflater = createInflateRaw({ finishFlush: constants.Z_SYNC_FLUSH, chunkSize: Math.min(limit, 64 << 10) });
    const parts: Buffer[] = [];
    let length = 0;
    let settled = false;
    const finish = () => {
      if (settled) return;
      settled = true;
      inflater.destroy();
      resolve(Buffer.concat(parts, length).subarray(0, limit));
    };
    inflater.on('data', (chunk: Buffer) => {
      parts.push(chunk);
      length += chunk.length;
      if (length >= limit) finish();
    });
    inflater.on('end', finish);
    inflater.on('error', (error) => {
      if (settled) return;
      settled = true;
      reject(error);
    });
    inflater.end(input);
  });
}
