/*
 * qemu-img check for qcow2, read-only: rebuilds the reference count of every host cluster
 * from the metadata and compares it with the on-disk refcounts, with QEMU 7.2's messages,
 * counters and order. Also the read-only metadata readers qemu-img info and map need: the
 * snapshot table, the bitmap directory, QEMU's metadata-preallocation guess.
 */
import { open, type FileHandle } from 'node:fs/promises';
import type { ChildEdge } from '../../child-edge.js';
import { describeErrno, errnoOf } from '../../io-error.js';
import {
  IncompatibleFeature, L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK, L2E_STANDARD_RESERVED_MASK,
  MAX_L1_TABLE_BYTES, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, Qcow2FormatError, REFT_OFFSET_MASK, REFT_RESERVED_MASK,
} from './format-constants.js';
import { parseHeader, type Qcow2Header } from './header.js';
import { getRefcountBigInt, maxRefcount, refcountBitsFromOrder, type RefcountBits } from './refcount-block.js';
import { decodeCompressedDescriptor } from './table-entries.js';
import { BITMAP_IN_USE, parseBitmapDirectory, parseBitmapTable, readBitmapTable, type BitmapDirectoryEntry } from './bitmap-directory.js';

export interface Qcow2CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  imageEndOffset: number;
  allocatedClusters: number;
  totalClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** QEMU's stderr lines, in its order ("ERROR cluster 5 refcount=0 reference=1", ...). */
  messages: string[];
  /** Set when the check could not complete (qemu-img: "Check failed: <failure>"); counts are partial. */
  failure?: string;
}

export interface SnapshotEntry {
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  /** Absent when the snapshot records none (stored as -1). */
  icount?: bigint;
  /** The virtual disk size when the snapshot was taken (the image's size for entries too old to record it). */
  diskSize: number;
  /** Extra data past the fields known here, kept as found when the table is rewritten. */
  unknownExtra: Buffer;
}

export type BitmapEntry = BitmapDirectoryEntry;

/** A qcow2 file: a path (read with fs) or a file edge. Reads past the end return zeros. */
export type Qcow2Source = string | ChildEdge;

const SNAPSHOT_EXTRA_MAX = 1024;
const SNAPSHOT_TABLE_MAX = 64 * 1024 * 1024;
const hex = (value: number | bigint) => value.toString(16);

class ImageReader {
  private constructor(private readonly handle: FileHandle | undefined, private readonly edge: ChildEdge | undefined, readonly length: number) {}

  /** The length is rounded up to 512 bytes, as QEMU sees a file. */
  static async open(source: Qcow2Source): Promise<ImageReader> {
    if (typeof source !== 'string') return new ImageReader(undefined, source, source.length());
    const handle = await open(source, 'r');
    const { size } = await handle.stat();
    return new ImageReader(handle, undefined, Math.ceil(size / 512) * 512);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const buffer = Buffer.alloc(length);
    const inside = Math.max(0, Math.min(length, this.length - offset));
    if (inside === 0) return buffer;
    if (this.edge) await this.edge.read(offset, buffer.subarray(0, inside));
    else for (let done = 0, n = 1; done < inside && n > 0; done += n) n = (await this.handle!.read(buffer, done, inside - done, offset + done)).bytesRead;
    return buffer;
  }

  async close(): Promise<void> {
    await this.handle?.close();
  }
}

async function readHeader(file: ImageReader): Promise<Qcow2Header> {
  const start = await file.read(0, 24);
  const bits = start.readUInt32BE(20);
  return parseHeader(await file.read(0, bits >= 9 && bits <= 21 ? 2 ** bits : 512), file.length);
}

/** The snapshot table as qcow2_do_read_snapshots reads it, and its length in bytes. */
async function readSnapshots(file: ImageReader, header: Qcow2Header): Promise<{ snapshots: SnapshotEntry[]; size: number }> {
  const snapshots: SnapshotEntry[] = [];
  let offset = header.snapshotsOffset;
  for (let i = 0; i < header.nbSnapshots; i++) {
    offset = Math.ceil(offset / 8) * 8;
    const head = await file.read(offset, 40);
    const extraSize = head.readUInt32BE(36);
    if (extraSize > SNAPSHOT_EXTRA_MAX) throw new Qcow2FormatError(`Too much extra metadata in snapshot table entry ${i}`);
    const extra = Buffer.concat([await file.read(offset + 40, extraSize), Buffer.alloc(24)]);
    const [idSize, nameSize] = [head.readUInt16BE(12), head.readUInt16BE(14)];
    const names = await file.read(offset + 40 + extraSize, idSize + nameSize);
    const icount = extraSize >= 24 ? extra.readBigUInt64BE(16) : -1n;
    snapshots.push({
      l1TableOffset: Number(head.readBigUInt64BE(0)), l1Size: head.readUInt32BE(8),
      dateSec: head.readUInt32BE(16), dateNsec: head.readUInt32BE(20), vmClockNsec: head.readBigUInt64BE(24),
      vmStateSize: extraSize >= 8 ? Number(extra.readBigUInt64BE(0)) : head.readUInt32BE(32),
      id: names.subarray(0, idSize).toString('utf8'), name: names.subarray(idSize).toString('utf8'),
      ...(icount === 0xffffffffffffffffn ? {} : { icount }),
      diskSize: extraSize >= 16 ? Number(extra.readBigUInt64BE(8)) : header.size,
      unknownExtra: extra.subarray(24, Math.max(24, extraSize)),
    });
    offset += 40 + extraSize + idSize + nameSize;
    if (offset - header.snapshotsOffset > SNAPSHOT_TABLE_MAX) throw new Qcow2FormatError('Snapshot table is too big');
  }
  return { snapshots, size: offset - header.snapshotsOffset };
}

/** The bitmap directory as bitmap_list_load checks it; throws with QEMU's text when it is broken. */
async function readBitmaps(file: ImageReader, header: Qcow2Header): Promise<BitmapEntry[]> {
  const extension = header.bitmaps;
  if (!extension) return [];
  const virtualSize = Math.floor(header.size / 512) * 512;
  const dir = await file.read(extension.directoryOffset, extension.directorySize);
  return parseBitmapDirectory(dir, extension.nbBitmaps, 2 ** header.clusterBits, virtualSize);
}

/**
 * What QEMU's open checks of the bitmaps (qemu-img check and info open the image first):
 * the directory and the table of every consistent bitmap. Throws Qcow2FormatError with QEMU's text.
 */
export async function checkBitmapsLoadable(source: Qcow2Source): Promise<void> {
  const file = await ImageReader.open(source);
  try {
    const header = await readHeader(file);
    const virtualSize = Math.floor(header.size / 512) * 512;
    for (const entry of await readBitmaps(file, header)) {
      if (!(entry.flags & BITMAP_IN_USE)) await readBitmapTable((offset, length) => file.read(offset, length), entry, 2 ** header.clusterBits, virtualSize);
    }
  } finally {
    await file.close();
  }
}

/** The snapshot table of an open image and its length in bytes; throws Qcow2FormatError with QEMU's text when it is broken. */
export async function readSnapshotTable(source: Qcow2Source, header: Qcow2Header): Promise<{ snapshots: SnapshotEntry[]; size: number }> {
  const file = await ImageReader.open(source);
  try {
    return await readSnapshots(file, header);
  } finally {
    await file.close();
  }
}

/** The header of a qcow2 image; throws Qcow2FormatError with QEMU's text when it cannot be opened. */
export async function readQcow2Header(source: Qcow2Source): Promise<Qcow2Header> {
  const file = await ImageReader.open(source);
  try {
    return await readHeader(file);
  } finally {
    await file.close();
  }
}

/** The header, snapshots and bitmaps of a qcow2 image (qemu-img info's extras). */
export async function readQcow2Metadata(source: Qcow2Source): Promise<{ header: Qcow2Header; snapshots: SnapshotEntry[]; bitmaps: BitmapEntry[] }> {
  const file = await ImageReader.open(source);
  try {
    const header = await readHeader(file);
    return { header, snapshots: (await readSnapshots(file, header)).snapshots, bitmaps: await readBitmaps(file, header) };
  } finally {
    await file.close();
  }
}

/** Where a compressed stream lies; offsets past 2^53 stay huge (and are reported as beyond the file). */
function compressedSpan(entry: bigint, clusterBits: number): [number, number] {
  try {
    const { hostOffset, compressedSize } = decodeCompressedDescriptor(entry, clusterBits);
    return [hostOffset, compressedSize];
  } catch {
    return [Number.MAX_SAFE_INTEGER, 1];
  }
}

/**
 * qcow2_detect_metadata_preallocation: QEMU takes an image for preallocated when clearly more
 * clusters are referenced than the file has allocated, and then refines the block status of
 * data clusters with the file's (qemu-img map shows such ranges as zero). False when unsure.
 */
export async function detectMetadataPreallocation(source: Qcow2Source, allocatedBytes: number): Promise<boolean> {
  const file = await ImageReader.open(source);
  try {
    const header = await readHeader(file);
    const clusterSize = 2 ** header.clusterBits;
    const bits = refcountBitsFromOrder(header.refcountOrder);
    const entriesPerBlock = clusterSize * 8 / bits;
    const realClusters = Math.floor(allocatedBytes / clusterSize);
    const threshold = Math.max(Math.floor(realClusters * 10 / 9), realClusters + 2);
    const table = await file.read(header.refcountTableOffset, header.refcountTableClusters * clusterSize);
    const end = Math.ceil(file.length / clusterSize);
    let count = 0;
    for (let first = 0, index = 0; first < end && count < threshold; first += entriesPerBlock, index++) {
      const blockOffset = index * 8 < table.length ? Number(table.readBigUInt64BE(index * 8) & REFT_OFFSET_MASK) : 0;
      if (blockOffset % clusterSize) return false; // QEMU's lookup fails, and the detection with it
      if (!blockOffset) continue;
      const block = await file.read(blockOffset, clusterSize);
      for (let i = 0; i < entriesPerBlock && first + i < end && count < threshold; i++) if (getRefcountBigInt(block, i, bits)) count++;
    }
    return count >= threshold;
  } finally {
    await file.close();
  }
}

/** Thrown inside the check to stop it, as QEMU's negative return codes do. */
class CheckAborted extends Error {}

class Checker {
  readonly result: Qcow2CheckResult = {
    corruptions: 0, leaks: 0, checkErrors: 0, imageEndOffset: 0, allocatedClusters: 0,
    totalClusters: 0, fragmentedClusters: 0, compressedClusters: 0, messages: [],
  };
  /** How many times each host cluster is referenced: what its refcount should be. */
  references: Uint32Array;
  private clusterCount: number;
  private readonly clusterSize: number;
  private readonly bits: RefcountBits;
  private readonly maxReference: number;
  private readonly extendedL2: boolean;
  private readonly dataFile: boolean;
  private readonly entriesPerBlock: number;
  private readonly refblocks = new Map<number, Buffer>();
  private reftable: bigint[] = [];
  private signaled = false;

  constructor(private readonly file: ImageReader, private readonly header: Qcow2Header) {
    this.clusterSize = 2 ** header.clusterBits;
    this.bits = refcountBitsFromOrder(header.refcountOrder);
    this.entriesPerBlock = this.clusterSize * 8 / this.bits;
    // The in-memory counts saturate where QEMU's do, or at 2^32 - 1 for wider refcounts (never reached).
    this.maxReference = Number(maxRefcount(this.bits) < 0xffffffffn ? maxRefcount(this.bits) : 0xffffffffn);
    this.extendedL2 = (header.incompatibleFeatures & IncompatibleFeature.EXTENDED_L2) !== 0n;
    this.dataFile = (header.incompatibleFeatures & IncompatibleFeature.EXTERNAL_DATA_FILE) !== 0n;
    this.clusterCount = Math.ceil(file.length / this.clusterSize);
    this.references = new Uint32Array(this.clusterCount);
    this.result.totalClusters = Math.ceil(Math.floor(header.size / 512) * 512 / this.clusterSize);
  }

  private report(message: string, counter?: 'corruptions' | 'leaks' | 'checkErrors'): void {
    this.result.messages.push(message);
    if (counter) this.result[counter]++;
  }

  private async read(offset: number, length: number, where: string): Promise<Buffer> {
    try {
      return await this.file.read(offset, length);
    } catch (error) {
      this.report(`ERROR: I/O error in ${where}`, 'checkErrors');
      this.result.failure = describeErrno(errnoOf(error));
      throw new CheckAborted();
    }
  }

  /** qcow2_inc_refcounts_imrt: one more reference to each cluster the range touches. */
  private reference(offset: number, size: number): void {
    if (size <= 0) return;
    if (offset + size - this.file.length >= this.clusterSize) {
      const message = 'ERROR: counting reference for region exceeding the end of the file by one cluster or more';
      return this.report(`${message}: offset 0x${hex(offset)} size 0x${hex(size)}`, 'corruptions');
    }
    const last = Math.floor((offset + size - 1) / this.clusterSize);
    if (last >= this.references.length) {
      const grown = new Uint32Array(last + 1);
      grown.set(this.references);
      this.references = grown;
    }
    this.clusterCount = Math.max(this.clusterCount, last + 1);
    for (let cluster = Math.floor(offset / this.clusterSize); cluster <= last; cluster++) {
      if (this.references[cluster] === this.maxReference) {
        this.report(`ERROR: overflow cluster offset=0x${hex(cluster * this.clusterSize)}`, 'corruptions');
        this.report('Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing');
        continue;
      }
      this.references[cluster]!++;
    }
  }

  /** The refcount block of a table index: null when there is none, undefined when it cannot be used. */
  private async refblock(tableIndex: number): Promise<Buffer | null | undefined> {
    const blockOffset = Number((this.reftable[tableIndex] ?? 0n) & REFT_OFFSET_MASK);
    if (blockOffset === 0) return null;
    if (blockOffset % this.clusterSize !== 0) {
      // qcow2_get_refcount signals this once, then every lookup through it fails with EIO.
      if (!this.signaled) {
        this.report(`qcow2: Image is corrupt: Refblock offset 0x${hex(blockOffset)} unaligned (reftable index: 0x${hex(tableIndex)}); `
          + 'further non-fatal corruption events will be suppressed');
      }
      this.signaled = true;
      return undefined;
    }
    let block = this.refblocks.get(blockOffset);
    if (!block) this.refblocks.set(blockOffset, (block = await this.read(blockOffset, this.clusterSize, 'refcount block')));
    return block;
  }

  /** The on-disk refcount, or undefined when its block cannot be used. */
  private async onDisk(cluster: number): Promise<bigint | undefined> {
    const block = await this.refblock(Math.floor(cluster / this.entriesPerBlock));
    return block ? getRefcountBigInt(block, cluster % this.entriesPerBlock, this.bits) : block === null ? 0n : undefined;
  }

  async run(): Promise<void> {
    const { header } = this;
    const table = await this.read(header.refcountTableOffset, header.refcountTableClusters * this.clusterSize, 'refcount table');
    for (let i = 0; i < table.length; i += 8) this.reftable.push(table.readBigUInt64BE(i));
    const { snapshots, size: snapshotsSize } = await this.snapshotTable();
    this.reference(0, this.clusterSize);
    await this.checkL1(header.l1TableOffset, header.l1Size, true);
    if (this.dataFile && header.nbSnapshots) this.report(`ERROR ${header.nbSnapshots} snapshots in image with data file`, 'corruptions');
    for (const sn of snapshots) {
      if (sn.l1TableOffset % this.clusterSize !== 0) {
        const where = `ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${hex(sn.l1TableOffset)}`;
        this.report(`${where}: L1 table is not cluster aligned; snapshot table entry corrupted`, 'corruptions');
      } else if (sn.l1Size > MAX_L1_TABLE_BYTES / 8) {
        this.report(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${hex(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`, 'corruptions');
      } else {
        await this.checkL1(sn.l1TableOffset, sn.l1Size, false);
      }
    }
    this.reference(header.snapshotsOffset, snapshotsSize);
    this.reference(header.refcountTableOffset, this.reftable.length * 8);
    if (header.fullDiskEncryption) this.reference(header.fullDiskEncryption.offset, header.fullDiskEncryption.length);
    await this.bitmaps();
    this.refcountBlocks();
    await this.compare();
    await this.copiedFlags();
  }

  private async snapshotTable(): Promise<{ snapshots: SnapshotEntry[]; size: number }> {
    try {
      return await readSnapshots(this.file, this.header);
    } catch (error) {
      if (!(error instanceof Qcow2FormatError)) throw error;
      this.report(`ERROR failed to read the snapshot table: ${error.message}`, 'checkErrors');
      this.result.failure = describeErrno('EFBIG');
      throw new CheckAborted();
    }
  }

  private async checkL1(offset: number, size: number, active: boolean): Promise<void> {
    if (!size) return;
    this.reference(offset, size * 8);
    const l1 = await this.read(offset, size * 8, 'check_refcounts_l1');
    for (let i = 0; i < size; i++) {
      const entry = l1.readBigUInt64BE(i * 8);
      if (!entry) continue;
      if (entry & L1E_RESERVED_MASK) this.report(`ERROR found L1 entry with reserved bits set: ${hex(entry)}`, 'corruptions');
      const l2Offset = Number(entry & L1E_OFFSET_MASK);
      this.reference(l2Offset, this.clusterSize);
      if (l2Offset % this.clusterSize) this.report(`ERROR l2_offset=${hex(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`, 'corruptions');
      await this.checkL2(l2Offset, active);
    }
  }

  /** qcow2_get_cluster_type, which (unlike the codec) accepts anything and classifies it. */
  private type(entry: bigint): 'COMPRESSED' | 'ZERO_ALLOC' | 'ZERO_PLAIN' | 'NORMAL' | 'UNALLOCATED' {
    if (entry & OFLAG_COMPRESSED) return 'COMPRESSED';
    if (entry & OFLAG_ZERO && !this.extendedL2) return entry & L2E_OFFSET_MASK ? 'ZERO_ALLOC' : 'ZERO_PLAIN';
    if (!(entry & L2E_OFFSET_MASK)) return this.dataFile && entry & OFLAG_COPIED ? 'NORMAL' : 'UNALLOCATED';
    return 'NORMAL';
  }

  private async l2Entries(offset: number, where: string): Promise<[bigint, bigint][]> {
    const table = await this.read(offset, this.clusterSize, where);
    const size = this.extendedL2 ? 16 : 8;
    const entries: [bigint, bigint][] = [];
    for (let at = 0; at < table.length; at += size) entries.push([table.readBigUInt64BE(at), this.extendedL2 ? table.readBigUInt64BE(at + 8) : 0n]);
    return entries;
  }

  private async checkL2(l2Offset: number, active: boolean): Promise<void> {
    const counts = this.result;
    let nextContiguous = 0;
    for (const [i, [entry, bitmap]] of (await this.l2Entries(l2Offset, 'check_refcounts_l2')).entries()) {
      const type = this.type(entry);
      if (type !== 'COMPRESSED' && entry & L2E_STANDARD_RESERVED_MASK) this.report(`ERROR found l2 entry with reserved bits set: ${hex(entry)}`, 'corruptions');
      if (type === 'COMPRESSED') {
        const coffset = entry & ((1n << BigInt(62 - (this.header.clusterBits - 8))) - 1n);
        if (entry & OFLAG_COPIED) this.report(`ERROR: coffset=0x${hex(coffset)}: copied flag must never be set for compressed clusters`, 'corruptions');
        const problem = this.dataFile ? 'with data file' : bitmap ? 'with non-zero subcluster allocation bitmap' : undefined;
        if (problem) {
          this.report(`ERROR compressed cluster ${i} ${problem}, entry=0x${hex(entry & ~OFLAG_COPIED)}`, 'corruptions');
          continue;
        }
        this.reference(...compressedSpan(entry, this.header.clusterBits));
        if (active) { counts.allocatedClusters++; counts.compressedClusters++; counts.fragmentedClusters++; }
      } else if (type === 'NORMAL' || type === 'ZERO_ALLOC') {
        const offset = Number(entry & L2E_OFFSET_MASK);
        if ((bitmap >> 32n) & bitmap) this.report(`ERROR offset=${hex(offset)}: Allocated cluster has corrupted subcluster allocation bitmap`, 'corruptions');
        if (offset % this.clusterSize) {
          const data = this.extendedL2 ? (bitmap & 0xffffffffn) !== 0n : !(entry & OFLAG_ZERO);
          this.report(`ERROR offset=${hex(offset)}: ${data ? 'Data' : 'Preallocated'} cluster is not properly aligned; L2 entry corrupted.`, 'corruptions');
        }
        if (active) {
          counts.allocatedClusters++;
          if (nextContiguous && offset !== nextContiguous) counts.fragmentedClusters++;
          nextContiguous = offset + this.clusterSize;
        }
        if (!this.dataFile) this.reference(offset, this.clusterSize);
      } else if (type === 'UNALLOCATED' && bitmap & 0xffffffffn) {
        this.report('ERROR: Unallocated cluster has non-zero subcluster allocation map', 'corruptions');
      }
    }
  }

  /** qcow2_check_bitmaps_refcounts: the directory, each table, each data cluster. */
  private async bitmaps(): Promise<void> {
    const extension = this.header.bitmaps;
    if (!extension) return;
    this.reference(extension.directoryOffset, extension.directorySize);
    let entries: BitmapEntry[];
    try {
      entries = await readBitmaps(this.file, this.header);
    } catch (error) {
      if (!(error instanceof Qcow2FormatError)) throw error;
      this.result.corruptions++;
      this.result.failure = describeErrno('EINVAL');
      throw new CheckAborted();
    }
    for (const bitmap of entries) {
      this.reference(bitmap.tableOffset, bitmap.tableSize * 8);
      const table = parseBitmapTable(await this.read(bitmap.tableOffset, bitmap.tableSize * 8, 'bitmap table'), this.clusterSize);
      if (!table) {
        this.result.corruptions++;
        this.result.failure = describeErrno('EINVAL');
        throw new CheckAborted();
      }
      const offsets = table.flatMap((entry) => (entry.kind === 'data' ? [entry.offset] : []));
      for (const offset of offsets) this.reference(offset, this.clusterSize);
    }
  }

  /** check_refblocks: every refcount block is inside the file and referenced exactly once. */
  private refcountBlocks(): void {
    this.reftable.forEach((entry, i) => {
      const offset = Number(entry & REFT_OFFSET_MASK);
      if (entry & REFT_RESERVED_MASK) return this.report(`ERROR refcount table entry ${i} has reserved bits set`, 'corruptions');
      if (offset % this.clusterSize) return this.report(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`, 'corruptions');
      if (offset / this.clusterSize >= this.clusterCount) return this.report(`ERROR refcount block ${i} is outside image`, 'corruptions');
      if (offset === 0) return;
      this.reference(offset, this.clusterSize);
      const count = this.references[offset / this.clusterSize]!;
      if (count !== 1) this.report(`ERROR refcount block ${i} refcount=${count}`, 'corruptions');
    });
  }

  /** compare_refcounts: more on disk than referenced is a leak, less is a corruption. */
  private async compare(): Promise<void> {
    let highest = 0;
    for (let first = 0; first < this.clusterCount; first += this.entriesPerBlock) {
      const block = await this.refblock(first / this.entriesPerBlock); // one lookup per block keeps big images fast
      for (let cluster = first; cluster < Math.min(this.clusterCount, first + this.entriesPerBlock); cluster++) {
        if (block === undefined) {
          this.report(`Can't get refcount for cluster ${cluster}: ${describeErrno('EIO')}`, 'checkErrors');
          continue;
        }
        const onDisk = block ? getRefcountBigInt(block, cluster - first, this.bits) : 0n;
        const computed = BigInt(this.references[cluster] ?? 0);
        if (onDisk > 0n || computed > 0n) highest = cluster;
        if (onDisk < computed) this.report(`ERROR cluster ${cluster} refcount=${onDisk} reference=${computed}`, 'corruptions');
        else if (onDisk > computed) this.report(`Leaked cluster ${cluster} refcount=${onDisk} reference=${computed}`, 'leaks');
      }
    }
    this.result.imageEndOffset = (highest + 1) * this.clusterSize;
  }

  /** check_oflag_copied: COPIED set exactly when the on-disk refcount is 1, in the active tables. */
  private async copiedFlags(): Promise<void> {
    const l1 = await this.read(this.header.l1TableOffset, this.header.l1Size * 8, 'check_oflag_copied');
    for (let i = 0; i < this.header.l1Size; i++) {
      const l1Entry = l1.readBigUInt64BE(i * 8);
      const l2Offset = Number(l1Entry & L1E_OFFSET_MASK);
      if (!l2Offset) continue;
      const refcount = await this.onDisk(Math.floor(l2Offset / this.clusterSize));
      if (refcount !== undefined && (refcount === 1n) !== ((l1Entry & OFLAG_COPIED) !== 0n)) {
        this.report(`ERROR OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex(l1Entry)} refcount=${refcount}`, 'corruptions');
      }
      for (const [entry] of await this.l2Entries(l2Offset, 'check_oflag_copied')) {
        const type = this.type(entry);
        if (type !== 'NORMAL' && type !== 'ZERO_ALLOC') continue;
        const count = this.dataFile ? 1n : await this.onDisk(Math.floor(Number(entry & L2E_OFFSET_MASK) / this.clusterSize));
        if (count !== undefined && (count === 1n) !== ((entry & OFLAG_COPIED) !== 0n)) {
          this.report(`ERROR OFLAG_COPIED data cluster: l2_entry=${hex(entry)} refcount=${count}`, 'corruptions');
        }
      }
    }
  }
}

/**
 * Checks a qcow2 image without changing it. Throws Qcow2FormatError when the header
 * cannot be opened (qemu-img: "Could not open"); anything found later is in the result.
 */
export async function checkQcow2(source: Qcow2Source): Promise<Qcow2CheckResult> {
  return (await countReferences(source)).result;
}

/** The check, with the reference count it computed for every host cluster (what a repair writes). */
export async function countReferences(source: Qcow2Source): Promise<{ result: Qcow2CheckResult; references: Uint32Array }> {
  const file = await ImageReader.open(source);
  try {
    const checker = new Checker(file, await readHeader(file));
    try {
      await checker.run();
    } catch (error) {
      if (!(error instanceof CheckAborted)) throw error;
    }
    return { result: checker.result, references: checker.references };
  } finally {
    await file.close();
  }
}
