/*
 * What a disk must read after a guest's NBD writes (recorded by AckedWriter with `exclusive`,
 * so that writes over the same bytes never were in flight together): after a clean run,
 * exactly the acknowledged writes applied in order; after a crash, at each byte the last
 * write there that was durable or any write after it (acknowledged or not), and where no
 * durable write reached, also what the disk held before.
 */
import assert from 'node:assert/strict';
import type { AckedWrite } from './nbd-acked-writes.js';

/** The bytes `initial` holds once every acknowledged write is applied in the order acknowledged. */
export function applyAcked(initial: Buffer, acked: readonly AckedWrite[]): Buffer {
  const bytes = Buffer.from(initial);
  for (const write of acked) {
    if (write.data) write.data.copy(bytes, write.offset);
    else bytes.fill(0, write.offset, write.offset + write.length);
  }
  return bytes;
}

function describe(write: AckedWrite): string {
  const kind = write.data ? 'write' : 'write-zeroes';
  const acked = write.ackedAt > 0 ? `acknowledged at ${write.ackedAt}` : 'never acknowledged';
  return `${kind} ${write.offset}+${write.length} (sent at ${write.sentAt}, ${acked}${write.durableAt > 0 ? `, durable at ${write.durableAt}` : ''})`;
}

function byteOf(write: AckedWrite, at: number): number {
  return write.data ? write.data[at - write.offset]! : 0;
}

/**
 * The disk `actual` after a crash: where no write was sent it holds `initial`; elsewhere each byte
 * is one a write there could have left, given which writes `durable` says were safe on this disk.
 */
export function assertReadsAsAckedWrites(actual: Buffer, initial: Buffer, sent: readonly AckedWrite[], durable: (write: AckedWrite) => boolean, context: string): void {
  assert.equal(actual.length, initial.length, `${context}: disk size`);
  const bounds = [...new Set([0, actual.length, ...sent.flatMap((write) => [write.offset, write.offset + write.length])])].sort((a, b) => a - b);
  const bySendTime = [...sent].sort((a, b) => a.sentAt - b.sentAt);
  for (let i = 0; i + 1 < bounds.length; i++) {
    const start = bounds[i]!;
    const end = bounds[i + 1]!;
    const covering = bySendTime.filter((write) => write.offset <= start && end <= write.offset + write.length);
    if (covering.length === 0) {
      if (actual.compare(initial, start, end, start, end) !== 0) {
        assert.fail(`${context}: bytes ${start}..${end} changed, but no write was sent there`);
      }
      continue;
    }
    let lastDurable = -1;
    covering.forEach((write, index) => {
      if (durable(write)) lastDurable = index;
    });
    const candidates = covering.slice(Math.max(lastDurable, 0));
    for (let at = start; at < end; at++) {
      const value = actual[at]!;
      if (candidates.some((write) => byteOf(write, at) === value)) continue;
      if (lastDurable < 0 && initial[at] === value) continue;
      assert.fail(`${context}: byte ${at} reads 0x${value.toString(16)}; it may only hold what one of these left: ` +
        `${lastDurable < 0 ? `the old 0x${initial[at]!.toString(16)}, ` : ''}${candidates.map((write) => `0x${byteOf(write, at).toString(16)} of ${describe(write)}`).join(', ')}`);
    }
  }
}
