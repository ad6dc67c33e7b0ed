/*
 * The daemon's jobs by id, newest first as QEMU lists them: id checks for new
 * jobs, lookups with the job-* and block-job-* commands' error texts, and the
 * query answers. A job leaves the registry when it reaches 'null'.
 */
import { pino } from 'pino';
import type { EventBus } from '../event-bus.js';
import type { BlockJobInfo, JobInfo } from '../generated/qapi-types.js';
import { isIdentifier } from '../blockdev/node-names.js';
import { QmpError, genericError } from '../errors.js';
import { MainLoopLock } from '../main-loop-lock.js';
import { Job, type JobEnvironment, type JobKind, type JobOptions } from './job.js';

export class JobRegistry {
  private jobs: Job[] = [];
  private readonly env: JobEnvironment;

  /** `lock`: the daemon's, which its commands take too (a registry of its own by default, for tests). */
  constructor(bus: EventBus, options: { lock?: MainLoopLock; log?: JobEnvironment['log'] } = {}) {
    this.env = { bus, lock: options.lock ?? new MainLoopLock(), log: options.log ?? pino({ level: 'silent' }) };
  }

  /** Creates and starts a job: its 'created' and 'running' events are sent before this returns. */
  start(kind: JobKind, options: JobOptions): Job {
    const job = this.create(kind, options);
    job.start();
    return job;
  }

  /**
   * Creates a job, sets it up and starts it, as QEMU's block_job_create and job_start: the
   * job exists (and says so) before its speed is checked, and a set-up that fails is undone
   * and the job goes again (job_early_fail). Resolves at the job's startup: a job that ends
   * before its first real I/O (a stream with nothing to copy) has sent all its events by then.
   */
  async launch(kind: JobKind, options: JobOptions & { speed: number }, setUp: (job: Job) => Promise<void>, undo: (job: Job) => Promise<void>): Promise<void> {
    const job = await this.prepare(kind, options, setUp, undo);
    job.begin();
    await job.untilStartup();
  }

  /**
   * The first half of `launch`: the job is created and set up, and waits in 'created' (a
   * transaction's prepare). Then `job.begin()` starts it, or `job.cancelUnstarted()` drops it.
   */
  async prepare(kind: JobKind, options: JobOptions & { speed: number }, setUp: (job: Job) => Promise<void>, undo: (job: Job) => Promise<void>): Promise<Job> {
    const job = this.create(kind, options);
    try {
      job.announce();
      if (options.speed < 0) throw genericError("Parameter 'speed' expects a non-negative value");
      await setUp(job);
    } catch (error) {
      await undo(job);
      job.abandon();
      throw error instanceof QmpError ? error : genericError((error as Error).message);
    }
    return job;
  }

  create(kind: JobKind, options: JobOptions): Job {
    this.checkNewId(options.id);
    const job = new Job(options.id, kind, options, this.env, (ended) => {
      this.jobs = this.jobs.filter((candidate) => candidate !== ended);
    });
    this.jobs.unshift(job);
    return job;
  }

  checkNewId(id: string): void {
    if (!isIdentifier(id)) throw genericError(`Invalid job ID '${id}'`);
    if (this.jobs.some((job) => job.id === id)) throw genericError(`Job ID '${id}' already in use`);
  }

  /** job-* commands' lookup. */
  find(id: string): Job {
    const job = this.jobs.find((candidate) => candidate.id === id);
    if (!job) throw genericError('Job not found');
    return job;
  }

  /** block-job-* commands' lookup: block jobs only. */
  findBlockJob(id: string): Job {
    const job = this.jobs.find((candidate) => candidate.id === id && candidate.kind.blockJob);
    if (!job) throw new QmpError('DeviceNotActive', `Block job '${id}' not found`);
    return job;
  }

  queryJobs(): JobInfo[] {
    return this.jobs.map((job) => ({
      id: job.id,
      type: job.type,
      status: job.status,
      'current-progress': job.currentProgress,
      'total-progress': job.totalProgress,
      ...(job.error === undefined ? {} : { error: job.error }),
    }));
  }

  queryBlockJobs(): BlockJobInfo[] {
    return this.jobs.filter((job) => job.kind.blockJob).map((job) => ({
      type: job.type,
      device: job.id,
      len: job.totalProgress,
      offset: job.currentProgress,
      busy: job.busy,
      paused: job.paused,
      speed: job.speed,
      'io-status': job.ioStatus,
      ready: job.status === 'ready' || job.status === 'standby',
      status: job.status,
      'auto-finalize': job.autoFinalize,
      'auto-dismiss': job.autoDismiss,
      ...(job.error === undefined ? {} : { error: job.error }),
    }));
  }

  /** Jobs that have not concluded. */
  live(): Job[] {
    return this.jobs.filter((job) => job.status !== 'concluded' && job.status !== 'null');
  }

  /**
   * For a section that waits for `work`: a job whose run ends meanwhile ends inside the
   * section instead of behind it (its writes may be held until its end runs: an active
   * commit drains its top from the moment it is in sync).
   */
  lettingJobsEnd<T>(work: Promise<T>): Promise<T> {
    return this.live().reduce((waiting, job) => this.env.lock.lend(job, waiting), work);
  }

  /**
   * Daemon shutdown, in its section of the lock, as QEMU's bdrv_drain_all_begin then
   * job_cancel_sync_all: running jobs pause (a drain that never ends), then newest first each
   * job is cancelled and waited for, and dismissed.
   */
  async cancelAll(): Promise<void> {
    await Promise.all(this.live().map((job) => job.drainPause()));
    for (const job of [...this.jobs]) await job.cancelAndDismiss();
  }
}
