/*
 * Compressed writes, as QEMU's qcow2_co_pwritev_compressed_part makes them (backup and
 * convert with `compress`): each cluster of the request (whole clusters, or the image's
 * last cluster padded with zeroes) is deflated and stored as a compressed cluster, packed
 * after the previous one in host space (Refcounts.allocateBytes). A cluster that does not
 * get smaller is written plainly instead. Compression never overwrites: a compressed
 * cluster aimed at a guest cluster that is allocated (data, preallocated zeroes, another
 * compressed cluster) fails the request with EIO, as in QEMU; unallocated and plain zero
 * clusters are replaced, over a backing file too. Crash-safe order as every allocation:
 * the data, then refcounts, then the L2 entries (cached until a write-back).
 */
import type { WriteFlags } from '../../block-driver.js';
import { IoError } from '../../io-error.js';
import { deflateCluster } from './deflate.js';
import { L2E_OFFSET_MASK } from './format-constants.js';
import type { Qcow2Image } from './qcow2-image.js';
import { fuaBarrier, lookupClusters, setEntries, writeData } from './qcow2-writes.js';
import { encodeCompressedDescriptor } from './table-entries.js';

/** Cluster `index` of the request; the image's partial last cluster is padded with zeroes. */
function clusterOf(buffer: Buffer, index: number, clusterSize: number): Buffer {
  const part = buffer.subarray(index * clusterSize, (index + 1) * clusterSize);
  if (part.length === clusterSize) return part;
  const padded = Buffer.alloc(clusterSize);
  part.copy(padded);
  return padded;
}

export async function writeCompressed(image: Qcow2Image, offset: number, buffer: Buffer, flags: WriteFlags): Promise<void> {
  image.checkUsable();
  const cs = image.clusterSize;
  if (offset % cs !== 0 || (buffer.length % cs !== 0 && offset + buffer.length !== image.size)) {
    throw new IoError('EINVAL', `a compressed write must cover whole clusters: [${offset}, +${buffer.length}) with ${cs}-byte clusters`);
  }
  const count = Math.ceil(buffer.length / cs);
  const streams = await Promise.all(Array.from({ length: count }, (_, i) => deflateCluster(clusterOf(buffer, i, cs))));
  await storeCompressed(image, offset / cs, streams);
  for (const [i, stream] of streams.entries()) {
    if (!stream) await writeData(image, offset + i * cs, buffer.subarray(i * cs, (i + 1) * cs), {});
  }
  if (flags.fua) await fuaBarrier(image);
}

/** Stores the streams of clusters `first`, `first + 1`, ... (undefined: that cluster is written plainly). */
async function storeCompressed(image: Qcow2Image, first: number, streams: (Buffer | undefined)[]): Promise<void> {
  const cs = image.clusterSize;
  if (!streams.some(Boolean)) return;
  const release = await image.locks.acquire(first * cs, (first + streams.length) * cs, true);
  try {
    const mappings = await lookupClusters(image, first, streams.length);
    const targets = streams.flatMap((stream, i) => (stream ? [{ cluster: first + i, stream }] : []));
    for (const { cluster } of targets) {
      // QEMU looks at the offset bits only: a plain zero cluster (no host cluster) may be replaced.
      if (mappings[cluster - first]!.raw & L2E_OFFSET_MASK) throw new IoError('EIO', `compressed write to guest cluster ${cluster}, which is allocated already`);
    }
    const hosts = await image.metadata.run(async () => {
      const offsets: number[] = [];
      for (const { stream } of targets) offsets.push(await image.refcounts.allocateBytes(stream.length));
      return offsets;
    });
    targets.forEach(({ stream }, i) => image.checkWrite(hosts[i]!, stream.length));
    await Promise.all(packedRuns(hosts, targets.map(({ stream }) => stream)).map(([host, data]) => image.file.write(host, data)));
    const entries = new Map(targets.map(({ cluster, stream }, i) => [cluster, encodeCompressedDescriptor({ hostOffset: hosts[i]!, length: stream.length }, image.header.clusterBits)]));
    await setEntries(image, entries, []);
  } finally {
    release();
  }
}

/** Streams that follow each other in the file go as one write. */
function packedRuns(hosts: number[], streams: Buffer[]): [number, Buffer][] {
  const runs: { host: number; parts: Buffer[]; end: number }[] = [];
  streams.forEach((stream, i) => {
    const run = runs[runs.length - 1];
    if (run && run.end === hosts[i]) {
      run.parts.push(stream);
      run.end += stream.length;
    } else {
      runs.push({ host: hosts[i]!, parts: [stream], end: hosts[i]! + stream.length });
    }
  });
  return runs.map((run) => [run.host, run.parts.length === 1 ? run.parts[0]! : Buffer.concat(run.parts)]);
}
