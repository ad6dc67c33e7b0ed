/*
 * The qcow2 mapping from guest clusters to L2 entries: the active L1 table in
 * memory and an LRU cache of L2 tables that is written back, as QEMU's is:
 * updates change the cached tables, and writeBack() (on flush, close, or a
 * cache full of dirty tables) writes them after a barrier has made the data
 * and refcounts they point to durable. New tables are written before the L1
 * entries that link them, and a shared table (snapshots) that was copied is
 * released only once the new link is durable. Callers hold the image's
 * metadata mutex.
 */
import { IoError } from '../../io-error.js';
import { L1_ENTRY_SIZE, L2_ENTRY_SIZE } from './format-constants.js';
import { MetadataKind } from './metadata-index.js';
import type { RefcountContext, Refcounts } from './refcounts.js';
import { decodeL1Entry, decodeL2Entry, encodeL1Entry, type L2Entry, type L2EntryContext } from './table-entries.js';

export interface TablesContext extends RefcountContext {
  refcounts: Refcounts;
  /** Drops references once the entries that held them are durable (after the next write-back). */
  releaseLater(offset: number, length: number): void;
}

export interface MappedCluster {
  raw: bigint;
  entry: L2Entry;
}

const UNALLOCATED: MappedCluster = { raw: 0n, entry: { type: 'UNALLOCATED', copied: false } };

export class ClusterTables {
  readonly clusterSize: number;
  readonly entriesPerTable: number;
  private l1: bigint[] = [];
  private readonly cache = new Map<number, Buffer>();
  /** Tables changed in memory, with the range of entries to write. */
  private readonly dirty = new Map<number, [number, number]>();
  /** L1 entries to write once the tables they link are durable. */
  private readonly pendingL1 = new Map<number, bigint>();
  private readonly maxCachedTables: number;
  private readonly entryContext: L2EntryContext;
  /**
   * The mappings of raw entries 0 (unallocated) and 1 (zero, v3), decoded once and shared: most
   * entries of sparse and fresh images are one of them, and decoding each (a bigint and an object
   * per entry) was the largest allocation of a sparse mirror.
   */
  private readonly commonMappings: (MappedCluster | undefined)[];

  constructor(private readonly context: TablesContext, cacheBytes: number) {
    const { header } = context;
    this.clusterSize = 2 ** header.clusterBits;
    this.entriesPerTable = this.clusterSize / L2_ENTRY_SIZE;
    this.maxCachedTables = Math.max(16, Math.floor(cacheBytes / this.clusterSize));
    this.entryContext = { clusterBits: header.clusterBits, version: header.version, externalDataFile: false };
    this.commonMappings = [0n, 1n].map((raw) => {
      const entry = decodeL2Entry(raw, this.entryContext);
      return entry.type === 'INVALID' ? undefined : Object.freeze({ raw, entry: Object.freeze(entry) });
    });
  }

  async load(): Promise<void> {
    const { header, file } = this.context;
    const bytes = Buffer.alloc(header.l1Size * L1_ENTRY_SIZE);
    await file.read(header.l1TableOffset, bytes);
    this.l1 = [];
    for (let i = 0; i < header.l1Size; i++) {
      const raw = bytes.readBigUInt64BE(i * L1_ENTRY_SIZE);
      const entry = decodeL1Entry(raw, header.clusterBits);
      if (entry.type === 'INVALID') this.context.corrupt(`${entry.reason} (L1 index: ${hex(BigInt(i))})`);
      this.l1.push(raw);
    }
    const { overlaps } = this.context;
    overlaps.add(MetadataKind.ActiveL1, header.l1TableOffset, header.l1Size * L1_ENTRY_SIZE);
    for (const raw of this.l1) overlaps.add(MetadataKind.ActiveL2, this.l2Offset(raw), this.l2Offset(raw) ? this.clusterSize : 0);
  }

  private l2Offset(raw: bigint): number {
    const entry = decodeL1Entry(raw, this.context.header.clusterBits);
    return entry.type === 'ALLOCATED' ? entry.l2Offset : 0;
  }

  private async table(offset: number): Promise<Buffer> {
    let table = this.cache.get(offset);
    if (table) {
      this.cache.delete(offset); // re-insert: most recently used last
    } else {
      // A table cut off by the end of the file would read as zeros: unallocated clusters instead of data.
      if (offset + this.clusterSize > this.context.file.length()) this.context.corrupt(`L2 table at ${hex(BigInt(offset))} lies past the end of the image file`);
      const read = Buffer.alloc(this.clusterSize);
      await this.context.file.read(offset, read);
      // Another caller may have loaded (and changed) the table meanwhile: its copy wins.
      table = this.cache.get(offset) ?? read;
      this.cache.delete(offset);
    }
    // Make room first: the table the caller is about to change must stay cached.
    this.evictClean(this.maxCachedTables - 1);
    this.cache.set(offset, table);
    return table;
  }

  /** Keeps the cache to its size; dirty tables stay until written back. */
  private evictClean(limit = this.maxCachedTables): void {
    for (const offset of this.cache.keys()) {
      if (this.cache.size <= limit) return;
      if (!this.dirty.has(offset)) this.cache.delete(offset);
    }
  }

  /** Whether so many tables are dirty that they should be written back now. */
  needsWriteBack(): boolean {
    return this.dirty.size > this.maxCachedTables;
  }

  hasPendingWrites(): boolean {
    return this.dirty.size > 0 || this.pendingL1.size > 0;
  }

  /** The L2 entries of `count` clusters from `cluster` on, within one L2 table. */
  async lookupRun(cluster: number, count: number): Promise<MappedCluster[]> {
    const l1Index = Math.floor(cluster / this.entriesPerTable);
    const first = cluster % this.entriesPerTable;
    const n = Math.min(count, this.entriesPerTable - first);
    const l2 = l1Index < this.l1.length ? this.l2Offset(this.l1[l1Index]!) : 0;
    if (l2 === 0) return new Array<MappedCluster>(n).fill(UNALLOCATED);
    if (l2 % this.clusterSize !== 0) this.context.corrupt(`L2 table offset ${hex(BigInt(l2))} unaligned (L1 index: ${hex(BigInt(l1Index))})`);
    const table = await this.table(l2);
    const run: MappedCluster[] = [];
    for (let i = first; i < first + n; i++) {
      const low = table.readUInt32BE(i * L2_ENTRY_SIZE + 4);
      const common = low <= 1 && table.readUInt32BE(i * L2_ENTRY_SIZE) === 0 ? this.commonMappings[low] : undefined;
      if (common) {
        run.push(common);
        continue;
      }
      const raw = table.readBigUInt64BE(i * L2_ENTRY_SIZE);
      const entry = decodeL2Entry(raw, this.entryContext);
      if (entry.type === 'INVALID') this.context.corrupt(`Invalid cluster entry found  (L2 offset: ${hex(BigInt(l2))}, L2 index: ${hex(BigInt(i))}): ${entry.reason}`);
      run.push({ raw, entry });
    }
    return run;
  }

  // ---- for internal snapshots (internal-snapshots.ts), which walk whole tables ----

  /** The active L1 entries as they are in memory (on disk too, after a write-back). */
  activeL1(): readonly bigint[] {
    return this.l1;
  }

  /** Changes an active L1 entry in memory; it reaches the disk with the next write-back. */
  setL1Entry(l1Index: number, raw: bigint): void {
    this.l1[l1Index] = raw;
    this.pendingL1.set(l1Index, raw);
  }

  /** The L2 table at `offset`, through the cache (active or not). */
  readTable(offset: number): Promise<Buffer> {
    return this.table(offset);
  }

  /** Changes raw entries of a cached active table in place (written back later). */
  setTableEntries(offset: number, entries: [number, bigint][]): void {
    const table = this.cache.get(offset);
    if (!table) throw new Error(`L2 table at ${offset} is not cached`);
    this.setInTable(offset, table, entries);
  }

  /** A table whose cluster was freed leaves the cache (it holds nothing once the cluster is reused). */
  forgetTable(offset: number): void {
    if (!this.dirty.has(offset)) this.cache.delete(offset);
  }

  async lookup(cluster: number): Promise<MappedCluster> {
    return (await this.lookupRun(cluster, 1))[0]!;
  }

  /**
   * Sets raw L2 entries in the cached tables (written back later). Tables that do not
   * exist are created, shared ones copied.
   */
  async setEntries(updates: Map<number, bigint>): Promise<void> {
    const byTable = new Map<number, [number, bigint][]>();
    for (const [cluster, raw] of updates) {
      const l1Index = Math.floor(cluster / this.entriesPerTable);
      if (!byTable.has(l1Index)) byTable.set(l1Index, []);
      byTable.get(l1Index)!.push([cluster % this.entriesPerTable, raw]);
    }
    for (const [l1Index, entries] of byTable) {
      if (l1Index >= this.l1.length) throw new IoError('EIO', `guest cluster beyond the L1 table (index ${l1Index})`);
      const current = this.l1[l1Index]!;
      const linked = decodeL1Entry(current, this.context.header.clusterBits);
      if (linked.type === 'ALLOCATED' && linked.copied) {
        this.setInTable(linked.l2Offset, await this.table(linked.l2Offset), entries);
      } else {
        await this.replaceTable(l1Index, linked.type === 'ALLOCATED' ? linked.l2Offset : 0, entries);
      }
    }
  }

  private setInTable(offset: number, table: Buffer, entries: [number, bigint][]): void {
    let [low, high] = this.dirty.get(offset) ?? [Infinity, -1];
    for (const [index, raw] of entries) {
      table.writeBigUInt64BE(raw, index * L2_ENTRY_SIZE);
      low = Math.min(low, index);
      high = Math.max(high, index);
    }
    this.dirty.set(offset, [low, high]);
  }

  /** A new table (empty, or a copy of a shared one), linked in memory now and on disk after write-back. */
  private async replaceTable(l1Index: number, sharedOffset: number, entries: [number, bigint][]): Promise<void> {
    const table = sharedOffset ? Buffer.from(await this.table(sharedOffset)) : Buffer.alloc(this.clusterSize);
    const [offset] = await this.context.refcounts.allocate(1);
    this.cache.set(offset!, table);
    this.setInTable(offset!, table, entries);
    this.dirty.set(offset!, [0, this.entriesPerTable - 1]); // the whole table goes to disk
    const raw = encodeL1Entry(offset!, true);
    // The table it replaces is no longer active: QEMU's default check does not cover inactive L2 tables.
    if (sharedOffset) this.context.overlaps.remove(MetadataKind.ActiveL2, sharedOffset, this.clusterSize);
    this.context.overlaps.add(MetadataKind.ActiveL2, offset!, this.clusterSize);
    this.l1[l1Index] = raw;
    this.pendingL1.set(l1Index, raw);
    if (sharedOffset) this.context.releaseLater(sharedOffset, this.clusterSize);
  }

  /**
   * Writes the refcounts, a barrier (data and refcounts durable before anything points
   * at them), the dirty tables, then (after another barrier) the L1 entries that link new ones.
   */
  async writeBack(): Promise<void> {
    const { file, refcounts } = this.context;
    await refcounts.writeBack();
    await this.context.flush();
    // QEMU checks whole tables before writing them, and each L1 entry (as it writes them one by one).
    for (const offset of this.dirty.keys()) this.context.checkWrite(offset, this.clusterSize, MetadataKind.ActiveL2);
    for (const l1Index of this.pendingL1.keys()) {
      this.context.checkWrite(this.context.header.l1TableOffset + l1Index * L1_ENTRY_SIZE, L1_ENTRY_SIZE, MetadataKind.ActiveL1);
    }
    for (const [offset, [low, high]] of this.dirty) {
      const table = this.cache.get(offset)!;
      await file.write(offset + low * L2_ENTRY_SIZE, table.subarray(low * L2_ENTRY_SIZE, (high + 1) * L2_ENTRY_SIZE));
    }
    this.dirty.clear();
    if (this.pendingL1.size) {
      await this.context.flush(); // tables durable before anything links them
      const bytes = Buffer.alloc(L1_ENTRY_SIZE);
      for (const [l1Index, raw] of this.pendingL1) {
        bytes.writeBigUInt64BE(raw);
        await file.write(this.context.header.l1TableOffset + l1Index * L1_ENTRY_SIZE, bytes);
      }
      this.pendingL1.clear();
    }
    this.evictClean();
  }

  /** Makes room in L1 for a disk of `size` bytes: a new, larger table, switched to in the header. */
  async growFor(size: number): Promise<void> {
    const { header, refcounts, file } = this.context;
    const needed = Math.ceil(size / (this.clusterSize * this.entriesPerTable));
    if (needed <= this.l1.length) return;
    // The new L1 copies the in-memory one, whose links must all point at tables already on disk.
    if (this.hasPendingWrites()) {
      await this.writeBack();
      await this.context.flush();
    }
    if (needed * L1_ENTRY_SIZE > 32 * 1024 * 1024) throw new IoError('EFBIG', 'Active L1 table too large');
    const entries = [...this.l1, ...new Array<bigint>(needed - this.l1.length).fill(0n)];
    const bytes = Buffer.alloc(Math.ceil((needed * L1_ENTRY_SIZE) / this.clusterSize) * this.clusterSize);
    entries.forEach((raw, i) => bytes.writeBigUInt64BE(raw, i * L1_ENTRY_SIZE));
    const clusters = bytes.length / this.clusterSize;
    const offsets = await refcounts.allocate(clusters, { contiguous: true });
    this.context.checkWrite(offsets[0]!, bytes.length);
    await file.write(offsets[0]!, bytes);
    await refcounts.writeBack(); // the new table's clusters are counted before the header points at them
    await this.context.flush();
    const old = { offset: header.l1TableOffset, size: header.l1Size };
    this.context.overlaps.remove(MetadataKind.ActiveL1, header.l1TableOffset, header.l1Size * L1_ENTRY_SIZE);
    header.l1TableOffset = offsets[0]!;
    header.l1Size = needed;
    this.context.overlaps.add(MetadataKind.ActiveL1, header.l1TableOffset, header.l1Size * L1_ENTRY_SIZE);
    await this.context.writeHeader();
    this.l1 = entries;
    if (old.size > 0) await refcounts.release(old.offset, old.size * L1_ENTRY_SIZE);
  }
}

export function hex(value: bigint): string {
  return `0x${value.toString(16)}`;
}
