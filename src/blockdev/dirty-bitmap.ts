/*
 * Which parts of a node changed, at a granularity (QEMU's BdrvDirtyBitmap, in
 * memory only): one bit per granule, with the count of dirty bytes kept as
 * bits change so a job can ask it at every step.
 */
export class DirtyBitmap {
  private readonly bits: Uint32Array;
  private dirtyGranules = 0;
  /** Writes to the node mark the bitmap (disabled bitmaps keep what they have). */
  recording = true;

  /** `name` is undefined for a job's own bitmap (listed, but not addressable). */
  constructor(readonly length: number, readonly granularity: number, readonly name?: string) {
    this.bits = new Uint32Array(Math.ceil(Math.ceil(length / granularity) / 32));
  }

  /** query-named-block-nodes' BlockDirtyInfo. */
  info(): { name?: string; count: number; granularity: number; recording: boolean; busy: boolean; persistent: boolean } {
    return { ...(this.name === undefined ? {} : { name: this.name }), count: this.count(), granularity: this.granularity, recording: this.recording, busy: false, persistent: false };
  }

  private get granules(): number {
    return Math.ceil(this.length / this.granularity);
  }

  private isSet(granule: number): boolean {
    return (this.bits[granule >>> 5]! & (1 << (granule & 31))) !== 0;
  }

  /** The granules a byte range touches. */
  private span(offset: number, length: number): [number, number] {
    const first = Math.floor(offset / this.granularity);
    const end = Math.min(this.granules, Math.ceil((offset + length) / this.granularity));
    return [first, end];
  }

  set(offset: number, length: number): void {
    const [first, end] = this.span(offset, length);
    for (let granule = first; granule < end; granule++) {
      if (this.isSet(granule)) continue;
      this.bits[granule >>> 5]! |= 1 << (granule & 31);
      this.dirtyGranules++;
    }
  }

  clear(offset: number, length: number): void {
    const [first, end] = this.span(offset, length);
    for (let granule = first; granule < end; granule++) {
      if (!this.isSet(granule)) continue;
      this.bits[granule >>> 5]! &= ~(1 << (granule & 31));
      this.dirtyGranules--;
    }
  }

  /** Dirty bytes (the last granule counts only up to the end). */
  count(): number {
    if (this.dirtyGranules === 0) return 0;
    const lastGranule = this.granules - 1;
    const tailShort = this.isSet(lastGranule) ? this.granules * this.granularity - this.length : 0;
    return this.dirtyGranules * this.granularity - tailShort;
  }

  /**
   * The first dirty run at or after `from` (wrapping to the start), at most `maxLength`
   * long and clipped to the end, or undefined when nothing is dirty.
   */
  nextRun(from: number, maxLength: number): { offset: number; length: number } | undefined {
    if (this.dirtyGranules === 0) return undefined;
    const granules = this.granules;
    const start = Math.min(Math.floor(from / this.granularity), granules);
    let first = this.findSet(start, granules);
    if (first < 0) first = this.findSet(0, start);
    if (first < 0) return undefined;
    const limit = Math.min(granules, first + Math.max(1, Math.floor(maxLength / this.granularity)));
    let end = first + 1;
    while (end < limit && this.isSet(end)) end++;
    const offset = first * this.granularity;
    return { offset, length: Math.min(end * this.granularity, this.length) - offset };
  }

  private findSet(from: number, to: number): number {
    for (let granule = from; granule < to;) {
      const word = this.bits[granule >>> 5]!;
      if (word === 0) {
        granule = (granule | 31) + 1; // a whole clean word
        continue;
      }
      if (this.isSet(granule)) return granule;
      granule++;
    }
    return -1;
  }
}
