/*
 * `commit_top`: the filter an intermediate block-commit puts above the top
 * node (QEMU's bdrv_commit_top). Its overlay reads through it; it asks
 * nothing of the chain below and shares everything, so the job can write
 * into the base while the layers in between stay readable to no one else.
 * Read-only, named after its child; only jobs create it.
 */
import type { BlockDriver, DriverState } from '../block-driver.js';
import type { ChildEdge } from '../child-edge.js';
import { nodeFilename } from '../node-filename.js';
import type { BlockNode } from '../node.js';
import { PERM_ALL, type PermissionPair } from '../permissions.js';

class CommitTopState implements DriverState {
  constructor(private readonly backing: ChildEdge, private readonly node: BlockNode) {}

  length(): number {
    return this.backing.length();
  }

  read(offset: number, buffer: Buffer): Promise<void> {
    return this.backing.read(offset, buffer);
  }

  async blockStatus(offset: number, length: number) {
    return { length, delegate: this.backing, offset };
  }

  childPermissions(): PermissionPair {
    return { perm: 0, shared: PERM_ALL };
  }

  info() {
    return { filename: nodeFilename(this.node) };
  }

  async close(): Promise<void> {}
}

export const commitTopDriver: BlockDriver = {
  name: 'commit_top',
  kind: 'filter',
  namedAfterChild: true,
  strongOptions: [],
  async open(context) {
    const backing = await context.openChild('backing', { name: 'backing', role: 'filtered' });
    return new CommitTopState(backing, context.node);
  },
};
