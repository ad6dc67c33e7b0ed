/*
 * Group commit: many callers that need "everything written so far is
 * durable" share one flush. A caller arriving while a flush runs waits for
 * the next one (its writes may have missed the running one), and all callers
 * that arrive meanwhile share that next flush.
 */

export class FlushCoalescer {
  private running: Promise<void> | undefined;
  private next: Promise<void> | undefined;

  constructor(private readonly flushNow: () => Promise<void>) {}

  flush(): Promise<void> {
    if (!this.running) return this.start();
    this.next ??= this.running.catch(() => {}).then(() => {
      this.next = undefined;
      return this.start();
    });
    return this.next;
  }

  private start(): Promise<void> {
    const run = this.flushNow().finally(() => {
      if (this.running === run) this.running = undefined;
    });
    this.running = run;
    return run;
  }
}
