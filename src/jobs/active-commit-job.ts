/*
 * Active commit (QEMU's commit_active_start over the mirror job): the top
 * layer is still written while its data moves into the base. A mirror_top
 * filter takes the top's place, the top's writes are watched, and the
 * mirror loop copies what the chain holds above the base and then every
 * new write. At READY the base is in sync; job-complete switches every user
 * of the top over to the base (the top and the layers in between leave the
 * graph), a soft cancel leaves the chain as it was. The base only ever
 * receives data that layers above it shadow, so a crash at any moment
 * leaves a chain that reads the same.
 */
import type { BlockLayer } from '../blockdev/block-layer.js';
import type { ChildEdge } from '../blockdev/child-edge.js';
import { DirtyBitmap } from '../blockdev/bitmaps/dirty-bitmap.js';
import { describeErrno, errnoOf } from '../blockdev/io-error.js';
import type { BlockNode } from '../blockdev/node.js';
import { PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED } from '../blockdev/permissions.js';
import { JobCancelled, type Job, type JobKind } from './job.js';
import { allocatedBetween, below } from './backing-chain.js';
import { holdIntermediates, type CommitPlan } from './commit-job.js';
import { JobNodes, insertJobFilter, leaveJobFilter } from './job-nodes.js';
import { DEFAULT_BUF_SIZE, runMirror } from './mirror-engine.js';

const CHUNK = 1 << 20;
const COPIES_IN_FLIGHT = 16;
const MIN_GRANULARITY = 64 * 1024;

export class ActiveCommitJob implements JobKind {
  readonly type = 'commit' as const;
  readonly blockJob = true;
  private filter: BlockNode | undefined;
  private nodes: JobNodes<'active-commit'> | undefined;
  private target: ChildEdge | undefined;
  private source: ChildEdge | undefined;
  private bitmap: DirtyBitmap | undefined;
  private stopWatching: (() => void) | undefined;
  private endDrain: (() => void) | undefined;
  private completeRequested = false;
  private finished = false;

  /** `baseWasReadOnly`: the command made the base writable for the job (undone if the job cannot start). */
  constructor(private readonly layer: BlockLayer, private readonly plan: CommitPlan, private readonly baseWasReadOnly: boolean) {}

  async setUp(job: Job): Promise<void> {
    const { top, base } = this.plan;
    const filter = await insertJobFilter(this.layer, { driver: 'mirror_top', backing: top.name, commit: true }, top, this.plan.filterNodeName);
    this.filter = filter;
    const nodes = new JobNodes(this.layer, job, 'active-commit');
    this.nodes = nodes;
    await nodes.hold(filter, 'filter', { perm: PERM_CONSISTENT_READ, shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED | PERM_WRITE });
    const grow = base.length() < top.length() ? PERM_RESIZE : 0;
    this.target = await nodes.open(base, { perm: PERM_WRITE | grow, shared: PERM_WRITE_UNCHANGED | PERM_CONSISTENT_READ | PERM_WRITE });
    this.source = await nodes.hold(top, 'source', { perm: 0, shared: PERM_WRITE_UNCHANGED | PERM_WRITE | PERM_CONSISTENT_READ });
    await nodes.hold(base, 'base', { perm: 0, shared: PERM_ALL });
    const firstBelow = below(top);
    if (firstBelow && firstBelow !== base) await holdIntermediates(nodes, firstBelow, this.plan);
    const granularity = Math.max(MIN_GRANULARITY, Number((base.state.info().image ?? {})['cluster-size'] ?? 0));
    const bitmap = new DirtyBitmap(top.length(), granularity);
    this.bitmap = bitmap;
    top.bitmaps.add(bitmap);
    this.stopWatching = () => top.bitmaps.remove(bitmap);
  }

  async run(job: Job): Promise<void> {
    const { top, baseOverlay } = this.plan;
    const target = this.target!;
    const bitmap = this.bitmap!;
    job.startupReached();
    const length = top.length();
    if (target.length() < length) await target.truncate(length);
    // What the chain holds above the base is to be copied (QEMU's mirror_dirty_init).
    for (let offset = 0; offset < length;) {
      await job.pausePoint();
      const run = await allocatedBetween(top, baseOverlay, offset, length - offset);
      if (run.allocated) bitmap.set(offset, run.length);
      offset += run.length;
    }
    try {
      this.endDrain = await runMirror(job, {
        source: this.source!,
        target,
        bitmap,
        // The job holds its own source still: its drain pauses other users, not itself.
        drainSource: () => this.filter!.beginDrain({ ignore: this.nodes!.user }),
        shouldComplete: () => this.completeRequested,
        policy: () => this.plan.onError,
        chunkSize: CHUNK,
        inFlight: COPIES_IN_FLIGHT,
        iterationBytes: DEFAULT_BUF_SIZE,
      });
    } catch (error) {
      if (error instanceof JobCancelled) throw error;
      throw new Error(describeErrno(errnoOf(error)));
    }
  }

  complete(): void {
    this.completeRequested = true;
  }

  /** In sync and completed: the base takes the top's place (QEMU's mirror_exit_common); commit then takes the filter out. */
  async prepare(): Promise<void> {
    if (!this.completeRequested) return;
    const { graph } = this.layer;
    const { top, base } = this.plan;
    await this.nodes!.drop(this.target!);
    // The base becomes what the top was: read-only only if the top was.
    if (top.readOnly && !base.readOnly) await graph.reopenReadOnly(base);
    await graph.replaceNode(top, base);
  }

  async commit(job: Job): Promise<void> {
    await this.finish(job);
  }

  async abort(job: Job): Promise<void> {
    await this.finish(job);
  }

  /**
   * Once, whatever the outcome: stop watching, let go of the nodes, take the filter out, let the
   * held writes go on. Each step runs even if one before failed: above all the drain ends, or
   * the writes held in the filter would wait forever.
   */
  private async finish(job: Job): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    this.stopWatching?.();
    const filter = this.filter;
    this.filter = undefined;
    const endDrain = this.endDrain;
    this.endDrain = undefined;
    await leaveJobFilter(job, this.layer, this.nodes, filter, endDrain);
  }

  /** Set-up failed before the job ran. */
  async undo(job: Job): Promise<void> {
    await this.finish(job);
    if (this.baseWasReadOnly) await job.bestEffort('reopen the base read-only', () => this.layer.graph.reopenReadOnly(this.plan.base));
  }

  async release(job: Job): Promise<void> {
    await this.finish(job);
  }
}
