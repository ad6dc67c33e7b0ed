/*
 * The process-wide order of flushes across every write log blockd keeps: a
 * flush moves the number on when it is issued, and each log records the
 * number in a mark before its next entry, so the logs of several nodes can be
 * merged and cut at one moment.
 */

let sequence = 0;

export function currentFlushSequence(): number {
  return sequence;
}

/** A flush being issued: the number that orders it. */
export function nextFlushSequence(): number {
  return ++sequence;
}

/** A log opened with log-append holds numbers up to `seen`: later events must come after them. */
export function observeFlushSequence(seen: number): void {
  sequence = Math.max(sequence, seen);
}
