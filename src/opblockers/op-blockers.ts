/*
 * QEMU's legacy op blockers as data: which sources block which operations on
 * a node, and with what reason. A block job blocks every operation on each
 * node it holds; a backing link blocks most operations on the backing node.
 * The guard answers with QEMU's text, naming the most recent reason.
 */
import type { BlockNode } from '../blockdev/node.js';

export const BLOCK_OPERATIONS = [
  'backup-source', 'backup-target', 'change', 'commit-source', 'commit-target', 'dataplane', 'drive-del', 'eject',
  'external-snapshot', 'internal-snapshot', 'internal-snapshot-delete', 'mirror-source', 'mirror-target', 'resize', 'stream', 'replace',
] as const;

export type BlockOperation = (typeof BLOCK_OPERATIONS)[number];

/** The sources of blockers: what they leave allowed, and how they explain themselves. */
export const BLOCKER_SOURCES = {
  'block-job': { allows: [] as BlockOperation[], reason: (jobType: string) => `block device is in use by block job: ${jobType}` },
  'backing-link': {
    allows: ['commit-target', 'stream', 'backup-source', 'backup-target'] as BlockOperation[],
    reason: (parent: string) => `node is used as backing hd of '${parent}'`,
  },
} as const;

export type BlockerSource = keyof typeof BLOCKER_SOURCES;

/** Which command checks which operation, on which nodes (QEMU 7.2's checks). */
export const OPERATION_CHECKS: readonly { command: string; operation: BlockOperation; nodes: string }[] = [
  { command: 'block-stream', operation: 'stream', nodes: "every node from 'device' down to the base (exclusive) or 'bottom' (inclusive), filters included" },
  { command: 'block-commit', operation: 'commit-source', nodes: "'device' (which must be a root node)" },
  { command: 'block-commit', operation: 'commit-target', nodes: "every node from 'top' down to 'base' (inclusive), and the overlay of 'top' when 'top' is not the active layer" },
  { command: 'blockdev-del', operation: 'drive-del', nodes: 'the node' },
  { command: 'block_resize', operation: 'resize', nodes: "the node; refused as \"Device '...' is in use\"" },
  { command: 'blockdev-snapshot', operation: 'external-snapshot', nodes: "'node'" },
  { command: 'blockdev-snapshot-sync', operation: 'external-snapshot', nodes: "'node-name' or 'device'" },
];

/** Commands that start an operation but meet only permissions and image locks, no op blocker (as in QEMU). */
export const PERMISSION_ONLY_COMMANDS: readonly string[] = [
  'blockdev-add', 'blockdev-create', 'block-export-add', 'nbd-server-add', 'block-set-write-threshold',
];

interface Blocker {
  source: BlockerSource;
  reason: string;
}

export class OpBlockers {
  private readonly byNode = new Map<BlockNode, Blocker[]>();

  /** Blocks `node` for the source's operations; returns the function that lifts it. */
  add(node: BlockNode, source: BlockerSource, detail: string): () => void {
    const blocker = { source, reason: BLOCKER_SOURCES[source].reason(detail) };
    const list = this.byNode.get(node) ?? [];
    list.push(blocker);
    this.byNode.set(node, list);
    return () => {
      const current = this.byNode.get(node) ?? [];
      current.splice(current.indexOf(blocker), 1);
      if (current.length === 0) this.byNode.delete(node);
    };
  }

  /** The reason `operation` is blocked on `node`, or undefined; the newest blocker speaks. */
  reason(node: BlockNode, operation: BlockOperation): string | undefined {
    const blocks = (source: BlockerSource) => !BLOCKER_SOURCES[source].allows.includes(operation);
    const explicit = [...(this.byNode.get(node) ?? [])].reverse().find((blocker) => blocks(blocker.source));
    if (explicit) return explicit.reason;
    // Backing links are part of the graph: their blocker exists as long as the link does.
    const backingOf = node.parents.find((edge) => edge.role === 'cow' && 'node' in edge.parent);
    if (backingOf && 'node' in backingOf.parent && blocks('backing-link')) return BLOCKER_SOURCES['backing-link'].reason(backingOf.parent.node.name);
    return undefined;
  }
}
