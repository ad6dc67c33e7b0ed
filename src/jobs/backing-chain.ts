/*
 * Walking a backing chain the way QEMU's jobs do: through filters and
 * backing files alike (bdrv_filter_or_cow_bs), asking which layers hold the
 * data of a range, and which node counts as a root for the commands that
 * want one.
 */
import { resolve } from 'node:path';
import { nodeFilename } from '../blockdev/node-filename.js';
import type { BlockNode } from '../blockdev/node.js';

/** The next node down the chain: a filter's child, or a format's backing file (QEMU's bdrv_filter_or_cow_bs). */
export function below(node: BlockNode): BlockNode | undefined {
  return node.below();
}

/** The first node at or below `node` that is not a filter (QEMU's bdrv_skip_filters). */
export function skipFilters(node: BlockNode): BlockNode {
  let current = node;
  while (current.driver.kind === 'filter' && current.primaryChild()) current = current.primaryChild()!.child;
  return current;
}

/** The chain below `node`, filters included, top first. */
export function chainBelow(node: BlockNode): BlockNode[] {
  const chain: BlockNode[] = [];
  for (let layer = below(node); layer; layer = below(layer)) chain.push(layer);
  return chain;
}

/**
 * The image below `node` that a name refers to: the name its overlay records, or the same
 * file by its absolute path (QEMU's bdrv_find_backing_image).
 */
export function findBackingImage(node: BlockNode, name: string): BlockNode | undefined {
  const names = (layer: BlockNode) => [nodeFilename(layer), layer.state.info().filename];
  return chainBelow(node).find((layer) => names(layer).some((known) => known === name || resolve(known) === resolve(name)));
}

/** The node right above `node` in the chain that starts at `top` (QEMU's bdrv_find_overlay). */
export function overlayIn(top: BlockNode, node: BlockNode): BlockNode | undefined {
  for (let layer: BlockNode | undefined = top; layer; layer = below(layer)) {
    if (below(layer) === node) return layer;
  }
  return undefined;
}

/** Whether the run at `offset` is allocated in some layer from `top` down to `bottom` (inclusive). */
export async function allocatedBetween(top: BlockNode, bottom: BlockNode, offset: number, length: number): Promise<{ length: number; allocated: boolean }> {
  let run = length;
  for (let layer: BlockNode | undefined = top; layer; layer = below(layer)) {
    if (layer.driver.kind !== 'filter' && offset < layer.length()) {
      const status = await layer.blockStatus(offset, Math.min(run, layer.length() - offset));
      if (status.allocated) return { length: status.length, allocated: true };
      run = Math.min(run, status.length);
    }
    if (layer === bottom) break;
  }
  return { length: run, allocated: false };
}

