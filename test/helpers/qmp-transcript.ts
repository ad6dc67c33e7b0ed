/*
 * Runs a QMP script and records what comes back (replies and events, in wire
 * order) with directories, timestamps and generated node names normalised, so
 * differential tests can compare blockd's transcript with qemu-storage-daemon's.
 * Steps are commands, waits for an event (the next step is then sent at once, as
 * a client reacting to it would) or for a polled state (never for a time: the
 * events that arrive meanwhile are recorded), actions of the test's own (an NBD
 * client connecting, a signal) that log a line, or the rest of what the daemon
 * says until it closes the connection.
 */
import { RawConnection } from './raw-connection.js';

/** An event a transcript waits for: its name, and fields its data must have. */
export interface AwaitedEvent {
  event: string;
  data: Record<string, unknown>;
}

/** A query repeated until its result shows a state; its replies are not recorded (their number depends on timing). */
export interface PolledState {
  /** What is waited for, for the error when it never comes. */
  what: string;
  execute: string;
  arguments?: object;
  holds: (result: unknown) => boolean;
}

export type TranscriptStep = object | { action: (dir: string) => Promise<string> } | { awaitEvent: AwaitedEvent } | { poll: PolledState } | { untilClosed: true } | { racing: object };

/** Waits until query-block-jobs shows the job in a state (e.g. a rate-limited job idle after its first chunk). */
export function untilBlockJob(device: string, holds: (job: { offset: number; busy: boolean; status: string }) => boolean): TranscriptStep {
  return {
    poll: {
      what: `block job ${device} in the awaited state`,
      execute: 'query-block-jobs',
      holds: (jobs) => (jobs as { device: string; offset: number; busy: boolean; status: string }[]).some((job) => job.device === device && holds(job)),
    },
  };
}

/**
 * The job sleeps where it stands: two polls in a row see it not busy at the same offset. One such
 * poll is not enough: QEMU's job loop yields (busy false) between chunks it skips, for microseconds.
 */
function settledAt(accept: (offset: number) => boolean): (job: { offset: number; busy: boolean }) => boolean {
  let seen: number | undefined;
  return (job) => {
    const settled = !job.busy && accept(job.offset) && seen === job.offset;
    seen = job.busy ? undefined : job.offset;
    return settled;
  };
}

/** A rate-limited job has copied its first chunk and sleeps. */
export function untilBlockJobIdle(device: string): TranscriptStep {
  return untilBlockJob(device, settledAt((offset) => offset > 0));
}

/**
 * For a rate-limited job around a pause: `mark` notes where it stands (place it while the job is
 * paused), `moved` waits until it has copied more and sleeps again (place it after the resume).
 */
export function progressAfterResume(device: string): { mark: TranscriptStep; moved: TranscriptStep } {
  let pausedAt = 0;
  return {
    mark: untilBlockJob(device, (job) => ((pausedAt = job.offset), true)),
    moved: untilBlockJob(device, settledAt((offset) => offset > pausedAt)),
  };
}

/** The block job has ended (or never started): query-block-jobs no longer lists it. */
export function untilBlockJobGone(device: string): TranscriptStep {
  return {
    poll: {
      what: `block job ${device} gone`,
      execute: 'query-block-jobs',
      holds: (jobs) => !(jobs as { device: string }[]).some((job) => job.device === device),
    },
  };
}

/** Every block job is READY or sleeps under a speed limit after some progress; the others have ended. */
export const untilBlockJobsRest: TranscriptStep = {
  poll: {
    what: 'every block job at rest',
    execute: 'query-block-jobs',
    holds: (jobs) => (jobs as { status: string; speed: number; busy: boolean; offset: number }[])
      .every((job) => job.status === 'ready' || (job.speed > 0 && !job.busy && job.offset > 0)),
  },
};

/**
 * A command whose reply races the events it causes in QEMU too (a job it wakes may act before
 * the reply goes out): the transcript records the reply first, then the events that came
 * before it, so both daemons' transcripts read alike whichever way the race went.
 */
export function racingReply(command: object): TranscriptStep {
  return { racing: command };
}

/** Waits for a job's status change (its last event of a phase, so later ones cannot race the next reply). */
export function untilJob(id: string, status: string): TranscriptStep {
  return { awaitEvent: { event: 'JOB_STATUS_CHANGE', data: { id, status } } };
}

function isAwaited(line: string, awaited: AwaitedEvent): boolean {
  const message = JSON.parse(line) as { event?: string; data?: Record<string, unknown> };
  return message.event === awaited.event && Object.entries(awaited.data).every(([key, value]) => message.data?.[key] === value);
}

export async function runTranscript(socket: string, dir: string, steps: readonly TranscriptStep[], normalise: (line: string) => string = (line) => line): Promise<string[]> {
  const connection = await RawConnection.negotiated(socket);
  const transcript: string[] = [];
  /** Lines as received, and how far awaited events have been looked for in them. */
  const received: string[] = [];
  let searchedUpTo = 0;
  const record = (line: string) => {
    received.push(line);
    transcript.push(normalise(
      line.replaceAll(dir, '$DIR').replace(/"timestamp": \{[^}]*\}/, '"timestamp": {}').replace(/#block\d+/g, '#blockN'),
    ));
  };
  for (const step of steps) {
    if ('pause' in step) {
      throw new Error('a transcript waits for an event or a polled state, never for a time');
    } else if ('poll' in step) {
      const { what, execute, arguments: args, holds } = step.poll;
      for (let tries = 0; ; tries++) {
        connection.send(JSON.stringify({ execute, ...(args ? { arguments: args } : {}) }));
        let line: string;
        while ((line = await connection.readLine(10_000)).startsWith('{"timestamp"')) record(line);
        if (holds((JSON.parse(line) as { return?: unknown }).return)) break;
        if (tries > 3000) throw new Error(`${what} never came; the last answer to ${execute}: ${line}`);
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
    } else if ('action' in step) {
      transcript.push(await step.action(dir));
    } else if ('untilClosed' in step) {
      // The daemon is going away (quit, a signal): everything it still sends, then the end.
      for (;;) {
        const line = await connection.readLine(30_000).catch((error: Error) => {
          if (error.message === 'connection closed') return undefined;
          throw error;
        });
        if (line === undefined) break;
        record(line);
      }
      transcript.push('(connection closed)');
      return transcript;
    } else if ('racing' in step) {
      connection.send(JSON.stringify(step.racing).replaceAll('$DIR', dir));
      const early: string[] = [];
      let line: string;
      while ((line = await connection.readLine(10_000)).startsWith('{"timestamp"')) early.push(line);
      for (const received of [line, ...early]) record(received);
    } else if ('awaitEvent' in step) {
      // Events up to the awaited one, however long the job takes on this machine; it may
      // already have come before the reply of the command that caused it.
      let found = received.findIndex((line, index) => index >= searchedUpTo && isAwaited(line, step.awaitEvent));
      while (found < 0) {
        const line = await connection.readLine(30_000);
        record(line);
        if (isAwaited(line, step.awaitEvent)) found = received.length - 1;
      }
      searchedUpTo = found + 1;
    } else {
      connection.send(JSON.stringify(step).replaceAll('$DIR', dir));
      for (;;) {
        const line = await connection.readLine(10_000);
        record(line);
        if (!line.startsWith('{"timestamp"')) break;
      }
    }
  }
  connection.end();
  return transcript;
}

/** The steps where two transcripts differ (empty when they agree). */
export function transcriptDifferences(ours: string[], theirs: string[]): { i: number; ours?: string; theirs?: string }[] {
  const length = Math.max(ours.length, theirs.length);
  return Array.from({ length }, (_, i) => ({ i, ours: ours[i], theirs: theirs[i] })).filter((d) => d.ours !== d.theirs);
}

/** A readable account of where two transcripts part: for the first few differing steps, the text around the first differing character. */
export function describeDifferences(ours: string[], theirs: string[], limit = 4): string {
  return transcriptDifferences(ours, theirs).slice(0, limit).map(({ i, ours: a = '(none)', theirs: b = '(none)' }) => {
    let at = 0;
    while (at < a.length && a[at] === b[at]) at++;
    const window = (text: string) => text.slice(Math.max(0, at - 200), at + 200);
    return `step ${i}, character ${at}:\n  ours:   ${window(a)}\n  theirs: ${window(b)}`;
  }).join('\n');
}

/**
 * For transcripts after jobs that write images: where copied clusters land in a qcow2 file
 * differs (blockd does not reuse clusters freed by a zero write before the change is flushed,
 * QEMU does) and so does the host's block allocation, so image file sizes are masked; the
 * tests check the images' contents and consistency instead.
 */
export function maskImageSizes(line: string): string {
  return line.replace(/"actual-size": \d+/g, '"actual-size": 0').replace(/"virtual-size": \d+(, "filename": "[^"]*", "format": "file")/g, '"virtual-size": 0$1');
}

/** Internal snapshots' dates are the wall clock when each daemon (or qemu-img) took them: masked. */
export function maskSnapshotDates(line: string): string {
  return line.replace(/"(date-sec|date-nsec|vm-clock-sec|vm-clock-nsec)": \d+/g, '"$1": 0');
}

/**
 * For transcripts while a qcow2 image with persistent bitmaps is open: the image's bitmaps
 * list (format-specific "bitmaps") is masked, because blockd writes a new persistent bitmap and
 * its write-intent record into the image at once and QEMU only at close. The stored result is
 * compared after close instead (qemu-img info).
 */
export function maskImageBitmaps(line: string): string {
  let masked = line;
  for (let at = masked.indexOf('"bitmaps": ['); at >= 0; at = masked.indexOf('"bitmaps": [', at)) {
    let depth = 0;
    let end = at + '"bitmaps": '.length;
    do {
      if (masked[end] === '[') depth++;
      else if (masked[end] === ']') depth--;
      end++;
    } while (depth > 0 && end < masked.length);
    if (masked.startsWith(', ', end)) end += 2;
    masked = masked.slice(0, at) + masked.slice(end);
  }
  return masked;
}
