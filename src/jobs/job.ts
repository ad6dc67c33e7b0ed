/*
 * One job, driven through QEMU's state machine (job-state-table.ts) by the
 * verbs clients send and by its own run. A job kind supplies run / prepare /
 * commit / abort / clean (and complete for jobs that reach READY); this class
 * owns everything else: status changes and their events in QEMU's order,
 * pause points, cancellation, finalization and dismissal. Its end, from the
 * run's end to its last event, is one section of the daemon's lock, as a QEMU
 * job's end is one main-loop step: no command meets it half done.
 */
import type { Logger } from 'pino';
import type { EventBus } from '../event-bus.js';
import type { JobStatus, JobType, JobVerb, MirrorCopyMode } from '../generated/qapi-types.js';
import { genericError } from '../errors.js';
import type { MainLoopLock } from '../main-loop-lock.js';
import { canTransition, verbAllowed } from './job-state-table.js';
import { JobTxn } from './job-txn.js';

export interface JobKind {
  readonly type: JobType;
  /** Block jobs send BLOCK_JOB_* events and are listed by query-block-jobs. */
  readonly blockJob: boolean;
  /** The work; calls `job.pausePoint()` between steps. A thrown error fails the job. */
  run(job: Job): Promise<void>;
  /** Graph changes that may still fail (the job then aborts): everything fallible of the job's end. */
  prepare?(job: Job): Promise<void>;
  /**
   * commit, abort and clean cannot fail, as in QEMU: the job goes on to its event and its
   * conclusion whatever they meet (an error there is logged as the bug it is).
   */
  commit?(job: Job): Promise<void>;
  abort?(job: Job): Promise<void>;
  clean?(job: Job): Promise<void>;
  /** job-complete on a READY job (mirror, active commit). */
  complete?(job: Job): void;
  /** block-job-change (QEMU 8.2): a mirror's copy mode is the one thing a job lets change. */
  change?(copyMode: MirrorCopyMode): void;
  /** When the job object goes away (dismissed): what it holds until then (stream's node blockers, as in QEMU). Logged if it fails. */
  release?(job: Job): Promise<void>;
}

/** What a job works with besides its kind. */
export interface JobEnvironment {
  bus: EventBus;
  /** A job's end (from its run's end to its last event) is a section of the daemon's lock: no command meets it half done. */
  lock: MainLoopLock;
  log: Logger;
}

/** What a job does with an I/O error, by its on-error policy (QEMU's block_job_error_action). */
export type ErrorPolicy = 'report' | 'ignore' | 'enospc' | 'stop' | 'auto';

export interface JobOptions {
  id: string;
  autoFinalize: boolean;
  autoDismiss: boolean;
  speed?: number;
  /** The job transaction it joins (a transaction's grouped backups); a transaction of its own otherwise. */
  txn?: JobTxn;
}

/** Statuses in which the job's run is over (QEMU's job_is_completed). */
const WORK_DONE: readonly JobStatus[] = ['waiting', 'pending', 'aborting', 'concluded', 'null'];

/** Thrown at a pause point once the job is cancelled. */
export class JobCancelled extends Error {
  constructor() {
    super('Operation canceled');
  }
}

export class Job {
  status: JobStatus = 'undefined';
  /** Work done and work known, in the kind's units (bytes for block jobs). */
  currentProgress = 0;
  totalProgress = 0;
  speed: number;
  error: string | undefined;
  ioStatus: 'ok' | 'failed' | 'nospace' = 'ok';
  readonly autoFinalize: boolean;
  readonly autoDismiss: boolean;
  /** The jobs that end together with this one (QEMU's JobTxn). */
  readonly txn: JobTxn;
  /** The job has failed or was cancelled (QEMU's job->ret != 0): it aborts. */
  private failed = false;
  /** The run began: only then does the job send BLOCK_JOB_COMPLETED or _CANCELLED. */
  private started = false;
  /** The run is under way (between begin and its end). */
  private executing = false;
  private userPaused = false;
  private pauseCount = 0;
  private cancelRequested = false;
  private forceCancel = false;
  private resumeWaiters: (() => void)[] = [];
  private parked = 0;
  /** The job shows 'paused' or 'standby': every worker is parked. */
  private shownPaused = false;
  private resumeStatus: JobStatus = 'running';
  /** Workers of the run (the copy engine sets this) and how many sleep (rate limit) right now. */
  workers = 1;
  private sleepers = 0;
  private sleepKicks: (() => void)[] = [];
  /**
   * Set by a run whose I/O goes on beside it (the mirror loop's copies): a pause parks only once
   * that I/O has settled, as QEMU's mirror_pause waits for its operations, so a paused job's
   * offset stands still.
   */
  settleBeforePause: (() => Promise<unknown>) | undefined;
  /** Counts parkings, so a sleeper can tell that the job was paused while it slept. */
  pauseGeneration = 0;
  private statusWaiters: { test: () => boolean; resolve: () => void }[] = [];
  private readonly endedWaiters: (() => void)[] = [];
  private startupDone!: () => void;
  private readonly startup = new Promise<void>((resolve) => (this.startupDone = resolve));
  private readonly bus: EventBus;

  constructor(readonly id: string, readonly kind: JobKind, options: JobOptions, private readonly env: JobEnvironment, private readonly onNull: (job: Job) => void) {
    this.autoFinalize = options.autoFinalize;
    this.autoDismiss = options.autoDismiss;
    this.speed = options.speed ?? 0;
    this.bus = env.bus;
    this.txn = options.txn ?? new JobTxn();
    this.txn.add(this);
  }

  /**
   * For the command that starts the job: resolves where QEMU's job coroutine would first yield
   * (its first real I/O), or once the job has ended if it ends before that. The command replies
   * after this, so a job that fails or has nothing to do sends all its events before the reply,
   * as in QEMU; its end then runs inside the command's section.
   */
  untilStartup(): Promise<void> {
    return this.env.lock.lend(this, this.startup);
  }

  get type(): JobType {
    return this.kind.type;
  }

  /** Busy: the run is working, not sleeping (rate limit, idle) or parked at a pause point. */
  get busy(): boolean {
    return this.executing && this.sleepers + this.parked < this.workers;
  }

  get paused(): boolean {
    return this.pauseCount > 0;
  }

  get cancelled(): boolean {
    return this.cancelRequested && this.forceCancel;
  }

  /** Any cancel was asked for: a READY job's soft cancel ends it without its final switch (QEMU's job_cancel_requested). */
  get stopRequested(): boolean {
    return this.cancelRequested;
  }

  // ---- status -------------------------------------------------------------------------------

  private transition(to: JobStatus): void {
    if (!canTransition(this.status, to)) throw new Error(`job '${this.id}': illegal transition ${this.status} -> ${to}`);
    const changed = this.status !== to;
    this.status = to;
    if (changed) this.bus.emit('JOB_STATUS_CHANGE', { id: this.id, status: to });
    this.recheckWaiters();
  }

  private recheckWaiters(): void {
    this.statusWaiters = this.statusWaiters.filter((waiter) => (waiter.test() ? (waiter.resolve(), false) : true));
  }

  /** Refuses a verb the current status does not accept, in QEMU's words. */
  checkVerb(verb: JobVerb): void {
    if (!verbAllowed(verb, this.status)) {
      throw genericError(`Job '${this.id}' in state '${this.status}' cannot accept command verb '${verb}'`);
    }
  }

  private blockEvent(): { type: JobType; device: string; len: number; offset: number; speed: number } {
    return { type: this.type, device: this.id, len: this.totalProgress, offset: this.currentProgress, speed: this.speed };
  }

  // ---- life cycle ----------------------------------------------------------------------------

  /** Announces the job (created) and starts it (running); both events precede the command's reply, as in QEMU. */
  start(): void {
    this.announce();
    this.begin();
  }

  /** The job exists (created); set-up that may still fail comes next. */
  announce(): void {
    this.transition('created');
  }

  /** Set-up failed: the job goes (created -> null), as in QEMU's job_early_fail. */
  abandon(): void {
    this.txn.remove(this);
    this.transition('null');
    this.onNull(this);
  }

  begin(): void {
    this.started = true;
    this.transition('running');
    this.executing = true;
    void this.execute().catch((error: unknown) => {
      // A bug in the job machinery must not take the daemon down; the job stays where it is.
      this.error = `internal error: ${(error as Error).message}`;
      this.env.log.error({ err: error, job: this.id }, 'job machinery failed');
    });
  }

  private async execute(): Promise<void> {
    let failure: unknown;
    try {
      await this.pausePoint();
      await this.kind.run(this);
    } catch (error) {
      failure = error;
    }
    this.executing = false;
    // A drain waiting for this job to park is done with it now: it pauses no more (its end, a
    // section of the lock, may have to wait for that very drain's command).
    this.recheckWaiters();
    // From here on the job changes the graph and its own state: one section, as QEMU's job_exit is one main-loop step.
    await this.env.lock.run(() => this.end(failure), this);
  }

  /** QEMU's job_completed: the run's result goes to the job's transaction, which ends the jobs together. */
  private async end(failure: unknown): Promise<void> {
    this.updateResult(failure);
    if (this.failed) await this.txn.abort(this);
    else await this.txn.succeed(this);
  }

  /**
   * QEMU's job_update_rc: a failure, or a cancel (one that came while the job waited for its
   * turn counts too), makes the job abort.
   */
  private updateResult(failure?: unknown): void {
    if (!this.failed && (failure !== undefined || this.cancelled)) {
      this.failed = true;
      this.error = this.cancelled ? new JobCancelled().message : (failure as Error)?.message ?? String(failure);
    }
    if (this.failed) this.transition('aborting');
  }

  /** The run is over (waiting, pending, aborting or later). */
  get workDone(): boolean {
    return WORK_DONE.includes(this.status);
  }

  /** For the transaction: resolves once this job's run is over (its end runs inside the caller's section). */
  untilWorkDone(): Promise<void> {
    return this.env.lock.lend(this, this.until(() => this.workDone));
  }

  /** The run succeeded; peers of the transaction are still working (the command that started it may reply). */
  markWaiting(): void {
    this.transition('waiting');
    this.startupDone();
  }

  /** Every peer is done: the job waits for finalization (BLOCK_JOB_PENDING if that is the user's to ask). */
  markPending(): void {
    this.transition('pending');
    if (!this.autoFinalize && this.kind.blockJob) this.bus.emit('BLOCK_JOB_PENDING', { type: this.type, id: this.id });
    this.startupDone();
  }

  /** job-finalize: finalizes the job's whole transaction. Runs in a section of the lock. */
  finalize(): Promise<void> {
    return this.txn.finalize();
  }

  /** QEMU's job_prepare: the fallible part of the job's end; false if it failed (the job then aborts). */
  async prepareEnd(): Promise<boolean> {
    if (this.failed || !this.kind.prepare) return !this.failed;
    try {
      await this.kind.prepare(this);
    } catch (error) {
      this.updateResult(error);
    }
    return !this.failed;
  }

  /** QEMU's job_finalize_single: commit or abort, clean, the job's last event, concluded. */
  async finalizeSingle(): Promise<void> {
    this.updateResult();
    if (this.failed) await this.infallible('abort', this.kind.abort);
    else await this.infallible('commit', this.kind.commit);
    await this.infallible('clean', this.kind.clean);
    if (this.kind.blockJob && this.started) {
      if (this.cancelled) this.bus.emit('BLOCK_JOB_CANCELLED', this.blockEvent());
      else this.bus.emit('BLOCK_JOB_COMPLETED', { ...this.blockEvent(), ...(this.failed ? { error: this.error } : {}) });
    }
    this.txn.remove(this);
    await this.conclude();
  }

  /** A peer failed: this job is cancelled (forced), wherever it stands; its transaction waits for it to stop. */
  cancelForPeer(): void {
    this.requestCancel(true);
  }

  /**
   * A transaction action that created the job is undone before the job ever ran (QEMU's
   * job_cancel_sync on a created job): it aborts with no BLOCK_JOB_* event, and its
   * transaction's other jobs with it.
   */
  async cancelUnstarted(): Promise<void> {
    if (this.workDone) return;
    this.requestCancel(true);
    await this.end(undefined);
  }

  private async conclude(): Promise<void> {
    this.transition('concluded');
    this.startupDone();
    for (const wake of this.endedWaiters.splice(0)) wake();
    if (this.autoDismiss) await this.dismiss();
  }

  /** The job goes ('null'), then lets go of what it held; resolves once it has (a release that fails is logged). */
  async dismiss(): Promise<void> {
    this.transition('null');
    this.onNull(this);
    await this.infallible('release', this.kind.release);
  }

  /** Runs a phase of the job's end that cannot fail, as in QEMU: an error there is logged, and the job goes on. */
  private async infallible(phase: string, step: ((job: Job) => Promise<void>) | undefined): Promise<void> {
    if (step) await this.bestEffort(phase, () => step.call(this.kind, this));
  }

  /**
   * One step of commit, abort, clean or release, which cannot fail: a failure is logged (it is
   * a bug, or storage gone bad) and the caller's next step still runs.
   */
  async bestEffort(step: string, work: () => Promise<unknown>): Promise<void> {
    try {
      await work();
    } catch (error) {
      this.env.log.error({ err: error, job: this.id, step }, `job '${this.id}': ${step} failed; the job goes on`);
    }
  }

  /**
   * Applies the on-error policy to an I/O error: sends BLOCK_JOB_ERROR, then 'retry' after a
   * stop (the job pauses as if the user paused it, and retries once resumed), 'ignore', or 'report'.
   */
  async ioError(code: string, operation: 'read' | 'write', policy: ErrorPolicy): Promise<'retry' | 'ignore' | 'report'> {
    const action = this.errorAction(code, operation, policy);
    if (action !== 'stop') return action;
    await this.pausePoint();
    return 'retry';
  }

  /**
   * The policy's verdict on an error met outside the job's own loop (a write-blocking mirror's
   * guest write): BLOCK_JOB_ERROR is sent and a stop pauses the job at its next pause point,
   * but the caller does not wait for it.
   */
  errorAction(code: string, operation: 'read' | 'write', policy: ErrorPolicy): 'stop' | 'ignore' | 'report' {
    const nospace = code === 'ENOSPC';
    const action = policy === 'ignore' ? 'ignore' : policy === 'stop' || ((policy === 'enospc' || policy === 'auto') && nospace) ? 'stop' : 'report';
    this.bus.emit('BLOCK_JOB_ERROR', { device: this.id, operation, action });
    if (action === 'stop') this.ioStatus = nospace ? 'nospace' : 'failed';
    if (action === 'stop' && !this.userPaused) {
      this.userPaused = true;
      this.pauseCount++;
      this.kickSleepers(); // a run waiting under its speed limit goes to its pause point now
    }
    return action;
  }

  /** The initial copy is done and the job keeps copying new writes until completed (mirror, active commit). */
  ready(): void {
    this.transition('ready');
    if (this.kind.blockJob) this.bus.emit('BLOCK_JOB_READY', this.blockEvent());
  }

  /** The kind's run reached its first real I/O (see `startup`). */
  startupReached(): void {
    this.startupDone();
  }

  /** Resolves once the job has concluded. */
  concluded(): Promise<void> {
    if (this.status === 'concluded' || this.status === 'null') return Promise.resolve();
    return new Promise((resolve) => this.endedWaiters.push(resolve));
  }

  // ---- pausing and cancelling ------------------------------------------------------------------

  /**
   * Where the run may stop: parks while paused, throws JobCancelled once cancelled. Several
   * workers of one job may park: the job shows 'paused' once every one has (as a QEMU job is
   * paused only with no I/O of its own in flight, so its offset no longer moves), and the
   * first to run again shows it running.
   */
  async pausePoint(): Promise<void> {
    if (this.cancelled) throw new JobCancelled();
    if (this.pauseCount === 0) return;
    if (this.settleBeforePause) {
      await this.settleBeforePause();
      if (this.cancelled) throw new JobCancelled();
      if (this.pauseCount === 0) return;
    }
    this.parked++;
    this.kickSleepers(); // a worker sleeping under the speed limit parks now, not after its sleep
    this.showPausedOnceParked();
    while (this.pauseCount > 0 && !this.cancelled) await new Promise<void>((resolve) => this.resumeWaiters.push(resolve));
    this.parked--;
    if (this.shownPaused) {
      this.shownPaused = false;
      this.transition(this.resumeStatus);
    }
    if (this.cancelled) throw new JobCancelled();
  }

  /** A worker of the run has ended (the copy engine's): the others may all be parked now. */
  workerEnded(): void {
    this.workers--;
    this.showPausedOnceParked();
  }

  private showPausedOnceParked(): void {
    if (this.shownPaused || this.parked === 0 || this.parked < this.workers || this.pauseCount === 0) return;
    this.shownPaused = true;
    this.pauseGeneration++;
    this.resumeStatus = this.status === 'ready' ? 'ready' : 'running';
    this.transition(this.resumeStatus === 'ready' ? 'standby' : 'paused');
  }

  /**
   * Sleeps (the rate limit's wait) as QEMU's job_sleep_ns does: a pause or cancel ends the
   * sleep at once, so the job reacts before the command that asked replies.
   */
  async sleep(ms: number): Promise<void> {
    this.sleepers++;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.sleepKicks.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
    this.sleepers--;
    await this.pausePoint();
  }

  /** Every worker sleeps or is parked: the job can act on a verb before the reply, as QEMU's does. */
  private get quiescent(): boolean {
    const started = ['running', 'paused', 'ready', 'standby'].includes(this.status);
    return started && this.workers > 0 && this.sleepers + this.parked >= this.workers;
  }

  /** Resolves once `test` holds (checked at each status change). */
  private until(test: () => boolean): Promise<void> {
    if (test()) return Promise.resolve();
    return new Promise((resolve) => this.statusWaiters.push({ test, resolve }));
  }

  private kickSleepers(): void {
    for (const kick of this.sleepKicks.splice(0)) kick();
  }

  private wake(): void {
    for (const wake of this.resumeWaiters.splice(0)) wake();
  }

  /** Resolves when a sleeping job has parked (its 'paused' event then precedes the reply); at once otherwise. */
  userPause(): Promise<void> {
    this.checkVerb('pause');
    if (this.userPaused) throw genericError('Job is already paused');
    this.userPaused = true;
    this.pauseCount++;
    if (!this.quiescent || this.shownPaused) return Promise.resolve();
    this.kickSleepers();
    return this.until(() => this.shownPaused);
  }

  userResume(): void {
    if (!this.userPaused || this.pauseCount <= 0) throw genericError("Can't resume a job that was not paused");
    this.checkVerb('resume');
    this.userPaused = false;
    this.ioStatus = 'ok';
    this.pauseCount--;
    this.wake();
  }

  /**
   * A drain reached the job (QEMU's child_job_drained_begin): it pauses at its next pause
   * point, and this resolves once it has (a job that is not running just counts the pause).
   */
  drainPause(): Promise<void> {
    this.pauseCount++;
    if (!this.executing || this.shownPaused) return Promise.resolve();
    this.kickSleepers();
    return this.until(() => this.shownPaused || !this.executing);
  }

  /** The drain ended: resolves once the job runs again (or stays paused for another reason). */
  drainResume(): Promise<void> {
    this.pauseCount--;
    this.wake();
    return this.until(() => !this.shownPaused || this.pauseCount > 0 || !this.executing);
  }

  /**
   * The run has ended holding the job's own source drained (a mirror's last copy): QEMU's job
   * is drained along with its node, so it shows as paused until the returned function (the
   * end of that drain) is called.
   */
  pausedByOwnDrain(): () => void {
    this.pauseCount++;
    let held = true;
    return () => {
      if (held) this.pauseCount--;
      held = false;
    };
  }

  get isUserPaused(): boolean {
    return this.userPaused;
  }

  /**
   * Cancels the job. Only a READY job that can complete (mirror, active commit) is cancelled
   * softly unless forced; any other cancel is forced. Resolves when a sleeping or paused job
   * has ended (its events then precede the reply).
   */
  cancel(force: boolean): Promise<void> {
    if (this.status === 'concluded') return this.dismiss();
    const idle = this.quiescent;
    const ready = this.status === 'ready' || this.status === 'standby';
    this.requestCancel(force || !this.kind.complete || !ready);
    // A job whose run is over (waiting for its peers, or pending) aborts with its transaction at once.
    if (this.status === 'waiting' || this.status === 'pending') return this.txn.abort(this);
    // Jobs that can complete drain their source on the way out, so like QEMU's their events follow the reply.
    return idle && this.forceCancel && !this.kind.complete ? this.env.lock.lend(this, this.concluded()) : Promise.resolve();
  }

  /** QEMU's job_cancel_async: the cancel is noted, a user pause ends, and a sleeping or parked run goes on to stop. */
  private requestCancel(force: boolean): void {
    this.cancelRequested = true;
    this.forceCancel = this.forceCancel || force;
    if (this.userPaused) {
      this.userPaused = false;
      this.pauseCount--;
    }
    this.kickSleepers();
    this.wake();
  }

  /**
   * Daemon shutdown, as QEMU's job_cancel_sync: a concluded job is dismissed; any other is
   * cancelled (forced), waited for and dismissed. Runs in the shutdown's section.
   */
  async cancelAndDismiss(): Promise<void> {
    if (this.status === 'null') return;
    await this.env.lock.lend(this, (async () => {
      if (this.status !== 'concluded') {
        await this.cancel(true);
        await this.concluded();
      }
      if (this.status === 'concluded') await this.dismiss();
    })());
  }

  setSpeed(speed: number): void {
    this.checkVerb('set-speed');
    if (speed < 0) throw genericError("Parameter 'speed' expects a non-negative value");
    this.speed = speed;
  }

  complete(): void {
    this.checkVerb('complete');
    if (this.cancelRequested || !this.kind.complete) throw genericError(`The active block job '${this.id}' cannot be completed`);
    this.kind.complete(this);
    this.kickSleepers(); // a READY job waiting for work goes on to complete now
  }
}
