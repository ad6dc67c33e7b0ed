/*
 * The op-blocker matrix as data. Every operation that holds nodes (a job, a
 * backing link) claims each node under a role; every command that starts an
 * operation asks for it on the nodes it walks. MATRIX says, for each held
 * role and requested operation, whether they coexist on one node or with
 * what reason the request is refused. Same node, overlapping chain segments
 * and disjoint segments fall out of where the claims are: operations on
 * disjoint segments never meet on a node. The guard answers in QEMU's words,
 * naming the newest claim that refuses.
 */
import type { BlockNode } from '../blockdev/node.js';

/** QEMU's BLOCK_OP_TYPE_*: what a command asks to do on a node. */
export const BLOCK_OPERATIONS = [
  'backup-source', 'backup-target', 'change', 'commit-source', 'commit-target', 'dataplane', 'drive-del', 'eject',
  'external-snapshot', 'internal-snapshot', 'internal-snapshot-delete', 'mirror-source', 'mirror-target', 'resize', 'stream', 'replace',
] as const;

export type BlockOperation = (typeof BLOCK_OPERATIONS)[number];

/** The operations that hold nodes, and the place a held node has in each (QEMU's job footprints). */
export const HELD_ROLES = {
  stream: ['filter', 'active', 'inter'],
  commit: ['main', 'top', 'inter', 'base'],
  'active-commit': ['filter', 'source', 'inter', 'base'],
  mirror: ['filter', 'source', 'target'],
  // A backup holds no claim on its source: only its filter above it (and the filter's permissions) guard it.
  backup: ['filter', 'target'],
  graph: ['backing'],
} as const;

export type HolderKind = keyof typeof HELD_ROLES;
export type HeldRole = { [K in HolderKind]: `${K}.${(typeof HELD_ROLES)[K][number]}` }[HolderKind];

export const ALL_HELD_ROLES = (Object.keys(HELD_ROLES) as HolderKind[]).flatMap((kind) => HELD_ROLES[kind].map((scope) => `${kind}.${scope}` as HeldRole));

/** Where each role's nodes are, for the documentation (QEMU 7.2's footprints, reference/op-blockers.md §3). */
export const ROLE_NODES: Record<HeldRole, string> = {
  'stream.filter': "the copy-on-read filter above 'device'",
  'stream.active': "'device'",
  'stream.inter': "every node between 'device' and the base (or down to 'bottom')",
  'commit.main': "'device' (the active layer)",
  'commit.top': "'top'",
  'commit.inter': "every node between 'top' and the base",
  'commit.base': 'the base',
  'active-commit.filter': "the mirror_top filter above 'device'",
  'active-commit.source': "'device' (the active layer)",
  'active-commit.inter': 'every node between the active layer and the base',
  'active-commit.base': 'the base',
  'mirror.filter': "the mirror_top filter above 'device'",
  'mirror.source': "'device'",
  'mirror.target': "'target'",
  'backup.filter': "the copy-before-write filter above 'device' ('device' itself holds no claim: the filter's permissions guard it)",
  'backup.target': "'target'",
  'graph.backing': 'a node that is the backing file of another',
};

export type Verdict = { allow: true } | { allow: false; reason: string };

/** A claim's owner, as reasons name it: {type} is a job's type, {parent} a backing link's overlay. */
export interface ClaimOwner {
  type?: string;
  parent?: string;
}

interface MatrixRow {
  held: readonly HeldRole[];
  requested: readonly BlockOperation[];
  verdict: Verdict;
}

const JOB_ROLES = ALL_HELD_ROLES.filter((role) => !role.startsWith('graph.'));
const busy = (reason: string): Verdict => ({ allow: false, reason });

/**
 * The non-allowed cells (every other pair coexists). As in QEMU, a block job blocks every
 * operation on each node it holds; a backing link leaves a backing file open to commits,
 * streams and backups through it and blocks the rest.
 */
export const MATRIX: readonly MatrixRow[] = [
  { held: JOB_ROLES, requested: BLOCK_OPERATIONS, verdict: busy('block device is in use by block job: {type}') },
  {
    held: ['graph.backing'],
    requested: BLOCK_OPERATIONS.filter((operation) => !['commit-target', 'stream', 'backup-source', 'backup-target'].includes(operation)),
    verdict: busy("node is used as backing hd of '{parent}'"),
  },
];

/** The verdict of one cell. */
export function verdictOf(held: HeldRole, requested: BlockOperation): Verdict {
  return MATRIX.find((row) => row.held.includes(held) && row.requested.includes(requested))?.verdict ?? { allow: true };
}

/** Which command asks for which operation, on which nodes (QEMU 7.2's checks). */
export const OPERATION_CHECKS: readonly { command: string; operation: BlockOperation; nodes: string }[] = [
  { command: 'block-stream', operation: 'stream', nodes: "every node from 'device' down to the base (exclusive) or 'bottom' (inclusive), filters included" },
  { command: 'block-commit', operation: 'commit-source', nodes: "'device' (which must be a root node)" },
  { command: 'block-commit', operation: 'commit-target', nodes: "every node from 'top' down to 'base' (inclusive), and the overlay of 'top' when 'top' is not the active layer" },
  { command: 'blockdev-mirror', operation: 'mirror-source', nodes: "'device' (which must be a root node)" },
  { command: 'blockdev-mirror', operation: 'mirror-target', nodes: "'target'" },
  { command: 'drive-mirror', operation: 'mirror-source', nodes: "'device' (which must be a root node), before the target file is made" },
  { command: 'drive-mirror', operation: 'mirror-target', nodes: 'the target node it opened' },
  { command: 'blockdev-backup', operation: 'backup-source', nodes: "'device'" },
  { command: 'blockdev-backup', operation: 'backup-target', nodes: "'target'" },
  { command: 'drive-backup', operation: 'backup-source', nodes: "'device', before the target file is made and again once it is open" },
  { command: 'drive-backup', operation: 'backup-target', nodes: 'the target node it opened' },
  { command: 'blockdev-del', operation: 'drive-del', nodes: 'the node' },
  { command: 'block_resize', operation: 'resize', nodes: "the node; refused as \"Device '...' is in use\"" },
  { command: 'blockdev-snapshot', operation: 'external-snapshot', nodes: "'node'" },
  { command: 'blockdev-snapshot-sync', operation: 'external-snapshot', nodes: "'node-name' or 'device'" },
  { command: 'blockdev-snapshot-internal-sync', operation: 'internal-snapshot', nodes: "'device' (which must be a root node)" },
  { command: 'change-backing-file', operation: 'change', nodes: "'device' (which must be a root node)" },
  { command: 'blockdev-snapshot-delete-internal-sync', operation: 'internal-snapshot-delete', nodes: "'device' (which must be a root node)" },
];

/** Commands that start an operation but meet only permissions and image locks, no op blocker (as in QEMU). */
export const PERMISSION_ONLY_COMMANDS: readonly string[] = [
  'blockdev-add', 'blockdev-create', 'block-export-add', 'nbd-server-add', 'block-set-write-threshold', 'blockdev-reopen',
];

interface Claim {
  role: HeldRole;
  owner: ClaimOwner;
}

function render(reason: string, owner: ClaimOwner): string {
  return reason.replace('{type}', owner.type ?? '').replace('{parent}', owner.parent ?? '');
}

export class OpBlockers {
  private readonly byNode = new Map<BlockNode, Claim[]>();

  /** Claims `node` under `role`; returns the function that releases the claim. */
  claim(node: BlockNode, role: HeldRole, owner: ClaimOwner): () => void {
    const claim = { role, owner };
    const list = this.byNode.get(node) ?? [];
    list.push(claim);
    this.byNode.set(node, list);
    return () => {
      const current = this.byNode.get(node) ?? [];
      const index = current.indexOf(claim);
      if (index >= 0) current.splice(index, 1);
      if (current.length === 0) this.byNode.delete(node);
    };
  }

  /** The roles `node` is held under right now, newest first (backing links last: they are the graph's). */
  claims(node: BlockNode): { role: HeldRole; owner: ClaimOwner }[] {
    const held = [...(this.byNode.get(node) ?? [])].reverse();
    // Backing links are part of the graph: their claim exists as long as the link does.
    const backingOf = node.parents.find((edge) => edge.role === 'cow' && 'node' in edge.parent);
    if (backingOf && 'node' in backingOf.parent) held.push({ role: 'graph.backing', owner: { parent: backingOf.parent.node.name } });
    return held;
  }

  /** Why `operation` is refused on `node` (the newest refusing claim speaks), or undefined. */
  reason(node: BlockNode, operation: BlockOperation): string | undefined {
    for (const claim of this.claims(node)) {
      const verdict = verdictOf(claim.role, operation);
      if (!verdict.allow) return render(verdict.reason, claim.owner);
    }
    return undefined;
  }
}
