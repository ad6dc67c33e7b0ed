/*
 * Where a qcow2 image file keeps its tables, read from its header and tables: for tests
 * that corrupt an image by hand (an entry pointed elsewhere, a refcount zeroed).
 */
import { readAt, readU64 } from './qemu-tools.js';

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

/** A guest cluster stored compressed: where its stream starts and the 512-byte sectors its L2 entry names. */
export interface CompressedCluster {
  cluster: number;
  hostOffset: number;
  sectors: number;
}

/** Every compressed cluster of the active L2 tables, decoded as the spec says (section 5.1), in guest order. */
export function compressedClusters(path: string): CompressedCluster[] {
  const header = readAt(path, 0, 48);
  const clusterBits = header.readUInt32BE(20);
  const l1Size = header.readUInt32BE(36);
  const l1 = Number(header.readBigUInt64BE(40));
  const entriesPerTable = 2 ** clusterBits / 8;
  const sectorShift = BigInt(62 - (clusterBits - 8));
  const found: CompressedCluster[] = [];
  for (let i = 0; i < l1Size; i++) {
    const l2 = Number(readU64(path, l1 + 8 * i) & OFFSET_MASK);
    if (!l2) continue;
    const table = readAt(path, l2, 2 ** clusterBits);
    for (let j = 0; j < entriesPerTable; j++) {
      const entry = table.readBigUInt64BE(8 * j);
      if (!(entry & (1n << 62n))) continue;
      const hostOffset = Number(entry & ((1n << sectorShift) - 1n));
      const sectors = Number((entry >> sectorShift) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1;
      found.push({ cluster: i * entriesPerTable + j, hostOffset, sectors });
    }
  }
  return found;
}

const BITMAPS_EXTENSION_MAGIC = 0x23852875;
const BITMAP_TABLE_OFFSET_MASK = 0x00fffffffffffe00n;

/** One entry of the bitmap directory: where it and its fields sit in the file. */
export interface BitmapEntryLayout {
  /** File offset of the entry. */
  at: number;
  /** Bytes the entry takes, padding included. */
  size: number;
  name: string;
  nameSize: number;
  tableOffset: number;
  tableSize: number;
  flags: number;
  granularityBits: number;
  /** Offsets of the data clusters its table names (entries 0 and 1 name none). */
  dataClusters: number[];
}

export interface Qcow2BitmapLayout {
  clusterSize: number;
  /** File offset of the bitmaps extension's data (its length field is 4 bytes before). */
  extension: number;
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
  entries: BitmapEntryLayout[];
}

/**
 * The bitmaps extension, directory and tables of a valid v3 image (in `image`, the whole
 * file), as the qcow2 spec lays them out: for tests that damage bitmap metadata by hand.
 */
export function qcow2BitmapLayout(image: Buffer): Qcow2BitmapLayout {
  const clusterSize = 2 ** image.readUInt32BE(20);
  let at = image.readUInt32BE(100);
  for (;;) {
    const magic = image.readUInt32BE(at);
    const length = image.readUInt32BE(at + 4);
    if (magic === 0) throw new Error('no bitmaps extension');
    if (magic === BITMAPS_EXTENSION_MAGIC) break;
    at += 8 + Math.ceil(length / 8) * 8;
  }
  const extension = at + 8;
  const layout: Qcow2BitmapLayout = {
    clusterSize,
    extension,
    nbBitmaps: image.readUInt32BE(extension),
    directorySize: Number(image.readBigUInt64BE(extension + 8)),
    directoryOffset: Number(image.readBigUInt64BE(extension + 16)),
    entries: [],
  };
  for (let entry = layout.directoryOffset; entry < layout.directoryOffset + layout.directorySize;) {
    const nameSize = image.readUInt16BE(entry + 18);
    const size = Math.ceil((24 + nameSize + image.readUInt32BE(entry + 20)) / 8) * 8;
    const tableOffset = Number(image.readBigUInt64BE(entry));
    const tableSize = image.readUInt32BE(entry + 8);
    const dataClusters: number[] = [];
    for (let i = 0; i < tableSize; i++) {
      const offset = Number(image.readBigUInt64BE(tableOffset + 8 * i) & BITMAP_TABLE_OFFSET_MASK);
      if (offset) dataClusters.push(offset);
    }
    layout.entries.push({
      at: entry, size, nameSize, tableOffset, tableSize, dataClusters,
      name: image.subarray(entry + 24, entry + 24 + nameSize).toString('latin1'),
      flags: image.readUInt32BE(entry + 12),
      granularityBits: image[entry + 17]!,
    });
    entry += size;
  }
  return layout;
}
