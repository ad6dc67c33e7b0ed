/*
 * A job transaction (QEMU's JobTxn, job.c): jobs that end together. A job whose run
 * succeeded waits until every peer's has; then all go pending, and all are finalized (every
 * prepare first, then each one's commit, clean and last event) once none needs a
 * job-finalize, or when one gets it. When one fails or is cancelled, every other is
 * cancelled (forced) and waited for, and all abort. Jobs are kept newest first, as QEMU's
 * list, so the last created is finalized first. A job started alone has a transaction of
 * its own. Everything here runs in a section of the daemon's lock (a job's end, or a command).
 */
import type { Job } from './job.js';

export class JobTxn {
  /** Newest first. */
  private readonly jobs: Job[] = [];
  private aborting = false;

  add(job: Job): void {
    this.jobs.unshift(job);
  }

  remove(job: Job): void {
    const index = this.jobs.indexOf(job);
    if (index >= 0) this.jobs.splice(index, 1);
  }

  /** The jobs still in the transaction, newest first. */
  members(): readonly Job[] {
    return this.jobs;
  }

  /** QEMU's job_completed_txn_success: `job`'s run succeeded. */
  async succeed(job: Job): Promise<void> {
    job.markWaiting();
    if (this.jobs.some((peer) => !peer.workDone)) return;
    for (const peer of [...this.jobs]) peer.markPending();
    if (this.jobs.every((peer) => peer.autoFinalize)) await this.finalize();
  }

  /**
   * QEMU's job_do_finalize: every prepare, in order; a failing one aborts them all (from the
   * failing job, so every other is cancelled: none commits alone); otherwise each finalizes.
   */
  async finalize(): Promise<void> {
    for (const peer of [...this.jobs]) {
      if (!(await peer.prepareEnd())) return this.abort(peer);
    }
    for (const peer of [...this.jobs]) await peer.finalizeSingle();
  }

  /** QEMU's job_completed_txn_abort: `job` failed or was cancelled; every peer is cancelled, waited for, and all finalize (abort). */
  async abort(job: Job): Promise<void> {
    if (this.aborting) return; // a peer's end, reached while the transaction aborts
    this.aborting = true;
    for (const peer of this.jobs) if (peer !== job) peer.cancelForPeer();
    while (this.jobs.length > 0) {
      const next = this.jobs[0]!;
      // A job a transaction created but never started has no run to wait for.
      if (!next.workDone && next.status !== 'created') await next.untilWorkDone();
      await next.finalizeSingle();
    }
  }
}
