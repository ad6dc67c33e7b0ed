/*
 * Persistent dirty bitmaps of an open qcow2 image, as QEMU 7.2's qcow2-bitmap.c keeps them:
 * loaded into the node's bitmaps at open (damaged ones refuse the open), marked in_use on
 * disk while a writer has the image, stored at close or when the image becomes read-only
 * (new data clusters and tables, a new directory, the header switched, then the old clusters
 * freed: a crash at any point only leaks), and removed one by one on request. Beyond QEMU,
 * while a writer has the image its bitmaps stay in the image, in use, with blockd's
 * write-intent record beside them (write-intent.ts): a bitmap is stored as soon as it is
 * added, and after a crash blockd reloads it whole rather than inconsistent.
 */
import { genericError } from '../../../errors.js';
import { DirtyBitmap } from '../../bitmaps/dirty-bitmap.js';
import { describeErrno, errnoOf } from '../../io-error.js';
import {
  BITMAP_AUTO, BITMAP_IN_USE, bitmapConstraintProblem, bitmapTableEntries, directoryEntrySize, parseBitmapDirectory,
  parseBitmapTable, readBitmapTable, serializeBitmapDirectory, serializeBitmapTable, type BitmapDirectoryEntry,
} from './bitmap-directory.js';
import { AutoclearFeature, MAX_BITMAP_DIRECTORY_SIZE, MAX_BITMAPS, Qcow2FormatError } from './format-constants.js';
import { MetadataKind } from './metadata-index.js';
import type { Qcow2Image } from './qcow2-image.js';
import { WRITE_INTENT_NAME, WriteIntent } from './write-intent.js';

/** query-named-block-nodes' Qcow2BitmapInfo. */
export interface Qcow2BitmapInfo {
  name: string;
  granularity: number;
  flags: ('in-use' | 'auto')[];
}

/** How a store leaves the image: bitmaps in use (a writer goes on) or not (closing), and the write-intent record. */
export interface StoreMode {
  inUse: boolean;
  intent: 'fresh' | 'carry' | 'drop';
}

export class PersistentBitmaps {
  /** The directory as it is on disk now (blockd holds the image's write lock, so nobody else changes it). */
  private entries: BitmapDirectoryEntry[] = [];
  /** Names of the bitmaps loaded from the directory (their entries may be rewritten even when not in use). */
  private readonly loaded = new Set<string>();
  /** The directory's names when the image was opened: they keep their places, later ones follow newest first, as QEMU stores at close. */
  private openedOrder: string[] = [];
  /** The write-intent record, while a writer keeps persistent bitmaps in the image. */
  private intent: WriteIntent | undefined;

  constructor(private readonly image: Qcow2Image) {}

  private get clusterSize(): number {
    return this.image.clusterSize;
  }

  private get node() {
    return this.image.node;
  }

  info(): Qcow2BitmapInfo[] {
    return this.entries.map((entry) => ({
      name: entry.name,
      granularity: 2 ** entry.granularityBits,
      flags: [...(entry.flags & BITMAP_IN_USE ? ['in-use' as const] : []), ...(entry.flags & BITMAP_AUTO ? ['auto' as const] : [])],
    }));
  }

  private async read(offset: number, length: number): Promise<Buffer> {
    const bytes = Buffer.alloc(length);
    // A damaged offset past 2^53 is past the end of any file: zeros, as QEMU reads there.
    if (!Number.isSafeInteger(offset + length)) return bytes;
    await this.image.file.read(offset, bytes);
    return bytes;
  }

  /**
   * qcow2_load_dirty_bitmaps: reads the directory and every consistent bitmap into the node
   * (throws Qcow2FormatError with QEMU's text when one is damaged; nothing is added then).
   * A writable image then has them marked in_use on disk before anything else is written.
   */
  async load(): Promise<void> {
    const extension = this.image.header.bitmaps;
    if (!extension) return;
    const dir = await this.read(extension.directoryOffset, extension.directorySize);
    this.entries = parseBitmapDirectory(dir, extension.nbBitmaps, this.clusterSize, this.image.size);
    this.openedOrder = this.entries.map((entry) => entry.name);
    const recovered = await this.readIntentRecord();
    const loaded: DirtyBitmap[] = [];
    try {
      for (const entry of this.entries) {
        if (entry.name === WRITE_INTENT_NAME) continue;
        const bitmap = new DirtyBitmap(this.image.size, 2 ** entry.granularityBits, entry.name);
        if (this.node.bitmaps.find(entry.name)) throw new Qcow2FormatError(`Bitmap already exists: ${entry.name}`);
        const inUse = (entry.flags & BITMAP_IN_USE) !== 0;
        if (!inUse || recovered) await this.loadData(entry, bitmap);
        // In use after blockd's writer: its last stored bits and every region the record marks cover whatever reached the disk.
        if (inUse && recovered) bitmap.merge(recovered);
        bitmap.persistent = true;
        // In use after another writer: it had it loaded and did not store it back, so its bits cannot be trusted.
        bitmap.inconsistent = inUse && !recovered;
        bitmap.enabled = (entry.flags & BITMAP_AUTO) !== 0 && !bitmap.inconsistent;
        bitmap.readonly = this.node.readOnly;
        this.node.bitmaps.add(bitmap);
        this.loaded.add(entry.name);
        loaded.push(bitmap);
      }
      if (!this.node.readOnly) await this.image.metadata.run(() => this.store({ inUse: true, intent: 'fresh' }));
    } catch (error) {
      for (const bitmap of loaded) this.node.bitmaps.remove(bitmap);
      this.loaded.clear();
      throw error;
    }
  }

  /** The write-intent record of blockd's last writer, when its autoclear bit still vouches for it. */
  private async readIntentRecord(): Promise<DirtyBitmap | undefined> {
    if (!(this.image.header.autoclearFeatures & AutoclearFeature.BLOCKD_WRITE_INTENT)) return undefined;
    const entry = this.entries.find((candidate) => candidate.name === WRITE_INTENT_NAME);
    if (!entry) return undefined;
    const record = new DirtyBitmap(this.image.size, 2 ** entry.granularityBits);
    await this.loadData(entry, record);
    return record;
  }

  /** Before a write to the image's data: the write-intent record marks its regions on disk (when a persistent bitmap records). */
  async intendWrite(offset: number, length: number): Promise<void> {
    if (!this.intent || !this.node.bitmaps.some((bitmap) => bitmap.persistent && bitmap.recording)) return;
    await this.intent.ensure(offset, length);
  }

  /** load_bitmap_data, a cluster at a time: table entry 0 is all clean, 1 all dirty. */
  private async loadData(entry: BitmapDirectoryEntry, bitmap: DirtyBitmap): Promise<void> {
    const table = await readBitmapTable((offset, length) => this.read(offset, length), entry, this.clusterSize, this.image.size);
    const failed = (code: string) => new Qcow2FormatError(`Could not read bitmap '${entry.name}' from image: ${describeErrno(code)}`);
    const granulesPerCluster = this.clusterSize * 8;
    const bytesPerCluster = granulesPerCluster * bitmap.granularity;
    for (const [k, tableEntry] of table.entries()) {
      if (tableEntry.kind === 'ones') bitmap.set(k * bytesPerCluster, Math.min(bytesPerCluster, this.image.size - k * bytesPerCluster));
      if (tableEntry.kind !== 'data') continue;
      const cluster = await this.read(tableEntry.offset, this.clusterSize).catch((error: unknown) => {
        throw failed(errnoOf(error));
      });
      bitmap.orGranuleBytes(k * granulesPerCluster, cluster);
    }
  }

  /** qcow2_reopen_bitmaps_rw: the image became writable; its bitmaps become writable and in use. */
  async reopenReadWrite(): Promise<void> {
    for (const entry of this.entries) {
      if (entry.name !== WRITE_INTENT_NAME && !this.node.bitmaps.find(entry.name)) throw genericError(`Unexpected bitmap '${entry.name}' in image '${this.image.file.child.name}'`);
    }
    for (const bitmap of this.node.bitmaps.list()) if (bitmap.persistent) bitmap.readonly = false;
    await this.image.metadata.run(() => this.store({ inUse: true, intent: 'fresh' }));
  }

  /** qcow2_reopen_bitmaps_ro, after storing: the bitmaps can no longer change. */
  becameReadOnly(): void {
    for (const bitmap of this.node.bitmaps.list()) if (bitmap.persistent) bitmap.readonly = true;
  }

  /**
   * qcow2_co_can_store_new_dirty_bitmap: throws QEMU's error when the image cannot keep a new
   * persistent bitmap of this name and granularity.
   */
  canStoreNew(name: string, granularity: number): void {
    if (this.node.bitmaps.find(name)) throw genericError(`Bitmap already exists: ${name}`);
    const refuse = (why: string) => genericError(`Can't make bitmap '${name}' persistent in '${this.node.name}': ${why}`);
    if (this.image.header.version < 3) throw refuse('Cannot store dirty bitmaps in qcow2 v2 files');
    if (name === WRITE_INTENT_NAME) throw refuse('the name is reserved for blockd\'s write-intent record');
    const problem = bitmapConstraintProblem(name, granularity, this.image.size, this.clusterSize);
    if (problem) throw refuse(problem);
    const persistent = this.node.bitmaps.list().filter((bitmap) => bitmap.persistent && bitmap.name !== undefined);
    const directorySize = persistent.reduce((size, bitmap) => size + directoryEntrySize(bitmap.name!), directoryEntrySize(name));
    if (persistent.length + 1 > MAX_BITMAPS) throw refuse('Maximum number of persistent bitmaps is already reached');
    if (directorySize > MAX_BITMAP_DIRECTORY_SIZE) throw refuse('Not enough space in the bitmap directory');
  }

  /** qcow2_truncate_bitmaps_check: every bitmap of the image must be loaded and usable to follow a resize. */
  checkResizable(): void {
    for (const entry of this.entries) {
      if (entry.name === WRITE_INTENT_NAME) continue; // follows the resize itself
      const bitmap = this.node.bitmaps.find(entry.name);
      if (!bitmap) throw genericError('Cannot resize qcow2 with persistent bitmaps that were not loaded into memory');
      if (bitmap.busy) throw genericError(`Bitmap '${entry.name}' is currently in use by another operation and cannot be used`);
      if (bitmap.readonly) throw genericError(`Bitmap '${entry.name}' is readonly and cannot be modified`);
      if (bitmap.inconsistent) throw genericError(`Bitmap '${entry.name}' is inconsistent and cannot be used`);
    }
  }

  /**
   * qcow2_store_persistent_dirty_bitmaps: writes every persistent, consistent, writable bitmap
   * of the node (flags: auto when enabled; in_use while a writer keeps the image, cleared at
   * close); bitmaps of the image that are inconsistent or not loaded keep their entries. The
   * write-intent record goes with them: a fresh one when a writer opens the image, the current
   * one carried over while it writes (a region it marked may hold a write no bitmap shows
   * yet), none at close. The caller holds the metadata mutex.
   */
  async store(mode: StoreMode = { inUse: false, intent: 'drop' }): Promise<void> {
    const list = this.entries.filter((entry) => entry.name !== WRITE_INTENT_NAME).map((entry) => ({ ...entry }));
    const toStore: { entry: BitmapDirectoryEntry; bitmap: DirtyBitmap }[] = [];
    const replaced: BitmapDirectoryEntry[] = this.entries.filter((entry) => entry.name === WRITE_INTENT_NAME);
    let directorySize = list.reduce((size, entry) => size + directoryEntrySize(entry.nameBytes ?? entry.name), 0);
    // Newest first, as QEMU walks a node's bitmaps: new ones join the directory in that order.
    for (const bitmap of this.node.bitmaps.list()) {
      const name = bitmap.name;
      if (!bitmap.persistent || bitmap.inconsistent || name === undefined || bitmap.readonly) continue;
      const problem = bitmapConstraintProblem(name, bitmap.granularity, this.image.size, this.clusterSize);
      if (problem) throw genericError(`Bitmap '${name}' doesn't satisfy the constraints: ${problem}`);
      let entry = list.find((candidate) => candidate.name === name);
      if (!entry) {
        if (list.length + 1 > MAX_BITMAPS) throw genericError('Too many persistent bitmaps');
        directorySize += directoryEntrySize(name);
        if (directorySize > MAX_BITMAP_DIRECTORY_SIZE) throw genericError('Bitmap directory is too large');
        entry = { name, tableOffset: 0, tableSize: 0, flags: 0, granularityBits: 0 };
        list.push(entry);
      } else {
        if (!(entry.flags & BITMAP_IN_USE) && !this.loaded.has(name)) throw genericError(`Bitmap '${name}' already exists in the image`);
        replaced.push({ ...entry });
      }
      // A bitmap a job froze is disabled only while its successor records for it: it stays 'auto' on disk.
      entry.flags = (bitmap.recording ? BITMAP_AUTO : 0) | (mode.inUse ? BITMAP_IN_USE : 0);
      entry.granularityBits = Math.log2(bitmap.granularity);
      toStore.push({ entry, bitmap });
    }
    const newestFirst = this.node.bitmaps.list().map((bitmap) => bitmap.name);
    const place = (entry: BitmapDirectoryEntry) => {
      const opened = this.openedOrder.indexOf(entry.name);
      return opened >= 0 ? opened : this.openedOrder.length + newestFirst.indexOf(entry.name);
    };
    list.sort((a, b) => place(a) - place(b));
    const keepsIntent = mode.intent !== 'drop' && list.length > 0;
    if (toStore.length === 0 && !keepsIntent && replaced.length === 0) return;
    // Written in directory order, as QEMU allocates them; the record last.
    toStore.sort((a, b) => list.indexOf(a.entry) - list.indexOf(b.entry));
    let intent: { record: WriteIntent; stored: DirtyBitmap; entry: BitmapDirectoryEntry } | undefined;
    if (keepsIntent) {
      const record = mode.intent === 'carry' && this.intent ? this.intent : WriteIntent.fresh(this.image);
      const stored = new DirtyBitmap(record.bits.length, record.bits.granularity);
      stored.merge(record.bits);
      const entry = { name: WRITE_INTENT_NAME, tableOffset: 0, tableSize: 0, flags: BITMAP_IN_USE, granularityBits: Math.log2(stored.granularity) };
      list.push(entry);
      intent = { record, stored, entry };
    }
    if (this.node.readOnly) throw genericError('No write access');
    const written: BitmapDirectoryEntry[] = [];
    try {
      for (const job of toStore) {
        await this.storeBitmap(job.entry, job.bitmap);
        written.push(job.entry);
      }
      if (intent) {
        await this.storeBitmap(intent.entry, intent.stored, { everyCluster: true });
        written.push(intent.entry);
      }
      await this.switchDirectory(list, intent !== undefined);
    } catch (error) {
      for (const entry of written) await this.freeBitmapClusters(entry);
      await this.image.refcounts.writeBack();
      throw error;
    }
    if (intent) intent.record.placed(this.pendingTables.get(intent.entry)!, intent.stored);
    this.intent = intent?.record;
    this.pendingTables.clear();
    for (const { entry } of toStore) this.loaded.add(entry.name);
    // The new directory is durable: the old tables and data are garbage now.
    for (const entry of replaced) await this.freeBitmapClusters(entry);
    await this.image.refcounts.writeBack();
    await this.image.barrier.flush();
  }

  /** While a writer keeps the image: the bitmaps as they are now go into it, in use (a new one exists in the image once added). */
  async storeInUse(): Promise<void> {
    if (this.node.readOnly) return;
    await this.image.metadata.run(() => this.store({ inUse: true, intent: 'carry' }));
  }

  /** The image was resized (the node's bitmaps already follow): the record follows, and everything is stored at the new size. */
  async resized(): Promise<void> {
    this.intent?.resize(this.image.size);
    if (this.entries.length > 0) await this.storeInUse();
  }

  /** store_bitmap: data clusters for the parts with a dirty bit, then the table; fills in the entry. */
  private async storeBitmap(entry: BitmapDirectoryEntry, bitmap: DirtyBitmap, options: { everyCluster?: boolean } = {}): Promise<void> {
    const granulesPerCluster = this.clusterSize * 8;
    const tableSize = bitmapTableEntries(this.image.size, bitmap.granularity, this.clusterSize);
    const parts: { index: number; bytes: Buffer }[] = [];
    const clean = Buffer.alloc(this.clusterSize);
    for (let index = 0; index < tableSize; index++) {
      const first = index * granulesPerCluster;
      const bytes = bitmap.granuleBytes(first, Math.min(granulesPerCluster, bitmap.granules - first));
      // The write-intent record keeps a cluster for every entry: marking a region rewrites it in place.
      if (options.everyCluster || !bytes.equals(clean.subarray(0, bytes.length))) parts.push({ index, bytes });
    }
    const dataOffsets = new Array<number>(tableSize).fill(0);
    const hosts = parts.length ? await this.image.refcounts.allocate(parts.length) : [];
    const tableClusters = Math.ceil((tableSize * 8) / this.clusterSize);
    const [tableOffset] = await this.image.refcounts.allocate(tableClusters, { contiguous: true });
    entry.tableOffset = tableOffset!;
    entry.tableSize = tableSize;
    parts.forEach((part, i) => (dataOffsets[part.index] = hosts[i]!));
    // Recorded before any write, so a failure frees them all.
    this.pendingTables.set(entry, dataOffsets);
    for (const [i, part] of parts.entries()) {
      const cluster = Buffer.alloc(this.clusterSize);
      part.bytes.copy(cluster);
      this.image.checkWrite(hosts[i]!, this.clusterSize);
      await this.image.file.write(hosts[i]!, cluster);
    }
    const table = serializeBitmapTable(dataOffsets);
    this.image.checkWrite(tableOffset!, table.length);
    await this.image.file.write(tableOffset!, table);
  }

  /** Data offsets of tables written by this store and not yet in the directory (freed without reading them back). */
  private readonly pendingTables = new Map<BitmapDirectoryEntry, number[]>();

  /** free_bitmap_clusters: the data clusters of a table and the table itself (a table that no longer reads is left as a leak). */
  private async freeBitmapClusters(entry: BitmapDirectoryEntry): Promise<void> {
    let dataOffsets = this.pendingTables.get(entry);
    this.pendingTables.delete(entry);
    if (!dataOffsets) {
      const table = parseBitmapTable(await this.read(entry.tableOffset, entry.tableSize * 8).catch(() => Buffer.alloc(0)), this.clusterSize);
      if (!table?.length) return;
      dataOffsets = table.flatMap((tableEntry) => (tableEntry.kind === 'data' ? [tableEntry.offset] : []));
    }
    for (const offset of dataOffsets) if (offset) await this.releaseCounted(offset, this.clusterSize);
    await this.releaseCounted(entry.tableOffset, entry.tableSize * 8);
  }

  /**
   * Drops a reference to each cluster of the range that still has one. A damaged table may name
   * a cluster twice, or one already free: QEMU's decrement fails there and leaves it as it is,
   * without calling the image corrupt, and so does this.
   */
  private async releaseCounted(offset: number, length: number): Promise<void> {
    const { refcounts } = this.image;
    const first = Math.floor(offset / this.clusterSize);
    for (let cluster = first; cluster * this.clusterSize < offset + length; cluster++) {
      if (await refcounts.get(cluster) > 0) await refcounts.release(cluster * this.clusterSize, this.clusterSize);
    }
  }

  /**
   * update_ext_header_and_dir: writes `list` as a new directory (or none when empty), makes it
   * and every refcount durable, switches the header to it, then frees the old directory.
   */
  private async switchDirectory(list: BitmapDirectoryEntry[], writeIntent = false): Promise<void> {
    const { header, overlaps } = this.image;
    if (list.length > MAX_BITMAPS) throw genericError('Too many persistent bitmaps');
    const old = header.bitmaps;
    const oldAutoclear = header.autoclearFeatures;
    let created: { offset: number; size: number } | undefined;
    if (list.length) {
      const dir = serializeBitmapDirectory(list, this.clusterSize, this.image.size);
      const [offset] = await this.image.refcounts.allocate(Math.ceil(dir.length / this.clusterSize), { contiguous: true });
      created = { offset: offset!, size: dir.length };
      try {
        this.image.checkWrite(created.offset, dir.length);
        await this.image.file.write(created.offset, dir);
        // Data, tables, directory and their refcounts reach the disk before the header names them.
        await this.image.writeBackMetadata();
        await this.image.refcounts.writeBack();
        await this.image.barrier.flush();
      } catch (error) {
        await this.image.refcounts.release(created.offset, created.size);
        throw error;
      }
      header.autoclearFeatures |= AutoclearFeature.BITMAPS;
    } else {
      header.autoclearFeatures &= ~AutoclearFeature.BITMAPS;
    }
    if (writeIntent) header.autoclearFeatures |= AutoclearFeature.BLOCKD_WRITE_INTENT;
    else header.autoclearFeatures &= ~AutoclearFeature.BLOCKD_WRITE_INTENT;
    header.bitmaps = created ? { nbBitmaps: list.length, directorySize: created.size, directoryOffset: created.offset } : undefined;
    try {
      await this.image.writeHeader();
    } catch (error) {
      header.bitmaps = old;
      header.autoclearFeatures = oldAutoclear;
      if (created) await this.image.refcounts.release(created.offset, created.size);
      throw error;
    }
    this.entries = list.map((entry) => ({ ...entry }));
    if (old) {
      overlaps.remove(MetadataKind.BitmapDirectory, old.directoryOffset, old.directorySize);
      await this.image.refcounts.release(old.directoryOffset, old.directorySize);
    }
    if (created) overlaps.add(MetadataKind.BitmapDirectory, created.offset, created.size);
  }

  /** qcow2_co_remove_persistent_dirty_bitmap: the bitmap leaves the image now, its clusters freed. Absent: nothing to do. */
  async remove(name: string): Promise<void> {
    await this.image.metadata.run(async () => {
      const entry = this.entries.find((candidate) => candidate.name === name);
      if (!entry) return;
      // The write-intent record goes with the last bitmap.
      const remaining = this.entries.filter((candidate) => candidate !== entry);
      const record = remaining.find((candidate) => candidate.name === WRITE_INTENT_NAME);
      const gone = record && remaining.length === 1 ? [entry, record] : [entry];
      try {
        await this.switchDirectory(remaining.filter((candidate) => !gone.includes(candidate)), gone.length === 1 && this.intent !== undefined);
      } catch (error) {
        throw genericError(`Failed to update bitmap extension: ${error instanceof Error ? error.message : String(error)}`);
      }
      if (gone.length === 2) this.intent = undefined;
      this.loaded.delete(name);
      for (const freed of gone) await this.freeBitmapClusters(freed);
      await this.image.refcounts.writeBack();
      await this.image.barrier.flush();
    });
  }
}
