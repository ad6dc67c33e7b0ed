/*
 * Sizes block-status requests for map and compare. blockd's qcow2 driver maps the whole
 * requested range to answer with its first run, so asking for "everything to the end" costs
 * time in proportion to the disk, per answer; asking for a bit more than the last run cost
 * keeps fragmented images fast, and doubling while runs fill the request keeps sparse ones fast.
 */
const MIN_REQUEST = 1024 * 1024;

export class StatusWindow {
  private size = MIN_REQUEST;

  /** How much to ask for when `remaining` bytes are left. */
  request(remaining: number): number {
    return Math.min(remaining, this.size);
  }

  /** Records an answer of `length` bytes to a request of `requested`. */
  answered(length: number, requested: number): void {
    this.size = length >= requested ? this.size * 2 : Math.max(MIN_REQUEST, 2 * length);
  }
}
