/*
 * What a point-in-time copy still has to copy from a source to a target
 * (QEMU's BlockCopyState), shared by the copy-before-write filter and the
 * backup job: a bitmap of the clusters not copied yet, the copies in flight,
 * and the wait that keeps a guest write off a cluster until its old data is
 * in the target. Whoever reaches a cluster first (the filter before a guest
 * write, or the job's walk) takes it off the bitmap as it starts copying; a
 * later request for it waits for that copy, and a failed copy leaves its
 * clusters dirty for the next one to retry.
 */
import type { WriteFlags } from './block-driver.js';
import type { ChildEdge } from './child-edge.js';
import { CopyError, copyRange, offloadCopy } from './copy-range.js';
import { DirtyBitmap } from './bitmaps/dirty-bitmap.js';

/** QEMU's BLOCK_COPY_CLUSTER_SIZE_DEFAULT: the smallest unit copied. */
export const DEFAULT_COPY_CLUSTER = 64 << 10;
/** One copy of plain data reads and writes at most this much (QEMU's BLOCK_COPY_MAX_BUFFER). */
const MAX_BUFFER = 1 << 20;
/** One offloaded copy, once the first one worked, covers at most this much (QEMU's BLOCK_COPY_MAX_COPY_RANGE). */
const MAX_COPY_RANGE = 16 << 20;

/**
 * How copies are made now (QEMU's BlockCopyMethod): offloaded (copy_file_range) a buffer's worth
 * at first, then in longer pieces once one worked; by reading and writing after any offload failed.
 */
type CopyMethod = 'read-write' | 'offload-small' | 'offload-full';

/** How copies are made; the backup job sets them after the filter made the state (QEMU's block_copy_set_copy_opts). */
export interface CopySettings {
  /** Copy only what the source's top layer holds (sync=top): clusters it does not allocate are dropped when reached. */
  skipUnallocated?: boolean;
  /** Write compressed clusters (one cluster per copy). */
  compress?: boolean;
  /** The longest single copy (x-perf max-chunk); 0: as long as a buffer allows. */
  maxChunk?: number;
  /** Offload copies to the kernel where source and target are files (x-perf use-copy-range). */
  useCopyRange?: boolean;
}

interface CopyTask {
  offset: number;
  end: number;
  done: Promise<void>;
}

/**
 * The cluster size a copy into `target` must use so that no copy writes part of a target
 * cluster (QEMU's block_copy_calculate_cluster_size): at least 64 KiB, or the target's own.
 */
export function blockCopyClusterSize(target: ChildEdge): number {
  return Math.max(DEFAULT_COPY_CLUSTER, target.child.state.clusterSize ?? 0);
}

export class BlockCopy {
  /** Clusters still to copy (QEMU's copy_bitmap): set by the owner, cleared as copies start. */
  readonly bitmap: DirtyBitmap;
  private readonly tasks = new Set<CopyTask>();
  private inFlightBytes = 0;
  private settings: CopySettings = {};
  private method: CopyMethod = 'read-write';
  private writeFlags: WriteFlags = {};
  /** Told the bytes of each copy that completed (the owner's progress). */
  onCopied: ((bytes: number) => void) | undefined;

  /** `clusterSize`: the unit copied and tracked (blockCopyClusterSize). */
  constructor(readonly source: ChildEdge, readonly target: ChildEdge, readonly clusterSize: number) {
    this.bitmap = new DirtyBitmap(source.length(), clusterSize);
    this.bitmap.enabled = false;
    this.configure({});
  }

  configure(settings: CopySettings): void {
    this.settings = { ...this.settings, ...settings };
    const { compress, useCopyRange } = this.settings;
    // Compressed clusters are written one by one and never offloaded.
    this.method = useCopyRange && !compress ? 'offload-small' : 'read-write';
    this.writeFlags = compress ? { compress: true } : {};
  }

  /** The longest single copy (QEMU's block_copy_chunk_size), within x-perf max-chunk. */
  private get maxCopy(): number {
    const cluster = this.clusterSize;
    const { compress, maxChunk } = this.settings;
    const limit = compress ? cluster : Math.max(cluster, this.method === 'offload-full' ? MAX_COPY_RANGE : MAX_BUFFER);
    const chunk = maxChunk ? Math.min(limit, maxChunk) : limit;
    return Math.max(cluster, Math.floor(chunk / cluster) * cluster);
  }

  /** Bytes not copied yet: still dirty, or being copied now (QEMU's progress remaining). */
  remaining(): number {
    return this.bitmap.count() + this.inFlightBytes;
  }

  /** Whether a copy is running over any of [offset, end). */
  private busyOver(offset: number, end: number): CopyTask | undefined {
    for (const task of this.tasks) if (task.offset < end && offset < task.end) return task;
    return undefined;
  }

  /**
   * Makes [offset, offset + length) of the target hold what the source holds now (whole
   * clusters): copies what is dirty there and waits for the copies already running there.
   * Throws the first failed copy's error; its clusters stay dirty.
   */
  async copy(offset: number, length: number): Promise<void> {
    const cluster = this.clusterSize;
    const start = Math.floor(offset / cluster) * cluster;
    const end = Math.min(Math.ceil((offset + length) / cluster) * cluster, this.bitmap.length);
    for (;;) {
      const started: Promise<void>[] = [];
      // Claiming is synchronous, so no other request can claim the same clusters meanwhile.
      for (let at = start, area; (area = this.bitmap.dirtyArea(at, end)); ) {
        const piece = Math.min(area.length, this.maxCopy);
        started.push(this.run(area.offset, piece));
        at = area.offset + piece;
      }
      if (started.length > 0) {
        const results = await Promise.allSettled(started);
        const failed = results.find((result): result is PromiseRejectedResult => result.status === 'rejected');
        if (failed) throw failed.reason;
        continue;
      }
      const running = this.busyOver(start, end);
      if (!running) return;
      // A copy someone else started: wait, then look again (it may have failed and left its clusters dirty).
      await running.done.catch(() => {});
    }
  }

  /** The first dirty run at or after `from` (no wrapping), at most one copy long. */
  nextDirty(from: number): { offset: number; length: number } | undefined {
    const area = this.bitmap.dirtyArea(from, this.bitmap.length);
    return area && { offset: area.offset, length: Math.min(area.length, this.maxCopy) };
  }

  /**
   * The next piece a job copies from `from` on (QEMU's block_copy_task_create, then _shrink):
   * the first dirty run, at most one copy long, cut where the source's block status changes.
   * The rest is the next piece, so pieces start where QEMU's do, and a job's progress at a
   * failure is QEMU's. Undefined when nothing is dirty from `from` on.
   */
  async nextPiece(from: number): Promise<{ offset: number; length: number } | undefined> {
    const area = this.nextDirty(from);
    if (!area) return undefined;
    const { length } = await this.status(area.offset, area.length);
    return { offset: area.offset, length: Math.min(area.length, length) };
  }

  /**
   * The source's status over [offset, offset + length) in whole clusters (QEMU's
   * block_copy_block_status): a run cut down to clusters (up at the disk's end); a failure or a
   * run shorter than a cluster counts as one cluster of data.
   */
  private async status(offset: number, length: number): Promise<{ length: number; allocated: boolean; zero: boolean }> {
    const cluster = this.clusterSize;
    const asData = { length: cluster, allocated: true, zero: false };
    const status = await (this.settings.skipUnallocated ? this.source.child.blockStatus(offset, length) : this.source.child.blockStatusAbove(offset, length))
      .catch(() => undefined);
    if (!status || status.length < cluster) return asData;
    const end = offset + status.length >= this.bitmap.length ? Math.ceil(status.length / cluster) * cluster : Math.floor(status.length / cluster) * cluster;
    return { length: end, allocated: status.allocated, zero: status.zero };
  }

  /**
   * sync=top's first pass (QEMU's block_copy_reset_unallocated): drops the clusters from
   * `offset` that the source's top layer does not allocate. Returns how far it looked.
   */
  async resetUnallocated(offset: number): Promise<number> {
    const cluster = this.clusterSize;
    const status = await this.source.child.blockStatus(offset, Math.min(this.bitmap.length - offset, 1 << 30));
    const runEnd = offset + status.length;
    if (status.allocated) return Math.ceil(runEnd / cluster) * cluster - offset;
    // Only whole clusters the layer leaves unallocated; a cluster partly allocated is copied.
    const end = runEnd >= this.bitmap.length ? this.bitmap.length : Math.floor(runEnd / cluster) * cluster;
    if (end > offset) this.bitmap.clear(offset, end - offset);
    return Math.max(cluster, end - offset);
  }

  /** Clears [offset, offset + length) without copying it (QEMU's block_copy_reset: the reader gave it up). */
  reset(offset: number, length: number): void {
    this.bitmap.clear(offset, length);
  }

  /** Takes the clusters off the bitmap and copies them; a failure puts them back. */
  private run(offset: number, length: number): Promise<void> {
    this.bitmap.clear(offset, length);
    this.inFlightBytes += length;
    const done = this.copyClusters(offset, length);
    const task: CopyTask = { offset, end: offset + length, done };
    this.tasks.add(task);
    return done.then(
      () => this.finish(task, length, true),
      (error: unknown) => {
        this.finish(task, length, false);
        this.bitmap.set(offset, length);
        throw error;
      },
    );
  }

  private finish(task: CopyTask, length: number, copied: boolean): void {
    this.tasks.delete(task);
    this.inFlightBytes -= length;
    if (copied) this.onCopied?.(length);
  }

  private async copyClusters(offset: number, length: number): Promise<void> {
    const status = await this.status(offset, length);
    if (status.length < length) {
      // The status changes inside: copy the first part now and the rest as a copy of its own.
      await Promise.all([this.copyClusters(offset, status.length), this.copyClusters(offset + status.length, length - status.length)]);
      return;
    }
    if (this.settings.skipUnallocated && !status.allocated) return;
    if (status.zero) {
      await this.target.writeZeroes(offset, length, {}).catch((error: unknown) => {
        throw new CopyError('write', error);
      });
      return;
    }
    if (this.method !== 'read-write' && await this.offload(offset, length)) return;
    await copyRange(this.source, this.target, offset, length, this.writeFlags);
  }

  /**
   * QEMU's block_copy_do_copy with copy-range: after the first offload that worked, pieces
   * grow; after one that failed (whatever the reason), copies read and write from then on,
   * starting with this one.
   */
  private async offload(offset: number, length: number): Promise<boolean> {
    const method = this.method;
    try {
      await offloadCopy(this.source, this.target, offset, length, this.writeFlags);
    } catch {
      if (this.method === method) this.method = 'read-write';
      return false;
    }
    if (this.method === 'offload-small') this.method = 'offload-full';
    return true;
  }
}
