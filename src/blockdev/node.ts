/*
 * One node of the graph: its driver state, its child edges, the edges of its
 * parents, and the generic I/O layer every request passes through: bounds,
 * read-only, in-flight tracking (for drain), detect-zeroes, the discard
 * policy, no-flush, the write threshold, and block status resolved through
 * delegating drivers (raw, filters) and down the backing chain.
 */
import type { BlockdevOptions } from '../generated/qapi-types.js';
import type { BlockDriver, DriverExtent, DriverState, HostFileRange, WriteFlags, ZeroFlags } from './block-driver.js';
import type { ChildEdge } from './child-edge.js';
import { BitmapRegistry } from './bitmaps/bitmap-registry.js';
import { IoError, RESIZE_UNSUPPORTED } from './io-error.js';
import { RangeLock } from './range-lock.js';
import { usersReached, withUsersDrained, type DrainOptions } from './drain.js';
import { PERM_ALL, PERM_WRITE, PERM_WRITE_UNCHANGED, type PermissionPair } from './permissions.js';

/** Block status as the layers above a driver see it. */
export interface NodeExtent {
  length: number;
  /** Decided at this depth of the chain (not a fall-through). */
  allocated: boolean;
  data: boolean;
  zero: boolean;
  /** 0 = this node, 1 = its backing file, ... (the top layer of filters counts as 0). */
  depth: number;
  /** Where the bytes are stored: a protocol node and the offset in it. */
  host?: { node: BlockNode; offset: number };
}

export interface NodeSettings {
  readOnly: boolean;
  autoReadOnly: boolean;
  forceShare: boolean;
  discard: 'ignore' | 'unmap';
  detectZeroes: 'off' | 'on' | 'unmap';
  cacheDirect: boolean;
  cacheNoFlush: boolean;
}

/** A driver's report of metadata found broken (QEMU's BLOCK_IMAGE_CORRUPTED). */
export interface CorruptionReport {
  message: string;
  fatal: boolean;
  offset?: number;
  size?: number;
}

/** What the node tells the graph about (and the graph turns into events). */
export interface NodeObserver {
  writeThresholdExceeded(node: BlockNode, amountExceeded: number, threshold: number): void;
  imageCorrupted(node: BlockNode, report: CorruptionReport): void;
}

const ZERO_CHUNK = 1 << 20;

export class BlockNode {
  state!: DriverState;
  readonly children: ChildEdge[] = [];
  /** Edges of the node's parents and users, newest first (QEMU's order, which its messages follow). */
  readonly parents: ChildEdge[] = [];
  writeThreshold = 0;
  private inFlight = 0;
  private quiesce = 0;
  private idleWaiters: (() => void)[] = [];
  private resumeWaiters: (() => void)[] = [];
  /** While a job copies into this node: its copies and other writes to the same bytes never overlap (QEMU's serialising requests). */
  private serialising: { lock: RangeLock; users: number } | undefined;
  /** Bitmaps that record every range written, zeroed or discarded here (a job's, like active commit's, or a user's). */
  readonly bitmaps = new BitmapRegistry();
  /** A filter a job inserted without a name from the user: QEMU names it after its child (bs->implicit). */
  implicit = false;
  /** When QEMU would have named the node (after its "file" child, before its backing file): the order nodes are listed in. */
  sequence = 0;

  constructor(
    readonly name: string,
    readonly driver: BlockDriver,
    /** The options the node was opened (or last reopened) with. */
    public options: BlockdevOptions,
    readonly settings: NodeSettings,
    readonly monitorOwned: boolean,
    private readonly observer: NodeObserver,
  ) {}

  reportCorruption(report: CorruptionReport): void {
    this.observer.imageCorrupted(this, report);
  }

  get readOnly(): boolean {
    return this.settings.readOnly;
  }

  /** The backing child, if the node has one. */
  backing(): ChildEdge | undefined {
    return this.children.find((edge) => edge.role === 'cow');
  }

  /** The child a filter or pass-through format reads through ("file" or "image"). */
  primaryChild(): ChildEdge | undefined {
    return this.children.find((edge) => edge.role !== 'cow');
  }

  /** The next node down the chain: a filter's child, or a format's backing file (QEMU's bdrv_filter_or_cow_bs). */
  below(): BlockNode | undefined {
    return this.driver.kind === 'filter' ? this.primaryChild()?.child : this.backing()?.child;
  }

  length(): number {
    return this.state.length();
  }

  /** What the node's parents and users need of it, combined. */
  neededPermissions(edges: readonly ChildEdge[] = this.parents, proposed?: Map<ChildEdge, PermissionPair>): PermissionPair {
    let perm = 0;
    let shared = PERM_ALL;
    for (const edge of edges) {
      const pair = proposed?.get(edge) ?? edge;
      perm |= pair.perm;
      shared &= pair.shared;
    }
    return { perm, shared };
  }

  // ---- request tracking and drain -------------------------------------------------------

  private async track<T>(request: () => Promise<T>): Promise<T> {
    while (this.quiesce > 0) await new Promise<void>((resolve) => this.resumeWaiters.push(resolve));
    this.inFlight++;
    try {
      return await request();
    } finally {
      if (--this.inFlight === 0) for (const wake of this.idleWaiters.splice(0)) wake();
    }
  }

  /**
   * Runs `change` in a drained section of this node (QEMU's bdrv_drained_begin/end): first
   * every user the drain reaches is told (a job pauses, see drain.ts), then new requests on
   * this node are held back until no request is in flight (unless holdRequests is false).
   * At the end requests go on, then the users. Nested drains count: a user resumes only
   * when its last drain ends.
   */
  async drained<T>(change: () => Promise<T>, { reach = 'node', ignore, holdRequests = true }: DrainOptions = {}): Promise<T> {
    return withUsersDrained(usersReached([this], reach, ignore), holdRequests ? () => this.quiesced(change) : change);
  }

  /** Runs `change` with no request in flight on this node and new ones held back. */
  private async quiesced<T>(change: () => Promise<T>): Promise<T> {
    this.quiesce++;
    try {
      while (this.inFlight > 0) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
      return await change();
    } finally {
      if (--this.quiesce === 0) for (const wake of this.resumeWaiters.splice(0)) wake();
    }
  }

  /**
   * Drains the node until the returned function is called: a job holds its source still from
   * the moment it is in sync until it has switched the graph over (QEMU's drained section).
   */
  async beginDrain(options: DrainOptions = {}): Promise<() => void> {
    let end!: () => void;
    const ended = new Promise<void>((resolve) => (end = resolve));
    await new Promise<void>((entered) => {
      void this.drained(async () => {
        entered();
        await ended;
      }, options);
    });
    return end;
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.length()) {
      throw new IoError('EIO', `request [${offset}, +${length}) outside '${this.name}' (size ${this.length()})`);
    }
  }

  private checkWritable(offset: number, length: number): void {
    if (this.readOnly) throw new IoError('EPERM', `node '${this.name}' is read-only`);
    if (!this.state.growsOnWrite) return this.checkRange(offset, length);
    if (!Number.isSafeInteger(offset + length) || offset < 0 || length < 0) throw new IoError('EINVAL', 'bad request range');
  }

  /**
   * Runs a request that changes bytes and marks them dirty once it ends (failed ones too: the
   * bytes may have changed); a copy of what the node already reads changes nothing a bitmap tracks.
   */
  private async changing<T>(offset: number, length: number, flags: WriteFlags, request: () => Promise<T>): Promise<T> {
    try {
      return await request();
    } finally {
      if (!flags.contentUnchanged) this.bitmaps.markDirty(offset, length);
    }
  }

  private noteWrite(offset: number, length: number): void {
    const end = offset + length;
    if (this.writeThreshold > 0 && end > this.writeThreshold) {
      const threshold = this.writeThreshold;
      this.writeThreshold = 0; // one-shot, as in QEMU
      this.observer.writeThresholdExceeded(this, end - threshold, threshold);
    }
  }

  // ---- serialised copies ----------------------------------------------------------------------

  /** A job or a copy-on-read filter starts copying into this node; returns the function that ends it. */
  beginSerialising(): () => void {
    this.serialising ??= { lock: new RangeLock(), users: 0 };
    this.serialising.users++;
    let ended = false;
    return () => {
      if (ended || !this.serialising) return;
      ended = true;
      if (--this.serialising.users === 0) this.serialising = undefined;
    };
  }

  /**
   * Runs a read-then-write copy of a range with no other write to it in between. The range
   * grows to whole clusters, as QEMU serialises at the cluster size: a write to another part
   * of a cluster being copied waits too.
   */
  async serialisedCopy<T>(offset: number, length: number, copy: () => Promise<T>): Promise<T> {
    if (!this.serialising) return copy();
    const unit = this.state.clusterSize ?? 1;
    const start = Math.floor(offset / unit) * unit;
    const end = Math.ceil((offset + length) / unit) * unit;
    const release = await this.serialising.lock.acquire(start, end, true);
    try {
      return await copy();
    } finally {
      release();
    }
  }

  /** Other writes wait for overlapping copies (and copies for them) while serialising is on. */
  private async guarded<T>(offset: number, length: number, request: () => Promise<T>, flags: WriteFlags = {}): Promise<T> {
    if (!this.serialising || flags.serialisedCopy) return request();
    const release = await this.serialising.lock.acquire(offset, offset + length, false);
    try {
      return await request();
    } finally {
      release();
    }
  }

  // ---- I/O ---------------------------------------------------------------------------------

  async read(offset: number, buffer: Buffer): Promise<void> {
    // Protocol nodes read zeros past their end, as QEMU does (formats read their file's tail that way).
    const end = this.state.growsOnWrite ? Math.min(offset + buffer.length, this.length()) : offset + buffer.length;
    // A read that starts past the end is all zeros, not an error (only the part inside is checked).
    this.checkRange(Math.min(offset, end), Math.max(0, end - offset));
    if (end < offset + buffer.length) buffer.fill(0, Math.max(0, end - offset));
    if (end <= offset) return;
    const inside = buffer.subarray(0, end - offset);
    return this.track(() => this.state.read(offset, inside));
  }

  /** Whether writes with the `compress` flag are taken (QEMU's bdrv_supports_compressed_writes). */
  supportsCompressedWrites(): boolean {
    return this.state.supportsCompressedWrites === true;
  }

  async write(offset: number, buffer: Buffer, flags: WriteFlags = {}): Promise<void> {
    this.checkWritable(offset, buffer.length);
    if (buffer.length === 0) return;
    if (this.settings.detectZeroes !== 'off' && isAllZero(buffer)) {
      const mayUnmap = this.settings.detectZeroes === 'unmap' && this.settings.discard === 'unmap';
      // As in QEMU, detected zeroes become a zero write, compressed or not.
      return this.writeZeroes(offset, buffer.length, { ...flags, compress: false, mayUnmap });
    }
    const write = this.state.write;
    if (!write) throw new IoError('ENOTSUP', `driver '${this.driver.name}' does not support writes`);
    // A driver that cannot compress must not store the data plainly as if it had.
    if (flags.compress && !this.supportsCompressedWrites()) throw new IoError('ENOTSUP', `driver '${this.driver.name}' does not support compressed writes`);
    this.noteWrite(offset, buffer.length);
    const emulateFua = this.emulatesFua(flags);
    const driverFlags = emulateFua ? { ...flags, fua: false } : flags;
    await this.guarded(offset, buffer.length, () => this.changing(offset, buffer.length, flags, () => this.track(() => write.call(this.state, offset, buffer, driverFlags))), flags);
    if (emulateFua) await this.flush();
  }

  /**
   * A FUA write to a driver that cannot make it durable by itself is written plainly, then
   * flushed before it completes, as QEMU's block layer emulates FUA (a file has no FUA).
   */
  private emulatesFua(flags: WriteFlags): boolean {
    return flags.fua === true && !this.driver.handlesFua;
  }

  async writeZeroes(offset: number, length: number, flags: ZeroFlags = {}): Promise<void> {
    this.checkWritable(offset, length);
    if (length === 0) return;
    this.noteWrite(offset, length);
    const emulateFua = this.emulatesFua(flags);
    const zeroFlags = { ...flags, fua: flags.fua === true && !emulateFua, mayUnmap: flags.mayUnmap === true && this.settings.discard === 'unmap' };
    await this.guarded(offset, length, () => this.changing(offset, length, flags, () => this.track(async () => {
      if (this.state.writeZeroes) {
        try {
          return await this.state.writeZeroes(offset, length, zeroFlags);
        } catch (error) {
          if ((error as IoError).code !== 'ENOTSUP' || flags.noFallback) throw error;
        }
      } else if (flags.noFallback) {
        throw new IoError('ENOTSUP');
      }
      // Generic fallback: write real zero buffers.
      const write = this.state.write;
      if (!write) throw new IoError('ENOTSUP', `driver '${this.driver.name}' does not support writes`);
      const zeros = Buffer.alloc(Math.min(length, ZERO_CHUNK));
      for (let done = 0; done < length; done += zeros.length) {
        await write.call(this.state, offset + done, zeros.subarray(0, Math.min(zeros.length, length - done)), zeroFlags);
      }
    })), flags);
    if (emulateFua) await this.flush();
  }

  async discard(offset: number, length: number): Promise<void> {
    this.checkWritable(offset, length);
    // QEMU drops discards on nodes opened with discard=ignore (the default for blockdev-add).
    if (this.settings.discard === 'ignore' || !this.state.discard || length === 0) return;
    const discard = this.state.discard;
    return this.guarded(offset, length, () => this.changing(offset, length, {}, () => this.track(() => discard.call(this.state, offset, length))));
  }

  /**
   * An offloaded copy into `target` (QEMU's bdrv_co_copy_range_from): a read of this node as far
   * as tracking goes; ENOTSUP when a driver on the way cannot offload (the caller reads and writes).
   */
  async copyRangeFrom(offset: number, length: number, target: ChildEdge, targetOffset: number, flags: WriteFlags = {}): Promise<void> {
    this.checkRange(offset, length);
    const copyFrom = this.state.copyRangeFrom;
    if (!copyFrom) throw new IoError('ENOTSUP', `driver '${this.driver.name}' cannot offload copies`);
    return this.track(() => copyFrom.call(this.state, offset, length, target, targetOffset, flags));
  }

  /** The target's half of an offloaded copy (QEMU's bdrv_co_copy_range_to): a write, as far as locks, bitmaps and tracking go. */
  async copyRangeTo(source: HostFileRange, offset: number, length: number, flags: WriteFlags = {}): Promise<void> {
    this.checkWritable(offset, length);
    const copyTo = this.state.copyRangeTo;
    if (!copyTo) throw new IoError('ENOTSUP', `driver '${this.driver.name}' cannot offload copies`);
    if (length === 0) return;
    this.noteWrite(offset, length);
    await this.guarded(offset, length, () => this.changing(offset, length, flags, () => this.track(() => copyTo.call(this.state, source, offset, length, flags))), flags);
  }

  /** Flushes this node, then every child it may have written to. */
  async flush(): Promise<void> {
    if (this.settings.cacheNoFlush) return;
    await this.track(async () => {
      await this.state.flush?.();
    });
    if (this.state.flushCoversChildren) return;
    for (const edge of this.children) {
      if (edge.perm & (PERM_WRITE | PERM_WRITE_UNCHANGED)) await edge.child.flush();
    }
  }

  /**
   * A hint that what was written will be flushed soon (a job's copy): the storage starts
   * writing it back now, so that flush finds little left. Errors are the flush's to report.
   */
  startWriteback(): void {
    if (this.settings.cacheNoFlush) return;
    const start = this.state.startWriteback;
    if (start) {
      this.track(() => start.call(this.state)).catch(() => {});
      return;
    }
    for (const edge of this.children) {
      if (edge.perm & (PERM_WRITE | PERM_WRITE_UNCHANGED)) edge.child.startWriteback();
    }
  }

  async truncate(size: number): Promise<void> {
    if (this.readOnly) throw new IoError('EPERM', `node '${this.name}' is read-only`);
    const truncate = this.state.truncate;
    if (!truncate) throw new IoError('ENOTSUP', RESIZE_UNSUPPORTED);
    await this.track(() => truncate.call(this.state, size));
    // QEMU's bdrv_dirty_bitmap_truncate: the bitmaps follow the new size.
    this.bitmaps.resize(this.length());
  }

  // ---- block status ----------------------------------------------------------------------

  /** The driver's own answer, clamped to the node. */
  async driverBlockStatus(offset: number, length: number): Promise<DriverExtent> {
    this.checkRange(offset, length);
    return this.track(() => this.state.blockStatus(offset, Math.min(length, this.length() - offset)));
  }

  /** Status of this layer, following delegations (raw, filters) but not the backing chain. */
  async blockStatus(offset: number, length: number): Promise<NodeExtent> {
    const extent = await this.driverBlockStatus(offset, length);
    if ('delegate' in extent) {
      const below = await extent.delegate.child.blockStatusAbove(extent.offset, extent.length);
      return { ...below, length: Math.min(below.length, extent.length) };
    }
    const host = extent.hostOffset === undefined ? undefined : { node: this.primaryChild()?.child ?? this, offset: extent.hostOffset };
    return { length: extent.length, allocated: extent.allocated, data: extent.data, zero: extent.zero, depth: 0, host };
  }

  /** Status through the whole chain: where the bytes at `offset` come from. */
  async blockStatusAbove(offset: number, length: number): Promise<NodeExtent> {
    const extent = await this.blockStatus(offset, length);
    if (extent.allocated) return extent;
    const backing = this.backing();
    // Only an image format reads unallocated ranges as zeroes (QEMU: drivers that support backing files); a
    // protocol's hole that is not zero stays unknown (an nbd node's dirty range with x-dirty-bitmap).
    if (!backing) return this.driver.kind === 'protocol' ? extent : { ...extent, zero: true, data: false };
    const backingLength = backing.child.length();
    // Past the end of a short backing file this layer ends the search, as if it had no backing file (qemu-img map).
    if (offset >= backingLength) return { length: extent.length, allocated: false, data: false, zero: true, depth: 0 };
    const below = await backing.child.blockStatusAbove(offset, Math.min(extent.length, backingLength - offset));
    return { ...below, depth: below.depth + 1 };
  }
}

export function isAllZero(buffer: Buffer): boolean {
  // Compare 8 bytes at a time where alignment allows; most non-zero buffers fail on the first word.
  const words = Math.floor(buffer.length / 8);
  if (buffer.byteOffset % 8 === 0 && words > 0) {
    const view = new BigUint64Array(buffer.buffer, buffer.byteOffset, words);
    for (let i = 0; i < words; i++) if (view[i] !== 0n) return false;
    for (let i = words * 8; i < buffer.length; i++) if (buffer[i] !== 0) return false;
    return true;
  }
  for (let i = 0; i < buffer.length; i++) if (buffer[i] !== 0) return false;
  return true;
}
