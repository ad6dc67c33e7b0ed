/*
 * blockdev-snapshot and blockdev-snapshot-sync as a transaction action (QEMU's
 * external_snapshot_*): prepare drains the old node, checks it and the overlay
 * (creating and opening it for -sync) and appends the overlay, so later actions see
 * the new graph; abort takes the overlay off again; commit makes the old node
 * read-only; clean ends the drain and drops an opened overlay nobody uses.
 */
import type { BlockLayer } from '../blockdev/block-layer.js';
import type { BlockNode } from '../blockdev/node.js';
import {
  appendOverlay, checkOverlay, dropUnusedOverlay, findOverlay, openNewOverlay, settleSnapshot, snapshotSource, type SnapshotSyncArguments,
} from '../blockdev/snapshot.js';
import type { TransactionAction } from './action.js';
import { DrainedSection } from './drained-section.js';

export class ExternalSnapshotAction implements TransactionAction {
  private readonly drain = new DrainedSection();
  private old: BlockNode | undefined;
  /** The overlay this action opened (-sync), which is nobody's unless appended. */
  private opened: BlockNode | undefined;
  private undoAppend: (() => Promise<void>) | undefined;

  constructor(private readonly layer: BlockLayer, private readonly request: { overlay: string } | { sync: SnapshotSyncArguments }, private readonly node: string | undefined, private readonly device: string | undefined) {}

  async prepare(): Promise<void> {
    const found = this.node === undefined ? undefined : this.layer.graph.find(this.node);
    if (found) await this.drain.begin(found);
    const old = await snapshotSource(this.layer, found, this.device, this.node);
    let overlay: BlockNode;
    if ('overlay' in this.request) {
      overlay = findOverlay(this.layer, this.request.overlay);
    } else {
      overlay = await openNewOverlay(this.layer, old, this.request.sync);
      this.opened = overlay;
    }
    checkOverlay(overlay);
    this.undoAppend = await appendOverlay(this.layer, old, overlay);
    this.old = old;
  }

  async commit(): Promise<void> {
    if (this.old) await settleSnapshot(this.layer, this.old);
  }

  async abort(): Promise<void> {
    await this.undoAppend?.();
    this.undoAppend = undefined;
  }

  async clean(): Promise<void> {
    await this.drain.end();
    if (this.opened) await dropUnusedOverlay(this.layer, this.opened);
  }
}
