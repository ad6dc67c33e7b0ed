/*
 * blockd's write-intent record, which makes persistent bitmaps survive a crash (QEMU 7.2
 * marks them inconsistent instead, and the next backup must be a full one). Like Linux md's
 * write-intent bitmap: one coarse bit per region (2 MiB or more, so the record fits one
 * cluster), set and made durable before any write into its region is issued. After a crash,
 * each in-use persistent bitmap is its last stored bits plus every region the record marks:
 * a superset of whatever reached the disk. The record is an ordinary bitmap of the image's
 * directory (so qemu-img check counts its clusters), always in use (so QEMU never trusts or
 * stores over it), and blockd trusts it only while its autoclear bit is set: a program that
 * does not know the bit clears it when it opens the image to write, and may write without
 * marking anything.
 */
import { DirtyBitmap } from '../../bitmaps/dirty-bitmap.js';
import { FlushCoalescer } from '../../flush-coalescer.js';
import type { Qcow2Image } from './qcow2-image.js';

/** The record's name in the bitmap directory (refused for a user's persistent bitmap). */
export const WRITE_INTENT_NAME = 'org.blockd.write-intent';

const MIN_REGION = 2 << 20;
const MAX_REGION = 2 ** 31;

/** Bytes per record bit: at least 2 MiB, and few enough bits that the record fits one cluster. */
export function intentRegion(size: number, clusterSize: number): number {
  let region = MIN_REGION;
  while (region < MAX_REGION && Math.ceil(size / region) > clusterSize * 8) region *= 2;
  return region;
}

export class WriteIntent {
  /** What the record marks (in memory: may be ahead of the disk until a write-out ends). */
  bits: DirtyBitmap;
  /** What the record on disk marks for sure. */
  private durable: DirtyBitmap;
  /** Host offsets of the record's data clusters, one per table entry (set when it is stored). */
  private dataOffsets: number[] = [];
  private readonly writer = new FlushCoalescer(() => this.writeOut());

  constructor(private readonly image: Qcow2Image, bits: DirtyBitmap) {
    this.bits = bits;
    this.durable = new DirtyBitmap(bits.length, bits.granularity);
    this.durable.merge(bits);
  }

  static fresh(image: Qcow2Image): WriteIntent {
    return new WriteIntent(image, new DirtyBitmap(image.size, intentRegion(image.size, image.clusterSize)));
  }

  /** The record was stored with these data clusters, holding `bits` as they were then (durable once the header names it). */
  placed(dataOffsets: number[], stored: DirtyBitmap): void {
    this.dataOffsets = dataOffsets;
    this.durable = new DirtyBitmap(stored.length, stored.granularity);
    this.durable.merge(stored);
  }

  /**
   * The image changed size: the record keeps its region size and every region it marked that
   * still exists (the store that follows writes it out at the new size).
   */
  resize(size: number): void {
    const carry = (from: DirtyBitmap) => {
      const carried = new DirtyBitmap(size, from.granularity);
      for (const run of from.dirtyRuns()) if (run.offset < size) carried.set(run.offset, Math.min(run.length, size - run.offset));
      return carried;
    };
    this.bits = carry(this.bits);
    this.durable = carry(this.durable);
  }

  /** Before a write to [offset, offset+length) is issued: its regions are marked on disk. */
  async ensure(offset: number, length: number): Promise<void> {
    if (length === 0 || this.covered(offset, length)) return;
    this.bits.set(offset, length);
    // A region past the stored record (the image just grew) is written by the store under way: wait for it.
    for (let attempt = 0; attempt < 3; attempt++) {
      await this.writer.flush();
      if (this.covered(offset, length)) return;
      await this.image.metadata.run(async () => {});
    }
    throw new Error('the write-intent record could not be made durable');
  }

  private covered(offset: number, length: number): boolean {
    const region = this.durable.granularity;
    const end = Math.min(offset + length, this.durable.length);
    for (let at = Math.floor(offset / region) * region; at < end; at += region) if (!this.durable.isDirty(at)) return false;
    return true;
  }

  /** Writes the record's clusters from memory, then flushes: everything marked before it started is durable after. */
  private async writeOut(): Promise<void> {
    await this.image.metadata.run(async () => {
      if (this.dataOffsets.length === 0) return; // not stored yet: the store that places it writes the marks
      const snapshot = new DirtyBitmap(this.bits.length, this.bits.granularity);
      snapshot.merge(this.bits);
      const granulesPerCluster = this.image.clusterSize * 8;
      for (const [index, host] of this.dataOffsets.entries()) {
        const first = index * granulesPerCluster;
        const cluster = Buffer.alloc(this.image.clusterSize);
        snapshot.granuleBytes(first, Math.max(0, Math.min(granulesPerCluster, snapshot.granules - first))).copy(cluster);
        this.image.checkWrite(host, cluster.length);
        await this.image.file.write(host, cluster);
      }
      await this.image.barrier.flush();
      // After a grow, regions past the stored record's clusters wait for the store that follows.
      const coveredBytes = this.dataOffsets.length * granulesPerCluster * snapshot.granularity;
      if (coveredBytes < snapshot.length) snapshot.clear(coveredBytes, snapshot.length - coveredBytes);
      this.durable = snapshot;
    });
  }
}
