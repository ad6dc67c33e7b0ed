/*
 * What a block job holds on the graph (QEMU's block_job_add_bdrv and the
 * job's BlockBackends): edges with the permissions the job needs on each
 * node, and the op blockers it puts on them. Released together; nodes the
 * release leaves without any user, and that the monitor does not own, close.
 */
import type { BlockLayer } from '../blockdev/block-layer.js';
import { COMMAND_USER } from '../blockdev/block-layer.js';
import type { ChildEdge } from '../blockdev/child-edge.js';
import type { BlockNode } from '../blockdev/node.js';
import { PERM_ALL, type PermissionPair } from '../blockdev/permissions.js';
import type { BlockdevOptions } from '../generated/qapi-types.js';
import type { Job } from './job.js';

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

/** Reopens a read-only node read-write for a job that writes into it; returns whether it was read-only. */
export async function makeWritable(layer: BlockLayer, node: BlockNode): Promise<boolean> {
  if (!node.readOnly) return false;
  await layer.graph.reopenReadWrite(node);
  return true;
}

export class JobNodes {
  private readonly edges: ChildEdge[] = [];
  private readonly unblock: (() => void)[] = [];
  private readonly user;
  private readonly jobType: string;

  constructor(private readonly layer: BlockLayer, job: Job) {
    this.jobType = job.type;
    this.user = { describe: () => `${job.type} job '${job.id}'`, job: true };
  }

  /** A node the job works on: permissions under the edge name QEMU gives it, and the job's op blocker. */
  async hold(node: BlockNode, name: string, needs: PermissionPair): Promise<ChildEdge> {
    const edge = await this.layer.graph.attachUser(this.user, node, name, needs);
    this.edges.push(edge);
    this.unblock.push(this.layer.blockers.add(node, 'block-job', this.jobType));
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

  /** Lets go of everything; nodes left without users that the monitor does not own close. */
  async release(): Promise<void> {
    for (const unblock of this.unblock.splice(0)) unblock();
    const { graph } = this.layer;
    for (const edge of this.edges.splice(0)) {
      await graph.detach(edge);
      if (edge.child.parents.length === 0 && !edge.child.monitorOwned && graph.find(edge.child.name) === edge.child) await graph.close(edge.child);
    }
  }
}
