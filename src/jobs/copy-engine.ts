/*
 * The copy loop every data-moving job shares: walks a range in large chunks,
 * asks the job's plan which parts need copying (holes, zeroes and data
 * already in place are skipped without reading), keeps several copies in
 * flight, honours the job's speed limit, reports progress, stops at pause
 * points and applies the on-error policy to each failed chunk.
 */
import { CopyError } from '../blockdev/copy-range.js';
import { errnoOf } from '../blockdev/io-error.js';
import type { ErrorPolicy, Job } from './job.js';
import { RateLimit } from './rate-limit.js';

export interface CopyPlan {
  /** Bytes to walk. */
  length: number;
  /** How the run starting at `offset` is handled (its length may be shorter than `maxLength`). */
  decide(offset: number, maxLength: number): Promise<{ length: number; copy: boolean }>;
  /** Copies one run; errors carry the side that failed. */
  copy(offset: number, length: number): Promise<void>;
}

/** How far one decision may look ahead over data that needs no copy. */
const SKIP_PROBE = 2 << 20;

export interface CopyOptions {
  chunkSize: number;
  inFlight: number;
  onError: ErrorPolicy;
}

export async function runCopy(job: Job, plan: CopyPlan, options: CopyOptions): Promise<void> {
  job.totalProgress = plan.length;
  const limit = new RateLimit();
  let cursor = 0;
  let failure: unknown;
  let lastYield = Date.now();
  let deciding = Promise.resolve();
  // Progress is the prefix copied or skipped in full, as a job copying in order reports it: a run
  // finished ahead of one still in flight (or failed) counts once the gap before it is closed.
  const finishedAhead = new Map<number, number>();
  const finished = (offset: number, length: number) => {
    finishedAhead.set(offset, length);
    for (let end = job.currentProgress, ahead; (ahead = finishedAhead.get(end)) !== undefined; end += ahead) {
      finishedAhead.delete(end);
      job.currentProgress = end + ahead;
    }
  };

  /** Claims the next run, deciding in order so runs never overlap. */
  const next = async (): Promise<{ offset: number; length: number; copy: boolean } | undefined> => {
    const turn = deciding.then(async () => {
      if (cursor >= plan.length || failure !== undefined) return undefined;
      const offset = cursor;
      // Ranges to skip may be long (one block-status call covers them); copies go chunk by chunk.
      const run = await plan.decide(offset, Math.min(SKIP_PROBE, plan.length - offset));
      const length = Math.max(1, Math.min(run.length, run.copy ? options.chunkSize : SKIP_PROBE, plan.length - offset));
      cursor = offset + length;
      return { offset, length, copy: run.copy };
    });
    deciding = turn.then(() => undefined, () => undefined);
    return turn;
  };

  const worker = async (index: number) => {
    try {
      await work(index);
    } finally {
      job.workerEnded();
    }
  };
  const work = async (index: number) => {
    for (;;) {
      await job.pausePoint();
      if (cursor >= plan.length || failure !== undefined) return;
      // Under a speed limit one copy at a time, as QEMU's jobs copy: progress then moves chunk by chunk.
      if (index > 0 && job.speed > 0) {
        await job.sleep(50);
        continue;
      }
      const run = await next();
      if (!run) return;
      if (run.copy) {
        for (;;) {
          try {
            await plan.copy(run.offset, run.length);
            break;
          } catch (error) {
            const operation = error instanceof CopyError ? error.operation : 'read';
            const cause = error instanceof CopyError ? error.cause : error;
            const action = await job.ioError(errnoOf(cause), operation, options.onError);
            if (action === 'retry') continue;
            if (action === 'ignore') break;
            failure ??= cause;
            return;
          }
        }
        finished(run.offset, run.length);
        await limit.take(job, run.length);
      } else {
        finished(run.offset, run.length);
        // Even skipping yields now and then, so QMP stays responsive on huge sparse images.
        if (Date.now() - lastYield > 10) {
          await new Promise((resolve) => setImmediate(resolve));
          lastYield = Date.now();
        }
      }
    }
  };
  job.workers = options.inFlight;
  // Every worker ends before the job goes on (none may still be parked at a pause point).
  const results = await Promise.allSettled(Array.from({ length: options.inFlight }, (_, index) => worker(index)));
  const rejected = results.find((result): result is PromiseRejectedResult => result.status === 'rejected');
  if (rejected) throw rejected.reason;
  if (failure !== undefined) throw failure;
}
