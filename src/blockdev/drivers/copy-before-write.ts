/*
 * The `copy-before-write` filter (QEMU's block/copy-before-write.c): before a
 * write, write-zeroes or discard reaches `file`, the old data of the clusters
 * it touches is copied to `target`, through the block-copy state the backup
 * job shares. So `target` keeps the disk as it was when the filter was put in.
 *
 * It also offers that frozen view to a snapshot-access node (the snapshot
 * API, for pull backups): a cluster already copied is read from `target`, one
 * not copied yet from `file`, and a guest write to a range being read that way
 * waits until the read is done. `bitmap` limits both the copies and the view
 * to that bitmap's clusters; a reader discarding a range gives it up. On a
 * failed copy the guest write fails (on-cbw-error=break-guest-write) or the
 * view breaks for good while guest writes go on (break-snapshot); cbw-timeout
 * turns a copy slower than that many seconds into such a failure.
 *
 * As in QEMU, the node lists three anonymous bitmaps: the copy bitmap on the
 * source, and the done and access bitmaps on the filter.
 */
import type { BlockDriver, DriverExtent, WriteFlags, ZeroFlags } from '../block-driver.js';
import { BlockCopy, blockCopyClusterSize } from '../block-copy.js';
import { checkBitmap, lookupBitmap } from '../bitmaps/bitmap-commands.js';
import { genericError } from '../../errors.js';
import { DirtyBitmap } from '../bitmaps/dirty-bitmap.js';
import type { ChildEdge } from '../child-edge.js';
import { IoError } from '../io-error.js';
import type { BlockNode } from '../node.js';
import { PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, defaultChildPermissions, type PermissionPair } from '../permissions.js';
import { RequestList } from '../request-list.js';
import type { SnapshotSource } from '../snapshot-api.js';
import type { BlockdevOptionsCbw, OnCbwError } from '../../generated/qapi-types.js';
import { PassThroughFilter } from './pass-through-filter.js';

export interface CbwSettings {
  /** Only these clusters are copied and readable (QEMU copies the bitmap as it is when the filter opens). */
  bitmap?: DirtyBitmap;
  onCbwError: OnCbwError;
  /** 0: no limit. */
  timeoutSeconds: number;
}

export class CopyBeforeWriteState extends PassThroughFilter implements SnapshotSource {
  readonly blockCopy: BlockCopy;
  /** The clusters the frozen view may be read at: the copy bitmap as it started, less what the reader discarded. */
  private readonly access: DirtyBitmap;
  /** The clusters copy-before-write has put in the target: the view reads them there. */
  private readonly done: DirtyBitmap;
  /** Reads of the view that go to the live disk: guest writes to their ranges wait for them. */
  private readonly frozenReads = new RequestList();
  /** With break-snapshot, the first failed copy: the view answers EACCES from then on. */
  private snapshotError: unknown;
  /** Copies a timeout gave up waiting for, which still run (close waits for them). */
  private readonly lateCopies = new Set<Promise<void>>();

  constructor(file: ChildEdge, readonly target: ChildEdge, node: BlockNode, private readonly settings: CbwSettings = { onCbwError: 'break-guest-write', timeoutSeconds: 0 }) {
    super(file, node);
    const cluster = blockCopyClusterSize(target);
    this.blockCopy = new BlockCopy(file, target, cluster);
    if (settings.bitmap) this.blockCopy.bitmap.merge(settings.bitmap);
    else this.blockCopy.bitmap.set(0, file.length());
    this.done = new DirtyBitmap(file.length(), cluster);
    this.access = new DirtyBitmap(file.length(), cluster);
    this.access.merge(this.blockCopy.bitmap);
    for (const bitmap of [this.done, this.access]) bitmap.enabled = false;
    file.child.bitmaps.add(this.blockCopy.bitmap);
    node.bitmaps.add(this.done);
    node.bitmaps.add(this.access);
  }

  // ---- the write path ----------------------------------------------------------------------

  /**
   * Copies the old data of the clusters [offset, offset + length) touches, unless the write does
   * not change them, then waits for the reads of the view still reading them from the disk.
   */
  private async beforeWrite(offset: number, length: number, flags: WriteFlags): Promise<void> {
    if (flags.contentUnchanged || this.snapshotError !== undefined) return;
    const cluster = this.blockCopy.clusterSize;
    const start = Math.floor(offset / cluster) * cluster;
    const end = Math.ceil((offset + length) / cluster) * cluster;
    try {
      await this.copyInTime(start, end - start);
      this.done.set(start, end - start);
    } catch (error) {
      if (this.settings.onCbwError === 'break-guest-write') throw error;
      this.snapshotError ??= error;
    }
    await this.frozenReads.waitAll(start, end - start);
  }

  /** The copy, failing with ETIMEDOUT after cbw-timeout while it goes on (QEMU's block_copy with a timeout). */
  private copyInTime(offset: number, length: number): Promise<void> {
    const copy = this.blockCopy.copy(offset, length);
    if (this.settings.timeoutSeconds === 0) return copy;
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        const late = copy.catch(() => {}).finally(() => this.lateCopies.delete(late));
        this.lateCopies.add(late);
        reject(new IoError('ETIMEDOUT'));
      }, this.settings.timeoutSeconds * 1000);
      copy.then(resolve, reject).finally(() => clearTimeout(timer));
    });
  }

  override async write(offset: number, buffer: Buffer, flags: WriteFlags): Promise<void> {
    await this.beforeWrite(offset, buffer.length, flags);
    return this.filtered.write(offset, buffer, flags);
  }

  override async writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    await this.beforeWrite(offset, length, flags);
    return this.filtered.writeZeroes(offset, length, flags);
  }

  override async discard(offset: number, length: number): Promise<void> {
    await this.beforeWrite(offset, length, {});
    return this.filtered.discard(offset, length);
  }

  /** As QEMU's filter: a flush reaches the source only; the target is the filter's own business. */
  readonly flushCoversChildren = true;

  flush(): Promise<void> {
    return this.filtered.flush();
  }

  // ---- the snapshot API (snapshot-access) --------------------------------------------------

  /**
   * Where the view's bytes from `offset` are, for a run all copied (the target) or all not
   * copied yet (the disk, listed as a frozen read until `release`). EACCES when any of the
   * range is not accessible, as QEMU's cbw_snapshot_read_lock.
   */
  private lockView(offset: number, length: number): { edge: ChildEdge; length: number; release: () => void } {
    const end = offset + length;
    const accessible = this.access.dirtyArea(offset, end);
    if (this.snapshotError !== undefined || !accessible || accessible.offset !== offset || accessible.length !== length) throw new IoError('EACCES');
    if (this.done.isDirty(offset)) return { edge: this.target, length: this.done.dirtyArea(offset, end)!.length, release: () => {} };
    const run = (this.done.dirtyArea(offset, end)?.offset ?? end) - offset;
    return { edge: this.filtered, length: run, release: this.frozenReads.add(offset, run) };
  }

  async snapshotRead(offset: number, buffer: Buffer): Promise<void> {
    for (let at = 0; at < buffer.length; ) {
      const view = this.lockView(offset + at, buffer.length - at);
      try {
        await view.edge.read(offset + at, buffer.subarray(at, at + view.length));
      } finally {
        view.release();
      }
      at += view.length;
    }
  }

  async snapshotBlockStatus(offset: number, length: number): Promise<DriverExtent> {
    const view = this.lockView(offset, length);
    try {
      // Through the whole chain below (QEMU 7.2 asks only the top layer, and calls its holes
      // neither data nor zero): the view is a whole disk, and a copied cluster is in the target.
      const status = await view.edge.child.blockStatusAbove(offset, view.length);
      // What is neither data nor surely zero (a protocol's unknown hole) is data to a reader.
      return { length: status.length, allocated: true, data: status.data || !status.zero, zero: status.zero };
    } finally {
      view.release();
    }
  }

  async snapshotDiscard(offset: number, length: number): Promise<void> {
    // Only whole clusters are given up (QEMU 7.2 asserts on others; later QEMU aligns inwards, as here).
    const cluster = this.blockCopy.clusterSize;
    const start = Math.ceil(offset / cluster) * cluster;
    const end = Math.min(Math.floor((offset + length) / cluster) * cluster, this.length());
    if (end <= start) return;
    this.access.clear(start, end - start);
    this.blockCopy.reset(start, end - start);
    await this.target.discard(start, end - start);
  }

  // ---- the graph ---------------------------------------------------------------------------

  childPermissions(edge: ChildEdge, parents: PermissionPair): PermissionPair {
    // The target is written by the filter; others may use it (the live disk may be in its backing chain), but not resize it.
    if (edge === this.target) return { perm: PERM_WRITE, shared: PERM_ALL & ~PERM_RESIZE };
    const pair = defaultChildPermissions(edge.role, parents, !this.node.readOnly);
    // Once in use, every write to the source must come through the filter.
    if (this.node.parents.length === 0) return pair;
    return { perm: pair.perm | PERM_CONSISTENT_READ, shared: pair.shared & ~(PERM_WRITE | PERM_RESIZE) };
  }

  override async close(): Promise<void> {
    await Promise.all(this.lateCopies);
    this.filtered.child.bitmaps.remove(this.blockCopy.bitmap);
    this.node.bitmaps.remove(this.done);
    this.node.bitmaps.remove(this.access);
  }
}

/** What QEMU's merge into the copy bitmap refuses (block_copy_state_new), in its words. */
function checkMergeable(bitmap: DirtyBitmap, source: ChildEdge): void {
  try {
    checkBitmap(bitmap, { busy: true, inconsistent: true });
    if (bitmap.length !== source.length()) throw genericError("Bitmaps are incompatible and can't be merged");
  } catch (error) {
    throw genericError(`Cannot create block-copy-state: Failed to merge bitmap '${bitmap.name ?? ''}' to internal copy-bitmap: ${(error as Error).message}`);
  }
}

export const copyBeforeWriteDriver: BlockDriver<BlockdevOptionsCbw> = {
  name: 'copy-before-write',
  kind: 'filter',
  // Its filename is its source's, as qemu-storage-daemon reports it.
  namedAfterChild: true,
  strongOptions: [],
  async open(context, options) {
    const file = await context.openChild('file', { name: 'file', role: 'filtered' });
    const target = await context.openChild('target', { name: 'target', role: 'data' });
    const bitmap = options.bitmap && lookupBitmap({ find: context.findNode }, options.bitmap.node, options.bitmap.name).bitmap;
    if (bitmap) checkMergeable(bitmap, file);
    return new CopyBeforeWriteState(file, target, context.node, {
      bitmap,
      onCbwError: options['on-cbw-error'] ?? 'break-guest-write',
      timeoutSeconds: options['cbw-timeout'] ?? 0,
    });
  },
};
