/*
 * One copy of a byte range from one node to another, as every job and the
 * copy-before-write filter make it: read into a pooled buffer, write it (or a
 * zero write when it is all zero), and tell the target to start writing back
 * now and then. Errors say which side failed, for the on-error policies.
 */
import type { WriteFlags } from './block-driver.js';
import { ioBuffers } from './buffer-pool.js';
import type { ChildEdge } from './child-edge.js';
import { isAllZero, type BlockNode } from './node.js';

/** An error of a copy, with the side (read or write) the on-error policy reports. */
export class CopyError extends Error {
  constructor(readonly operation: 'read' | 'write', override readonly cause: unknown) {
    super((cause as Error)?.message ?? String(cause));
  }
}

/**
 * How much a job copies into a node before it asks the node to start writing it back: the
 * flush that must come before a backing link changes then finds little left to write, and
 * the disk works while the copy goes on.
 */
const WRITEBACK_EVERY = 64 << 20;
const copiedSinceWriteback = new WeakMap<BlockNode, number>();

function noteCopied(node: BlockNode, length: number): void {
  const copied = (copiedSinceWriteback.get(node) ?? 0) + length;
  copiedSinceWriteback.set(node, copied >= WRITEBACK_EVERY ? 0 : copied);
  if (copied >= WRITEBACK_EVERY) node.startWriteback();
}

/** Copies a range with copy_file_range down the drivers (ChildEdge.copyRangeFrom); throws when any part cannot be offloaded. */
export async function offloadCopy(from: ChildEdge, to: ChildEdge, offset: number, length: number, flags: WriteFlags = {}): Promise<void> {
  await from.copyRangeFrom(offset, length, to, offset, flags);
  noteCopied(to.child, length);
}

/**
 * Copies a range from `from` to `to` through a pooled buffer: all-zero data goes as a zero
 * write (deallocating when `unmapZeroes`). Errors carry the side that failed.
 */
export async function copyRange(from: ChildEdge, to: ChildEdge, offset: number, length: number, flags: WriteFlags = {}, unmapZeroes = false): Promise<void> {
  const lease = ioBuffers.acquire(length);
  try {
    const data = lease.buffer;
    await from.read(offset, data).catch((error: unknown) => {
      throw new CopyError('read', error);
    });
    const zero = isAllZero(data);
    const write = zero ? to.writeZeroes(offset, length, { ...flags, mayUnmap: unmapZeroes }) : to.write(offset, data, flags);
    await write.catch((error: unknown) => {
      throw new CopyError('write', error);
    });
    if (!zero) noteCopied(to.child, length);
  } finally {
    lease.release();
  }
}
