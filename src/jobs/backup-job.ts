/*
 * The backup job (QEMU's block/backup.c for blockdev-backup and
 * drive-backup): a copy-before-write filter takes the source's place, so a
 * guest write first copies the old data it overwrites to the target; the job
 * copies everything else the sync mode asks for through the same block-copy
 * state. The target ends as the disk was when the job started. A bitmap
 * (incremental and bitmap sync, or any sync with `bitmap`) gets a successor
 * for the job's time, which records the writes meanwhile; bitmap-mode says
 * what becomes of it when the job ends.
 */
import type { BlockLayer } from '../blockdev/block-layer.js';
import type { BlockCopy } from '../blockdev/block-copy.js';
import { settleSyncBitmap } from '../blockdev/bitmaps/bitmap-sync-mode.js';
import type { DirtyBitmap } from '../blockdev/bitmaps/dirty-bitmap.js';
import { createSuccessor, reclaim } from '../blockdev/bitmaps/successor.js';
import { CopyError } from '../blockdev/copy-range.js';
import type { CopyBeforeWriteState } from '../blockdev/drivers/copy-before-write.js';
import { describeErrno, errnoOf } from '../blockdev/io-error.js';
import { Mutex } from '../blockdev/mutex.js';
import type { BlockNode } from '../blockdev/node.js';
import { PERM_ALL } from '../blockdev/permissions.js';
import { genericError } from '../errors.js';
import { JobCancelled, type ErrorPolicy, type Job, type JobKind } from './job.js';
import { JobNodes, insertJobFilter } from './job-nodes.js';
import type { JobTxn } from './job-txn.js';
import type { JobRegistry } from './job-registry.js';
import { RateLimit } from './rate-limit.js';

/** QEMU 7.2's default x-perf max-workers: copies in flight. */
export const DEFAULT_MAX_WORKERS = 64;

export interface BackupJobOptions {
  /** Checked and defaulted by the command. */
  jobId: string;
  source: BlockNode;
  target: BlockNode;
  sync: 'full' | 'top' | 'none' | 'incremental' | 'bitmap';
  /** For incremental and bitmap sync, and any other sync that is to update a bitmap. */
  bitmap?: DirtyBitmap;
  bitmapMode?: 'on-success' | 'never' | 'always';
  compress: boolean;
  speed: number;
  onSourceError: ErrorPolicy;
  onTargetError: ErrorPolicy;
  filterNodeName?: string;
  autoFinalize: boolean;
  autoDismiss: boolean;
  perf: { maxWorkers: number; maxChunk: number; useCopyRange: boolean };
  /** The transaction's job transaction (completion-mode grouped). */
  txn?: JobTxn;
}

/**
 * QEMU's backup_job_create after the command's checks: the bitmap gets its successor and then
 * the filter goes in (so the node lists the filter's copy bitmap above the successor, as QEMU
 * does), before the job exists (their failures create no job); then the job is made and set
 * up. It waits in 'created' until the caller (a transaction's commit) begins it.
 */
export async function createBackupJob(layer: BlockLayer, jobs: JobRegistry, options: BackupJobOptions): Promise<Job> {
  const { source, target, filterNodeName, bitmap } = options;
  if (source.length() !== target.length()) throw genericError('Source and target image have different sizes');
  if (bitmap) createSuccessor(source.bitmaps, bitmap);
  const filter = await insertJobFilter(layer, { driver: 'copy-before-write', file: source.name, target: target.name }, source, filterNodeName)
    .catch((error: unknown) => {
      if (bitmap) reclaim(source.bitmaps, bitmap);
      throw error;
    });
  const kind = new BackupJob(layer, options, filter, bitmap !== undefined);
  try {
    kind.prepareCopy();
    return await jobs.prepare(kind, { id: options.jobId, autoFinalize: options.autoFinalize, autoDismiss: options.autoDismiss, speed: options.speed, txn: options.txn },
      (job) => kind.setUp(job), () => kind.undo());
  } catch (error) {
    await kind.undo();
    throw error;
  }
}

export class BackupJob implements JobKind {
  readonly type = 'backup' as const;
  readonly blockJob = true;
  private readonly blockCopy: BlockCopy;
  private nodes: JobNodes<'backup'> | undefined;
  private filterRemoved = false;

  /** `successorMade`: the bitmap got its successor (startBackupJob), which the job's end settles. */
  constructor(private readonly layer: BlockLayer, private readonly options: BackupJobOptions, private readonly filter: BlockNode, private successorMade: boolean) {
    this.blockCopy = (filter.state as CopyBeforeWriteState).blockCopy;
  }

  /** The copy's settings. */
  prepareCopy(): void {
    const { perf, compress } = this.options;
    const cluster = this.blockCopy.clusterSize;
    if (perf.maxChunk && perf.maxChunk < cluster) {
      throw genericError(`Required max-chunk (${perf.maxChunk}) is less than backup cluster size (${cluster})`);
    }
    this.blockCopy.configure({ compress, maxChunk: perf.maxChunk, useCopyRange: perf.useCopyRange });
  }

  /** The job's holds: the filter as its main node, and the target (the filter writes it). */
  async setUp(job: Job): Promise<void> {
    const nodes = new JobNodes(this.layer, job, 'backup');
    this.nodes = nodes;
    await nodes.hold(this.filter, 'filter', { perm: 0, shared: PERM_ALL });
    await nodes.hold(this.options.target, 'target', { perm: 0, shared: PERM_ALL });
  }

  async run(job: Job): Promise<void> {
    const { sync, bitmap } = this.options;
    const copy = this.blockCopy;
    const length = this.options.source.length();
    // QEMU's backup_init_bcs_bitmap: what the job copies.
    if (sync === 'bitmap' || sync === 'incremental') {
      copy.bitmap.clear(0, length);
      copy.bitmap.merge(bitmap!);
    } else {
      copy.bitmap.set(0, length);
      if (sync === 'top') copy.configure({ skipUnallocated: true });
    }
    const progress = () => {
      job.totalProgress = job.currentProgress + copy.remaining();
    };
    copy.onCopied = (bytes) => {
      job.currentProgress += bytes;
      progress();
    };
    progress();
    job.startupReached();
    if (sync === 'top') {
      for (let offset = 0; offset < length;) {
        await job.pausePoint();
        offset += await copy.resetUnallocated(offset);
        progress();
      }
      copy.configure({ skipUnallocated: false });
    }
    if (sync === 'none') {
      // The filter copies what guest writes would overwrite; the job only waits to be cancelled.
      for (;;) await job.sleep(60 * 60 * 1000);
    }
    try {
      await this.copyAll(job, copy);
    } catch (error) {
      if (error instanceof JobCancelled) throw error;
      throw new Error(describeErrno(errnoOf(error)));
    }
  }

  /** Copies every dirty cluster, several at a time (one under a speed limit), until none is left. */
  private async copyAll(job: Job, copy: BlockCopy): Promise<void> {
    const limit = new RateLimit('keep-account');
    // Pieces are cut one after the other, as QEMU's block_copy_dirty_clusters creates its tasks.
    const cutting = new Mutex();
    let cursor = 0;
    let failure: unknown;
    const work = async (index: number) => {
      for (;;) {
        await job.pausePoint();
        if (failure !== undefined) return;
        if (index > 0 && job.speed > 0) {
          if (copy.remaining() === 0) return;
          await job.sleep(50);
          continue;
        }
        // A pass ends at the disk's end; copies that failed left their clusters dirty for the next.
        const next = await cutting.run(async () => {
          const piece = (await copy.nextPiece(cursor)) ?? (await copy.nextPiece(0));
          if (piece) cursor = piece.offset + piece.length;
          return piece;
        });
        if (!next) return;
        try {
          await copy.copy(next.offset, next.length);
        } catch (error) {
          const operation = error instanceof CopyError ? error.operation : 'read';
          const cause = error instanceof CopyError ? error.cause : error;
          const action = await job.ioError(errnoOf(cause), operation, operation === 'read' ? this.options.onSourceError : this.options.onTargetError);
          if (action === 'report') failure ??= cause;
          continue; // retry and ignore both leave the clusters dirty: QEMU's backup copies them again
        }
        await limit.take(job, next.length);
      }
    };
    const workers = Math.max(1, this.options.perf.maxWorkers);
    job.workers = workers;
    const results = await Promise.allSettled(Array.from({ length: workers }, (_, index) => work(index).finally(() => job.workerEnded())));
    const rejected = results.find((result): result is PromiseRejectedResult => result.status === 'rejected');
    if (rejected) throw rejected.reason;
    if (failure !== undefined) throw failure;
  }

  async commit(): Promise<void> {
    this.settleBitmap(true);
  }

  async abort(): Promise<void> {
    this.settleBitmap(false);
  }

  async clean(job: Job): Promise<void> {
    await job.bestEffort('release the nodes', async () => this.nodes?.release());
    await this.removeFilter();
  }

  /** The job never ran (set-up failed, or the job could not be made): the bitmap is as it was, plus the writes meanwhile. */
  async undo(): Promise<void> {
    if (this.successorMade) reclaim(this.options.source.bitmaps, this.options.bitmap!);
    this.successorMade = false;
    await this.nodes?.release().catch(() => {});
    await this.removeFilter();
  }

  private async removeFilter(): Promise<void> {
    if (this.filterRemoved) return;
    this.filterRemoved = true;
    this.blockCopy.onCopied = undefined;
    await this.layer.graph.removeFilter(this.filter);
  }

  /** QEMU's backup_cleanup_sync_bitmap (bitmap-sync-mode.ts); what the job did not copy is its copy bitmap. */
  private settleBitmap(succeeded: boolean): void {
    const { bitmap, bitmapMode, source } = this.options;
    if (!bitmap || !this.successorMade) return;
    this.successorMade = false;
    settleSyncBitmap(source.bitmaps, bitmap, bitmapMode ?? 'on-success', succeeded, this.blockCopy.bitmap);
  }
}
