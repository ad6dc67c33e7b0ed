/*
 * Jobs pause when a drain reaches them, as QEMU's block jobs do (and say so:
 * JOB_STATUS_CHANGE paused, then running). Draining a node reaches the jobs
 * holding it or any node above it (a drain goes up through the parents); a
 * subtree drain (QEMU's reopen) drains every node below too; draining
 * everything reaches every job.
 */
import type { BlockNode } from '../blockdev/node.js';
import type { DrainReach } from '../blockdev/block-layer.js';
import type { JobRegistry } from './job-registry.js';

/** The ids of the jobs a drain of `node` reaches. */
function jobsReached(node: BlockNode, reach: DrainReach): Set<string> {
  const ids = new Set<string>();
  const up = new Set<BlockNode>();
  const goUp = (current: BlockNode) => {
    if (up.has(current)) return;
    up.add(current);
    for (const edge of current.parents) {
      if ('node' in edge.parent) goUp(edge.parent.node);
      else if (edge.parent.user.jobId !== undefined) ids.add(edge.parent.user.jobId);
    }
  };
  const down = new Set<BlockNode>();
  const goDown = (current: BlockNode) => {
    if (down.has(current)) return;
    down.add(current);
    goUp(current);
    if (reach === 'subtree') for (const edge of current.children) goDown(edge.child);
  };
  goDown(node);
  return ids;
}

/** The block layer's pauseJobs: pauses the jobs a drain of `node` (or of everything) reaches; returns their resume. */
export function jobPauser(jobs: JobRegistry): (node?: BlockNode, reach?: DrainReach) => Promise<() => Promise<void>> {
  return async (node, reach = 'node') => {
    const reached = node ? jobsReached(node, reach) : undefined;
    const paused = jobs.live().filter((job) => !reached || reached.has(job.id));
    await Promise.all(paused.map((job) => job.drainPause()));
    return async () => {
      await Promise.all(paused.map((job) => job.drainResume()));
    };
  };
}
