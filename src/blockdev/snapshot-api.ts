/*
 * What a node offers to read a point-in-time view of itself (QEMU's snapshot
 * API: bdrv_co_preadv_snapshot and friends). The copy-before-write filter has
 * it; the snapshot-access driver turns it into an ordinary node that NBD can
 * export. Nodes without it answer ENOTSUP, as in QEMU.
 */
import type { DriverExtent, DriverState } from './block-driver.js';

export interface SnapshotSource {
  /** Reads the view as it was; EACCES where it is not accessible (outside the bitmap, discarded, or broken). */
  snapshotRead(offset: number, buffer: Buffer): Promise<void>;
  /** The view's block status at `offset` (a run that is all copied or all not copied yet). */
  snapshotBlockStatus(offset: number, length: number): Promise<DriverExtent>;
  /** The reader is done with the clusters wholly inside the range: they are no longer copied, kept or readable. */
  snapshotDiscard(offset: number, length: number): Promise<void>;
}

export function snapshotSourceOf(state: DriverState): SnapshotSource | undefined {
  const candidate = state as Partial<SnapshotSource>;
  return typeof candidate.snapshotRead === 'function' ? (state as DriverState & SnapshotSource) : undefined;
}
