/*
 * blockdev-snapshot-internal-sync as a transaction action (QEMU's internal_snapshot_*):
 * prepare looks the root node up, drains it until clean and writes the snapshot
 * (blockdev/internal-snapshot.ts); abort deletes it again; commit has nothing left to do.
 */
import { lookupRootNode, type BlockLayer } from '../blockdev/block-layer.js';
import { abortInternalSnapshot, createInternalSnapshot, type PreparedInternalSnapshot } from '../blockdev/internal-snapshot.js';
import type { TransactionAction } from './action.js';
import { DrainedSection } from './drained-section.js';

export class InternalSnapshotAction implements TransactionAction {
  private readonly drain = new DrainedSection();
  private prepared: PreparedInternalSnapshot | undefined;

  constructor(private readonly layer: BlockLayer, private readonly request: { device: string; name: string }) {}

  async prepare(): Promise<void> {
    const node = lookupRootNode(this.layer.graph, this.request.device);
    await this.drain.begin(node);
    this.prepared = await createInternalSnapshot(this.layer, node, this.request);
  }

  async abort(): Promise<void> {
    if (this.prepared) await abortInternalSnapshot(this.layer, this.prepared);
    this.prepared = undefined;
  }

  async clean(): Promise<void> {
    await this.drain.end();
  }
}
