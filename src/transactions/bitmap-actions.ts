/*
 * The block-dirty-bitmap-* transaction actions (QEMU's block_dirty_bitmap_*_prepare and
 * friends): prepare runs the same function as the stand-alone command and keeps what undoes
 * it; abort undoes it. Only removal waits for commit to let the bitmap go from memory.
 */
import {
  addBitmap, clearBitmap, discardAddedBitmap, keepBitmap, mergeBitmaps, releaseBitmap, removeBitmap, setBitmapEnabled, type RemovedBitmap,
} from '../blockdev/bitmaps/bitmap-commands.js';
import type { DirtyBitmap } from '../blockdev/bitmaps/dirty-bitmap.js';
import type { BlockGraph } from '../blockdev/graph.js';
import type { BlockNode } from '../blockdev/node.js';
import type { BlockDirtyBitmapAdd, BlockDirtyBitmapMerge } from '../generated/qapi-types.js';
import type { TransactionAction } from './action.js';

export class BitmapAddAction implements TransactionAction {
  private added: { node: BlockNode; bitmap: DirtyBitmap } | undefined;

  constructor(private readonly graph: BlockGraph, private readonly args: BlockDirtyBitmapAdd) {}

  async prepare(): Promise<void> {
    const bitmap = await addBitmap(this.graph, this.args);
    this.added = { node: this.graph.find(this.args.node)!, bitmap };
  }

  async abort(): Promise<void> {
    if (this.added) await discardAddedBitmap(this.added.node, this.added.bitmap);
  }
}

export class BitmapRemoveAction implements TransactionAction {
  private removed: RemovedBitmap | undefined;

  constructor(private readonly graph: BlockGraph, private readonly args: { node: string; name: string }) {}

  async prepare(): Promise<void> {
    this.removed = await removeBitmap(this.graph, this.args.node, this.args.name, false);
  }

  async commit(): Promise<void> {
    if (this.removed) releaseBitmap(this.removed);
  }

  async abort(): Promise<void> {
    if (this.removed) await keepBitmap(this.removed);
  }
}

/** clear, enable, disable and merge: applied in prepare, put back in abort. */
export class BitmapChangeAction implements TransactionAction {
  private undo: (() => unknown) | undefined;

  constructor(private readonly change: () => Promise<() => unknown>) {}

  async prepare(): Promise<void> {
    this.undo = await this.change();
  }

  async abort(): Promise<void> {
    await this.undo?.();
  }
}

export const bitmapClear = (graph: BlockGraph, { node, name }: { node: string; name: string }) =>
  new BitmapChangeAction(async () => clearBitmap(graph, node, name));
export const bitmapToggle = (graph: BlockGraph, { node, name }: { node: string; name: string }, enabled: boolean) =>
  new BitmapChangeAction(async () => setBitmapEnabled(graph, node, name, enabled));
export const bitmapMerge = (graph: BlockGraph, args: BlockDirtyBitmapMerge) =>
  new BitmapChangeAction(() => mergeBitmaps(graph, args));
