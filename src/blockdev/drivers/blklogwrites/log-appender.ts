/*
 * Appends entries to a write log through the log child. Each entry takes its
 * place when it is appended, so the log lists entries in the order they were
 * appended even when their writes to the log overlap. As in QEMU, the
 * superblock (the count of entries) is rewritten and the log flushed at every
 * flush and every `superInterval` entries; a new log's superblock is written
 * before its first entry, so a stale one never describes it. Before its next
 * entry after the process-wide flush sequence moved, the log records the new
 * number in a mark.
 */
import type { ChildEdge } from '../../child-edge.js';
import { Mutex } from '../../mutex.js';
import { currentFlushSequence, nextFlushSequence } from './flush-sequence.js';
import { LOG_DISCARD, LOG_FLUSH, LOG_MARK, encodeEntrySector, encodeSuperblock, sequenceMark, type LogEntryHeader } from './log-format.js';

/** Where the next entry goes, and what the log holds already (log-append). */
export interface LogPosition {
  sectorSize: number;
  /** In log sectors; entries start at sector 1, after the superblock. */
  nextSector: number;
  entries: number;
  /** The sequence number of the log's last mark, if it has one of blockd's. */
  lastSequence?: number;
  /** The log holds a superblock that counts `entries` (an appended log). */
  existing: boolean;
}

export class LogAppender {
  private readonly inFlight = new Set<Promise<void>>();
  private readonly superblockWrites = new Mutex();
  /** Entries the superblock on disk counts (-1: this new log has none yet). */
  private countedEntries: number;
  private recordedSequence: number | undefined;
  private started: Promise<void> | undefined;
  /** Writes or discards were logged since the last flush (QEMU's write_gen against flushed_gen). */
  private unflushed = false;

  constructor(private readonly log: ChildEdge, private readonly position: LogPosition, private readonly superInterval: number) {
    this.countedEntries = position.existing ? position.entries : -1;
    this.recordedSequence = position.lastSequence;
  }

  get sectorSize(): number {
    return this.position.sectorSize;
  }

  /** Logs a write of whole sectors at byte `offset`: its bytes, or zeros for a write-zeroes. */
  async write(offset: number, data: Buffer | { zeroes: number }): Promise<void> {
    const length = Buffer.isBuffer(data) ? data.length : data.zeroes;
    this.unflushed = true;
    await this.append({ sector: offset / this.sectorSize, sectors: length / this.sectorSize, flags: 0, dataLength: 0 }, data);
  }

  async discard(offset: number, length: number): Promise<void> {
    this.unflushed = true;
    await this.append({ sector: offset / this.sectorSize, sectors: length / this.sectorSize, flags: LOG_DISCARD, dataLength: 0 });
  }

  /**
   * Logs a flush as it is issued, behind a mark with its new sequence number: what the
   * log holds before it is what the flush makes durable (a write that completes while
   * the flush runs is logged after it, and is not covered by it). As in QEMU, a flush with
   * nothing written since the last one is not logged.
   */
  async flush(): Promise<void> {
    if (!this.unflushed) return;
    this.unflushed = false;
    nextFlushSequence();
    await this.append({ sector: 0, sectors: 0, flags: LOG_FLUSH, dataLength: 0 });
    await this.updateSuperblock();
  }

  /** Counts every entry in the superblock (QEMU leaves that to the flush on close, which a read-only node skips). */
  async close(): Promise<void> {
    await this.settle();
    if (this.started && this.position.entries !== this.countedEntries) await this.updateSuperblock();
  }

  private async append(header: LogEntryHeader, data?: Buffer | { zeroes: number }): Promise<void> {
    const countBefore = this.position.entries;
    const current = currentFlushSequence();
    const mark = this.recordedSequence === current ? undefined : this.recordMark(current);
    const sector = encodeEntrySector(header, this.sectorSize);
    const dataBytes = data === undefined ? 0 : Buffer.isBuffer(data) ? data.length : data.zeroes;
    const at = this.reserve(1 + dataBytes / this.sectorSize);
    const countAfter = this.position.entries;
    const entry = this.issue(async () => {
      if (Buffer.isBuffer(data)) {
        await this.log.write(at, Buffer.concat([sector, data]));
      } else {
        await this.log.write(at, sector);
        if (dataBytes > 0) await this.log.writeZeroes(at + this.sectorSize, dataBytes);
      }
    });
    await Promise.all([mark, entry]);
    // QEMU rewrites the superblock whenever its count reaches a multiple of the interval.
    if (Math.floor(countAfter / this.superInterval) > Math.floor(countBefore / this.superInterval)) await this.updateSuperblock();
  }

  private recordMark(sequence: number): Promise<void> {
    const text = sequenceMark(sequence);
    const sector = encodeEntrySector({ sector: 0, sectors: 0, flags: LOG_MARK, dataLength: text.length }, this.sectorSize, text);
    const at = this.reserve(1);
    this.recordedSequence = sequence;
    return this.issue(() => this.log.write(at, sector));
  }

  /** Takes the next `sectors` log sectors for one entry; returns their byte offset. */
  private reserve(sectors: number): number {
    const at = this.position.nextSector * this.sectorSize;
    this.position.nextSector += sectors;
    this.position.entries++;
    return at;
  }

  private issue(write: () => Promise<void>): Promise<void> {
    this.started ??= this.position.existing ? Promise.resolve() : this.log.write(0, encodeSuperblock(0, this.sectorSize));
    const started = this.started;
    const promise = started.then(write);
    const tracked = promise.finally(() => this.inFlight.delete(tracked)).catch(() => {});
    this.inFlight.add(tracked);
    return promise;
  }

  private async settle(): Promise<void> {
    while (this.inFlight.size) await Promise.all(this.inFlight);
  }

  /** Rewrites the count once every entry it counts is in the log, then flushes the log. */
  private updateSuperblock(): Promise<void> {
    const count = this.position.entries;
    const before = [...this.inFlight];
    return this.superblockWrites.run(async () => {
      await Promise.all(before);
      if (count <= this.countedEntries) return;
      await this.log.write(0, encodeSuperblock(count, this.sectorSize));
      await this.log.flush();
      this.countedEntries = count;
    });
  }
}
