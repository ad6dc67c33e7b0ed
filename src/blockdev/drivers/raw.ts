/*
 * The `raw` format driver: the file's bytes are the disk, optionally a window
 * of them (offset, size). Without a window it passes its users' permissions
 * straight through, like a filter; with one it guards the file's size.
 */
import { genericError } from '../../errors.js';
import type { BlockDriver, DriverState, HostFileRange, WriteFlags, ZeroFlags } from '../block-driver.js';
import type { ChildEdge } from '../child-edge.js';
import { PERM_RESIZE, PERM_WRITE, defaultChildPermissions, type PermissionPair } from '../permissions.js';
import { nodeFilename } from '../node-filename.js';

interface RawOptions {
  offset?: number;
  size?: number;
}

const SECTOR = 512;

/** The window of the file the options describe, refused in QEMU's words where the file cannot hold it (raw_apply_options). */
function windowOf(options: RawOptions, fileSize: number): { offset: number; size: number | undefined } {
  const offset = options.offset ?? 0;
  if (offset < 0) throw genericError(`Parameter 'offset' expects a non-negative value`);
  if (offset > fileSize) throw genericError(`Offset (${offset}) cannot be greater than size of the containing file (${fileSize})`);
  if (options.size !== undefined && fileSize - offset < options.size) {
    throw genericError(`The sum of offset (${offset}) and size (${options.size}) has to be smaller or equal to the  actual size of the containing file (${fileSize})`);
  }
  if (options.size !== undefined && options.size % SECTOR !== 0) throw genericError(`Specified size is not multiple of ${SECTOR}`);
  return { offset, size: options.size };
}

class RawState implements DriverState {
  constructor(private readonly file: ChildEdge, private offset: number, private fixedSize: number | undefined, private readonly filename: () => string) {}

  /** A reopen may move the window (checked against the file the node has now, as QEMU does before switching files). */
  prepareReopen(options: Record<string, unknown>): () => () => void {
    const window = windowOf(options, this.file.length());
    return () => {
      const old = { offset: this.offset, size: this.fixedSize };
      this.offset = window.offset;
      this.fixedSize = window.size;
      return () => {
        this.offset = old.offset;
        this.fixedSize = old.size;
      };
    };
  }

  length(): number {
    if (this.fixedSize !== undefined) return this.fixedSize;
    return Math.max(0, this.file.length() - this.offset);
  }

  read(offset: number, buffer: Buffer): Promise<void> {
    return this.file.read(this.offset + offset, buffer);
  }

  write(offset: number, buffer: Buffer, flags: WriteFlags): Promise<void> {
    return this.file.write(this.offset + offset, buffer, flags);
  }

  writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.file.writeZeroes(this.offset + offset, length, flags);
  }

  discard(offset: number, length: number): Promise<void> {
    return this.file.discard(this.offset + offset, length);
  }

  copyRangeFrom(offset: number, length: number, target: ChildEdge, targetOffset: number, flags: WriteFlags): Promise<void> {
    return this.file.copyRangeFrom(this.offset + offset, length, target, targetOffset, flags);
  }

  copyRangeTo(source: HostFileRange, offset: number, length: number, flags: WriteFlags): Promise<void> {
    return this.file.copyRangeTo(source, this.offset + offset, length, flags);
  }

  async blockStatus(offset: number, length: number) {
    return { length, delegate: this.file, offset: this.offset + offset };
  }

  async truncate(size: number): Promise<void> {
    if (this.fixedSize !== undefined) throw genericError('Cannot resize fixed-size raw disks');
    await this.file.truncate(this.offset + size);
  }

  childPermissions(edge: ChildEdge, parents: PermissionPair): PermissionPair {
    // Default rules may add write/resize for metadata; raw has none, so it takes them only when its users do.
    const pair = defaultChildPermissions(edge.role, parents, true);
    const mask = PERM_WRITE | PERM_RESIZE;
    return { perm: (pair.perm & ~mask) | (parents.perm & mask), shared: pair.shared };
  }

  info() {
    // QEMU answers raw's driver info with its file's: the dirty flag is the file's, and absent over nbd.
    const below = this.file.child.state.info().image ?? {};
    return { filename: this.filename(), image: 'dirty-flag' in below ? { 'dirty-flag': below['dirty-flag'] } : {} };
  }

  async close(): Promise<void> {}
}

export const rawDriver: BlockDriver<RawOptions & Record<string, unknown>> = {
  name: 'raw',
  kind: 'format',
  strongOptions: ['offset', 'size'],
  async open(context, options) {
    const windowed = options.offset !== undefined || options.size !== undefined;
    const file = await context.openChild('file', { name: 'file', role: windowed ? 'data' : 'filtered' });
    const window = windowOf(options, file.length());
    return new RawState(file, window.offset, window.size, () => nodeFilename(context.node));
  },
};
