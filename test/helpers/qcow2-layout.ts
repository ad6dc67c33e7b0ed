/*
 * Where a qcow2 image file keeps its tables, read from its header and tables: for tests
 * that corrupt an image by hand (an entry pointed elsewhere, a refcount zeroed).
 */
import { readU64 } from './qemu-tools.js';

/** The COPIED flag of L1 and L2 entries (refcount exactly one: written in place). */
export const OFLAG_COPIED = 1n << 63n;
const OFFSET_MASK = 0x00fffffffffffe00n;

export interface Qcow2Layout {
  l1: number;
  refcountTable: number;
  /** The first refcount block (it counts the clusters from 0 on). */
  refcountBlock: number;
  /** The L2 table of guest cluster 0 (0 when unallocated). */
  l2: number;
  /** The L1 table of the first snapshot (0 without snapshots). */
  snapshotL1: number;
}

export function qcow2Layout(path: string): Qcow2Layout {
  const l1 = Number(readU64(path, 40));
  const refcountTable = Number(readU64(path, 48));
  const snapshots = Number(readU64(path, 64));
  return {
    l1,
    refcountTable,
    refcountBlock: Number(readU64(path, refcountTable)),
    l2: Number(readU64(path, l1) & OFFSET_MASK),
    snapshotL1: snapshots ? Number(readU64(path, snapshots)) : 0,
  };
}
