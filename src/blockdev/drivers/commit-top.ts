/*
 * `commit_top`: the filter an intermediate block-commit puts above the top
 * node (QEMU's bdrv_commit_top). Its overlay reads through it; it asks
 * nothing of the chain below and shares everything, so the job can write
 * into the base while the layers in between stay readable to no one else.
 * Read-only, named after its child; only jobs create it.
 */
import type { BlockDriver } from '../block-driver.js';
import { PassThroughFilter } from './pass-through-filter.js';
import { PERM_ALL, type PermissionPair } from '../permissions.js';

class CommitTopState extends PassThroughFilter {
  childPermissions(): PermissionPair {
    return { perm: 0, shared: PERM_ALL };
  }
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
