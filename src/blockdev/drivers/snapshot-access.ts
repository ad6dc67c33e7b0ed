/*
 * The `snapshot-access` driver (QEMU's block/snapshot-access.c): a node that
 * reads the point-in-time view its `file` offers through the snapshot API (a
 * copy-before-write filter: the disk as it was when the filter went in), so
 * that an NBD export can serve it to a backup program while the guest writes.
 * Reads and block status come from the view, a discard gives clusters up (the
 * reader is done with them), writes are not supported. Over a node without
 * the API every read answers ENOTSUP, as in QEMU.
 */
import type { BlockDriver, DriverExtent, DriverInfo, DriverState } from '../block-driver.js';
import type { ChildEdge } from '../child-edge.js';
import { IoError } from '../io-error.js';
import { nodeFilename } from '../node-filename.js';
import type { BlockNode } from '../node.js';
import { PERM_ALL, type PermissionPair } from '../permissions.js';
import { snapshotSourceOf, type SnapshotSource } from '../snapshot-api.js';

class SnapshotAccessState implements DriverState {
  constructor(private readonly file: ChildEdge, private readonly node: BlockNode) {}

  private get source(): SnapshotSource {
    const source = snapshotSourceOf(this.file.child.state);
    if (!source) throw new IoError('ENOTSUP');
    return source;
  }

  length(): number {
    return this.file.length();
  }

  read(offset: number, buffer: Buffer): Promise<void> {
    return Promise.resolve().then(() => this.source.snapshotRead(offset, buffer));
  }

  async write(): Promise<void> {
    throw new IoError('ENOTSUP');
  }

  async writeZeroes(): Promise<void> {
    throw new IoError('ENOTSUP');
  }

  discard(offset: number, length: number): Promise<void> {
    return Promise.resolve().then(() => this.source.snapshotDiscard(offset, length));
  }

  blockStatus(offset: number, length: number): Promise<DriverExtent> {
    return Promise.resolve().then(() => this.source.snapshotBlockStatus(offset, length));
  }

  /** It needs nothing of its child: the view's own locking keeps the reads consistent. */
  childPermissions(): PermissionPair {
    return { perm: 0, shared: PERM_ALL };
  }

  info(): DriverInfo {
    return { filename: nodeFilename(this.node) };
  }

  async close(): Promise<void> {}
}

export const snapshotAccessDriver: BlockDriver = {
  name: 'snapshot-access',
  kind: 'format',
  // Its filename is its child's, as qemu-storage-daemon reports it.
  namedAfterChild: true,
  strongOptions: [],
  async open(context) {
    const file = await context.openChild('file', { name: 'file', role: 'data' });
    return new SnapshotAccessState(file, context.node);
  },
};
