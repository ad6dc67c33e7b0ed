/*
 * An open qcow2 image: the header, refcounts and cluster tables, the read and
 * block-status paths, header rewrites and corruption handling. Writes live in
 * qcow2-writes.ts. Requests lock the guest clusters they touch (shared for
 * reads and in-place writes, exclusive for anything that changes a mapping),
 * so a cluster is never freed or reused while a request still uses it.
 */
import type { Logger } from 'pino';
import type { ChildEdge } from '../../child-edge.js';
import { FlushCoalescer } from '../../flush-coalescer.js';
import { IoError } from '../../io-error.js';
import { Mutex } from '../../mutex.js';
import type { BlockNode } from '../../node.js';
import { RangeLock } from '../../range-lock.js';
import { ClusterTables, type MappedCluster } from './cluster-tables.js';
import { readSnapshotTable } from './consistency-check.js';
import { InternalSnapshots } from './internal-snapshots.js';
import { IncompatibleFeature, L1_ENTRY_SIZE, Qcow2FormatError } from './format-constants.js';
import { serializeHeader, type Qcow2Header } from './header.js';
import { Refcounts } from './refcounts.js';
import { inflateAtMost } from './inflate.js';
import { MetadataIndex, MetadataKind, metadataName } from './metadata-index.js';

/** One run of guest clusters with the same kind of mapping. */
export interface MappedRun {
  offset: number;
  length: number;
  mapping: MappedCluster;
}

export class Qcow2Image {
  readonly clusterSize: number;
  readonly refcounts: Refcounts;
  readonly tables: ClusterTables;
  readonly locks = new RangeLock();
  readonly metadata = new Mutex();
  readonly barrier: FlushCoalescer;
  private failed: string | undefined;
  /** Set once load() read the tables: corruption found before that refuses the open instead. */
  private loaded = false;
  /** The header write that marks the image corrupt, awaited by close. */
  private marking: Promise<void> | undefined;
  private readonly inflated = new Map<bigint, Buffer>();
  /** References to drop once the entries that held them are durable. */
  private pendingReleases: [number, number][] = [];
  /** The internal snapshots (set by load). */
  snapshots!: InternalSnapshots;
  /** Where the metadata is, for the overlap check before every write. */
  readonly overlaps: MetadataIndex;

  constructor(
    readonly node: BlockNode,
    readonly file: ChildEdge,
    public backing: ChildEdge | undefined,
    readonly header: Qcow2Header,
    cacheBytes: number,
    readonly log: Logger,
  ) {
    this.clusterSize = 2 ** header.clusterBits;
    this.barrier = new FlushCoalescer(() => file.flush());
    this.overlaps = new MetadataIndex(this.clusterSize);
    const context = {
      file,
      header,
      flush: () => this.barrier.flush(),
      writeHeader: () => this.writeHeader(),
      corrupt: (message: string): never => this.corrupt(message),
      overlaps: this.overlaps,
      checkWrite: (offset: number, length: number, ignore?: MetadataKind) => this.checkWrite(offset, length, ignore),
    };
    this.refcounts = new Refcounts(context);
    this.tables = new ClusterTables({ ...context, refcounts: this.refcounts, releaseLater: (offset, length) => this.releaseLater(offset, length) }, cacheBytes);
  }

  releaseLater(offset: number, length: number): void {
    this.pendingReleases.push([offset, length]);
  }

  /**
   * Makes the metadata on disk match memory, in QEMU's dependency order: refcounts,
   * a barrier (data and refcounts durable), the dirty L2 tables and new L1 links,
   * another barrier, then the references that entries dropped are released (a crash
   * before they reach the disk only leaks) and the space of clusters nobody references
   * is given back to the host. Holds the metadata mutex.
   */
  async writeBackMetadata(): Promise<void> {
    if (!this.tables.hasPendingWrites() && !this.refcounts.hasPendingWrites() && !this.pendingReleases.length) return;
    await this.tables.writeBack();
    if (!this.pendingReleases.length) return;
    await this.barrier.flush();
    const releases = this.pendingReleases;
    this.pendingReleases = [];
    for (const [offset, length] of releases) {
      await this.refcounts.release(offset, length);
      // A corrupt entry may have named a metadata cluster: its refcount drops as in QEMU, but its contents stay.
      if (length === this.clusterSize && (await this.refcounts.get(offset / this.clusterSize)) === 0 && this.overlaps.overlap(offset, length) === undefined) {
        await this.file.discard(offset, length).catch(() => {});
      }
    }
    await this.refcounts.writeBack();
  }

  /** Guest flush: everything written so far becomes durable (the node flushes the file after this). */
  flushMetadata(): Promise<void> {
    return this.metadata.run(() => this.writeBackMetadata());
  }

  /**
   * QEMU's qcow2_pre_write_overlap_check, before every write to the file: one that would land
   * on metadata (other than `ignore`, the structure being written) marks the image corrupt.
   */
  checkWrite(offset: number, length: number, ignore?: MetadataKind): void {
    const kind = this.overlaps.overlap(offset, length, ignore);
    if (kind !== undefined) this.corrupt(`Preventing invalid write on metadata (overlaps with ${metadataName(kind)})`, offset, length);
  }

  async load(): Promise<void> {
    const { header } = this;
    this.overlaps.add(MetadataKind.Header, 0, this.clusterSize);
    await this.refcounts.load();
    await this.tables.load();
    const snapshots = await readSnapshotTable(this.file, header);
    this.overlaps.add(MetadataKind.SnapshotTable, header.snapshotsOffset, snapshots.size);
    for (const snapshot of snapshots.snapshots) this.overlaps.add(MetadataKind.InactiveL1, snapshot.l1TableOffset, snapshot.l1Size * L1_ENTRY_SIZE);
    this.snapshots = new InternalSnapshots(this, snapshots);
    // QEMU knows the directory only while the bitmaps are valid (the autoclear bit set): so does the parsed header.
    if (header.bitmaps) this.overlaps.add(MetadataKind.BitmapDirectory, header.bitmaps.directoryOffset, header.bitmaps.directorySize);
    this.loaded = true;
  }

  get size(): number {
    return this.header.size;
  }

  /** Rewrites the header cluster in one write and makes it durable. */
  async writeHeader(): Promise<void> {
    await this.file.write(0, serializeHeader(this.header));
    await this.barrier.flush();
  }

  /**
   * Metadata found broken: like QEMU, report BLOCK_IMAGE_CORRUPTED once, mark a writable
   * image corrupt on disk, and fail this and every later request.
   */
  corrupt(message: string, offset?: number, size?: number): never {
    // While opening, nothing is reported or written: the open fails with the reason.
    if (!this.loaded) throw new Qcow2FormatError(`qcow2 image is corrupt: ${message}`);
    if (this.failed === undefined) {
      this.failed = message;
      const fatal = !this.node.readOnly;
      this.node.reportCorruption({ message, fatal, offset, size });
      if (fatal) {
        this.header.incompatibleFeatures |= IncompatibleFeature.CORRUPT;
        this.marking = this.writeHeader().catch((error: unknown) => this.log.error({ err: error }, 'could not mark the image corrupt'));
      }
    }
    throw new IoError('EIO', `qcow2 image '${this.node.name}' is corrupt: ${message}`);
  }

  /** Waits for the corrupt mark to reach the file (before it is closed). */
  async settle(): Promise<void> {
    await this.marking;
  }

  /** False once the image was found corrupt while writable: nothing more is written to it. */
  usable(): boolean {
    return this.failed === undefined || this.node.readOnly;
  }

  /**
   * After a fatal corruption QEMU takes the driver away from the node (bs->drv = NULL): every
   * later request, reads and flushes too, fails with ENOMEDIUM, which NBD clients see as EINVAL.
   */
  checkUsable(): void {
    if (!this.usable()) throw new IoError('ENOMEDIUM', `qcow2 image '${this.node.name}' is corrupt: ${this.failed}`);
  }

  /** The guest range [offset, offset+length) cut into runs of consecutive clusters with one kind of mapping. */
  async mappedRuns(offset: number, length: number): Promise<MappedRun[]> {
    const runs: MappedRun[] = [];
    const end = offset + length;
    let position = offset;
    while (position < end) {
      const cluster = Math.floor(position / this.clusterSize);
      const lastCluster = Math.floor((end - 1) / this.clusterSize);
      for (const mapping of await this.tables.lookupRun(cluster, lastCluster - cluster + 1)) {
        const runEnd = Math.min(end, (Math.floor(position / this.clusterSize) + 1) * this.clusterSize);
        const previous = runs[runs.length - 1];
        if (previous && continues(previous, mapping, this.clusterSize)) previous.length += runEnd - position;
        else runs.push({ offset: position, length: runEnd - position, mapping });
        position = runEnd;
      }
    }
    return runs;
  }

  /** The first run of [offset, offset+length): clusters are looked up only until the kind of mapping changes. */
  async firstRun(offset: number, length: number): Promise<MappedRun> {
    const end = offset + length;
    let run: MappedRun | undefined;
    let position = offset;
    // Entries are decoded in growing batches: a short run asked about with a long length costs little.
    let batch = 16;
    while (position < end) {
      const cluster = Math.floor(position / this.clusterSize);
      const wanted = Math.min(batch, Math.floor((end - 1) / this.clusterSize) - cluster + 1);
      batch *= 2;
      for (const mapping of await this.tables.lookupRun(cluster, wanted)) {
        const runEnd = Math.min(end, (Math.floor(position / this.clusterSize) + 1) * this.clusterSize);
        if (!run) run = { offset: position, length: runEnd - position, mapping };
        else if (continues(run, mapping, this.clusterSize)) run.length += runEnd - position;
        else return run;
        position = runEnd;
      }
    }
    return run!;
  }

  /** Reads guest data; the caller holds a lock covering the range. */
  async readUnlocked(offset: number, buffer: Buffer): Promise<void> {
    let done = 0;
    for (const run of await this.mappedRuns(offset, buffer.length)) {
      const part = buffer.subarray(done, done + run.length);
      await this.readRun(run, part);
      done += run.length;
    }
  }

  private async readRun(run: MappedRun, part: Buffer): Promise<void> {
    const { entry } = run.mapping;
    const inCluster = run.offset % this.clusterSize;
    switch (entry.type) {
      case 'NORMAL':
        return this.file.read(entry.hostOffset + inCluster, part);
      case 'ZERO_ALLOC':
      case 'ZERO_PLAIN':
        part.fill(0);
        return;
      case 'UNALLOCATED':
        return this.readBacking(run.offset, part);
      case 'COMPRESSED':
        for (let done = 0; done < part.length;) {
          const at = run.offset + done;
          const within = at % this.clusterSize;
          const mapping = await this.tables.lookup(Math.floor(at / this.clusterSize));
          const cluster = await this.inflateCluster(mapping);
          const n = Math.min(part.length - done, this.clusterSize - within);
          cluster.copy(part, done, within, within + n);
          done += n;
        }
        return;
      default:
        this.corrupt(`Invalid cluster entry found at guest offset ${run.offset}`);
    }
  }

  /** Reads from the backing file, zeros past its end (or everywhere without one). */
  async readBacking(offset: number, part: Buffer): Promise<void> {
    const backingLength = this.backing?.length() ?? 0;
    const inBacking = Math.max(0, Math.min(part.length, backingLength - offset));
    if (inBacking > 0) await this.backing!.read(offset, part.subarray(0, inBacking));
    part.fill(0, inBacking);
  }

  /** A compressed cluster, inflated (the last few are cached). */
  async inflateCluster(mapping: MappedCluster): Promise<Buffer> {
    const cached = this.inflated.get(mapping.raw);
    if (cached) return cached;
    if (mapping.entry.type !== 'COMPRESSED') throw new Error('not a compressed cluster');
    if (this.header.compressionType !== 0) throw new IoError('ENOTSUP', 'qcow2 compression type zstd is not supported by blockd');
    const { hostOffset, compressedSize } = mapping.entry.compressed;
    const stream = Buffer.alloc(compressedSize);
    await this.file.read(hostOffset, stream);
    let cluster: Buffer;
    try {
      cluster = await inflateAtMost(stream, this.clusterSize);
    } catch {
      this.corrupt(`Compressed cluster at ${hostOffset} does not inflate`);
    }
    if (cluster.length < this.clusterSize) this.corrupt(`Compressed cluster at ${hostOffset} inflates to ${cluster.length} bytes`);
    if (this.inflated.size >= 8) this.inflated.delete(this.inflated.keys().next().value!);
    this.inflated.set(mapping.raw, cluster);
    return cluster;
  }

  forgetInflated(raw: bigint): void {
    this.inflated.delete(raw);
  }
}

/** Whether a cluster's mapping extends the run before it (same kind; contiguous on the host for data). */
function continues(previous: MappedRun, next: MappedCluster, clusterSize: number): boolean {
  const a = previous.mapping.entry;
  const b = next.entry;
  if (a.type !== b.type) return false;
  if (a.type === 'COMPRESSED') return true;
  if (a.type === 'NORMAL' || a.type === 'ZERO_ALLOC') {
    const clustersSoFar = Math.ceil((previous.offset % clusterSize + previous.length) / clusterSize);
    return (b as { hostOffset: number }).hostOffset === a.hostOffset + clustersSoFar * clusterSize && a.copied === (b as { copied: boolean }).copied;
  }
  return true;
}
