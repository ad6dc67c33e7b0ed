/*
 * Runs in-band requests one at a time for the whole daemon, taking them
 * round-robin from the sessions that have some queued, as QEMU's single
 * dispatcher does: a session's replies stay in request order and no two
 * in-band commands ever interleave. Out-of-band requests bypass it.
 */

export interface RequestQueueOwner {
  /** Runs this session's oldest queued request; false when it had none. */
  runNext(): Promise<boolean>;
}

export class InBandScheduler {
  private readonly ready: RequestQueueOwner[] = [];
  private running = false;

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
        if (await owner.runNext()) this.ready.push(owner); // may have more; goes to the back of the line
        // Let I/O (other clients, OOB requests, jobs) run between two commands.
        await new Promise<void>((resolve) => setImmediate(resolve));
      }
    } finally {
      this.running = false;
    }
  }
}
