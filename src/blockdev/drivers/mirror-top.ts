/*
 * `mirror_top`: the filter a mirror or an active block-commit puts above its
 * source (QEMU's bdrv_mirror_top). Every request passes through to the
 * source; the job watches the source's writes to copy them again, and a
 * write-blocking mirror sees each write here first (its hook). For a
 * commit it takes no consistent read of the chain (only the base may be read
 * consistently while the job writes into it) and lets others write, as QEMU
 * does. Named after its child; only jobs create it.
 */
import type { BlockDriver, DriverState, WriteFlags, ZeroFlags } from '../block-driver.js';
import type { ChildEdge } from '../child-edge.js';
import { nodeFilename } from '../node-filename.js';
import type { BlockNode } from '../node.js';
import { PERM_CONSISTENT_READ, PERM_WRITE, defaultChildPermissions, type PermissionPair } from '../permissions.js';

/** A job that takes part in every write to its source (a write-blocking mirror copies it to the target too). */
export interface MirrorTopHook {
  /** `request` changes the source; `replay` does the same to a part of it on another node. Resolves when the write may complete. */
  write(offset: number, length: number, request: () => Promise<void>, replay: (target: ChildEdge, offset: number, length: number) => Promise<void>): Promise<void>;
}

export class MirrorTopState implements DriverState {
  hook: MirrorTopHook | undefined;

  constructor(private readonly source: ChildEdge, private readonly node: BlockNode, private readonly commit: boolean) {}

  length(): number {
    return this.source.length();
  }

  read(offset: number, buffer: Buffer): Promise<void> {
    return this.source.read(offset, buffer);
  }

  write(offset: number, buffer: Buffer, flags: WriteFlags): Promise<void> {
    if (!this.hook) return this.source.write(offset, buffer, flags);
    return this.hook.write(offset, buffer.length, () => this.source.write(offset, buffer, flags),
      (target, at, length) => target.write(at, buffer.subarray(at - offset, at - offset + length), { fua: flags.fua }));
  }

  writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (!this.hook) return this.source.writeZeroes(offset, length, flags);
    return this.hook.write(offset, length, () => this.source.writeZeroes(offset, length, flags),
      (target, at, part) => target.writeZeroes(at, part, { fua: flags.fua, mayUnmap: flags.mayUnmap }));
  }

  discard(offset: number, length: number): Promise<void> {
    return this.source.discard(offset, length);
  }

  async blockStatus(offset: number, length: number) {
    return { length, delegate: this.source, offset };
  }

  childPermissions(edge: ChildEdge, parents: PermissionPair): PermissionPair {
    const pair = defaultChildPermissions(edge.role, parents, !this.node.readOnly);
    if (!this.commit) return pair;
    return { perm: pair.perm & ~PERM_CONSISTENT_READ, shared: pair.shared | PERM_WRITE };
  }

  info() {
    return { filename: nodeFilename(this.node) };
  }

  async close(): Promise<void> {}
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
