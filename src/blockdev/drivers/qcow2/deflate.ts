/*
 * Compressing one cluster for a zlib qcow2 image, with the settings of QEMU's
 * qcow2_zlib_compress: a raw deflate stream (no zlib header), a 4 KiB window
 * (window bits -12), the default level and memory level 9. The work runs on
 * libuv's thread pool, so a backup or convert that compresses many clusters
 * does not block the event loop.
 */
import { constants, deflateRaw } from 'node:zlib';
import { promisify } from 'node:util';

const deflateRawAsync = promisify(deflateRaw);

const QEMU_ZLIB_OPTIONS = { level: constants.Z_DEFAULT_COMPRESSION, windowBits: 12, memLevel: 9, strategy: constants.Z_DEFAULT_STRATEGY };

/**
 * The cluster as a raw deflate stream, or undefined when the stream would not be smaller than
 * the cluster (QEMU compresses into cluster_size - 1 bytes and writes the cluster plainly when
 * that does not fit).
 */
export async function deflateCluster(cluster: Buffer): Promise<Buffer | undefined> {
  const stream = await deflateRawAsync(cluster, QEMU_ZLIB_OPTIONS);
  return stream.length < cluster.length ? stream : undefined;
}
