/*
 * BLOCK_STATUS answers for an export's node: base:allocation from the block
 * status of the whole chain, qemu:allocation-depth from where each range is
 * allocated. Neighbouring extents with the same flags merge, as QEMU does.
 */
import type { BlockNode } from '../../blockdev/node.js';
import { CONTEXT_ID } from './meta-contexts.js';
import { encodeBlockStatusPayload, type StatusExtent } from '../../nbd/messages.js';
import { AllocationFlag } from '../../nbd/protocol.js';

/** QEMU's cap on extents in one reply chunk (1 MiB of extent data). */
const MAX_EXTENTS = 131072;

export async function blockStatusExtents(node: BlockNode, contextId: number, offset: number, length: number, onlyOne: boolean): Promise<Buffer> {
  const limit = onlyOne ? 1 : MAX_EXTENTS;
  const extents: StatusExtent[] = [];
  for (let done = 0; done < length; ) {
    const status = await node.blockStatusAbove(offset + done, length - done);
    const step = Math.min(status.length, length - done);
    const flags = contextId === CONTEXT_ID.baseAllocation
      ? (status.data ? 0 : AllocationFlag.HOLE) | (status.zero ? AllocationFlag.ZERO : 0)
      : status.allocated ? status.depth + 1 : 0;
    const last = extents[extents.length - 1];
    if (last && last.flags === flags) last.length += step;
    else if (extents.length < limit) extents.push({ length: step, flags });
    else break;
    done += step;
  }
  return encodeBlockStatusPayload(contextId, extents);
}
