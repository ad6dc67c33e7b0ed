/*
 * block-stream: copies into the top node the data its backing chain holds
 * above the base, then makes the base its backing file (header rewritten
 * after the copied data is flushed, so a crash at any moment leaves a chain
 * that reads the same) and lets the streamed layers go. As in QEMU a
 * copy-on-read filter sits above the top node while the job runs, and the
 * job blocks other operations on every node it holds until it is dismissed.
 */
import { checkNotBlocked, type BlockLayer } from '../blockdev/block-layer.js';
import type { ChildEdge } from '../blockdev/child-edge.js';
import { describeErrno, errnoOf } from '../blockdev/io-error.js';
import { nodeFilename } from '../blockdev/node-filename.js';
import type { BlockNode } from '../blockdev/node.js';
import { PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED } from '../blockdev/permissions.js';
import type { QmpCommandMap } from '../generated/qapi-types.js';
import type { CommandTable } from '../command-table.js';
import { genericError } from '../errors.js';
import { allocatedBetween, below, chainBelow, findBackingImage } from './backing-chain.js';
import { copyRange } from '../blockdev/copy-range.js';
import { runCopy } from './copy-engine.js';
import { JobNodes, insertJobFilter, makeWritable } from './job-nodes.js';
import type { JobRegistry } from './job-registry.js';
import type { Job, JobKind } from './job.js';

type StreamArguments = QmpCommandMap['block-stream']['args'];

const STREAM_CHUNK = 512 * 1024;
const COPIES_IN_FLIGHT = 8;
const SHARED_BY_JOB = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;

interface StreamPlan {
  top: BlockNode;
  /** The lowest layer whose data is copied. */
  bottom: BlockNode;
  /** The new backing file once the job completes (undefined: the whole chain is streamed). */
  base: BlockNode | undefined;
  backingFile: string | undefined;
}

class StreamJob implements JobKind {
  readonly type = 'stream' as const;
  readonly blockJob = true;
  private filter: BlockNode | undefined;
  private filterEdge: ChildEdge | undefined;
  private active: ChildEdge | undefined;
  private nodes: JobNodes<'stream'> | undefined;
  private topWasReadOnly = false;

  constructor(private readonly layer: BlockLayer, private readonly plan: StreamPlan,
    private readonly onError: NonNullable<StreamArguments['on-error']>) {}

  /** Inserts the copy-on-read filter and takes the job's nodes: permissions and op blockers. */
  async setUp(job: Job, filterNodeName: string | undefined): Promise<void> {
    const { top, bottom } = this.plan;
    // As in QEMU, a read-only top is made writable for the job, and read-only again after it.
    this.topWasReadOnly = await makeWritable(this.layer, top);
    const filter = await insertJobFilter(this.layer, { driver: 'copy-on-read', file: top.name, bottom: bottom.name }, top, filterNodeName);
    this.filter = filter;
    const nodes = new JobNodes(this.layer, job, 'stream');
    this.nodes = nodes;
    this.filterEdge = await nodes.hold(filter, 'filter', { perm: PERM_CONSISTENT_READ, shared: PERM_ALL & ~PERM_RESIZE });
    this.active = await nodes.hold(top, 'active', { perm: PERM_WRITE_UNCHANGED, shared: SHARED_BY_JOB | PERM_WRITE });
    for (const node of chainBelow(top)) {
      if (node === this.plan.base) break;
      await nodes.hold(node, 'inter', { perm: 0, shared: SHARED_BY_JOB });
    }
  }

  async run(job: Job): Promise<void> {
    const { top, bottom } = this.plan;
    const active = this.active!;
    // Nothing between the top and the base (no backing file, or the base is the top's backing):
    // as in QEMU the job ends at once, with length 0, before the command's reply.
    if (top === bottom) return;
    job.startupReached();
    const backing = top.backing()?.child;
    const endSerialising = top.beginSerialising();
    try {
      await this.copy(job, top, bottom, backing, active);
    } finally {
      endSerialising();
    }
  }

  private async copy(job: Job, top: BlockNode, bottom: BlockNode, backing: BlockNode | undefined, active: ChildEdge): Promise<void> {
    await runCopy(job, {
      length: top.length(),
      decide: async (offset, maxLength) => {
        const here = await top.blockStatus(offset, maxLength);
        if (here.allocated || !backing) return { length: here.length, copy: false };
        const below = await allocatedBetween(backing, bottom, offset, here.length);
        return { length: below.length, copy: below.allocated };
      },
      // Read what the top shows and write it back into the top, with no client write to the range in between.
      copy: (offset, length) => top.serialisedCopy(offset, length, () => copyRange(active, active, offset, length, { serialisedCopy: true, contentUnchanged: true })),
    }, { chunkSize: STREAM_CHUNK, inFlight: COPIES_IN_FLIGHT, onError: this.onError }).catch((error: unknown) => {
      throw new Error(describeErrno(errnoOf(error)));
    });
  }

  /** Flushes what was copied, then records the new backing file and drops the streamed layers. */
  async prepare(): Promise<void> {
    const { graph } = this.layer;
    const { top, bottom, base } = this.plan;
    await this.dropFilter();
    await top.flush();
    // As QEMU's stream_prepare: the chain changes in a drained section of the lowest streamed layer and all below it.
    // The top's writes may still read the layers being dropped: their requests are not held.
    await bottom.drained(async () => {
      if (!top.backing()) return;
      const name = base ? this.plan.backingFile ?? nodeFilename(base) : undefined;
      await top.state.changeBackingFile?.(name, base?.driver.name);
      await graph.changeBacking(top, base);
    }, { reach: 'subtree', holdRequests: false });
  }

  /** Whatever the outcome: the filter goes (if prepare did not drop it), a node that was read-only is again. */
  async clean(job: Job): Promise<void> {
    await job.bestEffort('drop the copy-on-read filter', () => this.dropFilter());
    if (this.topWasReadOnly && this.layer.graph.find(this.plan.top.name) === this.plan.top) {
      this.topWasReadOnly = false;
      const active = this.active;
      if (active) await job.bestEffort('give up writing the node', () => this.nodes!.relax(active));
      await job.bestEffort('reopen the node read-only', () => this.layer.graph.reopenReadOnly(this.plan.top));
    }
  }

  /** At dismiss, as in QEMU: the job lets go of its nodes; streamed layers nobody else holds close. */
  async release(): Promise<void> {
    await this.nodes?.release();
  }

  private async dropFilter(): Promise<void> {
    const filter = this.filter;
    this.filter = undefined;
    if (!filter) return;
    if (this.filterEdge) await this.nodes?.drop(this.filterEdge);
    // Drained, as QEMU's bdrv_drop_filter: jobs above the filter pause while it goes.
    await this.layer.graph.removeFilter(filter);
  }
}

/** block-stream's checks, in QEMU's order and words, then the job. */
export function registerStreamCommand(registry: CommandTable, layer: BlockLayer, jobs: JobRegistry): void {
  const { blockers } = layer;
  registry.register('block-stream', async (args) => {
    const { device, base, 'base-node': baseNode, bottom } = args;
    if (base !== undefined && baseNode !== undefined) throw genericError("'base' and 'base-node' cannot be specified at the same time");
    if (base !== undefined && bottom !== undefined) throw genericError("'base' and 'bottom' cannot be specified at the same time");
    if (bottom !== undefined && baseNode !== undefined) throw genericError("'bottom' and 'base-node' cannot be specified at the same time");
    const { graph } = layer;
    const top = graph.find(device);
    if (!top) throw genericError(`Cannot find device='${device}' nor node-name='${device}'`);
    const chain = chainBelow(top);
    let baseBs: BlockNode | undefined;
    if (base !== undefined) {
      baseBs = findBackingImage(top, base);
      if (!baseBs) throw genericError(`Can't find '${base}' in the backing chain`);
    }
    if (baseNode !== undefined) {
      baseBs = graph.find(baseNode);
      if (!baseBs) throw genericError(`Cannot find device='' nor node-name='${baseNode}'`);
      if (!chain.includes(baseBs)) throw genericError(`Node '${baseNode}' is not a backing image of '${device}'`);
    }
    let bottomBs: BlockNode | undefined;
    if (bottom !== undefined) {
      bottomBs = graph.find(bottom);
      if (!bottomBs) throw genericError(`Cannot find device='' nor node-name='${bottom}'`);
      if (bottomBs.driver.kind === 'filter') throw genericError(`Node '${bottom}' is a filter, use a non-filter node as 'bottom'`);
      if (bottomBs !== top && !chain.includes(bottomBs)) throw genericError(`Node '${bottom}' is not in a chain starting from '${device}'`);
    }
    // Op blockers on the chain from the top down to the base (exclusive) or bottom (inclusive).
    const end = bottomBs ? below(bottomBs) : baseBs;
    for (const node of [top, ...chain]) {
      if (node === end) break;
      checkNotBlocked(blockers, node, 'stream');
    }
    if (baseBs === undefined && args['backing-file'] !== undefined) throw genericError('backing file specified, but streaming the entire chain');

    const finalBase = bottomBs ? below(bottomBs) : baseBs;
    const overlayOfBase = bottomBs ?? ([top, ...chain].find((node) => below(node) === baseBs) ?? top);
    const plan: StreamPlan = { top, bottom: overlayOfBase, base: finalBase, backingFile: args['backing-file'] };
    const kind = new StreamJob(layer, plan, args['on-error'] ?? 'report');
    const options = { id: args['job-id'] ?? '', autoFinalize: args['auto-finalize'] ?? true, autoDismiss: args['auto-dismiss'] ?? true, speed: args.speed ?? 0 };
    await jobs.launch(kind, options, (job) => kind.setUp(job, args['filter-node-name']), async (job) => {
      await kind.clean(job);
      await job.bestEffort('release the nodes', () => kind.release());
    });
  });
}
