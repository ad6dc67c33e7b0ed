/*
 * The copy loop of jobs that keep a target in sync with a source that is
 * being written (mirror and active commit; QEMU's mirror_run): copies what
 * the dirty bitmap marks, several chunks in flight and never two over the
 * same bytes, reaches READY when nothing is left to copy, then keeps copying
 * new writes until completed or cancelled. It ends with the source drained
 * and the target flushed: the caller switches the graph over and then ends
 * the drain.
 * An iteration clears its dirty run first (a write from then on marks it
 * again), then cuts it by the source's block status, each look deciding one
 * copy; the copy is told what was found (zeroes are written without a read,
 * the status not asked again) unless a write-blocking write reached the target
 * since, which only the job sees (its bitmap does not record it).
 */
import type { ChildEdge } from '../blockdev/child-edge.js';
import type { DirtyBitmap } from '../blockdev/bitmaps/dirty-bitmap.js';
import { errnoOf } from '../blockdev/io-error.js';
import type { RangeLock } from '../blockdev/range-lock.js';
import { CopyError, copyRange } from '../blockdev/copy-range.js';
import type { ErrorPolicy, Job } from './job.js';
import { RateLimit } from './rate-limit.js';

export interface MirrorPlan {
  source: ChildEdge;
  target: ChildEdge;
  /** The source's changed parts: what the initial copy must move, and every write since. */
  bitmap: DirtyBitmap;
  /** Holds writes to the source back; returns the function that lets them go. */
  drainSource(): Promise<() => void>;
  /** job-complete was received. */
  shouldComplete(): boolean;
  /** The on-error policy for a failed read of the source or write of the target. */
  policy(operation: 'read' | 'write'): ErrorPolicy;
  /** The most bytes one copy of data moves (a multiple of the bitmap's granularity; QEMU's max_io_bytes). */
  chunkSize: number;
  inFlight: number;
  /** The most one iteration copies before the speed limit is applied (QEMU's buf-size). */
  iterationBytes: number;
  /**
   * Copies one range (default: read it and write it, zeroes as zero writes). `zero`: the range
   * was found to read as zeroes, or (false) as data; undefined: not known (or no longer: look
   * again under the range's lock). Errors carry their side.
   */
  copy?(offset: number, length: number, zero: boolean | undefined): Promise<void>;
  /** Held over each copy's range, so that a write-blocking guest write and a copy never cross. */
  locks?: RangeLock;
  /** Counts the writes that reached the target outside the loop (write-blocking): what was found before one is looked at again. */
  targetWrites?(): number;
  /** A failure met outside the loop (a write-blocking write the target refused): the job ends with it. */
  failure?(): unknown;
}

/** QEMU's default buf-size: the most one iteration copies before the speed limit applies. */
export const DEFAULT_BUF_SIZE = 16 << 20;

/** How long a READY job waits for new writes before it looks again (QEMU's BLOCK_JOB_SLICE_TIME). */
const IDLE_POLL_MS = 100;

interface Operation {
  offset: number;
  length: number;
  done: Promise<void>;
}

/** Runs until the target is in sync and completion (or a soft cancel) was asked; returns the source drain's end. */
export async function runMirror(job: Job, plan: MirrorPlan): Promise<() => void> {
  const { bitmap } = plan;
  const limit = new RateLimit();
  const operations = new Set<Operation>();
  const copy = plan.copy ?? ((offset: number, length: number) => copyRange(plan.source, plan.target, offset, length, {}, true));
  let failure: unknown;
  let cursor = 0;
  /** Wakes the loop when a copy ends (the loop is the only one waiting, and only while copies are in flight). */
  let operationEnded: (() => void) | undefined;
  job.workers = 1;

  /** One copy; its iteration cleared its range in the bitmap before looking at the source. */
  const copyOnce = async (offset: number, length: number, zero: boolean | undefined, foundAt: number | undefined) => {
    const release = await plan.locks?.acquire(offset, offset + length, true);
    try {
      await copy(offset, length, foundAt === plan.targetWrites?.() ? zero : undefined);
    } catch (error) {
      bitmap.set(offset, length); // failed: still to copy
      throw error;
    } finally {
      release?.();
    }
  };

  const start = (offset: number, length: number, zero: boolean | undefined, foundAt: number | undefined) => {
    const operation: Operation = { offset, length, done: Promise.resolve() };
    operation.done = copyOnce(offset, length, zero, foundAt).then(() => {
      job.currentProgress += length;
    }, (error: unknown) => {
      // The range is dirty again: copied later (ignore), after the resume (stop), or never (report).
      const cause = error instanceof CopyError ? error.cause : error;
      const operationType = error instanceof CopyError ? error.operation : 'read';
      const action = job.errorAction(errnoOf(cause), operationType, plan.policy(operationType));
      if (action === 'report') failure ??= cause;
    }).finally(() => {
      operations.delete(operation);
      operationEnded?.();
      operationEnded = undefined;
    });
    operations.add(operation);
  };

  /**
   * The copy at `offset` (QEMU's mirror_iteration): one run of the source's block status in whole
   * granules, a run of data at most a chunk, a run of zeroes or holes whole; whether it reads as
   * zeroes, when the run covers it whole.
   */
  const nextCopy = async (offset: number, remaining: number): Promise<{ length: number; zero: boolean | undefined }> => {
    const { granularity } = bitmap;
    let length: number;
    let zero: boolean | undefined;
    let found = 0;
    try {
      const status = await plan.source.child.blockStatusAbove(offset, remaining);
      length = status.data ? Math.min(status.length, plan.chunkSize) : status.length;
      found = status.length;
      zero = status.zero;
    } catch {
      length = plan.chunkSize; // the copy itself meets the error
    }
    length -= length % granularity;
    length = Math.min(remaining, Math.max(length, granularity));
    return { length, zero: length <= found ? zero : undefined };
  };

  const overlapsInFlight = (offset: number, length: number) =>
    [...operations].some((operation) => operation.offset < offset + length && offset < operation.offset + operation.length);
  const anyDone = () => new Promise<void>((resolve) => (operationEnded = resolve));
  const allDone = () => Promise.allSettled([...operations].map((operation) => operation.done));
  const failed = () => failure ?? plan.failure?.();

  job.settleBeforePause = allDone;
  try {
    for (;;) {
      await job.pausePoint();
      if (failed() !== undefined) throw failed();
      const dirty = bitmap.count();
      const inFlightBytes = [...operations].reduce((sum, operation) => sum + operation.length, 0);
      job.totalProgress = job.currentProgress + inFlightBytes + dirty;

      if (dirty > 0 && operations.size < plan.inFlight) {
        // One iteration takes a dirty run of up to iterationBytes and copies it in chunks, as QEMU's mirror_iteration.
        const run = bitmap.nextRun(cursor, plan.iterationBytes)!;
        if (overlapsInFlight(run.offset, run.length)) {
          await anyDone(); // never two copies of the same bytes: the later could land first
          continue;
        }
        const end = run.offset + run.length;
        cursor = end;
        job.startupReached(); // the first copy: QEMU's job yields here, its command has returned
        bitmap.clear(run.offset, run.length); // a write from now on marks the range again
        for (let offset = run.offset; offset < end;) {
          while (operations.size >= plan.inFlight) await anyDone();
          if (failed() !== undefined) {
            bitmap.set(offset, end - offset); // as QEMU's, an iteration issues no more copies once one has failed
            break;
          }
          const foundAt = plan.targetWrites?.();
          const { length, zero } = await nextCopy(offset, end - offset);
          start(offset, length, zero, foundAt);
          offset += length;
        }
        await limit.take(job, run.length);
        continue;
      }
      if (operations.size > 0) {
        await anyDone();
        continue;
      }
      // Nothing dirty, nothing in flight: in sync.
      if (job.status !== 'ready' && job.status !== 'standby') {
        await plan.target.flush();
        job.ready();
        job.startupReached(); // in sync without a copy (sync=none): READY comes before the command's reply
      }
      if (plan.shouldComplete() || job.stopRequested) {
        const endDrain = await plan.drainSource();
        try {
          if (bitmap.count() === 0 && failed() === undefined) {
            await plan.target.flush();
            // QEMU's job is drained with its source until its end lets the drain go: it shows as paused.
            const resume = job.pausedByOwnDrain();
            return () => {
              endDrain();
              resume();
            };
          }
        } catch (error) {
          endDrain();
          throw error;
        }
        endDrain(); // written meanwhile: copy that first
        continue;
      }
      await job.sleep(IDLE_POLL_MS);
    }
  } finally {
    job.settleBeforePause = undefined;
    await allDone();
  }
}
