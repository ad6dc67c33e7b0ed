/*
 * The `file` protocol driver: a regular file through async fs calls. Block
 * status comes from SEEK_DATA/SEEK_HOLE, write-zeroes and discard from
 * fallocate, and image locking uses QEMU's OFD lock bytes (image-locks.ts)
 * so blockd and QEMU never both write one image. The node is the file's size rounded up to 512 bytes, the
 * tail reading as zeros, as in QEMU. cache.direct=on is accepted and
 * reported but I/O stays buffered: Node cannot guarantee O_DIRECT-aligned
 * buffers, and durability is the same (data is durable after a flush).
 */
import { open, type FileHandle } from 'node:fs/promises';
import { genericError } from '../../errors.js';
import type { BlockDriver, DriverExtent, DriverState, HostFileRange, WriteFlags, ZeroFlags } from '../block-driver.js';
import type { ChildEdge } from '../child-edge.js';
import { IoError, describeErrno, errnoOf } from '../io-error.js';
import { preadFull, pwriteFull } from '../native/batched-io.js';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, nativeAddonMissing, nativeFileOps } from '../native/native-file-ops.js';
import { changeImageLocks, takeLockBytes } from '../image-locks.js';
import type { PermissionPair } from '../permissions.js';

interface FileOptions {
  filename: string;
  locking?: 'auto' | 'on' | 'off';
  aio?: 'threads' | 'native' | 'io_uring';
  'pr-manager'?: string;
}

const SECTOR = 512;

function roundUp(value: number, to: number): number {
  return Math.ceil(value / to) * to;
}

class FileState implements DriverState {
  private size: number;
  private held: ReadonlySet<number> = new Set<number>();
  private flushFailed: Error | undefined;
  readonly growsOnWrite = true;

  constructor(private handle: FileHandle, private readonly path: string, size: number, private readonly locking: boolean) {
    this.size = size;
  }

  /**
   * A new descriptor with the other access mode. OFD locks belong to a descriptor: the
   * held lock bytes are taken on the new one (all shared, so they coexist with the old
   * one's) before the old one closes, so another process never sees the image unlocked.
   */
  async reopen(writable: boolean): Promise<void> {
    const handle = await openFile(this.path, writable);
    try {
      if (this.locking) await takeLockBytes(handle.fd, this.held);
    } catch (error) {
      await handle.close();
      throw error;
    }
    const old = this.handle;
    this.handle = handle;
    await old.close();
  }

  length(): number {
    return roundUp(this.size, SECTOR);
  }

  // Transfers use the raw descriptor: the node drains (no request in flight) before it reopens or closes it.
  async read(offset: number, buffer: Buffer): Promise<void> {
    const done = await preadFull(this.handle.fd, buffer, offset);
    if (done < buffer.length) buffer.fill(0, done); // the tail past EOF reads as zeros
  }

  async write(offset: number, buffer: Buffer): Promise<void> {
    await pwriteFull(this.handle.fd, buffer, offset);
    this.size = Math.max(this.size, offset + buffer.length);
  }

  /** The file's bytes go to the target as a range of this descriptor (QEMU's raw_co_copy_range_from). */
  async copyRangeFrom(offset: number, length: number, target: ChildEdge, targetOffset: number, flags: WriteFlags): Promise<void> {
    // Past the end the file reads as zeros, which only a read can give.
    if (offset + length > this.size) throw new IoError('ENOTSUP', 'offloaded copy past the end of the file');
    return target.copyRangeTo({ fd: this.handle.fd, offset }, targetOffset, length, flags);
  }

  /** copy_file_range until all is copied (the kernel may copy less per call). */
  async copyRangeTo(source: HostFileRange, offset: number, length: number): Promise<void> {
    for (let done = 0; done < length;) {
      const copied = await nativeFileOps.copyFileRange(source.fd, source.offset + done, this.handle.fd, offset + done, length - done).catch((error: unknown) => {
        throw new IoError(errnoOf(error), (error as Error).message);
      });
      if (copied <= 0) throw new IoError('EIO', 'copy_file_range copied nothing');
      done += copied;
      this.size = Math.max(this.size, offset + done);
    }
  }

  async startWriteback(): Promise<void> {
    await nativeFileOps.startWriteback(this.handle.fd, 0, 0);
  }

  private async fallocate(mode: number, offset: number, length: number): Promise<boolean> {
    try {
      await nativeFileOps.fallocate(this.handle.fd, mode, offset, length);
      return true;
    } catch (error) {
      const code = errnoOf(error);
      if (code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'EINVAL' || code === 'EBUSY') return false;
      throw new IoError(code, (error as Error).message);
    }
  }

  /** Zeroes within the file, past its end the file just grows (new space reads as zeros). */
  async writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    const end = offset + length;
    const inside = Math.min(end, this.size) - offset;
    if (inside > 0 && !(await this.zeroInPlace(offset, inside, flags.mayUnmap === true))) {
      throw new IoError('ENOTSUP'); // the node falls back to writing zero buffers
    }
    if (end > this.size) {
      await this.handle.truncate(end);
      this.size = end;
    }
  }

  /** QEMU's order: punch a hole when allowed, else zero-range, else punch and reallocate. */
  private async zeroInPlace(offset: number, length: number, mayUnmap: boolean): Promise<boolean> {
    if (!nativeFileOps.native) return false;
    if (mayUnmap && (await this.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length))) return true;
    if (await this.fallocate(FALLOC_FL_ZERO_RANGE, offset, length)) return true;
    return (await this.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)) && (await this.fallocate(0, offset, length));
  }

  async discard(offset: number, length: number): Promise<void> {
    const inside = Math.min(offset + length, this.size) - offset;
    if (inside > 0) await this.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, inside);
  }

  async flush(): Promise<void> {
    // After a failed writeback the kernel may have dropped dirty pages: no later flush may claim success.
    if (this.flushFailed) throw new IoError('EIO', `flush failed earlier: ${this.flushFailed.message}`);
    try {
      await this.handle.datasync();
    } catch (error) {
      this.flushFailed = error as Error;
      throw new IoError(errnoOf(error), (error as Error).message);
    }
  }

  async truncate(size: number): Promise<void> {
    await this.handle.truncate(size);
    this.size = size;
  }

  async blockStatus(offset: number, length: number): Promise<DriverExtent> {
    const available = Math.min(length, this.length() - offset);
    if (offset >= this.size) return { length: available, allocated: true, data: false, zero: true, hostOffset: offset };
    const data = await this.seek(offset, false);
    if (data === null) return { length: available, allocated: true, data: false, zero: true, hostOffset: offset };
    if (data > offset) return { length: Math.min(available, data - offset), allocated: true, data: false, zero: true, hostOffset: offset };
    const hole = (await this.seek(offset, true)) ?? this.size;
    // An unaligned end of file counts as data up to the sector boundary, as QEMU rounds it.
    const dataEnd = hole >= this.size ? this.length() : hole;
    return { length: Math.max(1, Math.min(available, dataEnd - offset)), allocated: true, data: true, zero: false, hostOffset: offset };
  }

  /** SEEK_DATA or SEEK_HOLE; on the calling thread when the addon can (as QEMU does: cheaper than a hand-off). */
  private async seek(offset: number, hole: boolean): Promise<number | null> {
    const fd = this.handle.fd;
    if (nativeFileOps.seekNow) return nativeFileOps.seekNow(fd, offset, hole);
    return hole ? nativeFileOps.seekHole(fd, offset) : nativeFileOps.seekData(fd, offset);
  }

  async setPermissions(needs: PermissionPair): Promise<void> {
    if (this.locking) this.held = await changeImageLocks(this.handle.fd, this.held, needs, this.path);
  }

  info() {
    return { filename: this.path, image: { 'dirty-flag': false } };
  }

  async allocatedSize(): Promise<number> {
    const stats = await this.handle.stat();
    return stats.blocks * 512;
  }

  async close(): Promise<void> {
    await this.handle.close(); // also drops the OFD locks
  }
}

async function openFile(path: string, writable: boolean): Promise<FileHandle> {
  try {
    return await open(path, writable ? 'r+' : 'r');
  } catch (error) {
    throw genericError(`Could not open '${path}': ${describeErrno(errnoOf(error))}`);
  }
}

export const fileDriver: BlockDriver<FileOptions> = {
  name: 'file',
  kind: 'protocol',
  strongOptions: ['filename'],
  async open(context, options) {
    const { node } = context;
    if (options['pr-manager'] !== undefined) throw genericError('pr-manager is not supported by blockd');
    if (options.aio === 'io_uring') throw genericError('aio=io_uring was specified, but is not supported in this build.');
    if (options.aio === 'native' && !node.settings.cacheDirect) {
      throw genericError('aio=native was specified, but it requires cache.direct=on, which was not specified.');
    }
    // Never silently weaker than QEMU: without the addon there are no OFD locks, so only locking=off opens.
    if (options.locking !== 'off' && nativeAddonMissing !== undefined) {
      throw genericError(`Could not open '${options.filename}': image locking is unavailable (${nativeAddonMissing}); use locking=off to open the image without locks`);
    }
    let handle: FileHandle;
    try {
      handle = await openFile(options.filename, !node.readOnly);
    } catch (error) {
      // auto-read-only: fall back to a read-only open when the file cannot be written.
      if (node.readOnly || !node.settings.autoReadOnly) throw error;
      handle = await openFile(options.filename, false);
      node.settings.readOnly = true;
    }
    try {
      const stats = await handle.stat();
      if (!stats.isFile()) throw genericError(`'file' driver requires '${options.filename}' to be a regular file`);
      return new FileState(handle, options.filename, stats.size, options.locking !== 'off');
    } catch (error) {
      await handle.close();
      throw error;
    }
  },
};

