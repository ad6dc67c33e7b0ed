/*
 * Meta context negotiation as QEMU's server answers it: which contexts a
 * LIST or SET query selects on an export, and their fixed ids. Unknown
 * namespaces and leaves are ignored, not errors; a bare namespace is a
 * wildcard for LIST only.
 */
import type { NbdExport } from './nbd-export.js';
import { CONTEXT_ALLOCATION_DEPTH, CONTEXT_BASE_ALLOCATION } from '../../nbd/protocol.js';

export interface ContextSelection {
  baseAllocation: boolean;
  allocationDepth: boolean;
}

/** QEMU's fixed context ids; dirty bitmaps will follow from 2. */
export const CONTEXT_ID = { baseAllocation: 0, allocationDepth: 1 } as const;

export const NO_CONTEXTS: ContextSelection = { baseAllocation: false, allocationDepth: false };

export function selectContexts(exported: NbdExport, queries: string[], listing: boolean): ContextSelection {
  const selection = { ...NO_CONTEXTS };
  const everything = () => {
    selection.baseAllocation = true;
    selection.allocationDepth = exported.settings.allocationDepth;
  };
  if (listing && queries.length === 0) everything();
  for (const query of queries) {
    if (query.startsWith('base:')) {
      const leaf = query.slice('base:'.length);
      if (leaf === 'allocation' || (leaf === '' && listing)) selection.baseAllocation = true;
    } else if (query.startsWith('qemu:')) {
      const leaf = query.slice('qemu:'.length);
      if (leaf === 'allocation-depth' || (leaf === '' && listing)) selection.allocationDepth = exported.settings.allocationDepth;
    }
  }
  return selection;
}

/** The selected contexts as (id, name) pairs, in the order QEMU replies and answers BLOCK_STATUS. */
export function selectedContexts(selection: ContextSelection): { id: number; name: string }[] {
  const contexts: { id: number; name: string }[] = [];
  if (selection.baseAllocation) contexts.push({ id: CONTEXT_ID.baseAllocation, name: CONTEXT_BASE_ALLOCATION });
  if (selection.allocationDepth) contexts.push({ id: CONTEXT_ID.allocationDepth, name: CONTEXT_ALLOCATION_DEPTH });
  return contexts;
}
