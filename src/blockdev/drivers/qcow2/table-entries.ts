/*
 * Decoding and encoding of qcow2 table entries: L1, standard and extended L2, compressed
 * cluster descriptors, refcount table. Raw entries are bigint; offsets come out as numbers
 * only after masking, and a malformed entry decodes to INVALID with a reason, never throws.
 */
import {
  COMPRESSED_SECTOR_SIZE, L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK,
  L2E_STANDARD_RESERVED_MASK, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, OFLAG_COMPRESSED, OFLAG_COPIED,
  OFLAG_ZERO, REFT_OFFSET_MASK, REFT_RESERVED_MASK, SUBCLUSTERS_PER_CLUSTER,
} from './format-constants.js';

const MAX_SAFE_OFFSET = BigInt(Number.MAX_SAFE_INTEGER);
const ALL_SUBCLUSTERS = 0xffffffff;

export type InvalidEntry = { type: 'INVALID'; reason: string };

export type L1Entry =
  | { type: 'UNALLOCATED'; copied: boolean }
  | { type: 'ALLOCATED'; l2Offset: number; copied: boolean }
  | InvalidEntry;

/** Where a compressed cluster's stream lies in the image file (section 5.1). */
export interface CompressedDescriptor {
  /** Byte offset of the stream; not aligned. */
  hostOffset: number;
  /** 512-byte sectors the stream touches, the one holding hostOffset included. */
  nbSectors: number;
  /** Bytes to read from hostOffset: the stream plus whatever follows in its last sector. */
  compressedSize: number;
}

/** A standard (8-byte) L2 entry, classified in the order of section 4.4. */
export type L2Entry =
  | { type: 'COMPRESSED'; compressed: CompressedDescriptor }
  | { type: 'ZERO_ALLOC' | 'NORMAL'; hostOffset: number; copied: boolean }
  | { type: 'ZERO_PLAIN' | 'UNALLOCATED'; copied: boolean }
  | InvalidEntry;

/** A 16-byte extended L2 entry: the cluster part and its 32 subcluster bits (section 4.5). */
export type ExtendedL2Entry =
  | { type: 'COMPRESSED'; compressed: CompressedDescriptor }
  | { type: 'ALLOCATED'; hostOffset: number; copied: boolean; allocatedMask: number; zeroMask: number }
  | { type: 'UNALLOCATED'; copied: boolean; zeroMask: number }
  | InvalidEntry;

export type SubclusterType =
  | 'NORMAL' | 'ZERO_ALLOC' | 'ZERO_PLAIN' | 'UNALLOCATED_ALLOC' | 'UNALLOCATED_PLAIN' | 'COMPRESSED' | 'INVALID';

export type RefcountTableEntry =
  | { type: 'UNALLOCATED' }
  | { type: 'ALLOCATED'; blockOffset: number }
  | InvalidEntry;

/** What classifying an L2 entry depends on besides the entry itself. */
export interface L2EntryContext {
  clusterBits: number;
  /** v2 images have no zero flag: bit 0 set there is corruption. */
  version: 2 | 3;
  /** Offset 0 with COPIED set is a real cluster at data-file offset 0; compression is invalid. */
  externalDataFile: boolean;
}

function hex(value: bigint): string {
  return `0x${value.toString(16)}`;
}

function invalid(reason: string): InvalidEntry {
  return { type: 'INVALID', reason };
}

/** Why a masked offset cannot be used, or undefined when it can. */
function offsetProblem(offset: bigint, clusterBits: number, what: string): string | undefined {
  if ((offset & ((1n << BigInt(clusterBits)) - 1n)) !== 0n) return `${what} ${hex(offset)} unaligned`;
  if (offset > MAX_SAFE_OFFSET) return `${what} ${hex(offset)} is beyond 2^53`;
  return undefined;
}

function checkEncodableOffset(offset: number, mask: bigint, what: string): bigint {
  if (!Number.isSafeInteger(offset) || offset < 0 || (BigInt(offset) & ~mask) !== 0n) {
    throw new RangeError(`${what} ${offset} cannot be stored in a qcow2 entry`);
  }
  return BigInt(offset);
}

export function decodeL1Entry(raw: bigint, clusterBits: number): L1Entry {
  if ((raw & L1E_RESERVED_MASK) !== 0n) return invalid(`L1 entry ${hex(raw)} has reserved bits set`);
  const copied = (raw & OFLAG_COPIED) !== 0n;
  const l2Offset = raw & L1E_OFFSET_MASK;
  if (l2Offset === 0n) return { type: 'UNALLOCATED', copied };
  const problem = offsetProblem(l2Offset, clusterBits, 'L2 table offset');
  return problem ? invalid(problem) : { type: 'ALLOCATED', l2Offset: Number(l2Offset), copied };
}

export function encodeL1Entry(l2Offset: number, copied: boolean): bigint {
  return checkEncodableOffset(l2Offset, L1E_OFFSET_MASK, 'L2 table offset') | (copied ? OFLAG_COPIED : 0n);
}

/** Bit position where the sector count starts: x = 62 - (cluster_bits - 8). */
function compressedOffsetBits(clusterBits: number): bigint {
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new RangeError(`Unsupported cluster size: 2^${clusterBits}`);
  }
  return BigInt(62 - (clusterBits - 8));
}

/** The stream offset and sector count of a compressed entry, before the 2^53 check. */
function splitCompressedDescriptor(raw: bigint, clusterBits: number): { hostOffset: bigint; nbSectors: number } {
  const offsetBits = compressedOffsetBits(clusterBits);
  const sectorMask = (1n << BigInt(clusterBits - 8)) - 1n;
  return { hostOffset: raw & ((1n << offsetBits) - 1n), nbSectors: Number((raw >> offsetBits) & sectorMask) + 1 };
}

function describeCompressed(hostOffset: bigint, nbSectors: number): CompressedDescriptor {
  const offset = Number(hostOffset);
  return { hostOffset: offset, nbSectors, compressedSize: nbSectors * COMPRESSED_SECTOR_SIZE - (offset % COMPRESSED_SECTOR_SIZE) };
}

/** Throws when the stream offset is 2^53 or more; decodeL2Entry reports that as INVALID. */
export function decodeCompressedDescriptor(raw: bigint, clusterBits: number): CompressedDescriptor {
  const { hostOffset, nbSectors } = splitCompressedDescriptor(raw, clusterBits);
  if (hostOffset > MAX_SAFE_OFFSET) throw new RangeError(`Compressed cluster offset ${hex(hostOffset)} is beyond 2^53`);
  return describeCompressed(hostOffset, nbSectors);
}

/** The L2 entry (bit 62 included, COPIED never) for `length` compressed bytes at `hostOffset`. */
export function encodeCompressedDescriptor(stream: { hostOffset: number; length: number }, clusterBits: number): bigint {
  const offsetBits = compressedOffsetBits(clusterBits);
  const { hostOffset, length } = stream;
  if (!Number.isSafeInteger(hostOffset) || hostOffset <= 0 || BigInt(hostOffset) >= 1n << offsetBits) {
    throw new RangeError(`Compressed cluster offset ${hostOffset} cannot be stored in a qcow2 entry`);
  }
  if (!Number.isSafeInteger(length) || length < 1 || length > 2 ** clusterBits) {
    throw new RangeError(`Compressed length ${length} must be 1 to ${2 ** clusterBits} bytes`);
  }
  const additionalSectors = Math.floor((hostOffset + length - 1) / COMPRESSED_SECTOR_SIZE)
    - Math.floor(hostOffset / COMPRESSED_SECTOR_SIZE);
  return OFLAG_COMPRESSED | (BigInt(additionalSectors) << offsetBits) | BigInt(hostOffset);
}

/** Splits a standard descriptor; `zeroFlag` is false for extended L2, where bit 0 is reserved. */
function decodeDescriptor(raw: bigint, context: L2EntryContext, zeroFlag: boolean): L2Entry {
  if ((raw & OFLAG_COMPRESSED) !== 0n) {
    if (context.externalDataFile) return invalid('Compressed cluster entry found in image with external data file');
    if ((raw & OFLAG_COPIED) !== 0n) return invalid('copied flag must never be set for compressed clusters');
    const { hostOffset, nbSectors } = splitCompressedDescriptor(raw, context.clusterBits);
    if (hostOffset > MAX_SAFE_OFFSET) return invalid(`Compressed cluster offset ${hex(hostOffset)} is beyond 2^53`);
    return { type: 'COMPRESSED', compressed: describeCompressed(hostOffset, nbSectors) };
  }
  const reserved = zeroFlag ? L2E_STANDARD_RESERVED_MASK : L2E_STANDARD_RESERVED_MASK | OFLAG_ZERO;
  if ((raw & reserved) !== 0n) return invalid(`L2 entry ${hex(raw)} has reserved bits set`);
  const copied = (raw & OFLAG_COPIED) !== 0n;
  const offset = raw & L2E_OFFSET_MASK;
  let type: 'ZERO_ALLOC' | 'NORMAL' = 'NORMAL';
  if (zeroFlag && (raw & OFLAG_ZERO) !== 0n) {
    if (context.version < 3) return invalid('Zero cluster entry found in pre-v3 image');
    if (offset === 0n) return { type: 'ZERO_PLAIN', copied };
    type = 'ZERO_ALLOC';
  } else if (offset === 0n && !(context.externalDataFile && copied)) {
    return { type: 'UNALLOCATED', copied };
  }
  const problem = offsetProblem(offset, context.clusterBits,
    type === 'ZERO_ALLOC' ? 'Preallocated zero cluster offset' : 'Cluster allocation offset');
  return problem ? invalid(problem) : { type, hostOffset: Number(offset), copied };
}

export function decodeL2Entry(raw: bigint, context: L2EntryContext): L2Entry {
  return decodeDescriptor(raw, context, true);
}

export function encodeL2Entry(entry: Exclude<L2Entry, InvalidEntry>, clusterBits: number): bigint {
  switch (entry.type) {
    case 'COMPRESSED':
      return encodeCompressedFromDescriptor(entry.compressed, clusterBits);
    case 'NORMAL':
    case 'ZERO_ALLOC':
      return checkEncodableOffset(entry.hostOffset, L2E_OFFSET_MASK, 'Cluster offset')
        | (entry.type === 'ZERO_ALLOC' ? OFLAG_ZERO : 0n) | (entry.copied ? OFLAG_COPIED : 0n);
    case 'ZERO_PLAIN':
      return OFLAG_ZERO | (entry.copied ? OFLAG_COPIED : 0n);
    case 'UNALLOCATED':
      return entry.copied ? OFLAG_COPIED : 0n;
  }
}

/** Re-encodes a decoded descriptor: its sector count is kept, not recomputed. */
function encodeCompressedFromDescriptor(compressed: CompressedDescriptor, clusterBits: number): bigint {
  const offsetBits = compressedOffsetBits(clusterBits);
  const base = encodeCompressedDescriptor({ hostOffset: compressed.hostOffset, length: 1 }, clusterBits);
  const sectorMask = (1n << BigInt(clusterBits - 8)) - 1n;
  const additionalSectors = BigInt(compressed.nbSectors - 1);
  if (additionalSectors < 0n || additionalSectors > sectorMask) {
    throw new RangeError(`Compressed sector count ${compressed.nbSectors} cannot be stored in a qcow2 entry`);
  }
  return base | (additionalSectors << offsetBits);
}

export function decodeExtendedL2Entry(raw: bigint, bitmap: bigint, context: L2EntryContext): ExtendedL2Entry {
  const cluster = decodeDescriptor(raw, context, false);
  const allocatedMask = Number(bitmap & BigInt(ALL_SUBCLUSTERS));
  const zeroMask = Number(bitmap >> 32n);
  switch (cluster.type) {
    case 'INVALID':
      return cluster;
    case 'COMPRESSED':
      return bitmap === 0n ? cluster : invalid('Compressed cluster with non-zero subcluster allocation bitmap');
    case 'UNALLOCATED':
    case 'ZERO_PLAIN': // not produced without the zero flag
      if (allocatedMask !== 0) return invalid('Unallocated cluster has non-zero subcluster allocation map');
      return { type: 'UNALLOCATED', copied: cluster.copied, zeroMask };
    case 'NORMAL':
    case 'ZERO_ALLOC':
      if ((allocatedMask & zeroMask) !== 0) {
        return invalid(`Allocated cluster at ${hex(BigInt(cluster.hostOffset))} has corrupted subcluster allocation bitmap`);
      }
      return { type: 'ALLOCATED', hostOffset: cluster.hostOffset, copied: cluster.copied, allocatedMask, zeroMask };
  }
}

/** Type of subcluster `index` (0-31), QEMU's table of section 4.5. */
export function subclusterType(entry: ExtendedL2Entry, index: number): SubclusterType {
  if (!Number.isInteger(index) || index < 0 || index >= SUBCLUSTERS_PER_CLUSTER) {
    throw new RangeError(`Subcluster index ${index} out of range`);
  }
  const bit = 2 ** index;
  switch (entry.type) {
    case 'INVALID':
    case 'COMPRESSED':
      return entry.type;
    case 'UNALLOCATED':
      return (entry.zeroMask & bit) !== 0 ? 'ZERO_PLAIN' : 'UNALLOCATED_PLAIN';
    case 'ALLOCATED':
      if ((entry.zeroMask & bit) !== 0) return 'ZERO_ALLOC';
      return (entry.allocatedMask & bit) !== 0 ? 'NORMAL' : 'UNALLOCATED_ALLOC';
  }
}

export function encodeExtendedL2Entry(entry: Exclude<ExtendedL2Entry, InvalidEntry>, clusterBits: number):
  { entry: bigint; bitmap: bigint } {
  switch (entry.type) {
    case 'COMPRESSED':
      return { entry: encodeCompressedFromDescriptor(entry.compressed, clusterBits), bitmap: 0n };
    case 'UNALLOCATED':
      return { entry: entry.copied ? OFLAG_COPIED : 0n, bitmap: subclusterMask(entry.zeroMask) << 32n };
    case 'ALLOCATED':
      if ((entry.allocatedMask & entry.zeroMask) !== 0) {
        throw new RangeError('A subcluster cannot be both allocated and zero');
      }
      return {
        entry: checkEncodableOffset(entry.hostOffset, L2E_OFFSET_MASK, 'Cluster offset') | (entry.copied ? OFLAG_COPIED : 0n),
        bitmap: (subclusterMask(entry.zeroMask) << 32n) | subclusterMask(entry.allocatedMask),
      };
  }
}

function subclusterMask(mask: number): bigint {
  if (!Number.isInteger(mask) || mask < 0 || mask > ALL_SUBCLUSTERS) {
    throw new RangeError(`Subcluster mask ${mask} is not a 32-bit mask`);
  }
  return BigInt(mask);
}

export function decodeRefcountTableEntry(raw: bigint, clusterBits: number): RefcountTableEntry {
  if ((raw & REFT_RESERVED_MASK) !== 0n) return invalid(`Refcount table entry ${hex(raw)} has reserved bits set`);
  const blockOffset = raw & REFT_OFFSET_MASK;
  if (blockOffset === 0n) return { type: 'UNALLOCATED' };
  const problem = offsetProblem(blockOffset, clusterBits, 'Refcount block offset');
  return problem ? invalid(problem) : { type: 'ALLOCATED', blockOffset: Number(blockOffset) };
}

export function encodeRefcountTableEntry(blockOffset: number): bigint {
  return checkEncodableOffset(blockOffset, REFT_OFFSET_MASK, 'Refcount block offset');
}
