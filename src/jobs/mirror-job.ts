/*
 * The mirror job (QEMU's mirror_start_job for blockdev-mirror and
 * drive-mirror): a mirror_top filter takes the source's place and sees every
 * write, a dirty bitmap records what the target still lacks, and the mirror
 * loop copies it, zeroes as zero writes and holes never read. At READY the
 * target is in sync; job-complete puts it in the place of the source (or of
 * `replaces`) in every parent; a soft cancel leaves the graph as it was, the
 * target a copy of the source at that moment. In write-blocking mode a guest
 * write completes only once the target has it too, so READY never falls
 * back.
 */
import type { BlockLayer } from '../blockdev/block-layer.js';
import type { ChildEdge } from '../blockdev/child-edge.js';
import { DirtyBitmap } from '../blockdev/bitmaps/dirty-bitmap.js';
import type { MirrorTopHook, MirrorTopState } from '../blockdev/drivers/mirror-top.js';
import { describeErrno, errnoOf } from '../blockdev/io-error.js';
import type { BlockNode } from '../blockdev/node.js';
import { PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED } from '../blockdev/permissions.js';
import { RangeLock } from '../blockdev/range-lock.js';
import type { MirrorCopyMode } from '../generated/qapi-types.js';
import { genericError } from '../errors.js';
import { allocatedBetween, chainBelow, skipFilters } from './backing-chain.js';
import { CopyError, copyRange } from '../blockdev/copy-range.js';
import { JobCancelled, type ErrorPolicy, type Job, type JobKind } from './job.js';
import { JobNodes, insertJobFilter, leaveJobFilter } from './job-nodes.js';
import { runMirror } from './mirror-engine.js';

/** The bytes each zero write of the target's initial zeroing covers. */
const ZEROING_CHUNK = 1 << 20;
/** QEMU's MAX_IN_FLIGHT. */
const MAX_IN_FLIGHT = 16;

export interface MirrorSettings {
  source: BlockNode;
  target: BlockNode;
  /** The node the target takes the place of at completion (the source unless `replaces` says otherwise). */
  replaces: BlockNode | undefined;
  /** The lowest layer whose data is copied (sync=full: the chain's bottom, top: the source); undefined for sync=none. */
  copyDownTo: BlockNode | undefined;
  /** sync=full onto a target that cannot be trusted to read as zeroes where the source does (QEMU's zero_target). */
  zeroTarget: boolean;
  /** Zeroes may be written to the target as holes. */
  unmap: boolean;
  granularity: number;
  bufSize: number;
  onSourceError: ErrorPolicy;
  onTargetError: ErrorPolicy;
  copyMode: MirrorCopyMode;
  filterNodeName: string | undefined;
  /** drive-mirror: gives the target its backing file before it takes the source's place. */
  beforePivot?: (target: BlockNode) => Promise<void>;
}

export class MirrorJob implements JobKind, MirrorTopHook {
  readonly type = 'mirror' as const;
  readonly blockJob = true;
  private filter: BlockNode | undefined;
  private nodes: JobNodes<'mirror'> | undefined;
  private source: ChildEdge | undefined;
  private target: ChildEdge | undefined;
  private bitmap: DirtyBitmap | undefined;
  private readonly locks = new RangeLock();
  private copyMode: MirrorCopyMode;
  /** A write-blocking write the target refused, under on-target-error=report: the job ends with it. */
  private activeFailure: unknown;
  private job: Job | undefined;
  private endDrain: (() => void) | undefined;
  private completeRequested = false;
  private finished = false;
  /** Write-blocking writes done (the copy loop's test whether what it found about a range still holds). */
  private targetWrites = 0;

  constructor(private readonly layer: BlockLayer, private readonly settings: MirrorSettings) {
    this.copyMode = settings.copyMode;
  }

  /** QEMU's mirror_start_job after the job exists: the filter's place, the target's writer, the job's holds. */
  async setUp(job: Job): Promise<void> {
    const { source, target, granularity } = this.settings;
    this.job = job;
    // QEMU refuses this once the job exists: the error comes between its created and null events.
    const unfilteredTarget = skipFilters(target);
    if (unfilteredTarget !== target && [source, ...chainBelow(source)].includes(unfilteredTarget)) {
      throw genericError("Cannot mirror to a filter on top of a node in the source's backing chain");
    }
    const filter = await insertJobFilter(this.layer, { driver: 'mirror_top', backing: source.name }, source, this.settings.filterNodeName);
    this.filter = filter;
    const nodes = new JobNodes(this.layer, job, 'mirror');
    this.nodes = nodes;
    await nodes.hold(filter, 'filter', { perm: PERM_CONSISTENT_READ, shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED | PERM_WRITE });
    // Nobody else may read or write the target while it is being filled.
    this.target = await nodes.open(target, { perm: PERM_WRITE, shared: PERM_WRITE_UNCHANGED });
    this.source = await nodes.hold(source, 'source', { perm: 0, shared: PERM_WRITE_UNCHANGED | PERM_WRITE | PERM_CONSISTENT_READ });
    await nodes.hold(target, 'target', { perm: 0, shared: PERM_ALL });
    // As QEMU 7.2's, the bitmap lives on the source and records its writes in the background;
    // write-blocking, the filter's hook keeps it (it shows as not recording).
    const bitmap = new DirtyBitmap(source.length(), granularity);
    bitmap.enabled = this.copyMode === 'background';
    this.bitmap = bitmap;
    source.bitmaps.add(bitmap);
    (filter.state as MirrorTopState).hook = this;
  }

  async run(job: Job): Promise<void> {
    const target = this.target!;
    const bitmap = this.bitmap!;
    const length = this.settings.source.length();
    if (target.length() !== length) {
      job.startupReached(); // QEMU reports a failed run from its main loop, after the command's reply
      throw new Error('Source and target image have different sizes');
    }
    // The initial copy's first look at the source is where QEMU's job first yields; with
    // nothing to copy (sync=none) that is only once it is READY (the engine says when).
    if (this.settings.copyDownTo) job.startupReached();
    await this.markInitialCopy(job, bitmap, length);
    // QEMU's max_io_bytes: the buffer shared by MAX_IN_FLIGHT copies, in whole granules.
    const { granularity, bufSize } = this.settings;
    const chunkSize = Math.max(granularity, Math.floor(bufSize / MAX_IN_FLIGHT / granularity) * granularity);
    try {
      this.endDrain = await runMirror(job, {
        source: this.source!,
        target,
        bitmap,
        // The job holds its own source still: its drain pauses other users, not itself.
        drainSource: () => this.filter!.beginDrain({ ignore: this.nodes!.user }),
        shouldComplete: () => this.completeRequested,
        policy: (operation) => (operation === 'read' ? this.settings.onSourceError : this.settings.onTargetError),
        chunkSize,
        inFlight: Math.max(1, Math.min(MAX_IN_FLIGHT, Math.floor(this.settings.bufSize / chunkSize))),
        iterationBytes: Math.max(chunkSize, this.settings.bufSize),
        copy: (offset, chunkLength, zero) => this.copyChunk(offset, chunkLength, zero),
        locks: this.locks,
        targetWrites: () => this.targetWrites,
        failure: () => this.activeFailure,
      });
    } catch (error) {
      if (error instanceof JobCancelled) throw error;
      throw new Error(describeErrno(errnoOf(error)));
    }
  }

  /** What the initial copy must move (QEMU's mirror_dirty_init): the layers sync asks for, or the whole target. */
  private async markInitialCopy(job: Job, bitmap: DirtyBitmap, length: number): Promise<void> {
    const { source, copyDownTo, zeroTarget } = this.settings;
    if (!copyDownTo) return;
    if (zeroTarget) {
      // Where the source reads zeroes the target must too: marked whole unless zeroes can be written as holes first.
      if (this.settings.target.settings.discard !== 'unmap') {
        bitmap.set(0, length);
        return;
      }
      for (let offset = 0; offset < length; offset += ZEROING_CHUNK) {
        await job.pausePoint();
        await this.target!.writeZeroes(offset, Math.min(ZEROING_CHUNK, length - offset), { mayUnmap: true });
      }
    }
    for (let offset = 0; offset < length;) {
      await job.pausePoint();
      const run = await allocatedBetween(source, copyDownTo, offset, length - offset);
      if (run.allocated) bitmap.set(offset, run.length);
      offset += run.length;
    }
  }

  /** What the source reads at `offset`, through its backing chain. */
  private async sourceStatus(offset: number, length: number): Promise<{ length: number; zero: boolean }> {
    const status = await this.source!.child.blockStatusAbove(offset, length);
    return { length: status.length, zero: status.zero };
  }

  /**
   * One range the loop found all zero or all data (`zero`), or found nothing about: then it is
   * walked here, under the range's lock. Zeroes are written as zeroes without being read.
   */
  private async copyChunk(offset: number, length: number, zero: boolean | undefined): Promise<void> {
    const end = offset + length;
    for (let at = offset; at < end;) {
      const status = zero === undefined
        ? await this.sourceStatus(at, end - at).catch((error: unknown) => {
          throw new CopyError('read', error);
        })
        : { length: end - at, zero };
      const run = Math.min(status.length, end - at);
      if (status.zero) {
        await this.target!.writeZeroes(at, run, { mayUnmap: this.settings.unmap }).catch((error: unknown) => {
          throw new CopyError('write', error);
        });
      } else {
        await copyRange(this.source!, this.target!, at, run, {}, this.settings.unmap);
      }
      at += run;
    }
  }

  /**
   * Every write to the source passes here (the filter's hook). In the background it just
   * goes on (the source marks the bitmap); write-blocking, the write goes to the target too
   * before it completes, holding its range so that no background copy of older data crosses it.
   */
  async write(offset: number, length: number, request: () => Promise<void>, replay: (target: ChildEdge, offset: number, length: number) => Promise<void>): Promise<void> {
    const bitmap = this.bitmap!;
    const target = this.target;
    if (this.copyMode !== 'write-blocking' || !target || this.finished) {
      try {
        return await request();
      } finally {
        // Switched to write-blocking meanwhile: the source no longer marked it, and the target does not have it.
        if (!bitmap.enabled) bitmap.set(offset, length);
      }
    }
    const release = await this.locks.acquire(offset, offset + length, true);
    try {
      try {
        await request();
      } catch (error) {
        bitmap.set(offset, length); // the source may have changed in part (its bitmap does not record now)
        throw error;
      }
      // QEMU's do_sync_target_write: a partly written granule that is dirty is left to the
      // background copy (copying part of it could not make it clean); the granules written
      // whole are in sync once the target has them.
      const { granularity } = bitmap;
      let start = offset;
      let end = offset + length;
      if (start % granularity !== 0 && bitmap.isDirty(start)) start = Math.ceil(start / granularity) * granularity;
      if (end % granularity !== 0 && end > start && bitmap.isDirty(end - 1)) end = Math.floor(end / granularity) * granularity;
      if (end <= start) return;
      const first = Math.ceil(start / granularity) * granularity;
      const last = Math.floor(end / granularity) * granularity;
      if (last > first) bitmap.clear(first, last - first);
      try {
        await replay(target, start, end - start);
      } catch (error) {
        bitmap.set(start, end - start);
        const action = this.job!.errorAction(errnoOf(error), 'write', this.settings.onTargetError);
        if (action === 'report') this.activeFailure ??= error;
        return;
      }
      this.job!.currentProgress += end - start;
      this.job!.totalProgress += end - start;
    } finally {
      this.targetWrites++; // counted once done, so that a walk that overlapped it is not trusted
      release();
    }
  }

  /** block-job-change (QEMU 8.2): only background → write-blocking. */
  change(copyMode: MirrorCopyMode): void {
    if (copyMode === this.copyMode) return;
    if (copyMode !== 'write-blocking') throw genericError(`Change to copy mode '${copyMode}' is not implemented`);
    this.copyMode = copyMode;
    if (this.bitmap) this.bitmap.enabled = false;
  }

  complete(): void {
    this.completeRequested = true;
  }

  /** In sync and completed: the target takes the place of the source, or of `replaces` (QEMU's mirror_exit_common). */
  async prepare(): Promise<void> {
    if (!this.completeRequested) return;
    const { graph } = this.layer;
    const { source, target } = this.settings;
    const replaced = this.settings.replaces ?? source;
    await this.nodes!.drop(this.target!);
    await this.settings.beforePivot?.(target);
    // The target becomes what it replaces: read-only only if that was.
    if (replaced.readOnly && !target.readOnly) await graph.reopenReadOnly(target);
    else if (!replaced.readOnly && target.readOnly) await graph.reopenReadWrite(target);
    await graph.replaceNode(replaced, target);
  }

  async commit(job: Job): Promise<void> {
    await this.finish(job);
  }

  async abort(job: Job): Promise<void> {
    await this.finish(job);
  }

  /** Set-up failed before the job ran. */
  async undo(job: Job): Promise<void> {
    await this.finish(job);
  }

  async release(job: Job): Promise<void> {
    await this.finish(job);
  }

  /**
   * Once, whatever the outcome: the filter stops calling the job, the job lets go of its
   * nodes, the filter goes and the held writes go on, each step even if one before failed.
   */
  private async finish(job: Job): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    const filter = this.filter;
    this.filter = undefined;
    if (filter) (filter.state as MirrorTopState).hook = undefined;
    if (this.bitmap) this.settings.source.bitmaps.remove(this.bitmap);
    const endDrain = this.endDrain;
    this.endDrain = undefined;
    await leaveJobFilter(job, this.layer, this.nodes, filter, endDrain);
  }
}
