/*
 * qcow2 reference counts: the refcount table and blocks, kept in memory, and
 * the cluster allocator built on them. Changed entries are written back in a
 * batch (writeBack), before anything that points at the clusters they count
 * is written: the L2 tables' write-back starts with it. Structure changes are
 * written through in the crash-safe order: a new refcount block is written and
 * flushed before the table entry that points to it; a grown table is complete
 * and flushed before the header switches to it. The caller serialises calls
 * (the image's metadata mutex).
 */
import type { ChildEdge } from '../../child-edge.js';
import { IoError } from '../../io-error.js';
import { REFCOUNT_TABLE_ENTRY_SIZE } from './format-constants.js';
import type { Qcow2Header } from './header.js';
import { getRefcount, maxSafeRefcount, refcountBitsFromOrder, refcountBlockEntries, setRefcount, type RefcountBits } from './refcount-block.js';
import { decodeRefcountTableEntry, encodeRefcountTableEntry } from './table-entries.js';
import { MetadataKind, type MetadataIndex } from './metadata-index.js';

export interface RefcountContext {
  file: ChildEdge;
  header: Qcow2Header;
  flush(): Promise<void>;
  writeHeader(): Promise<void>;
  /** Reports metadata found broken (the image is then marked corrupt). */
  corrupt(message: string): never;
  /** Where the metadata is: kept up to date as structures are allocated and freed. */
  overlaps: MetadataIndex;
  /** QEMU's pre-write overlap check: a write onto metadata other than `ignore` marks the image corrupt. */
  checkWrite(offset: number, length: number, ignore?: MetadataKind): void;
}

export class Refcounts {
  readonly bits: RefcountBits;
  readonly clusterSize: number;
  readonly entriesPerBlock: number;
  private table: number[] = [];
  private readonly blocks = new Map<number, Buffer>();
  /** Blocks changed in memory (by table index), with the byte range to write. */
  private readonly dirty = new Map<number, [number, number]>();
  /** Lowest cluster index that may be free. */
  private freeHint = 0;
  /** Where the next compressed cluster goes: just past the last one, inside its host cluster (0: start a new one). */
  private freeByteOffset = 0;

  constructor(private readonly context: RefcountContext) {
    const { header } = context;
    this.bits = refcountBitsFromOrder(header.refcountOrder);
    this.clusterSize = 2 ** header.clusterBits;
    this.entriesPerBlock = refcountBlockEntries(header.clusterBits, this.bits);
  }

  async load(): Promise<void> {
    const { header, file } = this.context;
    const bytes = Buffer.alloc(header.refcountTableClusters * this.clusterSize);
    await file.read(header.refcountTableOffset, bytes);
    this.table = [];
    for (let i = 0; i < bytes.length / REFCOUNT_TABLE_ENTRY_SIZE; i++) {
      const entry = decodeRefcountTableEntry(bytes.readBigUInt64BE(i * REFCOUNT_TABLE_ENTRY_SIZE), header.clusterBits);
      if (entry.type === 'INVALID') this.context.corrupt(`Refblock offset invalid (refcount table index ${i}): ${entry.reason}`);
      this.table.push(entry.type === 'ALLOCATED' ? entry.blockOffset : 0);
    }
    this.indexMetadata('add');
  }

  /** Enters (or takes out) the table and every block in the overlap index. */
  private indexMetadata(change: 'add' | 'remove'): void {
    const { header, overlaps } = this.context;
    overlaps[change](MetadataKind.RefcountTable, header.refcountTableOffset, header.refcountTableClusters * this.clusterSize);
    for (const offset of this.table) if (offset) overlaps[change](MetadataKind.RefcountBlock, offset, this.clusterSize);
  }

  private async block(tableIndex: number): Promise<Buffer | undefined> {
    const offset = this.table[tableIndex];
    if (!offset) return undefined;
    let block = this.blocks.get(offset);
    if (!block) {
      block = Buffer.alloc(this.clusterSize);
      await this.context.file.read(offset, block);
      this.blocks.set(offset, block);
    }
    return block;
  }

  async get(cluster: number): Promise<number> {
    const block = await this.block(Math.floor(cluster / this.entriesPerBlock));
    return block ? getRefcount(block, cluster % this.entriesPerBlock, this.bits) : 0;
  }

  /** Adds `delta` to a cluster's refcount (on disk at the next write-back). */
  async update(cluster: number, delta: number): Promise<void> {
    const tableIndex = Math.floor(cluster / this.entriesPerBlock);
    const block = (await this.block(tableIndex)) ?? (await this.createBlock(tableIndex));
    const index = cluster % this.entriesPerBlock;
    const value = getRefcount(block, index, this.bits) + delta;
    if (value < 0) this.context.corrupt(`Invalid refcount: cluster ${cluster} would drop below zero`);
    if (value > maxSafeRefcount(this.bits)) throw new IoError('EINVAL', `refcount of cluster ${cluster} would exceed the ${this.bits}-bit maximum`);
    setRefcount(block, index, this.bits, value);
    this.markDirty(tableIndex, index, index);
    if (value === 0 && cluster < this.freeHint) this.freeHint = cluster;
    // A freed host cluster may be handed out whole next: compressed data must not follow into it.
    if (value === 0 && this.freeByteOffset && Math.floor(this.freeByteOffset / this.clusterSize) === cluster) this.freeByteOffset = 0;
  }

  /** Notes that entries low..high of a block changed (whole bytes: sub-byte widths share them). */
  private markDirty(tableIndex: number, low: number, high: number): void {
    const first = Math.floor((low * this.bits) / 8);
    const last = Math.floor(((high + 1) * this.bits - 1) / 8);
    const span = this.dirty.get(tableIndex);
    this.dirty.set(tableIndex, span ? [Math.min(span[0], first), Math.max(span[1], last)] : [first, last]);
  }

  hasPendingWrites(): boolean {
    return this.dirty.size > 0;
  }

  /** Writes the changed parts of the blocks (the caller puts a barrier after it). */
  async writeBack(): Promise<void> {
    // Every block is checked before any is written: a corrupt image gets no partial write-back.
    for (const tableIndex of this.dirty.keys()) this.context.checkWrite(this.table[tableIndex]!, this.clusterSize, MetadataKind.RefcountBlock);
    const writes = [...this.dirty].map(([tableIndex, [first, last]]) => {
      const offset = this.table[tableIndex]!;
      return this.context.file.write(offset + first, this.blocks.get(offset)!.subarray(first, last + 1));
    });
    this.dirty.clear();
    await Promise.all(writes);
  }

  /**
   * Allocates `count` clusters (refcount 0 -> 1) and returns their offsets: the first
   * free ones, reusing freed clusters in the middle of the file before it grows, or
   * with `contiguous` a run of consecutive clusters (tables that must be contiguous).
   */
  async allocate(count: number, { contiguous = false }: { contiguous?: boolean } = {}): Promise<number[]> {
    const found: number[] = [];
    let cluster = this.freeHint;
    while (found.length < count) {
      // A range without a refcount block gets one first: the block takes a cluster of that range.
      const tableIndex = Math.floor(cluster / this.entriesPerBlock);
      if (!(await this.block(tableIndex))) await this.createBlock(tableIndex);
      if ((await this.get(cluster)) === 0) {
        if (contiguous && found.length && found[found.length - 1] !== cluster - 1) found.length = 0;
        found.push(cluster);
      } else if (contiguous) {
        found.length = 0;
      }
      cluster++;
    }
    await this.setAllocated(found);
    // Everything between the hint and the last cluster taken is in use now (unless a contiguous run skipped some).
    if (!contiguous || found[0] === this.freeHint) this.freeHint = found[found.length - 1]! + 1;
    return found.map((index) => index * this.clusterSize);
  }

  /**
   * Room for a compressed cluster of `size` bytes (QEMU's qcow2_alloc_bytes). Compressed clusters
   * are packed byte after byte into host clusters: one goes just past the previous one, into the
   * next host cluster when it does not fit (continuing across the boundary when the newly
   * allocated cluster is the adjacent one). Every host cluster a compressed cluster touches gains
   * one reference; a host cluster whose refcount is at its maximum takes no more.
   */
  async allocateBytes(size: number): Promise<number> {
    if (!Number.isSafeInteger(size) || size <= 0 || size > this.clusterSize) throw new RangeError(`compressed size ${size} is not 1 to ${this.clusterSize} bytes`);
    const cs = this.clusterSize;
    let offset = this.freeByteOffset;
    if (offset && (await this.get(Math.floor(offset / cs))) >= maxSafeRefcount(this.bits)) offset = 0;
    let fresh: number | undefined;
    if (!offset || cs - (offset % cs) < size) {
      [fresh] = await this.allocate(1); // its refcount becomes 1: this cluster's reference
      if (fresh === 0) this.context.corrupt('Preventing invalid allocation of compressed cluster at offset 0');
      if (!offset || Math.ceil(offset / cs) * cs !== fresh) offset = fresh!;
    }
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + size - 1) / cs);
    for (let cluster = first; cluster <= last; cluster++) if (cluster * cs !== fresh) await this.update(cluster, 1);
    this.freeByteOffset = (offset + size) % cs === 0 ? 0 : offset + size;
    return offset;
  }

  /** Sets free clusters to refcount 1. */
  private async setAllocated(clusters: number[]): Promise<void> {
    for (const cluster of clusters) {
      const tableIndex = Math.floor(cluster / this.entriesPerBlock);
      const block = (await this.block(tableIndex))!;
      const index = cluster % this.entriesPerBlock;
      setRefcount(block, index, this.bits, 1);
      this.markDirty(tableIndex, index, index);
    }
  }

  /** Drops one reference from each cluster of [offset, offset + length). */
  async release(offset: number, length: number): Promise<void> {
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    for (let cluster = first; cluster <= last; cluster++) await this.update(cluster, -1);
  }

  /** A new refcount block for table index `tableIndex`, placed inside the range it describes. */
  private async createBlock(tableIndex: number): Promise<Buffer> {
    if (tableIndex >= this.table.length) await this.growTable(tableIndex);
    if (this.table[tableIndex]) return (await this.block(tableIndex))!;
    const selfCluster = tableIndex * this.entriesPerBlock;
    const block = Buffer.alloc(this.clusterSize);
    setRefcount(block, 0, this.bits, 1); // the block describes itself
    const offset = selfCluster * this.clusterSize;
    const { file, header, overlaps } = this.context;
    const entryOffset = header.refcountTableOffset + tableIndex * REFCOUNT_TABLE_ENTRY_SIZE;
    this.context.checkWrite(offset, this.clusterSize, MetadataKind.RefcountBlock);
    this.context.checkWrite(entryOffset, REFCOUNT_TABLE_ENTRY_SIZE, MetadataKind.RefcountTable);
    await file.write(offset, block);
    await this.context.flush();
    this.table[tableIndex] = offset;
    this.blocks.set(offset, block);
    overlaps.add(MetadataKind.RefcountBlock, offset, this.clusterSize);
    const entry = Buffer.alloc(REFCOUNT_TABLE_ENTRY_SIZE);
    entry.writeBigUInt64BE(encodeRefcountTableEntry(offset));
    await file.write(entryOffset, entry);
    await this.context.flush();
    return block;
  }

  /**
   * Grows the table so that `tableIndex` fits: the new table and a refcount block for
   * it go at the start of a range no block covers yet, are written and flushed, the
   * header switches to the new table, and only then are the old table's clusters freed.
   */
  private async growTable(tableIndex: number): Promise<void> {
    const { file, header } = this.context;
    const range = Math.max(tableIndex, this.table.length);
    const entriesPerCluster = this.clusterSize / REFCOUNT_TABLE_ENTRY_SIZE;
    const tableClusters = Math.ceil(((range + 1) * 3) / 2 / entriesPerCluster);
    if (tableClusters + 1 > this.entriesPerBlock) throw new IoError('EFBIG', 'refcount table too large');
    const blockCluster = range * this.entriesPerBlock;
    const blockOffset = blockCluster * this.clusterSize;
    const tableOffset = blockOffset + this.clusterSize;
    const block = Buffer.alloc(this.clusterSize);
    for (let i = 0; i <= tableClusters; i++) setRefcount(block, i, this.bits, 1);
    const newTable = [...this.table, ...new Array<number>(tableClusters * entriesPerCluster - this.table.length).fill(0)];
    newTable[range] = blockOffset;
    const bytes = Buffer.alloc(tableClusters * this.clusterSize);
    newTable.forEach((offset, i) => bytes.writeBigUInt64BE(offset ? encodeRefcountTableEntry(offset) : 0n, i * REFCOUNT_TABLE_ENTRY_SIZE));
    this.context.checkWrite(blockOffset, this.clusterSize);
    this.context.checkWrite(tableOffset, bytes.length);
    await file.write(blockOffset, block);
    await file.write(tableOffset, bytes);
    await this.context.flush();
    const old = { offset: header.refcountTableOffset, clusters: header.refcountTableClusters };
    this.indexMetadata('remove');
    header.refcountTableOffset = tableOffset;
    header.refcountTableClusters = tableClusters;
    this.table = newTable;
    this.indexMetadata('add');
    await this.context.writeHeader();
    this.blocks.set(blockOffset, block);
    await this.release(old.offset, old.clusters * this.clusterSize);
  }

  /** One past the last cluster with a non-zero refcount: where the image ends. */
  async imageEnd(): Promise<number> {
    for (let tableIndex = this.table.length - 1; tableIndex >= 0; tableIndex--) {
      const block = await this.block(tableIndex);
      if (!block) continue;
      for (let index = this.entriesPerBlock - 1; index >= 0; index--) {
        if (getRefcount(block, index, this.bits) !== 0) return (tableIndex * this.entriesPerBlock + index + 1) * this.clusterSize;
      }
    }
    return 0;
  }

  /** Drops cached blocks (after a refcount rebuild rewrote them on disk). */
  async reload(): Promise<void> {
    this.indexMetadata('remove');
    this.blocks.clear();
    this.dirty.clear();
    this.freeHint = 0;
    this.freeByteOffset = 0;
    await this.load();
  }
}
