/*
 * Meta context negotiation as QEMU's server answers it: which contexts a
 * LIST or SET query selects on an export, and their fixed ids (the export's
 * i-th bitmap is 2 + i). Unknown namespaces and leaves are ignored, not
 * errors; a bare namespace (and `qemu:dirty-bitmap:`) is a wildcard for LIST only.
 */
import type { DirtyBitmap } from '../../blockdev/bitmaps/dirty-bitmap.js';
import { CONTEXT_ALLOCATION_DEPTH, CONTEXT_BASE_ALLOCATION, CONTEXT_DIRTY_BITMAP_PREFIX } from '../../nbd/protocol.js';

export interface ContextSelection {
  baseAllocation: boolean;
  allocationDepth: boolean;
  /** Indexes into the export's bitmaps of those selected (an export may list a bitmap twice: each has its id). */
  bitmaps: ReadonlySet<number>;
}

/** QEMU's fixed context ids; dirty bitmaps follow from `firstBitmap`, in the export's order. */
export const CONTEXT_ID = { baseAllocation: 0, allocationDepth: 1, firstBitmap: 2 } as const;

export const NO_CONTEXTS: ContextSelection = { baseAllocation: false, allocationDepth: false, bitmaps: new Set() };

/** What an export offers beyond base:allocation (its settings). */
export interface ContextOffer {
  allocationDepth: boolean;
  bitmaps: readonly DirtyBitmap[];
}

export interface SelectedContext {
  id: number;
  name: string;
  /** Set for a qemu:dirty-bitmap context. */
  bitmap?: DirtyBitmap;
}

export function selectContexts(offer: ContextOffer, queries: string[], listing: boolean): ContextSelection {
  const { allocationDepth, bitmaps } = offer;
  let baseAllocation = false;
  let depth = false;
  const chosen = new Set<number>();
  const allBitmaps = () => bitmaps.forEach((_, index) => chosen.add(index));
  if (listing && queries.length === 0) {
    baseAllocation = true;
    depth = allocationDepth;
    allBitmaps();
  }
  for (const query of queries) {
    if (query.startsWith('base:')) {
      const leaf = query.slice('base:'.length);
      if (leaf === 'allocation' || (leaf === '' && listing)) baseAllocation = true;
    } else if (query.startsWith(CONTEXT_DIRTY_BITMAP_PREFIX)) {
      const name = query.slice(CONTEXT_DIRTY_BITMAP_PREFIX.length);
      if (name === '') {
        if (listing) allBitmaps();
      } else {
        // The first exported bitmap of that name, as QEMU matches.
        const index = bitmaps.findIndex((bitmap) => bitmap.name === name);
        if (index >= 0) chosen.add(index);
      }
    } else if (query.startsWith('qemu:')) {
      const leaf = query.slice('qemu:'.length);
      if (leaf === 'allocation-depth') depth = allocationDepth;
      else if (leaf === '' && listing) {
        depth = allocationDepth;
        allBitmaps();
      }
    }
  }
  return { baseAllocation, allocationDepth: depth, bitmaps: chosen };
}

/** The selected contexts as (id, name) pairs, in the order QEMU replies and answers BLOCK_STATUS. */
export function selectedContexts(offer: ContextOffer, selection: ContextSelection): SelectedContext[] {
  const contexts: SelectedContext[] = [];
  if (selection.baseAllocation) contexts.push({ id: CONTEXT_ID.baseAllocation, name: CONTEXT_BASE_ALLOCATION });
  if (selection.allocationDepth) contexts.push({ id: CONTEXT_ID.allocationDepth, name: CONTEXT_ALLOCATION_DEPTH });
  offer.bitmaps.forEach((bitmap, index) => {
    if (selection.bitmaps.has(index)) contexts.push({ id: CONTEXT_ID.firstBitmap + index, name: `${CONTEXT_DIRTY_BITMAP_PREFIX}${bitmap.name!}`, bitmap });
  });
  return contexts;
}
