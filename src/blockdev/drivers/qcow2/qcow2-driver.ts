/*
 * The `qcow2` format driver: opens the image (header checks with QEMU's
 * texts, refusing what blockd cannot handle safely yet), opens the backing
 * chain from the header or from the options, and answers I/O through
 * Qcow2Image, qcow2-writes and compressed-writes. Table updates are cached:
 * a flush writes them back before the node flushes the file, and close
 * writes back what is left.
 */
import { genericError } from '../../../errors.js';
import type { BlockDriver, DriverExtent, DriverState, HostFileRange, NewInternalSnapshot, WriteFlags, ZeroFlags } from '../../block-driver.js';
import { IoError } from '../../io-error.js';
import { findSnapshot, snapshotInfo } from './snapshot-table.js';
import type { ChildEdge } from '../../child-edge.js';
import { CompatibleFeature, CompressionType, IncompatibleFeature, KNOWN_AUTOCLEAR_FEATURES, Qcow2FormatError } from './format-constants.js';
import { parseHeader, type Qcow2Header } from './header.js';
import { repairDirtyImage } from './dirty-repair.js';
import { nodeFilename } from '../../node-filename.js';
import { Qcow2Image } from './qcow2-image.js';
import { discard, resize, writeData, writeZeroes } from './qcow2-writes.js';
import { copyRangeFrom, copyRangeTo } from './qcow2-copy-range.js';
import { writeCompressed } from './compressed-writes.js';
import { PersistentBitmaps } from './persistent-bitmaps.js';

interface Qcow2Options {
  backing?: unknown;
  'cache-size'?: number;
  'l2-cache-size'?: number;
  encrypt?: unknown;
  'data-file'?: unknown;
}

const DEFAULT_L2_CACHE = 32 * 1024 * 1024;

class Qcow2State implements DriverState {
  constructor(private readonly image: Qcow2Image, private readonly bitmaps: PersistentBitmaps, public autoBackingFile: string) {}

  length(): number {
    return this.image.size;
  }

  get clusterSize(): number {
    return this.image.clusterSize;
  }

  async read(offset: number, buffer: Buffer): Promise<void> {
    this.image.checkUsable();
    const release = await this.image.locks.acquire(offset, offset + buffer.length, false);
    try {
      await this.image.readUnlocked(offset, buffer);
    } finally {
      release();
    }
  }

  /** zlib images only: blockd has no zstd (it refuses to open such images today, so this is the guard for later). */
  get supportsCompressedWrites(): boolean {
    return this.image.header.compressionType === CompressionType.ZLIB;
  }

  async write(offset: number, buffer: Buffer, flags: WriteFlags): Promise<void> {
    if (!flags.contentUnchanged) await this.bitmaps.intendWrite(offset, buffer.length);
    if (flags.compress) return writeCompressed(this.image, offset, buffer, flags);
    return writeData(this.image, offset, buffer, flags);
  }

  copyRangeFrom(offset: number, length: number, target: ChildEdge, targetOffset: number, flags: WriteFlags): Promise<void> {
    return copyRangeFrom(this.image, offset, length, target, targetOffset, flags);
  }

  async copyRangeTo(source: HostFileRange, offset: number, length: number, flags: WriteFlags): Promise<void> {
    if (!flags.contentUnchanged) await this.bitmaps.intendWrite(offset, length);
    return copyRangeTo(this.image, source, offset, length);
  }

  async writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (!flags.contentUnchanged) await this.bitmaps.intendWrite(offset, length);
    return writeZeroes(this.image, offset, length, flags);
  }

  async discard(offset: number, length: number): Promise<void> {
    await this.bitmaps.intendWrite(offset, length);
    return discard(this.image, offset, length);
  }

  async flush(): Promise<void> {
    this.image.checkUsable();
    // The node flushes the file after this.
    return this.image.flushMetadata();
  }

  async blockStatus(offset: number, length: number): Promise<DriverExtent> {
    this.image.checkUsable();
    const run = await this.image.firstRun(offset, length);
    const { entry } = run.mapping;
    const inCluster = offset % this.image.clusterSize;
    switch (entry.type) {
      case 'NORMAL': return { length: run.length, allocated: true, data: true, zero: false, hostOffset: entry.hostOffset + inCluster };
      case 'ZERO_ALLOC': return { length: run.length, allocated: true, data: false, zero: true, hostOffset: entry.hostOffset + inCluster };
      case 'ZERO_PLAIN': return { length: run.length, allocated: true, data: false, zero: true };
      case 'COMPRESSED': return { length: run.length, allocated: true, data: true, zero: false };
      default: return { length: run.length, allocated: false, data: false, zero: false };
    }
  }

  async truncate(size: number): Promise<void> {
    this.bitmaps.checkResizable();
    await resize(this.image, size);
    // The node resizes its bitmaps once the driver returns; the store below needs them at the new size already.
    this.image.node.bitmaps.resize(size);
    await this.bitmaps.resized();
  }

  /** Becoming writable: the checks a read-write open makes (the file below is writable already). */
  async reopen(writable: boolean): Promise<void> {
    if (!writable) return this.bitmaps.becameReadOnly(); // tables and bitmaps were written back before
    const { header } = this.image;
    const refusal = writeRefusal(header);
    if (refusal) throw genericError(refusal);
    if (header.incompatibleFeatures & IncompatibleFeature.DIRTY) {
      throw genericError('qcow2: the image was not closed cleanly (lazy refcounts); open it read-write once to repair it before reopening it read-write');
    }
  }

  /** What a read-write open writes first, once the file may be written. */
  async becameWritable(): Promise<void> {
    const { header } = this.image;
    if (header.autoclearFeatures & ~KNOWN_AUTOCLEAR_FEATURES) {
      header.autoclearFeatures &= KNOWN_AUTOCLEAR_FEATURES;
      await this.image.writeHeader();
    }
    await this.bitmaps.reopenReadWrite();
  }

  /** QEMU's reopen to read-only stores the persistent bitmaps while it still may write. */
  async prepareReadOnly(): Promise<void> {
    if (this.image.usable()) await this.image.metadata.run(() => this.bitmaps.store());
  }

  async canStoreNewDirtyBitmap(name: string, granularity: number): Promise<void> {
    this.bitmaps.canStoreNew(name, granularity);
  }

  removePersistentDirtyBitmap(name: string): Promise<void> {
    return this.bitmaps.remove(name);
  }

  storePersistentDirtyBitmaps(): Promise<void> {
    return this.bitmaps.storeInUse();
  }

  setBacking(backing: ChildEdge | undefined): void {
    this.image.backing = backing;
  }

  /** Rewrites the backing file name and format in the header (QEMU's bdrv_change_backing_file); the data must be flushed first. */
  async changeBackingFile(name: string | undefined, format: string | undefined): Promise<void> {
    const { header } = this.image;
    const previous = { backingFile: header.backingFile, backingFormat: header.backingFormat };
    header.backingFile = name;
    header.backingFormat = name === undefined ? undefined : format;
    try {
      await this.image.writeHeader();
      await this.image.flushMetadata();
    } catch (error) {
      Object.assign(header, previous);
      throw error;
    }
    this.autoBackingFile = name ?? '';
  }

  listSnapshots() {
    return this.image.snapshots.list().map(snapshotInfo);
  }

  async createSnapshot(snapshot: NewInternalSnapshot) {
    this.image.checkUsable();
    return snapshotInfo(await this.image.snapshots.create(snapshot));
  }

  async deleteSnapshot(id: string | undefined, name: string | undefined) {
    this.image.checkUsable();
    const found = findSnapshot(this.image.snapshots.list(), id, name) >= 0;
    // QEMU fails at the first write, the table's: the snapshot stays on disk.
    if (found && this.image.node.readOnly) throw new IoError('EPERM', 'Failed to remove snapshot from snapshot list: Operation not permitted');
    const deleted = await this.image.snapshots.delete(id, name);
    return deleted && snapshotInfo(deleted);
  }

  info() {
    const { header } = this.image;
    const v3 = header.version === 3;
    const image: Record<string, unknown> = {
      'cluster-size': this.image.clusterSize,
      'dirty-flag': (header.incompatibleFeatures & IncompatibleFeature.DIRTY) !== 0n,
      'format-specific': {
        type: 'qcow2',
        data: {
          compat: v3 ? '1.1' : '0.10',
          ...(v3 ? {
            'lazy-refcounts': (header.compatibleFeatures & CompatibleFeature.LAZY_REFCOUNTS) !== 0n,
            corrupt: (header.incompatibleFeatures & IncompatibleFeature.CORRUPT) !== 0n,
            'extended-l2': false,
          } : {}),
          'refcount-bits': 2 ** header.refcountOrder,
          ...(v3 && this.bitmaps.info().length ? { bitmaps: this.bitmaps.info() } : {}),
          'compression-type': header.compressionType === 1 ? 'zstd' : 'zlib',
        },
      },
    };
    if (header.backingFile) {
      image['backing-filename'] = header.backingFile;
      image['full-backing-filename'] = resolveBacking(this.image.file, header.backingFile);
      if (header.backingFormat) image['backing-filename-format'] = header.backingFormat;
    }
    return { filename: nodeFilename(this.image.node), image };
  }

  async close(): Promise<void> {
    if (this.image.usable()) {
      await this.image.metadata.run(() => this.bitmaps.store()).catch((error: unknown) => {
        this.image.log.error({ err: error }, `Lost persistent bitmaps during inactivation of node '${this.image.node.name}': ${(error as Error).message}`);
      });
    }
    // Even with cache.no-flush, the cached tables reach the file (QEMU writes its caches back too).
    if (!this.image.node.readOnly && this.image.usable()) {
      await this.image.flushMetadata().catch((error: unknown) => this.image.log.error({ err: error }, 'writing back qcow2 metadata on close failed'));
    }
    await this.image.settle();
  }
}

/** Why an image must not be written, in QEMU's words where QEMU refuses too. */
function writeRefusal(header: Qcow2Header): string | undefined {
  if (header.incompatibleFeatures & IncompatibleFeature.CORRUPT) return 'qcow2: Image is corrupt; cannot be opened read/write';
  return undefined;
}

/**
 * A backing name from the header, relative to the image's own directory as QEMU's
 * path_combine makes it: absolute names and names with a protocol prefix stay as
 * they are; otherwise the name replaces the last component of the image file's name.
 */
function resolveBacking(file: ChildEdge, name: string): string {
  const hasProtocol = (path: string) => {
    const colon = path.indexOf(':');
    return colon > 0 && (path.indexOf('/') < 0 || colon < path.indexOf('/'));
  };
  if (name.startsWith('/') || hasProtocol(name)) return name;
  // Through filters (a write log, a throttle) to the file whose directory holds the image, as QEMU's bdrv_dirname.
  let holder = file.child;
  for (let below = holder.primaryChild(); holder.driver.kind === 'filter' && below; below = holder.primaryChild()) holder = below.child;
  const base = holder.state.info().filename;
  let keep = base.lastIndexOf('/') + 1;
  if (hasProtocol(base)) keep = Math.max(keep, base.indexOf(':') + 1);
  return base.slice(0, keep) + name;
}

export const qcow2Driver: BlockDriver<Qcow2Options> = {
  name: 'qcow2',
  kind: 'format',
  handlesFua: true,
  supportsBacking: true,
  strongOptions: [],
  async open(context, options) {
    const { node } = context;
    if (options.encrypt !== undefined) throw genericError('qcow2 encryption is not supported by blockd');
    if (options['data-file'] !== undefined) throw genericError('qcow2 external data files are not supported by blockd');
    const file = await context.openChild('file', { name: 'file', role: 'storage' });
    const fileSize = file.length();
    const start = Buffer.alloc(Math.min(fileSize, 104));
    await file.read(0, start);
    if (start.length < 4 || start.readUInt32BE(0) !== 0x514649fb) throw genericError('Image is not in qcow2 format');
    const clusterBits = start.length >= 24 ? start.readUInt32BE(20) : 0;
    const cluster0 = Buffer.alloc(clusterBits >= 9 && clusterBits <= 21 ? 2 ** clusterBits : 512);
    await file.read(0, cluster0.subarray(0, Math.min(cluster0.length, fileSize)));
    let header;
    try {
      header = parseHeader(cluster0, fileSize);
    } catch (error) {
      if (error instanceof Qcow2FormatError) throw genericError(error.message);
      throw error;
    }
    header.size -= header.size % 512; // QEMU works in whole sectors
    // Tables past the end of the file would read as zeros: every cluster unallocated, or free for reuse.
    if (header.l1TableOffset + header.l1Size * 8 > fileSize) throw genericError('qcow2: the active L1 table lies past the end of the image file');
    if (header.refcountTableOffset + header.refcountTableClusters * 2 ** header.clusterBits > fileSize) {
      throw genericError('qcow2: the refcount table lies past the end of the image file');
    }
    const writable = !node.readOnly;
    if (header.cryptMethod !== 0) throw genericError('qcow2 encryption is not supported by blockd');
    if (header.incompatibleFeatures & IncompatibleFeature.EXTERNAL_DATA_FILE) throw genericError('qcow2 external data files are not supported by blockd');
    if (header.incompatibleFeatures & IncompatibleFeature.EXTENDED_L2) throw genericError('qcow2 extended L2 entries are not supported by blockd');
    if (header.compressionType !== 0) throw genericError('qcow2 compression type zstd is not supported by blockd');
    const refusal = writable ? writeRefusal(header) : undefined;
    if (refusal) throw genericError(refusal);

    // Like QEMU: a writer with lazy refcounts did not close the image; its refcounts are rebuilt before use.
    if (writable && header.incompatibleFeatures & IncompatibleFeature.DIRTY) await repairDirtyImage(file, header);

    const cacheBytes = options['l2-cache-size'] ?? options['cache-size'] ?? DEFAULT_L2_CACHE;
    let backing: ChildEdge | undefined;
    if (options.backing === undefined && header.backingFile) {
      backing = await context.openBackingFromImage!(resolveBacking(file, header.backingFile), header.backingFormat, { name: 'backing', role: 'cow' });
    } else if (options.backing !== undefined && options.backing !== null && options.backing !== '') {
      backing = await context.openChild('backing', { name: 'backing', role: 'cow' });
    }

    const image = new Qcow2Image(node, file, backing, header, cacheBytes, context.log);
    try {
      await image.load();
    } catch (error) {
      if (error instanceof Qcow2FormatError) throw genericError(error.message);
      throw error;
    }
    if (writable && header.autoclearFeatures & ~KNOWN_AUTOCLEAR_FEATURES) {
      // Unknown autoclear bits must be cleared before the first write (the extensions they vouch for go stale).
      header.autoclearFeatures &= KNOWN_AUTOCLEAR_FEATURES;
      await image.writeHeader();
    }
    const bitmaps = new PersistentBitmaps(image);
    try {
      await bitmaps.load();
    } catch (error) {
      if (error instanceof Qcow2FormatError) throw genericError(error.message);
      throw error;
    }
    // QEMU's auto_backing_file: the header's name, or the implicitly opened backing file's own name.
    const implicitBacking = options.backing === undefined && backing !== undefined;
    return new Qcow2State(image, bitmaps, implicitBacking && backing ? nodeFilename(backing.child) : header.backingFile ?? '');
  },
};
