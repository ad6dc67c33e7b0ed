/*
 * A job's speed limit (QEMU's ratelimit): a token bucket over 100 ms slices.
 * Bytes beyond the speed wait for later slices, in the job's own sleep so a
 * pause or cancel ends the wait at once.
 */
import type { Job } from './job.js';

/** Token bucket over 100 ms slices, like QEMU's ratelimit: bytes beyond the speed wait for later slices. */
export class RateLimit {
  private sliceStart = Date.now();
  private sliceBytes = 0;

  async take(job: Job, bytes: number): Promise<void> {
    if (job.speed <= 0) return;
    const perSlice = job.speed / 10;
    this.sliceBytes += bytes;
    while (this.sliceBytes > perSlice && job.speed > 0) {
      const sliceEnd = this.sliceStart + 100;
      const generation = job.pauseGeneration;
      await job.sleep(Math.max(0, sliceEnd - Date.now()));
      if (job.pauseGeneration !== generation) {
        // Paused while waiting: as in QEMU, the job goes on at once after the resume.
        this.sliceBytes = 0;
        this.sliceStart = Date.now();
        return;
      }
      this.sliceStart = Math.max(sliceEnd, Date.now() - 100);
      this.sliceBytes -= perSlice;
    }
  }
}
