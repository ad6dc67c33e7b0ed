/*
 * An edge from a parent to a node: a node's child (file, backing, image) or a
 * user of the node that is not a node (an export, a job, a temporary command
 * user). The edge holds the parent's permissions on the node and is the only
 * way to do I/O on it, so a write without the write permission is refused
 * here rather than trusted.
 */
import type { DriverExtent, HostFileRange, WriteFlags, ZeroFlags } from './block-driver.js';
import { IoError } from './io-error.js';
import type { BlockNode } from './node.js';
import type { DrainedHook } from './drain.js';
import { PERM_ALL, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED, type ChildRole } from './permissions.js';

/** A parent that is not a node; describes itself as QEMU does in messages. */
export interface BlockUser {
  /** e.g. "an unnamed block device", "stream job 'j0'". */
  describe(): string;
  /** A job's own hold on a node (QEMU: a BdrvChild of the job, not a BlockBackend). */
  readonly job?: boolean;
  /** What the user does when a drain reaches it (a job pauses); a user without one holds nothing extra. */
  readonly drained?: DrainedHook;
}

export type EdgeParent = { node: BlockNode } | { user: BlockUser };

export class ChildEdge {
  perm = 0;
  shared = PERM_ALL;

  /** The node the edge points at; graph operations (snapshot, job completion) move edges to another node. */
  constructor(readonly parent: EdgeParent, public child: BlockNode, readonly name: string, readonly role: ChildRole) {}

  /** How QEMU names this parent in permission messages. */
  describeParent(): string {
    return 'node' in this.parent ? `node '${this.parent.node.name}'` : this.parent.user.describe();
  }

  private requireWrite(): void {
    if (!(this.perm & (PERM_WRITE | PERM_WRITE_UNCHANGED))) throw new IoError('EPERM', `write to '${this.child.name}' without the write permission`);
  }

  async read(offset: number, buffer: Buffer): Promise<void> {
    return this.child.read(offset, buffer);
  }

  async write(offset: number, buffer: Buffer, flags: WriteFlags = {}): Promise<void> {
    this.requireWrite();
    return this.child.write(offset, buffer, flags);
  }

  async writeZeroes(offset: number, length: number, flags: ZeroFlags = {}): Promise<void> {
    this.requireWrite();
    return this.child.writeZeroes(offset, length, flags);
  }

  async discard(offset: number, length: number): Promise<void> {
    this.requireWrite();
    return this.child.discard(offset, length);
  }

  async copyRangeFrom(offset: number, length: number, target: ChildEdge, targetOffset: number, flags: WriteFlags = {}): Promise<void> {
    return this.child.copyRangeFrom(offset, length, target, targetOffset, flags);
  }

  async copyRangeTo(source: HostFileRange, offset: number, length: number, flags: WriteFlags = {}): Promise<void> {
    this.requireWrite();
    return this.child.copyRangeTo(source, offset, length, flags);
  }

  async flush(): Promise<void> {
    return this.child.flush();
  }

  async truncate(size: number): Promise<void> {
    if (!(this.perm & PERM_RESIZE)) throw new IoError('EPERM', `resize of '${this.child.name}' without the resize permission`);
    return this.child.truncate(size);
  }

  async blockStatus(offset: number, length: number): Promise<DriverExtent> {
    return this.child.driverBlockStatus(offset, length);
  }

  length(): number {
    return this.child.length();
  }

  /** Writes past the end grow the child (a file, or a filter over one): a format above may allocate there. */
  get growsOnWrite(): boolean {
    return this.child.state.growsOnWrite === true;
  }
}
