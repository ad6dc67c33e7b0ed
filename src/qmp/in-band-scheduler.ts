/*
 * Runs in-band requests one at a time for the whole daemon, taking them
 * round-robin from the sessions that have some queued, as QEMU's single
 * dispatcher does: a session's replies stay in request order and no two
 * in-band commands ever interleave. Each runs, reply included, as a section
 * of the daemon's lock, so a job's end never meets a command half done and
 * what a command sets off follows its reply. Out-of-band requests bypass it.
 */
import type { MainLoopLock } from '../main-loop-lock.js';

export interface RequestQueueOwner {
  /** Runs this session's oldest queued request; false when it had none. */
  runNext(): Promise<boolean>;
}

export class InBandScheduler {
  private readonly ready: RequestQueueOwner[] = [];
  private running = false;

  constructor(private readonly lock?: MainLoopLock) {}

  /** Called when a session queues a request. */
  wake(owner: RequestQueueOwner): void {
    if (!this.ready.includes(owner)) this.ready.push(owner);
    if (this.running) return;
    // Start on the next turn, as QEMU's dispatcher does: the rest of the received bytes is parsed first,
    // so an exec-oob request that arrived with queued in-band ones is answered ahead of them.
    this.running = true;
    setImmediate(() => void this.loop());
  }

  forget(owner: RequestQueueOwner): void {
    const index = this.ready.indexOf(owner);
    if (index >= 0) this.ready.splice(index, 1);
  }

  private async loop(): Promise<void> {
    try {
      while (this.ready.length) {
        const owner = this.ready.shift()!;
        const ran = await (this.lock ? this.lock.run(() => owner.runNext()) : owner.runNext());
        if (ran) this.ready.push(owner); // may have more; goes to the back of the line
        // Let I/O (other clients, OOB requests, jobs) run between two commands.
        await new Promise<void>((resolve) => setImmediate(resolve));
      }
    } finally {
      this.running = false;
    }
  }
}
