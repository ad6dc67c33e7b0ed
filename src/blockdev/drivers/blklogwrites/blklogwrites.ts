/*
 * The `blklogwrites` filter (QEMU's block/blklogwrites.c): every write,
 * write-zeroes, discard and flush that reaches `file` is also appended to
 * `log` in the dm-log-writes format, so a test can replay the writes onto a
 * copy of the original file up to any point and see what a power loss there
 * would have left (test/helpers/power-loss/). Requests are done in whole log
 * sectors: an unaligned write reads the sectors around it first, holding them
 * so no other write slips in between. As in QEMU, the filter has no FUA of its
 * own: the node turns a FUA write into a write and a flush, both logged.
 * Where blockd goes beyond QEMU, for the replay's sake: a flush is logged when
 * it is issued, not when it completes (what precedes it in the log is exactly
 * what it makes durable), and before the first entry after any flush of the
 * process, each log records a mark "flush-seq=N" with the process-wide
 * sequence number, so that the logs of several nodes (a commit writes the
 * base, then the overlay's header) can be merged in one order. Truncation
 * passes through unlogged, as in QEMU (the format has no entry for it).
 */
import type { BlockDriver, WriteFlags, ZeroFlags } from '../../block-driver.js';
import type { ChildEdge } from '../../child-edge.js';
import { IoError } from '../../io-error.js';
import { jsonFilename } from '../../node-filename.js';
import type { BlockNode } from '../../node.js';
import { defaultChildPermissions, type PermissionPair } from '../../permissions.js';
import { RangeLock } from '../../range-lock.js';
import { PassThroughFilter } from '../pass-through-filter.js';
import type { LogAppender } from './log-appender.js';
import { openLog, type LogOptions } from './open-log.js';

class BlklogwritesState extends PassThroughFilter {
  /** Sector spans being written: a read-modify-write holds its span alone. */
  private readonly spans = new RangeLock();

  constructor(file: ChildEdge, private readonly log: LogAppender, node: BlockNode) {
    super(file, node);
  }

  private alignDown(offset: number): number {
    return Math.floor(offset / this.log.sectorSize) * this.log.sectorSize;
  }

  private alignUp(offset: number): number {
    return Math.ceil(offset / this.log.sectorSize) * this.log.sectorSize;
  }

  override async write(offset: number, buffer: Buffer, flags: WriteFlags): Promise<void> {
    const start = this.alignDown(offset);
    const end = this.alignUp(offset + buffer.length);
    const padded = start !== offset || end !== offset + buffer.length;
    const release = await this.spans.acquire(start, end, padded);
    try {
      const bytes = padded ? await this.padToSectors(start, end, offset, buffer) : buffer;
      await this.filtered.write(start, bytes, flags);
      await this.log.write(start, bytes);
    } finally {
      release();
    }
  }

  /** The sectors around an unaligned write: the first and last read from the file, the write's bytes in between. */
  private async padToSectors(start: number, end: number, offset: number, buffer: Buffer): Promise<Buffer> {
    const sector = this.log.sectorSize;
    const bytes = Buffer.alloc(end - start);
    if (start < offset) await this.filtered.read(start, bytes.subarray(0, sector));
    if (end > offset + buffer.length && end - sector >= start + (start < offset ? sector : 0)) {
      await this.filtered.read(end - sector, bytes.subarray(bytes.length - sector));
    }
    buffer.copy(bytes, offset - start);
    return bytes;
  }

  override async writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    // Partial sectors go the node's generic way: zero buffers through write(), which pads them.
    if (offset % this.log.sectorSize !== 0 || length % this.log.sectorSize !== 0) throw new IoError('ENOTSUP');
    const release = await this.spans.acquire(offset, offset + length, false);
    try {
      await this.filtered.writeZeroes(offset, length, flags);
      await this.log.write(offset, { zeroes: length });
    } finally {
      release();
    }
  }

  /** Discards whole sectors only (a discard is a hint: the partial sectors at its ends are kept). */
  override async discard(offset: number, length: number): Promise<void> {
    const start = this.alignUp(offset);
    const end = this.alignDown(offset + length);
    if (end <= start) return;
    const release = await this.spans.acquire(start, end, false);
    try {
      await this.filtered.discard(start, end - start);
      await this.log.discard(start, end - start);
    } finally {
      release();
    }
  }

  /** Logs the flush; the node then flushes `file` and `log`. A read-only node has nothing to flush (as in QEMU). */
  async flush(): Promise<void> {
    if (this.node.readOnly) return;
    await this.log.flush();
  }

  childPermissions(edge: ChildEdge, parents: PermissionPair): PermissionPair {
    // The log is the filter's own metadata: written whenever the node is writable, never shared for writing.
    return defaultChildPermissions(edge.name === 'log' ? 'storage' : 'filtered', parents, !this.node.readOnly);
  }

  override info() {
    return { filename: jsonFilename(this.node) };
  }

  override async close(): Promise<void> {
    if (!this.node.readOnly) await this.log.close();
  }
}

export const blklogwritesDriver: BlockDriver<LogOptions> = {
  name: 'blklogwrites',
  kind: 'filter',
  // QEMU has no reopen handler for blklogwrites: changing its read-only mode is refused.
  reopenable: false,
  strongOptions: ['log-append', 'log-sector-size'],
  async open(context, options) {
    const file = await context.openChild('file', { name: 'file', role: 'filtered' });
    const log = await context.openChild('log', { name: 'log', role: 'storage' });
    return new BlklogwritesState(file, await openLog(log, options), context.node);
  },
};
