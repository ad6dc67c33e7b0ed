/*
 * block-commit: QEMU's checks in QEMU's order and words, then one of two
 * jobs. Committing an intermediate layer (its overlay is not written by
 * anyone) copies the data between top and base into the base, flushes it,
 * then points the overlay's header and backing link at the base; the
 * committed layers leave the graph. Committing the active layer is the
 * active-commit job (active-commit-job.ts). As in QEMU a read-only base is
 * reopened read-write for the job.
 */
import { checkNotBlocked, type BlockLayer } from '../blockdev/block-layer.js';
import type { ChildEdge } from '../blockdev/child-edge.js';
import { describeErrno, errnoOf } from '../blockdev/io-error.js';
import { nodeFilename } from '../blockdev/node-filename.js';
import type { BlockNode } from '../blockdev/node.js';
import { PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED } from '../blockdev/permissions.js';
import type { QmpCommandMap } from '../generated/qapi-types.js';
import type { CommandTable } from '../command-table.js';
import { QmpError, genericError } from '../errors.js';
import { ActiveCommitJob } from './active-commit-job.js';
import { allocatedBetween, below, chainBelow, findBackingImage, overlayIn, skipFilters } from './backing-chain.js';
import { copyRange } from '../blockdev/copy-range.js';
import { runCopy } from './copy-engine.js';
import { JobNodes, insertJobFilter, makeWritable } from './job-nodes.js';
import type { JobRegistry } from './job-registry.js';
import type { ErrorPolicy, Job, JobKind } from './job.js';
import { isRootNode } from '../blockdev/block-layer.js';

type CommitArguments = QmpCommandMap['block-commit']['args'];

const COMMIT_CHUNK = 512 * 1024;
const COPIES_IN_FLIGHT = 4;

/** The nodes of a commit: the root it is started on, the layers it empties and the one it fills. */
export interface CommitPlan {
  device: BlockNode;
  top: BlockNode;
  base: BlockNode;
  /** The lowest node above the base (its data is copied too). */
  baseOverlay: BlockNode;
  onError: ErrorPolicy;
  filterNodeName: string | undefined;
}

/** Permissions on the nodes a commit empties: others may write (the base is below them), none may rely on what they read. */
function intermediateShares(node: BlockNode, plan: CommitPlan): number {
  // From the base's own filters down, reads stay consistent (QEMU's filtered_base).
  const aboveBase = chainBelow(plan.baseOverlay).indexOf(plan.base);
  const filtersOfBase = chainBelow(plan.baseOverlay).slice(0, aboveBase);
  return PERM_WRITE_UNCHANGED | PERM_WRITE | (filtersOfBase.includes(node) ? PERM_CONSISTENT_READ : 0);
}

/** Holds the layers between `from` (inclusive) and the base (exclusive) for the job; an intermediate commit's top is 'top'. */
export async function holdIntermediates(nodes: JobNodes<'commit' | 'active-commit'>, from: BlockNode, plan: CommitPlan): Promise<void> {
  for (let node: BlockNode | undefined = from; node && node !== plan.base; node = below(node)) {
    await nodes.hold(node, node === plan.top ? 'top' : 'inter', { perm: 0, shared: intermediateShares(node, plan) });
  }
}

class IntermediateCommitJob implements JobKind {
  readonly type = 'commit' as const;
  readonly blockJob = true;
  private nodes: JobNodes<'commit'> | undefined;
  private filter: BlockNode | undefined;
  /** The commit_top filter once prepare has taken it out of the graph, for commit to close. */
  private droppedFilter: BlockNode | undefined;
  private topReader: ChildEdge | undefined;
  private baseWriter: ChildEdge | undefined;
  private baseWasReadOnly = false;

  constructor(private readonly layer: BlockLayer, private readonly plan: CommitPlan, private readonly backingFile: string | undefined) {}

  /** QEMU's commit_start: base writable, commit_top above the top, then the job's holds. */
  async setUp(job: Job): Promise<void> {
    const { device, top, base } = this.plan;
    this.baseWasReadOnly = await makeWritable(this.layer, base);
    this.filter = await insertJobFilter(this.layer, { driver: 'commit_top', backing: top.name, 'read-only': true }, top, this.plan.filterNodeName);
    const nodes = new JobNodes(this.layer, job, 'commit');
    this.nodes = nodes;
    await nodes.hold(device, 'main', { perm: 0, shared: PERM_ALL });
    await holdIntermediates(nodes, top, this.plan);
    await nodes.hold(base, 'base', { perm: 0, shared: PERM_ALL });
    const grow = base.length() < top.length() ? PERM_RESIZE : 0;
    this.baseWriter = await nodes.open(base, { perm: PERM_CONSISTENT_READ | PERM_WRITE | grow, shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED });
    this.topReader = await nodes.open(top, { perm: 0, shared: PERM_ALL });
  }

  async run(job: Job): Promise<void> {
    const { top, baseOverlay } = this.plan;
    const reader = this.topReader!;
    const writer = this.baseWriter!;
    job.startupReached();
    const length = top.length();
    if (writer.length() < length) await writer.truncate(length);
    await runCopy(job, {
      length,
      decide: async (offset, maxLength) => {
        const run = await allocatedBetween(top, baseOverlay, offset, maxLength);
        return { length: run.length, copy: run.allocated };
      },
      copy: (offset, runLength) => copyRange(reader, writer, offset, runLength, {}, true),
    }, { chunkSize: COMMIT_CHUNK, inFlight: COPIES_IN_FLIGHT, onError: this.plan.onError }).catch((error: unknown) => {
      throw new Error(describeErrno(errnoOf(error)));
    });
  }

  /**
   * The base's data is flushed before any overlay names it, so a crash at any moment leaves
   * a chain that reads the same; then the overlays' headers and links move to the base.
   */
  async prepare(): Promise<void> {
    const { base } = this.plan;
    const filter = this.filter!;
    await this.baseWriter!.flush();
    await this.nodes!.drop(this.baseWriter!);
    const name = this.backingFile ?? nodeFilename(base);
    for (const edge of filter.parents) {
      if ('node' in edge.parent && edge.parent.node.driver.supportsBacking) {
        await edge.parent.node.state.changeBackingFile?.(name, base.driver.name);
      }
    }
    await this.layer.graph.replaceNode(filter, base);
    this.filter = undefined;
    this.droppedFilter = filter;
  }

  /** The filter left the graph in prepare; closing it is cleanup, which cannot fail the job. */
  async commit(job: Job): Promise<void> {
    const filter = this.droppedFilter;
    this.droppedFilter = undefined;
    if (filter) await job.bestEffort('close the commit filter', () => this.layer.graph.close(filter));
  }

  /** As QEMU's commit_abort: the filter goes and the job lets go of the nodes at once. */
  async abort(job: Job): Promise<void> {
    await job.bestEffort('drop the commit filter', () => this.dropFilter());
    await job.bestEffort('release the nodes', async () => this.nodes?.release());
  }

  /** A base that was read-only becomes read-only again (QEMU's commit_clean). */
  async clean(job: Job): Promise<void> {
    if (this.baseWasReadOnly && this.layer.graph.find(this.plan.base.name) === this.plan.base) {
      await job.bestEffort('reopen the base read-only', () => this.layer.graph.reopenReadOnly(this.plan.base));
    }
  }

  /** At dismiss the job lets go of the committed layers; those nobody else holds close. */
  async release(): Promise<void> {
    await this.nodes?.release();
  }

  private async dropFilter(): Promise<void> {
    const filter = this.filter;
    this.filter = undefined;
    if (filter) await this.layer.graph.removeFilter(filter);
  }
}

/** Whether some user writes the node (QEMU's cumulative WRITE permission). */
function hasWriter(node: BlockNode): boolean {
  return node.neededPermissions().perm & PERM_WRITE ? true : false;
}

function chainContains(top: BlockNode, node: BlockNode): boolean {
  return top === node || chainBelow(top).includes(node);
}

export function registerCommitCommand(registry: CommandTable, layer: BlockLayer, jobs: JobRegistry): void {
  const { graph, blockers } = layer;
  registry.register('block-commit', async (args: CommitArguments) => {
    const { device, 'top-node': topNode, 'base-node': baseNode } = args;
    // libvirt probes with DeviceNotFound: the device lookup comes before anything else.
    const bs = graph.find(device);
    if (!bs) throw new QmpError('DeviceNotFound', `Device '${device}' not found`);
    if (!isRootNode(bs)) throw genericError('Need a root block node');
    checkNotBlocked(blockers, bs, 'commit-source');

    let top: BlockNode | undefined = bs;
    if (topNode !== undefined && args.top !== undefined) throw genericError("'top-node' and 'top' are mutually exclusive");
    if (topNode !== undefined) {
      top = graph.find(topNode);
      if (!top) throw genericError(`Cannot find device='' nor node-name='${topNode}'`);
      if (!chainContains(bs, top)) throw genericError(`'${topNode}' is not in this backing file chain`);
    } else if (args.top !== undefined && args.top !== nodeFilename(bs)) {
      top = findBackingImage(bs, args.top);
    }
    if (!top) throw genericError(`Top image file ${args.top ?? 'NULL'} not found`);

    let base: BlockNode | undefined;
    if (baseNode !== undefined && args.base !== undefined) throw genericError("'base-node' and 'base' are mutually exclusive");
    if (baseNode !== undefined) {
      base = graph.find(baseNode);
      if (!base) throw genericError(`Cannot find device='' nor node-name='${baseNode}'`);
      if (!chainContains(top, base)) throw genericError(`'${baseNode}' is not in this backing file chain`);
    } else if (args.base !== undefined) {
      base = findBackingImage(top, args.base);
      if (!base) throw genericError(`Can't find '${args.base}' in the backing chain`);
    } else {
      base = [top, ...chainBelow(top)].filter((node) => node.driver.kind !== 'filter').at(-1);
      if (!base) throw genericError('There is no backimg image');
    }

    for (let node: BlockNode | undefined = top; node && node !== below(base); node = below(node)) checkNotBlocked(blockers, node, 'commit-target');
    if (top === base) throw genericError('cannot commit an image into itself');

    const plan: CommitPlan = {
      device: bs, top, base, baseOverlay: overlayIn(top, base) ?? top,
      onError: args['on-error'] ?? 'report', filterNodeName: args['filter-node-name'],
    };
    const options = { autoFinalize: args['auto-finalize'] ?? true, autoDismiss: args['auto-dismiss'] ?? true, speed: args.speed ?? 0 };
    const active = skipFilters(top) === skipFilters(bs);
    if (active || hasWriter(top)) {
      if (args['backing-file'] !== undefined) {
        throw genericError(active ? "'backing-file' specified, but 'top' is the active layer" : "'backing-file' specified, but 'top' has a writer on it");
      }
      // As QEMU's commit_active_start: the base is writable before the job exists.
      const baseWasReadOnly = await makeWritable(layer, base);
      const kind = new ActiveCommitJob(layer, plan, baseWasReadOnly);
      // The job is named after the device, which a storage daemon's nodes do not have.
      return jobs.launch(kind, { id: args['job-id'] ?? '', ...options }, (job) => kind.setUp(job), (job) => kind.undo(job)).catch(async (error: unknown) => {
        if (baseWasReadOnly) await graph.reopenReadOnly(base).catch(() => {});
        throw error;
      });
    }
    const overlay = overlayIn(bs, top);
    if (overlay) checkNotBlocked(blockers, overlay, 'commit-target');
    if (skipFilters(top) === skipFilters(base)) throw genericError('Invalid files for merge: top and base are the same');
    const kind = new IntermediateCommitJob(layer, plan, args['backing-file']);
    return jobs.launch(kind, { id: args['job-id'] ?? '', ...options }, (job) => kind.setUp(job), async (job) => {
      await kind.abort(job);
      await kind.clean(job);
    });
  });
}
