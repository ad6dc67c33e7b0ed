/*
 * BLOCK_STATUS answers for an export's node: base:allocation from the block
 * status of the whole chain, qemu:allocation-depth from where each range is
 * allocated, qemu:dirty-bitmap:NAME from the bitmap's dirty areas.
 * Neighbouring extents with the same flags merge, as QEMU does.
 */
import type { DirtyBitmap } from '../../blockdev/bitmaps/dirty-bitmap.js';
import type { BlockNode } from '../../blockdev/node.js';
import { CONTEXT_ID } from './meta-contexts.js';
import { encodeBlockStatusPayload, type StatusExtent } from '../../nbd/messages.js';
import { AllocationFlag, DIRTY_BITMAP_STATE_DIRTY } from '../../nbd/protocol.js';

/** QEMU's cap on extents in one reply chunk (1 MiB of extent data). */
const MAX_EXTENTS = 131072;
const UINT32_MAX = 0xffffffff;

/** The extents of one reply chunk, merged as they come, up to a count (QEMU's NBDExtentArray). */
class ExtentList {
  readonly extents: StatusExtent[] = [];

  constructor(private readonly limit: number) {}

  /** Adds (or merges) an extent; false once the list is full and the extent did not fit. */
  add(length: number, flags: number): boolean {
    if (length === 0) return true;
    const last = this.extents[this.extents.length - 1];
    if (last && last.flags === flags && last.length + length <= UINT32_MAX) {
      last.length += length;
      return true;
    }
    if (this.extents.length >= this.limit) return false;
    this.extents.push({ length, flags });
    return true;
  }
}

function extentList(onlyOne: boolean): ExtentList {
  return new ExtentList(onlyOne ? 1 : MAX_EXTENTS);
}

export async function blockStatusExtents(node: BlockNode, contextId: number, offset: number, length: number, onlyOne: boolean): Promise<Buffer> {
  const list = extentList(onlyOne);
  for (let done = 0; done < length; ) {
    const status = await node.blockStatusAbove(offset + done, length - done);
    const step = Math.min(status.length, length - done);
    const flags = contextId === CONTEXT_ID.baseAllocation
      ? (status.data ? 0 : AllocationFlag.HOLE) | (status.zero ? AllocationFlag.ZERO : 0)
      : status.allocated ? status.depth + 1 : 0;
    if (!list.add(step, flags)) break;
    done += step;
  }
  return encodeBlockStatusPayload(contextId, list.extents);
}

/** Clean and dirty runs of [offset, offset+length) of a bitmap; bytes past its end read clean. */
export function bitmapExtents(bitmap: DirtyBitmap, contextId: number, offset: number, length: number, onlyOne: boolean): Buffer {
  const list = extentList(onlyOne);
  const end = offset + length;
  let at = offset;
  for (let area = bitmap.dirtyArea(at, end); area; area = bitmap.dirtyArea(at, end)) {
    if (!list.add(area.offset - at, 0) || !list.add(area.length, DIRTY_BITMAP_STATE_DIRTY)) {
      return encodeBlockStatusPayload(contextId, list.extents);
    }
    at = area.offset + area.length;
  }
  list.add(end - at, 0);
  return encodeBlockStatusPayload(contextId, list.extents);
}
