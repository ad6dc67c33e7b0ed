/*
 * `mirror_top`: the filter a mirror or an active block-commit puts above its
 * source (QEMU's bdrv_mirror_top). Every request passes through to the
 * source; the job watches the source's writes to copy them again, and a
 * write-blocking mirror sees each write here first (its hook). For a
 * commit it takes no consistent read of the chain (only the base may be read
 * consistently while the job writes into it) and lets others write, as QEMU
 * does. Named after its child; only jobs create it.
 */
import type { BlockDriver, WriteFlags, ZeroFlags } from '../block-driver.js';
import type { ChildEdge } from '../child-edge.js';
import type { BlockNode } from '../node.js';
import { PassThroughFilter } from './pass-through-filter.js';
import { PERM_CONSISTENT_READ, PERM_WRITE, defaultChildPermissions, type PermissionPair } from '../permissions.js';

/** A job that takes part in every write to its source (a write-blocking mirror copies it to the target too). */
export interface MirrorTopHook {
  /** `request` changes the source; `replay` does the same to a part of it on another node. Resolves when the write may complete. */
  write(offset: number, length: number, request: () => Promise<void>, replay: (target: ChildEdge, offset: number, length: number) => Promise<void>): Promise<void>;
}

export class MirrorTopState extends PassThroughFilter {
  hook: MirrorTopHook | undefined;

  constructor(source: ChildEdge, node: BlockNode, private readonly commit: boolean) {
    super(source, node);
  }

  override write(offset: number, buffer: Buffer, flags: WriteFlags): Promise<void> {
    if (!this.hook) return this.filtered.write(offset, buffer, flags);
    return this.hook.write(offset, buffer.length, () => this.filtered.write(offset, buffer, flags),
      (target, at, length) => target.write(at, buffer.subarray(at - offset, at - offset + length), { fua: flags.fua }));
  }

  override writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (!this.hook) return this.filtered.writeZeroes(offset, length, flags);
    return this.hook.write(offset, length, () => this.filtered.writeZeroes(offset, length, flags),
      (target, at, part) => target.writeZeroes(at, part, { fua: flags.fua, mayUnmap: flags.mayUnmap }));
  }

  childPermissions(edge: ChildEdge, parents: PermissionPair): PermissionPair {
    const pair = defaultChildPermissions(edge.role, parents, !this.node.readOnly);
    if (!this.commit) return pair;
    return { perm: pair.perm & ~PERM_CONSISTENT_READ, shared: pair.shared | PERM_WRITE };
  }
}

interface MirrorTopOptions {
  /** Commit: the target is in the source's backing chain. */
  commit?: boolean;
}

export const mirrorTopDriver: BlockDriver<MirrorTopOptions> = {
  name: 'mirror_top',
  kind: 'filter',
  namedAfterChild: true,
  strongOptions: [],
  async open(context, options) {
    const source = await context.openChild('backing', { name: 'backing', role: 'filtered' });
    return new MirrorTopState(source, context.node, options.commit === true);
  },
};
