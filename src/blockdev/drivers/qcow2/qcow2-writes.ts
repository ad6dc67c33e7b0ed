/*
 * Everything that changes a qcow2 image, in the crash-safe order of the
 * format: new clusters are counted and their data written before an L2 entry
 * points at them. Like QEMU, new entries stay in the table cache until a
 * write-back (a flush, a full cache, close), which puts a barrier first; an
 * entry that drops a reference is durable before the refcount goes down.
 * Writes into clusters the image owns go straight to the file under a shared
 * lock; anything that changes a mapping holds the clusters exclusively.
 */
import type { WriteFlags, ZeroFlags } from '../../block-driver.js';
import { IoError } from '../../io-error.js';
import { OFLAG_COPIED, OFLAG_ZERO } from './format-constants.js';
import type { MappedCluster } from './cluster-tables.js';
import type { Qcow2Image } from './qcow2-image.js';

/** Host clusters a mapping holds a reference on: released when the mapping goes away. */
export function referencedClusters(image: Qcow2Image, mapping: MappedCluster): [number, number][] {
  const { entry } = mapping;
  if (entry.type === 'NORMAL' || entry.type === 'ZERO_ALLOC') return [[entry.hostOffset, image.clusterSize]];
  if (entry.type === 'COMPRESSED') return [[entry.compressed.hostOffset, entry.compressed.compressedSize]];
  return [];
}

export function ownedHost(mapping: MappedCluster): number | undefined {
  const { entry } = mapping;
  return (entry.type === 'NORMAL' || entry.type === 'ZERO_ALLOC') && entry.copied ? entry.hostOffset : undefined;
}

export async function lookupClusters(image: Qcow2Image, first: number, count: number): Promise<MappedCluster[]> {
  const mappings: MappedCluster[] = [];
  while (mappings.length < count) mappings.push(...(await image.tables.lookupRun(first + mappings.length, count - mappings.length)));
  return mappings;
}

/**
 * The overlap check of new clusters, on the guest data as QEMU makes it (its host range, over
 * clusters that follow each other on the host), so that a refusal names the same offset and size.
 * The check is per cluster: the parts around the guest data are checked with it.
 */
function checkGuestData(image: Qcow2Image, contents: { cluster: number; host?: number; guest: [number, number] }[]): void {
  for (let i = 0; i < contents.length;) {
    const first = contents[i]!;
    let length = first.guest[1];
    let next = i + 1;
    for (; next < contents.length; next++) {
      const [previous, content] = [contents[next - 1]!, contents[next]!];
      if (content.cluster !== previous.cluster + 1 || content.host !== previous.host! + image.clusterSize) break;
      length += content.guest[1];
    }
    image.checkWrite(first.host! + first.guest[0], length);
    i = next;
  }
}

/**
 * The new clusters' data as file writes: whole clusters of the guest write that follow each
 * other on the host go as one write (a 1 MiB copy into fresh clusters is one request to the
 * file, not sixteen). Partly written clusters (merged with their old contents) go alone.
 */
function hostRuns(image: Qcow2Image, offset: number, buffer: Buffer, contents: { cluster: number; data: Buffer; host?: number }[]): [number, Buffer][] {
  const cs = image.clusterSize;
  const inGuestWrite = (cluster: number) => cluster * cs >= offset && (cluster + 1) * cs <= offset + buffer.length;
  const runs: { host: number; first: number; last: number; data: Buffer; whole: boolean }[] = [];
  for (const { cluster, data, host } of contents) {
    const whole = inGuestWrite(cluster);
    const run = runs[runs.length - 1];
    if (whole && run?.whole && cluster === run.last + 1 && host === run.host + run.data.length) {
      run.last = cluster;
      run.data = buffer.subarray(run.first * cs - offset, (cluster + 1) * cs - offset);
    } else {
      runs.push({ host: host!, first: cluster, last: cluster, data, whole });
    }
  }
  return runs.map((run) => [run.host, run.data]);
}

/** A FUA write is durable with everything that makes it readable: metadata written back, then a barrier. */
export async function fuaBarrier(image: Qcow2Image): Promise<void> {
  await image.flushMetadata();
  await image.barrier.flush();
}

/**
 * Updates cached L2 entries and queues the references they drop (released after the next
 * write-back made the new entries durable). Writes back now if too many tables are dirty.
 */
export async function setEntries(image: Qcow2Image, updates: Map<number, bigint>, released: [number, number][]): Promise<void> {
  if (!updates.size && !released.length) return;
  await image.metadata.run(async () => {
    if (updates.size) await image.tables.setEntries(updates);
    for (const [offset, length] of released) image.releaseLater(offset, length);
    if (image.tables.needsWriteBack()) await image.writeBackMetadata();
  });
}

export async function writeData(image: Qcow2Image, offset: number, buffer: Buffer, flags: WriteFlags): Promise<void> {
  image.checkUsable();
  const release = await image.locks.acquire(offset, offset + buffer.length, false);
  let inPlace: boolean;
  try {
    const runs = await image.mappedRuns(offset, buffer.length);
    inPlace = runs.every((run) => run.mapping.entry.type === 'NORMAL' && run.mapping.entry.copied);
    if (inPlace) {
      let done = 0;
      for (const run of runs) {
        const host = (run.mapping.entry as { hostOffset: number }).hostOffset + (run.offset % image.clusterSize);
        image.checkWrite(host, run.length);
        await image.file.write(host, buffer.subarray(done, done + run.length));
        done += run.length;
      }
    }
  } finally {
    release();
  }
  if (!inPlace) await allocatingWrite(image, offset, buffer);
  if (flags.fua) await fuaBarrier(image);
}

async function allocatingWrite(image: Qcow2Image, offset: number, buffer: Buffer): Promise<void> {
  const cs = image.clusterSize;
  const first = Math.floor(offset / cs);
  const last = Math.floor((offset + buffer.length - 1) / cs);
  const release = await image.locks.acquire(first * cs, (last + 1) * cs, true);
  try {
    const mappings = await lookupClusters(image, first, last - first + 1);
    const contents: { cluster: number; data: Buffer; host?: number; guest: [number, number] }[] = [];
    const released: [number, number][] = [];
    for (let i = 0; i < mappings.length; i++) {
      const cluster = first + i;
      const mapping = mappings[i]!;
      const clusterStart = cluster * cs;
      const from = Math.max(offset, clusterStart);
      const to = Math.min(offset + buffer.length, clusterStart + cs);
      const slice = buffer.subarray(from - offset, to - offset);
      const owned = ownedHost(mapping);
      if (mapping.entry.type === 'NORMAL' && owned !== undefined) {
        image.checkWrite(owned + from - clusterStart, slice.length);
        await image.file.write(owned + from - clusterStart, slice);
        continue;
      }
      // A whole new cluster: the old contents around the write (backing, zeros, a shared or compressed cluster).
      let data = slice;
      if (slice.length < cs) {
        data = Buffer.alloc(cs);
        if (mapping.entry.type !== 'ZERO_ALLOC' && mapping.entry.type !== 'ZERO_PLAIN') await image.readUnlocked(clusterStart, data);
        slice.copy(data, from - clusterStart);
      }
      contents.push({ cluster, data, host: owned, guest: [from - clusterStart, slice.length] });
      if (owned === undefined) released.push(...referencedClusters(image, mapping));
      if (mapping.entry.type === 'COMPRESSED') image.forgetInflated(mapping.raw);
    }
    if (!contents.length) return;

    const needHosts = contents.filter((content) => content.host === undefined);
    if (needHosts.length) {
      const hosts = await image.metadata.run(() => image.refcounts.allocate(needHosts.length));
      needHosts.forEach((content, i) => (content.host = hosts[i]));
    }
    checkGuestData(image, contents);
    await Promise.all(hostRuns(image, offset, buffer, contents).map(([host, data]) => image.file.write(host, data)));
    // The new entries stay in memory until a write-back, which first makes this data durable.
    await setEntries(image, new Map(contents.map((content) => [content.cluster, BigInt(content.host!) | OFLAG_COPIED])), released);
  } finally {
    release();
  }
}

/** Zeroes whole clusters with the zero flag (v3), or by unmapping them (v2 without a backing file). */
async function zeroClusters(image: Qcow2Image, first: number, count: number, mayUnmap: boolean): Promise<void> {
  const cs = image.clusterSize;
  const release = await image.locks.acquire(first * cs, (first + count) * cs, true);
  try {
    const mappings = await lookupClusters(image, first, count);
    const updates = new Map<number, bigint>();
    const released: [number, number][] = [];
    mappings.forEach((mapping, i) => {
      const { entry } = mapping;
      if (entry.type === 'ZERO_PLAIN' || (entry.type === 'ZERO_ALLOC' && !mayUnmap)) return;
      // v2 has no ZERO_ALLOC: its entry becomes 0, so the cluster is released even without mayUnmap.
      const keep = !mayUnmap && entry.type === 'NORMAL' && image.header.version === 3 ? ownedHost(mapping) : undefined;
      if (image.header.version === 2) updates.set(first + i, 0n);
      else updates.set(first + i, keep === undefined ? OFLAG_ZERO : BigInt(keep) | OFLAG_COPIED | OFLAG_ZERO);
      if (keep === undefined) released.push(...referencedClusters(image, mapping));
      if (entry.type === 'COMPRESSED') image.forgetInflated(mapping.raw);
    });
    await setEntries(image, updates, released);
  } finally {
    release();
  }
}

export async function writeZeroes(image: Qcow2Image, offset: number, length: number, flags: ZeroFlags): Promise<void> {
  image.checkUsable();
  // v2 has no zero flag: with a backing file, unmapping would expose its data.
  if (image.header.version === 2 && image.backing) throw new IoError('ENOTSUP');
  const cs = image.clusterSize;
  const end = offset + length;
  const alignedStart = Math.ceil(offset / cs) * cs;
  const alignedEnd = Math.min(Math.floor(end / cs) * cs, end);
  // The last cluster of an image whose size is not cluster-aligned counts as whole.
  const wholeEnd = end === image.size && end % cs !== 0 ? Math.ceil(end / cs) * cs : alignedEnd;
  if (alignedStart >= wholeEnd) return writeData(image, offset, Buffer.alloc(length), flags);
  if (offset < alignedStart) await writeData(image, offset, Buffer.alloc(alignedStart - offset), {});
  await zeroClusters(image, alignedStart / cs, (wholeEnd - alignedStart) / cs, flags.mayUnmap === true);
  if (wholeEnd < end) await writeData(image, wholeEnd, Buffer.alloc(end - wholeEnd), {});
  if (flags.fua) await fuaBarrier(image);
}

/** Discard (only whole clusters): the clusters read as zeros afterwards and their space is freed. */
export async function discard(image: Qcow2Image, offset: number, length: number): Promise<void> {
  image.checkUsable();
  const cs = image.clusterSize;
  const first = Math.ceil(offset / cs);
  const end = offset + length === image.size ? Math.ceil((offset + length) / cs) : Math.floor((offset + length) / cs);
  if (end <= first) return;
  const release = await image.locks.acquire(first * cs, end * cs, true);
  try {
    const mappings = await lookupClusters(image, first, end - first);
    const updates = new Map<number, bigint>();
    const released: [number, number][] = [];
    mappings.forEach((mapping, i) => {
      const allocated = mapping.entry.type !== 'UNALLOCATED';
      if (!allocated && !image.backing) return;
      updates.set(first + i, image.header.version === 3 ? OFLAG_ZERO : 0n);
      released.push(...referencedClusters(image, mapping));
      if (mapping.entry.type === 'COMPRESSED') image.forgetInflated(mapping.raw);
    });
    await setEntries(image, updates, released);
  } finally {
    release();
  }
}

/**
 * The area a grow adds must read as zeros: the old last cluster may keep data past the old
 * end (a shrink leaves it), and a longer backing file would show through unallocated clusters.
 * No request reaches the area before the size changes.
 */
async function zeroPastEnd(image: Qcow2Image, from: number, to: number): Promise<void> {
  const cs = image.clusterSize;
  const backingEnd = image.backing?.length() ?? 0;
  const headEnd = Math.min(to, Math.ceil(from / cs) * cs);
  if (headEnd > from) {
    const { type } = (await image.tables.lookup(Math.floor(from / cs))).entry;
    if (type === 'NORMAL' || type === 'COMPRESSED' || (type === 'UNALLOCATED' && backingEnd > from)) {
      await writeData(image, from, Buffer.alloc(headEnd - from), {});
    }
  }
  const zeroEnd = Math.min(to, Math.ceil(backingEnd / cs) * cs);
  if (zeroEnd > headEnd) await zeroClusters(image, headEnd / cs, (zeroEnd - headEnd) / cs, false);
}

/** Grows or shrinks the virtual disk; shrinking drops the clusters past the new end entirely. */
export async function resize(image: Qcow2Image, size: number): Promise<void> {
  image.checkUsable();
  if (size % 512 !== 0) throw new IoError('EINVAL', 'The new size must be a multiple of 512');
  if (image.header.nbSnapshots > 0 && size < image.size) throw new IoError('ENOTSUP', "Can't shrink an image with internal snapshots");
  if (size > image.size) {
    // v2 has no zero flag to hide a longer backing file with (QEMU refuses too).
    if (image.header.version === 2 && (image.backing?.length() ?? 0) > image.size) throw new IoError('ENOTSUP', 'Cannot grow a v2 image over a longer backing file');
    await image.metadata.run(() => image.tables.growFor(size));
    await zeroPastEnd(image, image.size, size);
  }
  const release = await image.locks.acquire(0, Number.MAX_SAFE_INTEGER, true);
  try {
    if (size < image.size) {
      const cs = image.clusterSize;
      const first = Math.ceil(size / cs);
      const count = Math.ceil(image.size / cs) - first;
      if (count > 0) {
        const mappings = await lookupClusters(image, first, count);
        const updates = new Map<number, bigint>();
        const released: [number, number][] = [];
        mappings.forEach((mapping, i) => {
          if (mapping.raw === 0n) return;
          updates.set(first + i, 0n);
          released.push(...referencedClusters(image, mapping));
        });
        await setEntries(image, updates, released);
      }
    }
    image.header.size = size;
    // The entries that hide old data past the end are durable before the header shows the new size.
    await image.metadata.run(async () => {
      await image.writeBackMetadata();
      await image.writeHeader();
    });
  } finally {
    release();
  }
}

