/*
 * What every filter does unless it says otherwise: each request goes to the
 * one filtered child unchanged, block status is the child's, and the node is
 * as long as the child. A filter extends this and overrides only what it
 * changes (throttle waits before forwarding, copy-before-write copies first).
 * Write flags (FUA, compress) go down unchanged.
 */
import type { DriverExtent, DriverInfo, DriverState, WriteFlags, ZeroFlags } from '../block-driver.js';
import type { ChildEdge } from '../child-edge.js';
import { IoError, RESIZE_UNSUPPORTED } from '../io-error.js';
import { nodeFilename } from '../node-filename.js';
import type { BlockNode } from '../node.js';

export abstract class PassThroughFilter implements DriverState {
  constructor(protected readonly filtered: ChildEdge, protected readonly node: BlockNode) {}

  length(): number {
    return this.filtered.length();
  }

  /** A format above may write past the end when the file below grows on write. */
  get growsOnWrite(): boolean {
    return this.filtered.growsOnWrite;
  }

  /**
   * Whether this filter passes compressed writes on (QEMU: the filters with a compressed-write
   * callback, throttle and copy-on-read); the others refuse them, as in QEMU.
   */
  protected get forwardsCompressedWrites(): boolean {
    return false;
  }

  /** QEMU's bdrv_supports_compressed_writes for a filter: it forwards them, and its child takes them. */
  get supportsCompressedWrites(): boolean {
    return this.forwardsCompressedWrites && this.filtered.child.supportsCompressedWrites();
  }

  read(offset: number, buffer: Buffer): Promise<void> {
    return this.filtered.read(offset, buffer);
  }

  write(offset: number, buffer: Buffer, flags: WriteFlags): Promise<void> {
    return this.filtered.write(offset, buffer, flags);
  }

  writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.filtered.writeZeroes(offset, length, flags);
  }

  discard(offset: number, length: number): Promise<void> {
    return this.filtered.discard(offset, length);
  }

  async blockStatus(offset: number, length: number): Promise<DriverExtent> {
    return { length, delegate: this.filtered, offset };
  }

  /** As QEMU's generic filter resize: passed on to a `file` child; filters over `backing` (the jobs' tops) cannot resize. */
  truncate(size: number): Promise<void> {
    if (this.filtered.name !== 'file') return Promise.reject(new IoError('ENOTSUP', RESIZE_UNSUPPORTED));
    return this.filtered.truncate(size);
  }

  info(): DriverInfo {
    return { filename: nodeFilename(this.node) };
  }

  async close(): Promise<void> {}
}
