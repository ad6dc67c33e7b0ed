/*
 * The block-dirty-bitmap-* commands and x-debug-block-dirty-bitmap-sha256, with
 * qemu-storage-daemon's checks in its order and its texts. Each is a function of its own that
 * also returns what undoes it: the transaction's bitmap actions run the same functions, as
 * QEMU's do (../../transactions/bitmap-actions.ts).
 */
import { createHash } from 'node:crypto';
import type { CommandTable } from '../../command-table.js';
import { genericError } from '../../errors.js';
import type { BlockDirtyBitmapAdd, BlockDirtyBitmapMerge, BlockDirtyBitmapOrStr } from '../../generated/qapi-types.js';
import { lookupDeviceOrNode, type BlockLayer } from '../block-layer.js';
import type { BlockGraph } from '../graph.js';
import type { BlockNode } from '../node.js';
import { DirtyBitmap } from './dirty-bitmap.js';

const MIN_GRANULARITY = 512;

/** What a command may not do to a bitmap (QEMU's BDRV_BITMAP_* check flags). */
interface Refusals {
  busy?: boolean;
  readonly?: boolean;
  inconsistent?: boolean;
}

const ANY_CHANGE: Refusals = { busy: true, readonly: true, inconsistent: true };
/** Enabling and disabling is allowed on a read-only image's bitmaps. */
const TOGGLE: Refusals = { busy: true, inconsistent: true };

/** QEMU's bdrv_dirty_bitmap_check. */
export function checkBitmap(bitmap: DirtyBitmap, refusals: Refusals): void {
  const name = bitmap.name ?? '';
  if (refusals.busy && bitmap.busy) throw genericError(`Bitmap '${name}' is currently in use by another operation and cannot be used`);
  if (refusals.readonly && bitmap.readonly) throw genericError(`Bitmap '${name}' is readonly and cannot be modified`);
  if (refusals.inconsistent && bitmap.inconsistent) throw genericError(`Bitmap '${name}' is inconsistent and cannot be used`);
}

/** QEMU's block_dirty_bitmap_lookup: the node by name, then its bitmap. */
export function lookupBitmap(graph: Pick<BlockGraph, 'find'>, nodeName: string, name: string): { node: BlockNode; bitmap: DirtyBitmap } {
  const node = graph.find(nodeName);
  if (!node) throw genericError(`Node '${nodeName}' not found`);
  const bitmap = node.bitmaps.find(name);
  if (!bitmap) throw genericError(`Dirty bitmap '${name}' not found`);
  return { node, bitmap };
}

/** QEMU's bdrv_get_default_bitmap_granularity: the cluster size kept within [4 KiB, 64 KiB], else 64 KiB. */
export function defaultGranularity(node: BlockNode): number {
  const cluster = node.state.clusterSize;
  return cluster ? Math.min(65536, Math.max(4096, cluster)) : 65536;
}

function isPowerOfTwo(value: number): boolean {
  return value > 0 && Number.isInteger(Math.log2(value));
}

export async function addBitmap(graph: BlockGraph, args: BlockDirtyBitmapAdd): Promise<DirtyBitmap> {
  if (args.name === '') throw genericError('Bitmap name cannot be empty');
  const node = lookupDeviceOrNode(graph, args.node, args.node);
  if (args.granularity !== undefined && (args.granularity < MIN_GRANULARITY || !isPowerOfTwo(args.granularity))) {
    throw genericError('Granularity must be power of 2 and at least 512');
  }
  const granularity = args.granularity ?? defaultGranularity(node);
  if (args.persistent) {
    const canStore = node.state.canStoreNewDirtyBitmap;
    if (!canStore) throw genericError(`Can't store persistent bitmaps to ${node.name}: Operation not supported`);
    await canStore.call(node.state, args.name, granularity);
  }
  const bitmap = new DirtyBitmap(node.length(), granularity, args.name);
  node.bitmaps.add(bitmap);
  bitmap.enabled = !args.disabled;
  bitmap.persistent = args.persistent ?? false;
  // Beyond QEMU (which writes it at close): the image holds it from now on, and a crash cannot lose it.
  if (bitmap.persistent) await storeNow(node, () => node.bitmaps.remove(bitmap));
  return bitmap;
}

/** Stores the node's persistent bitmaps in its image now; when that fails, `undo` runs and the error goes to the client. */
async function storeNow(node: BlockNode, undo: () => void): Promise<void> {
  try {
    await node.state.storePersistentDirtyBitmaps?.();
  } catch (error) {
    undo();
    throw genericError(`Could not store the persistent bitmaps of '${node.name}': ${(error as Error).message}`);
  }
}

/** Undoes an add: the bitmap goes again, from the image too when it was stored there. */
export async function discardAddedBitmap(node: BlockNode, bitmap: DirtyBitmap): Promise<void> {
  node.bitmaps.remove(bitmap);
  if (bitmap.persistent && bitmap.name !== undefined) await node.state.removePersistentDirtyBitmap?.(bitmap.name);
}

/** A bitmap being removed (QEMU's do_block_dirty_bitmap_remove): gone from the image already, released from memory by `release`. */
export interface RemovedBitmap {
  node: BlockNode;
  bitmap: DirtyBitmap;
  wasPersistent: boolean;
}

/**
 * Removes a bitmap; with `release` false (a transaction's prepare) it only leaves the image and
 * stays busy in memory until `releaseBitmap` or `keepBitmap`.
 */
export async function removeBitmap(graph: BlockGraph, nodeName: string, name: string, release = true): Promise<RemovedBitmap> {
  const { node, bitmap } = lookupBitmap(graph, nodeName, name);
  checkBitmap(bitmap, { busy: true, readonly: true });
  const wasPersistent = bitmap.persistent;
  if (wasPersistent) await node.state.removePersistentDirtyBitmap?.(name);
  const removed = { node, bitmap, wasPersistent };
  if (release) {
    releaseBitmap(removed);
  } else {
    // Not stored again by anyone meanwhile, and no one else may use it (QEMU's busy and no-store).
    bitmap.persistent = false;
    bitmap.busy = true;
  }
  return removed;
}

export function releaseBitmap({ node, bitmap }: RemovedBitmap): void {
  node.bitmaps.remove(bitmap);
}

/** The removal is called off: the bitmap is usable again, and back in the image if it was there (QEMU writes it back at close; blockd at once). */
export async function keepBitmap({ node, bitmap, wasPersistent }: RemovedBitmap): Promise<void> {
  bitmap.busy = false;
  bitmap.persistent = wasPersistent;
  if (wasPersistent) await node.state.storePersistentDirtyBitmaps?.();
}

/** The bitmap's bits as they are now; the returned function puts them back (QEMU's bdrv_restore_dirty_bitmap). */
export function keepBits(bitmap: DirtyBitmap): () => void {
  const copy = new DirtyBitmap(bitmap.length, bitmap.granularity);
  copy.merge(bitmap);
  return () => {
    bitmap.clear(0, bitmap.length);
    bitmap.merge(copy);
  };
}

/** Clears the bitmap; returns what restores its bits. */
export function clearBitmap(graph: BlockGraph, nodeName: string, name: string): () => void {
  const { bitmap } = lookupBitmap(graph, nodeName, name);
  checkBitmap(bitmap, ANY_CHANGE);
  const restore = keepBits(bitmap);
  bitmap.clear(0, bitmap.length);
  return restore;
}

/** Enables or disables the bitmap; returns what restores its state. */
export function setBitmapEnabled(graph: BlockGraph, nodeName: string, name: string, enabled: boolean): () => void {
  const { bitmap } = lookupBitmap(graph, nodeName, name);
  checkBitmap(bitmap, TOGGLE);
  const was = bitmap.enabled;
  bitmap.enabled = enabled;
  return () => {
    bitmap.enabled = was;
  };
}

/**
 * QEMU's block_dirty_bitmap_merge: every source (a bitmap of the target's node by name, or any
 * node's) is checked and gathered first, so a failure leaves the target as it was; sources of
 * another granularity merge by the bytes they cover.
 */
export async function mergeBitmaps(graph: BlockGraph, args: BlockDirtyBitmapMerge): Promise<() => Promise<void>> {
  const { node, bitmap: target } = lookupBitmap(graph, args.node, args.target);
  const gathered = new DirtyBitmap(target.length, target.granularity);
  for (const source of args.bitmaps) {
    const bitmap = sourceBitmap(graph, node, source);
    checkBitmap(bitmap, TOGGLE);
    if (bitmap.length !== gathered.length) {
      throw genericError(`Bitmaps are of different sizes (destination size is ${gathered.length}, source size is ${bitmap.length}) and can't be merged`);
    }
    gathered.merge(bitmap);
  }
  checkBitmap(target, ANY_CHANGE);
  const restoreBits = keepBits(target);
  target.merge(gathered);
  // Stored now, or a crash would lose the merged bits until the next store. A failure leaves them merged in memory
  // (stored at close), as QEMU keeps them: the merge itself succeeded.
  const store = async () => {
    if (target.persistent) await node.state.storePersistentDirtyBitmaps?.().catch(() => {});
  };
  await store();
  return async () => {
    restoreBits();
    await store();
  };
}

function sourceBitmap(graph: BlockGraph, targetNode: BlockNode, source: BlockDirtyBitmapOrStr): DirtyBitmap {
  if (typeof source !== 'string') return lookupBitmap(graph, source.node, source.name).bitmap;
  const bitmap = targetNode.bitmaps.find(source);
  if (!bitmap) throw genericError(`Dirty bitmap '${source}' not found`);
  return bitmap;
}

/** QEMU's hbitmap_sha256: over the bits as whole 64-bit little-endian words (at least one). */
export function bitmapSha256(bitmap: DirtyBitmap): string {
  const words = Math.max(1, Math.ceil(bitmap.granules / 64));
  const bytes = Buffer.alloc(words * 8);
  bitmap.granuleBytes(0, bitmap.granules).copy(bytes);
  return createHash('sha256').update(bytes).digest('hex');
}

export function registerBitmapCommands(registry: CommandTable, layer: BlockLayer): void {
  const { graph } = layer;
  registry.register('block-dirty-bitmap-add', async (args) => {
    await addBitmap(graph, args);
  });
  registry.register('block-dirty-bitmap-remove', async ({ node, name }) => {
    await removeBitmap(graph, node, name);
  });
  registry.register('block-dirty-bitmap-clear', async ({ node, name }) => {
    clearBitmap(graph, node, name);
  });
  registry.register('block-dirty-bitmap-enable', async ({ node, name }) => {
    setBitmapEnabled(graph, node, name, true);
  });
  registry.register('block-dirty-bitmap-disable', async ({ node, name }) => {
    setBitmapEnabled(graph, node, name, false);
  });
  registry.register('block-dirty-bitmap-merge', async (args) => {
    await mergeBitmaps(graph, args);
  });
  registry.register('x-debug-block-dirty-bitmap-sha256', ({ node, name }) => ({ sha256: bitmapSha256(lookupBitmap(graph, node, name).bitmap) }));
}
