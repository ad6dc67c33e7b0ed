/*
 * Refcount block codec: entry i of a refcount block for every width from 1 to 64 bits
 * (section 6.1), the largest storable refcount, and where a host cluster's refcount lives.
 * Sub-byte widths are packed least significant bits first; wider ones are big-endian.
 */
import { MAX_REFCOUNT_ORDER, Qcow2FormatError, REFCOUNT_TABLE_ENTRY_SIZE } from './format-constants.js';

export type RefcountBits = 1 | 2 | 4 | 8 | 16 | 32 | 64;

const MAX_SAFE_REFCOUNT = BigInt(Number.MAX_SAFE_INTEGER);

export function refcountBitsFromOrder(refcountOrder: number): RefcountBits {
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > MAX_REFCOUNT_ORDER) {
    throw new RangeError(`Refcount order ${refcountOrder} is not 0 to ${MAX_REFCOUNT_ORDER}`);
  }
  return (1 << refcountOrder) as RefcountBits;
}

function checkBits(refcountBits: number): void {
  if (![1, 2, 4, 8, 16, 32, 64].includes(refcountBits)) {
    throw new RangeError(`Refcount width ${refcountBits} is not a power of two from 1 to 64`);
  }
}

/** 2^bits - 1: incrementing a refcount past this must fail. */
export function maxRefcount(refcountBits: RefcountBits): bigint {
  checkBits(refcountBits);
  return (1n << BigInt(refcountBits)) - 1n;
}

/** The largest refcount the number-based accessors can carry (below 2^53 for 64-bit blocks). */
export function maxSafeRefcount(refcountBits: RefcountBits): number {
  const max = maxRefcount(refcountBits);
  return Number(max < MAX_SAFE_REFCOUNT ? max : MAX_SAFE_REFCOUNT);
}

/** Entries in one refcount block: cluster_size * 8 / refcount_bits. */
export function refcountBlockEntries(clusterBits: number, refcountBits: RefcountBits): number {
  checkBits(refcountBits);
  return 2 ** clusterBits * 8 / refcountBits;
}

/** Refcount table entries that fit in one cluster of the table. */
export function refcountTableEntriesPerCluster(clusterBits: number): number {
  return 2 ** clusterBits / REFCOUNT_TABLE_ENTRY_SIZE;
}

/** Which refcount table entry, and which entry of that block, count a host cluster. */
export function refcountLocation(hostClusterIndex: number, clusterBits: number, refcountBits: RefcountBits):
  { tableIndex: number; blockIndex: number } {
  if (!Number.isSafeInteger(hostClusterIndex) || hostClusterIndex < 0) {
    throw new RangeError(`Host cluster index ${hostClusterIndex} is not a non-negative integer`);
  }
  const entries = refcountBlockEntries(clusterBits, refcountBits);
  return { tableIndex: Math.floor(hostClusterIndex / entries), blockIndex: hostClusterIndex % entries };
}

function checkIndex(block: Buffer, index: number, refcountBits: RefcountBits): void {
  checkBits(refcountBits);
  const entries = block.length * 8 / refcountBits;
  if (!Number.isInteger(index) || index < 0 || index >= entries) {
    throw new RangeError(`Refcount index ${index} outside a block of ${Math.floor(entries)} entries`);
  }
}

/** Exact value of entry `index`; the only accessor that can hold any 64-bit refcount. */
export function getRefcountBigInt(block: Buffer, index: number, refcountBits: RefcountBits): bigint {
  checkIndex(block, index, refcountBits);
  switch (refcountBits) {
    case 64: return block.readBigUInt64BE(index * 8);
    case 32: return BigInt(block.readUInt32BE(index * 4));
    case 16: return BigInt(block.readUInt16BE(index * 2));
    case 8: return BigInt(block[index]!);
    default: {
      const bitOffset = index * refcountBits;
      return BigInt((block[bitOffset >> 3]! >> (bitOffset & 7)) & ((1 << refcountBits) - 1));
    }
  }
}

/** Entry `index` as a number; a 64-bit refcount of 2^53 or more is refused, not rounded. */
export function getRefcount(block: Buffer, index: number, refcountBits: RefcountBits): number {
  const value = getRefcountBigInt(block, index, refcountBits);
  if (value > MAX_SAFE_REFCOUNT) {
    throw new Qcow2FormatError(`Refcount 0x${value.toString(16)} at refcount block index ${index} is too large (2^53 or more)`);
  }
  return Number(value);
}

export function setRefcount(block: Buffer, index: number, refcountBits: RefcountBits, value: number | bigint): void {
  checkIndex(block, index, refcountBits);
  const refcount = BigInt(value);
  if (refcount < 0n || refcount > maxRefcount(refcountBits)) {
    throw new RangeError(`Refcount ${refcount} does not fit in ${refcountBits} bits`);
  }
  switch (refcountBits) {
    case 64: block.writeBigUInt64BE(refcount, index * 8); return;
    case 32: block.writeUInt32BE(Number(refcount), index * 4); return;
    case 16: block.writeUInt16BE(Number(refcount), index * 2); return;
    case 8: block[index] = Number(refcount); return;
    default: {
      const bitOffset = index * refcountBits;
      const shift = bitOffset & 7;
      const mask = ((1 << refcountBits) - 1) << shift;
      const byte = bitOffset >> 3;
      block[byte] = (block[byte]! & ~mask) | (Number(refcount) << shift);
    }
  }
}
