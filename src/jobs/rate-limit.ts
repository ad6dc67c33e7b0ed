/*
 * A job's speed limit (QEMU's ratelimit): a token bucket over 100 ms slices.
 * Bytes beyond the speed wait for later slices, in the job's own sleep so a
 * pause or cancel ends the wait at once. After a pause, a mirror or a stream
 * goes on at once (QEMU's loops start a new wait); a backup keeps the bytes it
 * was waiting for on account (QEMU's block-copy keeps its limit across pauses).
 */
import type { Job } from './job.js';

/** Token bucket over 100 ms slices, like QEMU's ratelimit: bytes beyond the speed wait for later slices. */
export class RateLimit {
  private sliceStart = Date.now();
  private sliceBytes = 0;

  constructor(private readonly afterPause: 'go-on' | 'keep-account' = 'go-on') {}

  async take(job: Job, bytes: number): Promise<void> {
    if (job.speed <= 0) return;
    this.sliceBytes += bytes;
    // The speed may change while the job waits (block-job-set-speed wakes it).
    const perSlice = () => job.speed / 10;
    while (job.speed > 0 && this.sliceBytes > perSlice()) {
      const sliceEnd = this.sliceStart + 100;
      const generation = job.pauseGeneration;
      await job.sleep(Math.max(0, sliceEnd - Date.now()));
      if (job.pauseGeneration !== generation) {
        if (this.afterPause === 'keep-account') {
          // Woken before the slice ended: its bytes still count.
          if (Date.now() < sliceEnd) continue;
        } else {
          // Paused while waiting: as in QEMU, the job goes on at once after the resume.
          this.sliceBytes = 0;
          this.sliceStart = Date.now();
          return;
        }
      }
      this.sliceStart = Math.max(sliceEnd, Date.now() - 100);
      this.sliceBytes -= perSlice();
    }
  }
}
