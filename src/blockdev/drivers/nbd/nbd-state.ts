/*
 * The open nbd node: turns block-layer requests into NBD commands within the
 * export's limits. Requests are split at the maximum payload, unaligned ones
 * (when the server's minimum block size is above 1) go through
 * read-modify-write under a range lock, and a flag the server did not
 * advertise is emulated or refused as QEMU's block layer does.
 */
import { Command, CommandFlag, TransmissionFlag, AllocationFlag } from '../../../nbd/protocol.js';
import type { StatusExtent } from '../../../nbd/messages.js';
import type { DriverExtent, DriverInfo, DriverState, WriteFlags, ZeroFlags } from '../../block-driver.js';
import { IoError } from '../../io-error.js';
import { RangeLock } from '../../range-lock.js';
import type { NbdConnection } from './connection.js';
import type { NbdCommand } from './session.js';

/** What the node may send, fixed when it opens (a reconnection must offer the same). */
export interface RequestLimits {
  /** Every request's offset and length are multiples of this. */
  alignment: number;
  /** Largest READ/WRITE/WRITE_ZEROES length. */
  maxTransfer: number;
  /** Largest TRIM and BLOCK_STATUS length (no payload: only the u32 length field bounds them). */
  maxRange: number;
}

const alignDown = (value: number, to: number) => Math.floor(value / to) * to;
const alignUp = (value: number, to: number) => Math.ceil(value / to) * to;

export class NbdState implements DriverState {
  /** Read-modify-write cycles take their blocks exclusively; other writes share. Unused at alignment 1. */
  private readonly writeLock = new RangeLock();

  constructor(
    private readonly connection: NbdConnection,
    private readonly size: number,
    private readonly limits: RequestLimits,
    private readonly filename: () => string,
    /** x-dirty-bitmap=qemu:allocation-depth: depths above 2 read as 2 (zero), as QEMU's client folds them. */
    private readonly depthAsStatus = false,
  ) {}

  private has(flag: number): boolean {
    return (this.connection.info.flags & flag) !== 0;
  }

  private send(command: NbdCommand): Promise<StatusExtent | undefined> {
    return this.connection.run((session) => session.request(command));
  }

  /** Calls `each` on consecutive pieces of at most `max` bytes, one after the other. */
  private async inPieces(offset: number, length: number, max: number, each: (offset: number, length: number, done: number) => Promise<unknown>): Promise<void> {
    for (let done = 0; done < length; ) {
      const step = Math.min(max, length - done);
      await each(offset + done, step, done);
      done += step;
    }
  }

  private isAligned(offset: number, length: number): boolean {
    return offset % this.limits.alignment === 0 && length % this.limits.alignment === 0;
  }

  /** Holds [offset, offset+length) rounded out to whole blocks while `body` runs (not needed at alignment 1). */
  private async locked(offset: number, length: number, exclusive: boolean, body: () => Promise<void>): Promise<void> {
    const { alignment } = this.limits;
    if (alignment === 1) return body();
    const release = await this.writeLock.acquire(alignDown(offset, alignment), alignUp(offset + length, alignment), exclusive);
    try {
      await body();
    } finally {
      release();
    }
  }

  length(): number {
    return this.size;
  }

  async read(offset: number, buffer: Buffer): Promise<void> {
    if (!this.isAligned(offset, buffer.length)) {
      // Read whole blocks into a bounce buffer and keep the part asked for.
      const start = alignDown(offset, this.limits.alignment);
      const bounce = Buffer.alloc(alignUp(offset + buffer.length, this.limits.alignment) - start);
      await this.read(start, bounce);
      bounce.copy(buffer, 0, offset - start, offset - start + buffer.length);
      return;
    }
    await this.inPieces(offset, buffer.length, this.limits.maxTransfer, (at, length, done) =>
      this.send({ type: Command.READ, flags: 0, offset: at, length, into: buffer.subarray(done, done + length) }));
  }

  async write(offset: number, buffer: Buffer, flags: WriteFlags): Promise<void> {
    const aligned = this.isAligned(offset, buffer.length);
    await this.locked(offset, buffer.length, !aligned, async () => {
      if (aligned) return this.writeAligned(offset, buffer, flags);
      const start = alignDown(offset, this.limits.alignment);
      const end = alignUp(offset + buffer.length, this.limits.alignment);
      const bounce = Buffer.alloc(end - start);
      // Only the first and last blocks hold bytes that are not rewritten.
      await this.read(start, bounce.subarray(0, this.limits.alignment));
      await this.read(end - this.limits.alignment, bounce.subarray(bounce.length - this.limits.alignment));
      buffer.copy(bounce, offset - start);
      await this.writeAligned(start, bounce, flags);
    });
  }

  private async writeAligned(offset: number, buffer: Buffer, flags: WriteFlags): Promise<void> {
    const fua = flags.fua === true && this.has(TransmissionFlag.SEND_FUA);
    await this.inPieces(offset, buffer.length, this.limits.maxTransfer, (at, length, done) =>
      this.send({ type: Command.WRITE, flags: fua ? CommandFlag.FUA : 0, offset: at, length, data: buffer.subarray(done, done + length) }));
    // Without FUA on the wire, a flush makes the write durable (QEMU's block layer does the same).
    if (flags.fua && !fua) await this.flush();
  }

  async writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (!this.has(TransmissionFlag.SEND_WRITE_ZEROES)) throw new IoError('ENOTSUP'); // the node writes zero buffers instead
    if (flags.noFallback && !this.has(TransmissionFlag.SEND_FAST_ZERO)) throw new IoError('ENOTSUP');
    const { alignment } = this.limits;
    const head = Math.min(alignUp(offset, alignment), offset + length);
    const tail = Math.max(alignDown(offset + length, alignment), head);
    if ((head > offset || tail < offset + length) && flags.noFallback) throw new IoError('ENOTSUP'); // partial blocks need writing
    // Partial blocks at either end are written as zeros (read-modify-write); whole blocks get WRITE_ZEROES.
    if (head > offset) await this.write(offset, Buffer.alloc(head - offset), flags);
    if (tail > head) await this.locked(head, tail - head, false, () => this.zeroAligned(head, tail - head, flags));
    if (offset + length > tail) await this.write(tail, Buffer.alloc(offset + length - tail), flags);
  }

  private async zeroAligned(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    const fua = flags.fua === true && this.has(TransmissionFlag.SEND_FUA);
    let commandFlags = fua ? CommandFlag.FUA : 0;
    if (!flags.mayUnmap) commandFlags |= CommandFlag.NO_HOLE;
    if (flags.noFallback) commandFlags |= CommandFlag.FAST_ZERO;
    await this.inPieces(offset, length, this.limits.maxTransfer, (at, step) =>
      this.send({ type: Command.WRITE_ZEROES, flags: commandFlags, offset: at, length: step }));
    if (flags.fua && !fua) await this.flush();
  }

  async discard(offset: number, length: number): Promise<void> {
    if (!this.has(TransmissionFlag.SEND_TRIM)) return; // a discard is a hint; QEMU drops it too
    // Only whole blocks can be trimmed; the partial ones at the ends stay as they are.
    const start = alignUp(offset, this.limits.alignment);
    const end = alignDown(offset + length, this.limits.alignment);
    if (end <= start) return;
    await this.locked(start, end - start, false, () =>
      this.inPieces(start, end - start, this.limits.maxRange, (at, step) => this.send({ type: Command.TRIM, flags: 0, offset: at, length: step })));
  }

  async flush(): Promise<void> {
    if (!this.has(TransmissionFlag.SEND_FLUSH)) return; // nothing to ask for: QEMU treats it as done
    await this.send({ type: Command.FLUSH, flags: 0, offset: 0, length: 0 });
  }

  async blockStatus(offset: number, length: number): Promise<DriverExtent> {
    if (this.connection.info.statusContext === undefined) return { length, allocated: true, data: true, zero: false, hostOffset: offset };
    const { alignment } = this.limits;
    const start = alignDown(offset, alignment);
    const asked = Math.min(alignUp(offset + length, alignment), this.size) - start;
    // REQ_ONE: one extent, no longer than asked, as QEMU asks.
    const extent = (await this.send({ type: Command.BLOCK_STATUS, flags: CommandFlag.REQ_ONE, offset: start, length: Math.min(asked, this.limits.maxRange) }))!;
    let { length: answered, flags } = extent;
    answered = Math.min(answered, asked);
    if (this.depthAsStatus && flags > 2) flags = 2;
    if (answered % alignment !== 0) {
      // A server may describe a partial block; like QEMU, trim the answer to whole blocks, or call one block data.
      if (answered > alignment) answered = alignDown(answered, alignment);
      else [answered, flags] = [alignment, 0];
    }
    return {
      length: Math.min(start + answered - offset, length),
      // As QEMU's block layer decides for a node without a backing file: allocated if it reads as data or zeroes.
      allocated: (flags & AllocationFlag.HOLE) === 0 || (flags & AllocationFlag.ZERO) !== 0,
      data: (flags & AllocationFlag.HOLE) === 0,
      zero: (flags & AllocationFlag.ZERO) !== 0,
      hostOffset: offset,
    };
  }

  /** NBD cannot resize: as in QEMU, shrinking is accepted and changes nothing, growing fails. */
  async truncate(size: number): Promise<void> {
    if (size > this.size) throw new IoError('EINVAL', 'Cannot grow NBD nodes');
  }

  info(): DriverInfo {
    return { filename: this.filename() };
  }

  /** QEMU cannot tell what an export occupies on its server: no actual-size. */
  async allocatedSize(): Promise<number | undefined> {
    return undefined;
  }

  close(): Promise<void> {
    return this.connection.close();
  }
}
