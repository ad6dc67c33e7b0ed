/*
 * The `copy-before-write` filter (QEMU's block/copy-before-write.c): before a
 * write, write-zeroes or discard reaches `file`, the old data of the clusters
 * it touches is copied to `target`, through the block-copy state the backup
 * job shares. So `target` keeps the disk as it was when the filter was put in.
 */
import type { BlockDriver, WriteFlags, ZeroFlags } from '../block-driver.js';
import { BlockCopy, blockCopyClusterSize } from '../block-copy.js';
import type { ChildEdge } from '../child-edge.js';
import type { BlockNode } from '../node.js';
import { PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, defaultChildPermissions, type PermissionPair } from '../permissions.js';
import { PassThroughFilter } from './pass-through-filter.js';

export class CopyBeforeWriteState extends PassThroughFilter {
  readonly blockCopy: BlockCopy;

  constructor(file: ChildEdge, readonly target: ChildEdge, node: BlockNode) {
    super(file, node);
    this.blockCopy = new BlockCopy(file, target, blockCopyClusterSize(target));
    this.blockCopy.bitmap.set(0, file.length());
  }

  /** Copies the old data of the clusters [offset, offset + length) touches, unless the write does not change them. */
  private async beforeWrite(offset: number, length: number, flags: WriteFlags): Promise<void> {
    if (flags.contentUnchanged) return;
    await this.blockCopy.copy(offset, length);
  }

  override async write(offset: number, buffer: Buffer, flags: WriteFlags): Promise<void> {
    await this.beforeWrite(offset, buffer.length, flags);
    return this.filtered.write(offset, buffer, flags);
  }

  override async writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    await this.beforeWrite(offset, length, flags);
    return this.filtered.writeZeroes(offset, length, flags);
  }

  override async discard(offset: number, length: number): Promise<void> {
    await this.beforeWrite(offset, length, {});
    return this.filtered.discard(offset, length);
  }

  childPermissions(edge: ChildEdge, parents: PermissionPair): PermissionPair {
    // The target is written by the filter; others may use it (the live disk may be in its backing chain), but not resize it.
    if (edge === this.target) return { perm: PERM_WRITE, shared: PERM_ALL & ~PERM_RESIZE };
    const pair = defaultChildPermissions(edge.role, parents, !this.node.readOnly);
    // Once in use, every write to the source must come through the filter.
    if (this.node.parents.length === 0) return pair;
    return { perm: pair.perm | PERM_CONSISTENT_READ, shared: pair.shared & ~(PERM_WRITE | PERM_RESIZE) };
  }
}

export const copyBeforeWriteDriver: BlockDriver = {
  name: 'copy-before-write',
  kind: 'filter',
  // Its filename is its source's, as qemu-storage-daemon reports it.
  namedAfterChild: true,
  strongOptions: [],
  async open(context) {
    const file = await context.openChild('file', { name: 'file', role: 'filtered' });
    const target = await context.openChild('target', { name: 'target', role: 'data' });
    return new CopyBeforeWriteState(file, target, context.node);
  },
};
