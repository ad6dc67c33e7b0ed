/*
 * The states a power loss could leave, read from write logs. The logs of one
 * blockd process are merged through their flush-sequence marks: every entry
 * belongs to the epoch of the last mark before it, so an epoch is "after
 * flush N was issued, before flush N+1 was". A crash state applies, in each
 * log, a prefix of entries, minus some that were not yet durable: a write is
 * durable once a later flush of its own file is in the prefix, or at once if
 * it was a FUA write. A log without marks (QEMU's) counts its own flushes.
 */
import { LOG_DISCARD, LOG_FLUSH, LOG_FUA, LOG_MARK, parseSequenceMark, type LogEntry, type ParsedLog } from '../../../src/blockdev/drivers/blklogwrites/log-format.js';
import type { SeededRandom } from '../qemu-tools.js';

export interface CrashState {
  /** What the state stands for, for messages: "flush 12" or "between flush 12 and the next, 3 writes dropped". */
  label: string;
  /** Per log, how many entries (from the first) the crash happened after. */
  prefix: number[];
  /** Per log, the indexes of entries in the prefix whose data did not reach the disk. */
  dropped: Set<number>[];
}

/** An entry that changes the file: a write (or write-zeroes) or a discard. */
export function changesData(entry: LogEntry): boolean {
  return (entry.flags & (LOG_FLUSH | LOG_MARK)) === 0;
}

export class LogTimeline {
  /** Per log, the epoch of each entry. */
  private readonly epochs: number[][];
  /** Every epoch some log has entries in, ascending. */
  readonly allEpochs: number[];

  constructor(readonly logs: readonly ParsedLog[]) {
    const marked = logs.map((log) => log.entries.some((entry) => entry.mark !== undefined && parseSequenceMark(entry.mark) !== undefined));
    if (logs.length > 1 && marked.includes(false)) throw new Error('logs without flush-seq marks cannot be merged: only one such log can be replayed');
    this.epochs = logs.map((log, i) => (marked[i] ? markedEpochs(log) : countedEpochs(log)));
    this.allEpochs = [...new Set(this.epochs.flat())].sort((a, b) => a - b);
  }

  epochOf(log: number, index: number): number {
    return this.epochs[log]![index]!;
  }

  /** How many of a log's entries belong to epochs before `epoch` (epochs never go back within a log). */
  entriesBefore(log: number, epoch: number): number {
    const epochs = this.epochs[log]!;
    let count = 0;
    while (count < epochs.length && epochs[count]! < epoch) count++;
    return count;
  }

  /** Every flush of every log, as (log, index). */
  flushes(): { log: number; index: number }[] {
    return this.logs.flatMap((log, i) => log.entries.filter((entry) => entry.flags & LOG_FLUSH).map((entry) => ({ log: i, index: entry.index })));
  }

  /** The whole logs applied: what the files hold at the end. */
  finalState(): CrashState {
    return { label: 'the end of the logs', prefix: this.logs.map((log) => log.entries.length), dropped: this.logs.map(() => new Set()) };
  }

  /** Just after a flush: every log up to the flush's epoch, the flushing log up to the flush itself, nothing dropped. */
  flushPoint(flush: { log: number; index: number }): CrashState {
    const epoch = this.epochOf(flush.log, flush.index);
    const prefix = this.logs.map((_, i) => (i === flush.log ? flush.index + 1 : this.entriesBefore(i, epoch)));
    return { label: `after flush ${flush.index} of log ${flush.log} (epoch ${epoch})`, prefix, dropped: this.logs.map(() => new Set()) };
  }

  /**
   * Where a moment in `epoch` can start in a log: after the earlier epochs, and after the flush
   * that opened the epoch if this log holds it. Entries of the epoch in other logs were written
   * after that flush was issued, often because it completed (a commit flushes the base, then
   * rewrites the overlay's header): cutting them from it would invent states that cannot happen.
   */
  private epochStart(log: number, epoch: number): number {
    const before = this.entriesBefore(log, epoch);
    const end = this.entriesBefore(log, epoch + 1);
    const opening = this.logs[log]!.entries.slice(before, end).find((entry) => entry.flags & LOG_FLUSH);
    return opening ? opening.index + 1 : before;
  }

  /**
   * A random moment in `epoch`: in each log, a random number of that epoch's entries on top of
   * the earlier epochs (and of the flush that opened it), then each write not yet durable
   * dropped or kept at random.
   */
  randomPoint(epoch: number, random: SeededRandom): CrashState {
    const prefix = this.logs.map((_, i) => {
      const floor = this.epochStart(i, epoch);
      return floor + random.int(this.entriesBefore(i, epoch + 1) - floor + 1);
    });
    const dropped = this.logs.map((_, i) => new Set(this.volatileEntries(i, prefix[i]!).filter(() => random.chance(0.5))));
    const count = dropped.reduce((sum, set) => sum + set.size, 0);
    return { label: `a moment in epoch ${epoch} (entries ${prefix.join('/')}, ${count} not durable writes dropped)`, prefix, dropped };
  }

  /**
   * The end of `epoch` with exactly one write that is not yet durable left out, for each such
   * write: a deterministic sweep of the simplest reorderings a missing barrier allows.
   */
  singleDrops(epoch: number): CrashState[] {
    const prefix = this.logs.map((_, i) => this.entriesBefore(i, epoch + 1));
    return this.logs.flatMap((_, log) => this.volatileEntries(log, prefix[log]!).map((index) => ({
      label: `the end of epoch ${epoch} without entry ${index} of log ${log}`,
      prefix,
      dropped: this.logs.map((__, i) => new Set(i === log ? [index] : [])),
    })));
  }

  /** The data-changing entries of a log's prefix that no flush in the prefix covers (FUA writes are durable by themselves). */
  volatileEntries(log: number, prefix: number): number[] {
    const entries = this.logs[log]!.entries.slice(0, prefix);
    let lastFlush = -1;
    for (const entry of entries) if (entry.flags & LOG_FLUSH) lastFlush = entry.index;
    return entries.filter((entry) => entry.index > lastFlush && changesData(entry) && !(entry.flags & LOG_FUA)).map((entry) => entry.index);
  }
}

/**
 * What a state writes, per log: the data-changing entries applied. Two states with the same
 * key leave the same files; the one with the longer prefixes includes more flushes the guest
 * saw acknowledged, so its check is the stricter one.
 */
export function appliedDataKey(logs: readonly ParsedLog[], state: CrashState): string {
  return logs.map((log, i) => log.entries.slice(0, state.prefix[i]).filter((entry) => changesData(entry) && !state.dropped[i]!.has(entry.index))
    .map((entry) => entry.index).join(',')).join('|');
}

/** Whether checking `state` adds nothing to a check already made of `other`. */
export function dominatedBy(state: CrashState, other: CrashState): boolean {
  return state.prefix.every((prefix, i) => prefix <= other.prefix[i]!);
}

/** blockd's logs: each entry is in the epoch of the mark before it. */
function markedEpochs(log: ParsedLog): number[] {
  let epoch = 0;
  return log.entries.map((entry) => {
    const sequence = entry.mark === undefined ? undefined : parseSequenceMark(entry.mark);
    if (sequence !== undefined) epoch = sequence;
    return epoch;
  });
}

/** A log without marks: a new epoch at each flush (which belongs to it) and after each FUA write. */
function countedEpochs(log: ParsedLog): number[] {
  let epoch = 0;
  return log.entries.map((entry) => {
    if (entry.flags & LOG_FLUSH) epoch++;
    const mine = epoch;
    if (entry.flags & LOG_FUA) epoch++;
    return mine;
  });
}

export function isDiscard(entry: LogEntry): boolean {
  return (entry.flags & LOG_DISCARD) !== 0;
}
