/*
 * Offloaded copies through a qcow2 image (QEMU's qcow2_co_copy_range_from and _to). As the
 * source, each run of the range goes where its clusters live: the image file, the backing
 * image, or a zero write on the target. As the target, whole clusters are counted, filled
 * from the source's file by the kernel, and only then mapped: the same crash-safe order as a
 * write. Compressed clusters and parts of clusters are not offloaded (ENOTSUP): the caller
 * reads and writes them, as QEMU's block-copy falls back.
 */
import type { HostFileRange, WriteFlags } from '../../block-driver.js';
import type { ChildEdge } from '../../child-edge.js';
import { IoError } from '../../io-error.js';
import { OFLAG_COPIED } from './format-constants.js';
import type { Qcow2Image } from './qcow2-image.js';
import { lookupClusters, ownedHost, referencedClusters, setEntries } from './qcow2-writes.js';

export async function copyRangeFrom(image: Qcow2Image, offset: number, length: number, target: ChildEdge, targetOffset: number, flags: WriteFlags): Promise<void> {
  image.checkUsable();
  const release = await image.locks.acquire(offset, offset + length, false);
  try {
    for (const run of await image.mappedRuns(offset, length)) {
      const to = targetOffset + run.offset - offset;
      const { entry } = run.mapping;
      switch (entry.type) {
        case 'NORMAL':
          await image.file.copyRangeFrom(entry.hostOffset + run.offset % image.clusterSize, run.length, target, to, flags);
          break;
        case 'ZERO_ALLOC':
        case 'ZERO_PLAIN':
          await target.writeZeroes(to, run.length, flags);
          break;
        case 'UNALLOCATED':
          await copyBackingFrom(image, run.offset, run.length, target, to, flags);
          break;
        default:
          throw new IoError('ENOTSUP', 'compressed clusters are not offloaded');
      }
    }
  } finally {
    release();
  }
}

/** The backing image's part, zeros past its end (or everywhere without one). */
async function copyBackingFrom(image: Qcow2Image, offset: number, length: number, target: ChildEdge, to: number, flags: WriteFlags): Promise<void> {
  const inBacking = Math.max(0, Math.min(length, (image.backing?.length() ?? 0) - offset));
  if (inBacking > 0) await image.backing!.copyRangeFrom(offset, inBacking, target, to, flags);
  if (inBacking < length) await target.writeZeroes(to + inBacking, length - inBacking, flags);
}

export async function copyRangeTo(image: Qcow2Image, source: HostFileRange, offset: number, length: number): Promise<void> {
  image.checkUsable();
  const cs = image.clusterSize;
  if (offset % cs !== 0 || (length % cs !== 0 && offset + length !== image.size)) throw new IoError('ENOTSUP', 'offloaded copies fill whole clusters');
  const first = offset / cs;
  const count = Math.ceil(length / cs);
  const release = await image.locks.acquire(offset, (first + count) * cs, true);
  try {
    const mappings = await lookupClusters(image, first, count);
    // Clusters the image owns keep their place (a zero one changes its entry); the others get new ones.
    const hosts: (number | undefined)[] = [];
    const remapped: number[] = [];
    const released: [number, number][] = [];
    mappings.forEach((mapping, i) => {
      const owned = ownedHost(mapping);
      hosts.push(owned);
      if (mapping.entry.type === 'NORMAL' && owned !== undefined) return;
      remapped.push(i);
      if (owned === undefined) released.push(...referencedClusters(image, mapping));
      if (mapping.entry.type === 'COMPRESSED') image.forgetInflated(mapping.raw);
    });
    const missing = hosts.flatMap((host, i) => (host === undefined ? [i] : []));
    if (missing.length) {
      const allocated = await image.metadata.run(() => image.refcounts.allocate(missing.length));
      missing.forEach((i, n) => (hosts[i] = allocated[n]));
    }
    for (const [index, clusters] of hostRuns(hosts as number[], cs)) {
      const start = index * cs;
      const bytes = Math.min(clusters * cs, length - start);
      image.checkWrite(hosts[index]!, bytes);
      await image.file.copyRangeTo({ fd: source.fd, offset: source.offset + start }, hosts[index]!, bytes);
    }
    // Mapped only now, after the data: the entries reach the disk at the next write-back.
    await setEntries(image, new Map(remapped.map((i) => [first + i, BigInt(hosts[i]!) | OFLAG_COPIED])), released);
  } finally {
    release();
  }
}

/** Runs of clusters that follow each other on the host: [first index, cluster count]. */
function hostRuns(hosts: number[], clusterSize: number): [number, number][] {
  const runs: [number, number][] = [];
  hosts.forEach((host, i) => {
    const run = runs[runs.length - 1];
    if (run && host === hosts[run[0]]! + run[1] * clusterSize) run[1]++;
    else runs.push([i, 1]);
  });
  return runs;
}
