/*
 * Runs a QMP script and records what comes back (replies and events, in wire
 * order) with directories, timestamps and generated node names normalised, so
 * differential tests can compare blockd's transcript with qemu-storage-daemon's.
 * Steps are commands, pauses (then the events that arrived are recorded), waits
 * for an event (the next step is then sent at once, as a client reacting to it
 * would), actions of the test's own (an NBD client connecting, a signal) that log
 * a line, or the rest of what the daemon says until it closes the connection.
 */
import { RawConnection } from './raw-connection.js';

/** An event a transcript waits for: its name, and fields its data must have. */
export interface AwaitedEvent {
  event: string;
  data: Record<string, unknown>;
}

export type TranscriptStep = object | { pause: number } | { action: (dir: string) => Promise<string> } | { awaitEvent: AwaitedEvent } | { untilClosed: true };

function isAwaited(line: string, awaited: AwaitedEvent): boolean {
  const message = JSON.parse(line) as { event?: string; data?: Record<string, unknown> };
  return message.event === awaited.event && Object.entries(awaited.data).every(([key, value]) => message.data?.[key] === value);
}

export async function runTranscript(socket: string, dir: string, steps: readonly TranscriptStep[], normalise: (line: string) => string = (line) => line): Promise<string[]> {
  const connection = await RawConnection.negotiated(socket);
  const transcript: string[] = [];
  const record = (line: string) => transcript.push(normalise(
    line.replaceAll(dir, '$DIR').replace(/"timestamp": \{[^}]*\}/, '"timestamp": {}').replace(/#block\d+/g, '#blockN'),
  ));
  for (const step of steps) {
    if ('pause' in step) {
      await new Promise((resolve) => setTimeout(resolve, step.pause));
      for (;;) {
        try {
          record(await connection.readLine(100));
        } catch {
          break;
        }
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
    } else if ('awaitEvent' in step) {
      // Events up to the awaited one, however long the job takes on this machine.
      for (;;) {
        const line = await connection.readLine(30_000);
        record(line);
        if (isAwaited(line, step.awaitEvent)) break;
      }
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
