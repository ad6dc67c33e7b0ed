/*
 * blockdev-snapshot-internal-sync as a transaction action (QEMU's internal_snapshot_*):
 * prepare drains the device, checks it and writes the snapshot into the image's table;
 * abort deletes it again; clean ends the drain.
 */
import type { BlockLayer } from '../blockdev/block-layer.js';
import { abortInternalSnapshot, prepareInternalSnapshot, type PreparedInternalSnapshot } from '../blockdev/internal-snapshot.js';
import type { TransactionAction } from './action.js';
import { DrainedSection } from './drained-section.js';

export class InternalSnapshotAction implements TransactionAction {
  private readonly drain = new DrainedSection();
  private prepared: PreparedInternalSnapshot | undefined;

  constructor(private readonly layer: BlockLayer, private readonly request: { device: string; name: string }) {}

  async prepare(): Promise<void> {
    const node = this.layer.graph.find(this.request.device);
    if (node) await this.drain.begin(node);
    this.prepared = await prepareInternalSnapshot(this.layer, this.request);
  }

  async abort(): Promise<void> {
    if (this.prepared) await abortInternalSnapshot(this.layer, this.prepared);
    this.prepared = undefined;
  }

  async clean(): Promise<void> {
    await this.drain.end();
  }
}
