/*
 * Which parts of a node changed, at a granularity (QEMU's BdrvDirtyBitmap): one bit per
 * granule in a GranuleBits, with QEMU's attributes. A bitmap marks writes while it is
 * enabled; a job that owns it (busy) gives it a successor (successor.ts): the bitmap is
 * disabled and frozen, and the successor, an anonymous bitmap of the same node, marks the
 * writes meanwhile, so no write is lost whichever way the job ends.
 */
import { GranuleBits } from './granule-bits.js';

/** query-named-block-nodes' BlockDirtyInfo. */
export interface BlockDirtyInfo {
  name?: string;
  count: number;
  granularity: number;
  recording: boolean;
  busy: boolean;
  persistent: boolean;
  inconsistent?: boolean;
}

export class DirtyBitmap {
  private readonly bits: GranuleBits;
  private lengthInBytes: number;
  /** Writes to the node mark the bitmap (block-dirty-bitmap-disable turns this off; so does a successor taking over). */
  enabled = true;
  /** Kept in the image (qcow2's bitmaps extension). */
  persistent = false;
  /** Owned by a job or an export: the user cannot change it meanwhile. */
  busy = false;
  /** Loaded from an image opened read-only: neither writes nor commands may change it (QEMU's readonly). */
  readonly = false;
  /** Found in use in an image after a crash: its bits cannot be trusted. */
  inconsistent = false;
  /** Records in this bitmap's place while a job owns it (successor.ts). */
  successor: DirtyBitmap | undefined;

  /**
   * `name` is undefined for a job's own bitmap (listed, but not addressable). A successor that
   * takes its bitmap's place takes its name (successor.ts), as QEMU's abdicate does.
   */
  constructor(length: number, readonly granularity: number, public name?: string) {
    this.lengthInBytes = length;
    this.bits = new GranuleBits(Math.ceil(length / granularity));
  }

  get length(): number {
    return this.lengthInBytes;
  }

  /** Whether writes to the node mark it now. */
  get marksWrites(): boolean {
    return this.enabled && !this.inconsistent;
  }

  /** What query-named-block-nodes calls recording: it marks writes, or its successor does for it (QEMU's bdrv_dirty_bitmap_recording). */
  get recording(): boolean {
    return this.marksWrites || this.successor?.marksWrites === true;
  }

  info(): BlockDirtyInfo {
    return {
      ...(this.name === undefined ? {} : { name: this.name }),
      count: this.count(),
      granularity: this.granularity,
      recording: this.recording,
      busy: this.busy,
      persistent: this.persistent,
      ...(this.inconsistent ? { inconsistent: true } : {}),
    };
  }

  /** The granules a byte range touches. */
  private span(offset: number, length: number): [number, number] {
    return [Math.floor(offset / this.granularity), Math.ceil((offset + length) / this.granularity)];
  }

  set(offset: number, length: number): void {
    this.bits.set(...this.span(offset, length));
  }

  clear(offset: number, length: number): void {
    this.bits.clear(...this.span(offset, length));
  }

  isDirty(offset: number): boolean {
    return this.bits.has(Math.floor(offset / this.granularity));
  }

  /** Dirty bytes as QEMU counts them: whole granules, the last one too where the disk ends inside it. */
  count(): number {
    return this.bits.count() * this.granularity;
  }

  /** Granules [first, first + count) as bytes, lowest bit first; `first` is a multiple of 32. */
  granuleBytes(first: number, count: number): Buffer {
    return this.bits.toBytes(first, count);
  }

  /** Marks the granules `bytes` has set (as granuleBytes lays them out), from granule `first`. */
  orGranuleBytes(first: number, bytes: Buffer): void {
    this.bits.orBytes(first, bytes);
  }

  /** How many granules the bitmap has. */
  get granules(): number {
    return this.bits.size;
  }

  /** Marks every byte `other` marks (a merge); `other` covers the same length at any granularity. */
  merge(other: DirtyBitmap): void {
    if (other.granularity === this.granularity) {
      this.bits.or(other.bits);
      return;
    }
    for (const run of other.dirtyRuns()) this.set(run.offset, run.length);
  }

  /** The dirty byte ranges, in order, each as long as it runs. */
  *dirtyRuns(): Generator<{ offset: number; length: number }> {
    for (let first = this.bits.findSet(0); first >= 0; ) {
      const clean = this.bits.findClear(first + 1);
      const end = clean < 0 ? this.bits.size : clean;
      const offset = first * this.granularity;
      yield { offset, length: Math.min(end * this.granularity, this.lengthInBytes) - offset };
      first = clean < 0 ? -1 : this.bits.findSet(clean);
    }
  }

  /** The node was resized: granules beyond a smaller end go, new ones start clean. */
  resize(length: number): void {
    this.lengthInBytes = length;
    this.bits.resize(Math.ceil(length / this.granularity));
  }

  /**
   * The first dirty bytes in [from, end), clipped to that range and to the bitmap's end, or
   * undefined when it is all clean (QEMU's bdrv_dirty_bitmap_next_dirty_area, no wrapping).
   */
  dirtyArea(from: number, end: number): { offset: number; length: number } | undefined {
    end = Math.min(end, this.lengthInBytes);
    if (from >= end || this.bits.count() === 0) return undefined;
    const lastGranule = Math.ceil(end / this.granularity);
    const first = this.bits.findSet(Math.floor(from / this.granularity), lastGranule);
    if (first < 0) return undefined;
    const clean = this.bits.findClear(first + 1, lastGranule);
    const offset = Math.max(from, first * this.granularity);
    const stop = clean < 0 ? end : Math.min(end, clean * this.granularity);
    return { offset, length: stop - offset };
  }

  /**
   * The first dirty run at or after `from` (wrapping to the start), at most `maxLength`
   * long and clipped to the end, or undefined when nothing is dirty.
   */
  nextRun(from: number, maxLength: number): { offset: number; length: number } | undefined {
    if (this.bits.count() === 0) return undefined;
    const granules = this.bits.size;
    const start = Math.min(Math.floor(from / this.granularity), granules);
    let first = this.bits.findSet(start);
    if (first < 0) first = this.bits.findSet(0, start);
    if (first < 0) return undefined;
    const limit = Math.min(granules, first + Math.max(1, Math.floor(maxLength / this.granularity)));
    const clean = this.bits.findClear(first + 1, limit);
    const end = clean < 0 ? limit : clean;
    const offset = first * this.granularity;
    return { offset, length: Math.min(end * this.granularity, this.lengthInBytes) - offset };
  }
}
