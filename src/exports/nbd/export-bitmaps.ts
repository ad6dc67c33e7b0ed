/*
 * Which dirty bitmaps an NBD export offers (block-export-add's `bitmaps`), found
 * and checked as QEMU's nbd_export_create does: a plain name is searched on the
 * exported node and on down through its filters and backing files; a {node, name}
 * pair names a bitmap of any node. Busy and inconsistent bitmaps are refused, and
 * so is an enabled one a read-only export would show while its node still changes.
 */
import { checkBitmap, lookupBitmap } from '../../blockdev/bitmaps/bitmap-commands.js';
import type { DirtyBitmap } from '../../blockdev/bitmaps/dirty-bitmap.js';
import type { BlockGraph } from '../../blockdev/graph.js';
import type { BlockNode } from '../../blockdev/node.js';
import { genericError } from '../../errors.js';
import type { BlockDirtyBitmapOrStr } from '../../generated/qapi-types.js';

/** The first bitmap of that name from `node` down the chain, with the node that holds it. */
function findInChain(node: BlockNode, name: string): { bitmap: DirtyBitmap; holder: BlockNode } | undefined {
  for (let layer: BlockNode | undefined = node; layer; layer = layer.below()) {
    const bitmap = layer.bitmaps.find(name);
    if (bitmap) return { bitmap, holder: layer };
  }
  return undefined;
}

/** The bitmaps in the order asked for (the contexts' ids follow it); throws QEMU's error for the first bad one. */
export function resolveExportBitmaps(graph: BlockGraph, exported: BlockNode, requested: BlockDirtyBitmapOrStr[], readOnly: boolean): DirtyBitmap[] {
  return requested.map((entry) => {
    let bitmap: DirtyBitmap;
    if (typeof entry === 'string') {
      const found = findInChain(exported, entry);
      if (!found) throw genericError(`Bitmap '${entry}' is not found`);
      bitmap = found.bitmap;
      // Clients of a read-only export would see a bitmap that keeps changing under them.
      if (readOnly && !found.holder.readOnly && bitmap.enabled) throw genericError(`Enabled bitmap '${entry}' incompatible with readonly export`);
    } else {
      bitmap = lookupBitmap(graph, entry.node, entry.name).bitmap;
    }
    // A read-only image's bitmap may be exported; a busy or inconsistent one may not.
    checkBitmap(bitmap, { busy: true, inconsistent: true });
    return bitmap;
  });
}
