/*
 * What QEMU's single main loop gives it for free: a QMP command, the end of a
 * job (its prepare, commit, abort, clean and release) and the daemon's
 * shutdown never interleave. Each runs as a section of this lock, in arrival
 * order; anything arriving meanwhile waits for the section to end, so nobody
 * meets a half-swapped graph or a job between two of its steps.
 */

interface Waiter {
  owner: object | undefined;
  start: (nested: boolean) => void;
}

/** A holder waiting for an owner's sections (a command waiting for a job to end): they run inside the holder's. */
interface Loan {
  count: number;
  running: Set<Promise<unknown>>;
}

export class MainLoopLock {
  private held = false;
  private readonly queue: Waiter[] = [];
  private readonly loans = new Map<object, Loan>();

  /** Whether a section runs now. */
  get busy(): boolean {
    return this.held;
  }

  /**
   * Runs `work` as a section: after every section before it, before any after it. `owner`
   * (a job) names the section, so a holder waiting for that owner lets it in (see `lend`).
   */
  async run<T>(work: () => Promise<T>, owner?: object): Promise<T> {
    const loan = owner === undefined ? undefined : this.loans.get(owner);
    if (loan) return this.runNested(loan, work);
    if (this.held) {
      const nested = await new Promise<boolean>((start) => this.queue.push({ owner, start }));
      if (nested) return this.runNested(this.loans.get(owner!)!, work);
    }
    this.held = true;
    try {
      return await work();
    } finally {
      this.handOn();
    }
  }

  /**
   * The current holder waits for `waiting`, which needs `owner`'s sections (a command waits for
   * the end of a job, whose end is a section of its own): those run inside the holder's section
   * meanwhile instead of waiting behind it. Resolves once `waiting` has and the owner's sections
   * let in have ended, so the holder never leaves one of them half done.
   */
  async lend<T>(owner: object, waiting: Promise<T>): Promise<T> {
    if (!this.held) return waiting;
    let loan = this.loans.get(owner);
    if (!loan) {
      loan = { count: 0, running: new Set() };
      this.loans.set(owner, loan);
    }
    loan.count++;
    for (const waiter of this.queue.filter((candidate) => candidate.owner === owner)) {
      this.queue.splice(this.queue.indexOf(waiter), 1);
      waiter.start(true);
    }
    try {
      return await waiting;
    } finally {
      while (loan.running.size > 0) await Promise.allSettled([...loan.running]);
      if (--loan.count === 0) this.loans.delete(owner);
    }
  }

  private runNested<T>(loan: Loan, work: () => Promise<T>): Promise<T> {
    const running = work();
    loan.running.add(running);
    const forget = () => loan.running.delete(running);
    running.then(forget, forget);
    return running;
  }

  private handOn(): void {
    const next = this.queue.shift();
    if (next) next.start(false);
    else this.held = false;
  }
}
