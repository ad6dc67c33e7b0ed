/*
 * What a block job holds on the graph (QEMU's block_job_add_bdrv and the
 * job's BlockBackends): edges with the permissions the job needs on each
 * node, and the op blockers it puts on them. Released together; nodes the
 * release leaves without any user, and that the monitor does not own, close.
 */
import type { BlockLayer } from '../blockdev/block-layer.js';
import { COMMAND_USER } from '../blockdev/block-layer.js';
import type { BlockUser, ChildEdge } from '../blockdev/child-edge.js';
import { drainedHook } from '../blockdev/drain.js';
import type { BlockNode } from '../blockdev/node.js';
import { PERM_ALL, type PermissionPair } from '../blockdev/permissions.js';
import type { BlockdevOptions } from '../generated/qapi-types.js';
import type { Job } from './job.js';
import type { HELD_ROLES, HeldRole, HolderKind } from '../opblockers/op-blockers.js';

/**
 * Opens the filter a job puts above `node` (copy-on-read, commit_top, mirror_top) and puts it
 * in the node's place. Unnamed by the user, it is implicit: named after its child, as in QEMU.
 */
export async function insertJobFilter(layer: BlockLayer, options: Record<string, unknown>, node: BlockNode, filterNodeName: string | undefined): Promise<BlockNode> {
  const filter = await layer.opener.open({
    options: { ...options, ...(filterNodeName === undefined ? {} : { 'node-name': filterNodeName }) } as unknown as BlockdevOptions,
    monitorOwned: false,
  });
  filter.implicit = filterNodeName === undefined;
  await layer.graph.insertFilter(filter, node);
  return filter;
}

/**
 * The end of a job that ran behind a filter and may hold its source drained (mirror, active
 * commit): it lets go of its nodes, the filter goes, the held writes go on. Each step runs even
 * if one before failed: above all the drain ends, or the writes held in the filter would wait forever.
 */
export async function leaveJobFilter(job: Job, layer: BlockLayer, nodes: JobNodes<Exclude<HolderKind, 'graph'>> | undefined, filter: BlockNode | undefined, endDrain: (() => void) | undefined): Promise<void> {
  await job.bestEffort('release the nodes', async () => nodes?.release());
  if (filter) {
    const moved = layer.graph.removeFilter(filter);
    endDrain?.(); // requests held in the filter go on to the node below it, before the filter closes
    await job.bestEffort('take the filter out', () => moved);
  } else {
    endDrain?.();
  }
}

/** Reopens a read-only node read-write for a job that writes into it; returns whether it was read-only. */
export async function makeWritable(layer: BlockLayer, node: BlockNode): Promise<boolean> {
  if (!node.readOnly) return false;
  await layer.graph.reopenReadWrite(node);
  return true;
}

/** The name QEMU gives a job's edge to a node in each role (it shows in permission messages). */
const EDGE_NAMES: Record<Exclude<HeldRole, `graph.${string}`>, string> = {
  'stream.filter': 'main node', 'stream.active': 'active node', 'stream.inter': 'intermediate node',
  'commit.main': 'main node', 'commit.top': 'intermediate node', 'commit.inter': 'intermediate node', 'commit.base': 'base',
  'active-commit.filter': 'main node', 'active-commit.source': 'source', 'active-commit.inter': 'intermediate node', 'active-commit.base': 'target',
  'mirror.filter': 'main node', 'mirror.source': 'source', 'mirror.target': 'target',
  'backup.filter': 'main node', 'backup.target': 'target',
};

export class JobNodes<H extends Exclude<HolderKind, 'graph'>> {
  private readonly edges: ChildEdge[] = [];
  private readonly unblock: (() => void)[] = [];
  /** The job as a user of its nodes: a drain that reaches one of them pauses the job. */
  readonly user: BlockUser;

  /** `holder`: the operation the job is in the op-blocker matrix (an active commit is not an intermediate one). */
  constructor(private readonly layer: BlockLayer, private readonly job: Job, readonly holder: H) {
    this.user = { describe: () => `${job.type} job '${job.id}'`, job: true, drained: drainedHook(() => job.drainPause(), () => job.drainResume()) };
  }

  /** A node the job works on: its claim in the op-blocker matrix, and the permissions it needs there. */
  async hold(node: BlockNode, scope: (typeof HELD_ROLES)[H][number], needs: PermissionPair): Promise<ChildEdge> {
    const role = `${this.holder}.${scope}` as keyof typeof EDGE_NAMES;
    const edge = await this.layer.graph.attachUser(this.user, node, EDGE_NAMES[role], needs);
    this.edges.push(edge);
    this.unblock.push(this.layer.blockers.claim(node, role, { type: this.job.type }));
    return edge;
  }

  /** The job's own BlockBackend on a node, for its I/O: permissions only, no blocker. */
  async open(node: BlockNode, needs: PermissionPair): Promise<ChildEdge> {
    const edge = await this.layer.graph.attachUser(COMMAND_USER, node, 'root', needs);
    this.edges.push(edge);
    return edge;
  }

  /** Keeps the hold on a node but gives up the permissions (the job is done with its I/O there). */
  async relax(edge: ChildEdge): Promise<void> {
    await this.layer.graph.updateUser(edge, { perm: 0, shared: PERM_ALL });
  }

  /** Gives up one edge (e.g. the writer on a base before the graph switches over). */
  async drop(edge: ChildEdge): Promise<void> {
    const index = this.edges.indexOf(edge);
    if (index < 0) return;
    this.edges.splice(index, 1);
    await this.layer.graph.detach(edge);
  }

  /**
   * Lets go of everything; nodes left without users that the monitor does not own close. A
   * step that fails does not keep the others from running; the first failure is thrown after.
   */
  async release(): Promise<void> {
    for (const unblock of this.unblock.splice(0)) unblock();
    const { graph } = this.layer;
    const failures: unknown[] = [];
    for (const edge of this.edges.splice(0)) {
      try {
        await graph.detach(edge);
        if (edge.child.parents.length === 0 && !edge.child.monitorOwned && graph.find(edge.child.name) === edge.child) await graph.close(edge.child);
      } catch (error) {
        failures.push(error);
      }
    }
    if (failures.length > 0) throw failures[0];
  }
}
