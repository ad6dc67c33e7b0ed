/*
 * The qcow2 bitmap directory and bitmap tables (spec section "Bitmaps"), as pure codecs
 * with QEMU 7.2's constraints and error texts: what bitmap_list_load refuses at open,
 * what check_dir_entry refuses before a directory is written, the bitmap table entries,
 * and how big a bitmap's table must be for a disk of a given size.
 */
import { describeErrno, errnoOf } from '../../io-error.js';
import { Qcow2FormatError } from './format-constants.js';

/** Directory entry flags. */
export const BITMAP_IN_USE = 1;
export const BITMAP_AUTO = 2;
/** QEMU 7.2 knows no other flag (extra_data_compatible is refused too). */
const RESERVED_FLAGS = 0xfffffffc;
const DIRTY_TRACKING_TYPE = 1;
const ENTRY_HEAD = 24;
export const MAX_BITMAP_TABLE_ENTRIES = 0x8000000;
/** QEMU's BME_MAX_PHYS_SIZE: the most bitmap data (bytes) it keeps for one bitmap. */
export const MAX_BITMAP_DATA_BYTES = 0x20000000;
export const MIN_BITMAP_GRANULARITY_BITS = 9;
export const MAX_BITMAP_GRANULARITY_BITS = 31;
export const MAX_BITMAP_NAME_BYTES = 1023;
const TABLE_ENTRY_RESERVED = 0xff000000000001fen;
const TABLE_ENTRY_OFFSET = 0x00fffffffffffe00n;
const TABLE_ENTRY_ALL_ONES = 1n;

export interface BitmapDirectoryEntry {
  name: string;
  /** The name's bytes as the image holds them (written back unchanged, even when they are not UTF-8). */
  nameBytes?: Buffer;
  tableOffset: number;
  /** Entries (u64) in the bitmap table. */
  tableSize: number;
  flags: number;
  granularityBits: number;
}

/** One bitmap table entry: where a data cluster is, or that it reads as all zeros or all ones. */
export type BitmapTableEntry = { kind: 'zeros' } | { kind: 'ones' } | { kind: 'data'; offset: number };

/** Bytes one directory entry takes, padded to 8 (calc_dir_entry_size). */
export function directoryEntrySize(name: string | Buffer): number {
  return Math.ceil((ENTRY_HEAD + (typeof name === 'string' ? Buffer.byteLength(name, 'utf8') : name.length)) / 8) * 8;
}

function nameBytesOf(entry: BitmapDirectoryEntry): Buffer {
  return entry.nameBytes ?? Buffer.from(entry.name, 'utf8');
}

/** QEMU's check_dir_entry: whether an entry is usable for an image of `virtualSize` bytes. */
function entrySatisfiesConstraints(entry: BitmapDirectoryEntry, nameBytes: number, type: number, clusterSize: number, virtualSize: number): boolean {
  if (entry.tableSize === 0 || entry.tableOffset === 0 || entry.tableOffset % clusterSize !== 0 || entry.tableSize > MAX_BITMAP_TABLE_ENTRIES
    || entry.granularityBits > MAX_BITMAP_GRANULARITY_BITS || entry.granularityBits < MIN_BITMAP_GRANULARITY_BITS
    || (entry.flags & RESERVED_FLAGS) !== 0 || nameBytes > MAX_BITMAP_NAME_BYTES || type !== DIRTY_TRACKING_TYPE) return false;
  const dataBytes = entry.tableSize * clusterSize;
  if (dataBytes > MAX_BITMAP_DATA_BYTES) return false;
  // A bitmap in use may have missed a resize; a valid one must cover the disk.
  return (entry.flags & BITMAP_IN_USE) !== 0 || virtualSize <= dataBytes * 8 * 2 ** entry.granularityBits;
}

/**
 * bitmap_list_load: the directory of `nbBitmaps` entries in `dir` (exactly the directory's
 * bytes), for an image of `virtualSize` bytes. Throws Qcow2FormatError with QEMU's text.
 */
export function parseBitmapDirectory(dir: Buffer, nbBitmaps: number, clusterSize: number, virtualSize: number): BitmapDirectoryEntry[] {
  if (dir.length === 0) throw new Qcow2FormatError('Requested bitmap directory size is zero');
  const entries: BitmapDirectoryEntry[] = [];
  let at = 0;
  while (at < dir.length) {
    if (at + ENTRY_HEAD > dir.length) throw new Qcow2FormatError('Broken bitmap directory');
    if (entries.length >= nbBitmaps) throw new Qcow2FormatError('More bitmaps found than specified in header extension');
    const nameSize = dir.readUInt16BE(at + 18);
    const extraSize = dir.readUInt32BE(at + 20);
    // QEMU sizes an entry in a C int: a huge extra_data_size wraps, and its refusal of extra data comes first then.
    const next = at + (((ENTRY_HEAD + nameSize + extraSize) | 0) + 7 & ~7);
    if (next > dir.length) throw new Qcow2FormatError('Broken bitmap directory');
    if (extraSize !== 0) throw new Qcow2FormatError('Bitmap extra data is not supported');
    const nameField = dir.subarray(at + ENTRY_HEAD, at + ENTRY_HEAD + nameSize);
    // QEMU copies the name as a C string: a NUL byte ends it.
    const nameBytes = Buffer.from(nameField.subarray(0, nameField.includes(0) ? nameField.indexOf(0) : nameSize));
    const entry: BitmapDirectoryEntry = {
      tableOffset: Number(dir.readBigUInt64BE(at)),
      tableSize: dir.readUInt32BE(at + 8),
      flags: dir.readUInt32BE(at + 12),
      granularityBits: dir[at + 17]!,
      name: nameBytes.toString('utf8'),
      nameBytes,
    };
    if (!entrySatisfiesConstraints(entry, nameSize, dir[at + 16]!, clusterSize, virtualSize)) {
      throw new Qcow2FormatError(`Bitmap '${entry.name}' doesn't satisfy the constraints`);
    }
    entries.push(entry);
    at = next;
  }
  if (entries.length !== nbBitmaps) throw new Qcow2FormatError('Less bitmaps found than specified in header extension');
  return entries;
}

/** bitmap_list_store's layout; throws (EINVAL in QEMU) when an entry breaks the constraints. */
export function serializeBitmapDirectory(entries: readonly BitmapDirectoryEntry[], clusterSize: number, virtualSize: number): Buffer {
  const dir = Buffer.alloc(entries.reduce((size, entry) => size + directoryEntrySize(nameBytesOf(entry)), 0));
  let at = 0;
  for (const entry of entries) {
    const name = nameBytesOf(entry);
    if (!entrySatisfiesConstraints(entry, name.length, DIRTY_TRACKING_TYPE, clusterSize, virtualSize)) {
      throw new Qcow2FormatError(`Bitmap '${entry.name}' doesn't satisfy the constraints`);
    }
    dir.writeBigUInt64BE(BigInt(entry.tableOffset), at);
    dir.writeUInt32BE(entry.tableSize, at + 8);
    dir.writeUInt32BE(entry.flags, at + 12);
    dir[at + 16] = DIRTY_TRACKING_TYPE;
    dir[at + 17] = entry.granularityBits;
    dir.writeUInt16BE(name.length, at + 18);
    name.copy(dir, at + ENTRY_HEAD);
    at += directoryEntrySize(name);
  }
  return dir;
}

/** A bitmap table as bitmap_table_load reads it; undefined when an entry is invalid (QEMU: EINVAL). */
export function parseBitmapTable(bytes: Buffer, clusterSize: number): BitmapTableEntry[] | undefined {
  const entries: BitmapTableEntry[] = [];
  for (let at = 0; at + 8 <= bytes.length; at += 8) {
    const raw = bytes.readBigUInt64BE(at);
    const offset = Number(raw & TABLE_ENTRY_OFFSET);
    if (raw & TABLE_ENTRY_RESERVED) return undefined;
    if (offset !== 0 && (raw & TABLE_ENTRY_ALL_ONES || offset % clusterSize !== 0)) return undefined;
    entries.push(offset !== 0 ? { kind: 'data', offset } : raw & TABLE_ENTRY_ALL_ONES ? { kind: 'ones' } : { kind: 'zeros' });
  }
  return entries;
}

/** The table as stored: data clusters by offset, 0 for clean clusters. */
export function serializeBitmapTable(dataOffsets: readonly number[]): Buffer {
  const bytes = Buffer.alloc(dataOffsets.length * 8);
  dataOffsets.forEach((offset, i) => bytes.writeBigUInt64BE(BigInt(offset), i * 8));
  return bytes;
}

/** Bitmap data bytes for a disk (QEMU serialises whole 64-bit words). */
export function bitmapDataBytes(virtualSize: number, granularity: number): number {
  return Math.ceil(Math.ceil(virtualSize / granularity) / 64) * 8;
}

/** Entries the bitmap table of such a bitmap has: one per cluster of data. */
export function bitmapTableEntries(virtualSize: number, granularity: number, clusterSize: number): number {
  return Math.ceil(bitmapDataBytes(virtualSize, granularity) / clusterSize);
}

/**
 * check_constraints_on_bitmap: why a bitmap of this name and granularity cannot be kept in
 * an image of this size and cluster size, in QEMU's words, or undefined.
 */
export function bitmapConstraintProblem(name: string, granularity: number, virtualSize: number, clusterSize: number): string | undefined {
  const bits = Math.log2(granularity);
  if (bits > MAX_BITMAP_GRANULARITY_BITS) return `Granularity exceeds maximum (${2 ** MAX_BITMAP_GRANULARITY_BITS} bytes)`;
  if (bits < MIN_BITMAP_GRANULARITY_BITS) return `Granularity is under minimum (${2 ** MIN_BITMAP_GRANULARITY_BITS} bytes)`;
  const neededBytes = Math.ceil(Math.ceil(virtualSize / granularity) / 8);
  if (neededBytes > MAX_BITMAP_DATA_BYTES || neededBytes > MAX_BITMAP_TABLE_ENTRIES * clusterSize) {
    return 'Too much space will be occupied by the bitmap. Use larger granularity';
  }
  if (Buffer.byteLength(name, 'utf8') > MAX_BITMAP_NAME_BYTES) return `Name length exceeds maximum (${MAX_BITMAP_NAME_BYTES} characters)`;
  return undefined;
}

/** Reads bytes of the image file (past its end: zeros). */
export type ReadImage = (offset: number, length: number) => Promise<Buffer>;

/**
 * load_bitmap's first steps for a consistent bitmap: its table, every entry checked, and its
 * size right for the disk. Throws Qcow2FormatError with the text QEMU's open fails with.
 */
export async function readBitmapTable(read: ReadImage, entry: BitmapDirectoryEntry, clusterSize: number, virtualSize: number): Promise<BitmapTableEntry[]> {
  let table: BitmapTableEntry[] | undefined;
  let code = 'EINVAL';
  try {
    table = parseBitmapTable(await read(entry.tableOffset, entry.tableSize * 8), clusterSize);
  } catch (error) {
    code = errnoOf(error);
  }
  if (!table) throw new Qcow2FormatError(`Could not read bitmap_table table from image for bitmap '${entry.name}': ${describeErrno(code)}`);
  if (table.length !== bitmapTableEntries(virtualSize, 2 ** entry.granularityBits, clusterSize)) {
    throw new Qcow2FormatError(`Could not read bitmap '${entry.name}' from image: ${describeErrno('EINVAL')}`);
  }
  return table;
}
