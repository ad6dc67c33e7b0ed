/*
 * Block permissions, as QEMU models them: every edge into a node says what it
 * uses (perm) and what it lets other users of the same node do (shared).
 * A node is consistent when, for every two of its parents, what one uses is
 * shared by the other. This module holds the bits, their names in messages,
 * the default rules by which a node derives its children's permissions from
 * its parents', and QEMU's conflict text.
 */

export const PERM_CONSISTENT_READ = 0x1;
export const PERM_WRITE = 0x2;
export const PERM_WRITE_UNCHANGED = 0x4;
export const PERM_RESIZE = 0x8;
export const PERM_ALL = 0xf;

/** Names as QEMU prints them in messages, and as QAPI's BlockPermission spells them. */
const MESSAGE_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];
export const QAPI_PERMISSION_NAMES = ['consistent-read', 'write', 'write-unchanged', 'resize'];

export function permissionNames(mask: number): string[] {
  return MESSAGE_NAMES.filter((_name, bit) => mask & (1 << bit));
}

export function permissionsFromQapi(names: readonly string[]): number {
  return names.reduce((mask, name) => mask | (1 << QAPI_PERMISSION_NAMES.indexOf(name)), 0);
}

/** What a child is to its parent; decides the default permission rules (QEMU's BdrvChildRole). */
export type ChildRole =
  | 'filtered' // filters and raw without offset/size: the parent passes its users' needs through
  | 'cow' // a backing file
  | 'storage' // a format's image file (data and metadata), e.g. qcow2 -> file
  | 'data'; // a format's pure data file, e.g. raw with offset/size -> file

export interface PermissionPair {
  perm: number;
  shared: number;
}

const PASSTHROUGH = PERM_ALL;

/** QEMU's default child permissions for a node whose own users need `parents`. */
export function defaultChildPermissions(role: ChildRole, parents: PermissionPair, nodeWritable: boolean): PermissionPair {
  const filtered = { perm: parents.perm & PASSTHROUGH, shared: (parents.shared & PASSTHROUGH) | (PERM_ALL & ~PASSTHROUGH) };
  switch (role) {
    case 'filtered':
      return filtered;
    case 'cow': {
      // A backing file is only read; it may be written or resized by others only if every user of the overlay allows writes.
      const shared = (parents.shared & PERM_WRITE ? PERM_WRITE | PERM_RESIZE : 0) | PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;
      return { perm: parents.perm & PERM_CONSISTENT_READ, shared };
    }
    case 'storage':
    case 'data': {
      let { perm, shared } = filtered;
      if (role === 'storage') {
        // Metadata is written whenever the format node is writable, and must never change underneath.
        if (nodeWritable) perm |= PERM_WRITE | PERM_RESIZE;
        perm |= PERM_CONSISTENT_READ;
        shared &= ~(PERM_WRITE | PERM_RESIZE);
      }
      shared &= ~PERM_RESIZE; // the format relies on the file's size
      if (perm & PERM_WRITE_UNCHANGED) perm |= PERM_WRITE;
      if (perm & PERM_WRITE) perm |= PERM_RESIZE; // writes may extend the file
      return { perm, shared };
    }
  }
}

/** QEMU 7.2's text for two users of one node that cannot coexist. */
export function permissionConflictMessage(node: string, wanted: number, user: string, userEdge: string, holder: string, holderEdge: string): string {
  return `Permission conflict on node '${node}': permissions '${permissionNames(wanted).join(', ')}' are both required by ` +
    `${user} (uses node '${node}' as '${userEdge}' child) and unshared by ${holder} (uses node '${node}' as '${holderEdge}' child).`;
}
