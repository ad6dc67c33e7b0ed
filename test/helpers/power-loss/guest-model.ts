/*
 * What a guest may read after a power loss. The guest's writes and flushes are
 * recorded in order; each acknowledged flush is tied to a witness, the last
 * flush entry its image's log held when the acknowledgement arrived. In a crash
 * state that includes the witness, every write made before that flush must read
 * back; a later write may read back or not (sector by sector, since nothing
 * promised it); bytes never written read as they did at the start.
 */
import type { CrashState } from './crash-states.js';

const SECTOR = 512;

/** A flush entry in one of the scenario's logs. */
export interface Witness {
  log: number;
  entry: number;
}

export function includes(state: CrashState, witness: Witness): boolean {
  return state.prefix[witness.log]! > witness.entry;
}

type GuestOperation = { write: { offset: number; data: Buffer } } | { flush: Witness };

export class GuestModel {
  private readonly operations: GuestOperation[] = [];

  /** `initial`: what the image reads before the first recorded write. */
  constructor(readonly initial: Buffer) {}

  write(offset: number, data: Buffer): void {
    if (offset % SECTOR !== 0 || data.length % SECTOR !== 0) throw new Error('the model follows whole sectors: guest writes must be 512-byte aligned');
    this.operations.push({ write: { offset, data } });
  }

  flush(witness: Witness): void {
    this.operations.push({ flush: witness });
  }

  /** What the disk reads once every recorded write is done (where a snapshot's overlay starts from). */
  contents(): Buffer {
    const bytes = Buffer.from(this.initial);
    for (const operation of this.operations) if ('write' in operation) operation.write.data.copy(bytes, operation.write.offset);
    return bytes;
  }

  /** Problems with what the image reads in a crash state (none: it is one the guest may see). */
  check(actual: Buffer, state: CrashState): string[] {
    let settled = -1;
    this.operations.forEach((operation, i) => {
      if ('flush' in operation && includes(state, operation.flush)) settled = i;
    });
    const flushed = Buffer.from(this.initial);
    const unflushed: { offset: number; data: Buffer }[] = [];
    this.operations.forEach((operation, i) => {
      if (!('write' in operation)) return;
      if (i < settled) operation.write.data.copy(flushed, operation.write.offset);
      else unflushed.push(operation.write);
    });
    if (actual.length !== flushed.length) return [`the disk is ${actual.length} bytes, expected ${flushed.length}`];
    if (actual.equals(flushed)) return [];
    const problems: string[] = [];
    for (let at = 0; at < actual.length && problems.length < 4; at += SECTOR) {
      const sector = actual.subarray(at, at + SECTOR);
      if (sector.equals(flushed.subarray(at, at + SECTOR))) continue;
      const later = unflushed.some((write) => at >= write.offset && at < write.offset + write.data.length
        && sector.equals(write.data.subarray(at - write.offset, at - write.offset + SECTOR)));
      if (!later) problems.push(`sector at ${at} reads neither what was flushed there nor any later write (lost or garbage)`);
    }
    return problems;
  }
}
