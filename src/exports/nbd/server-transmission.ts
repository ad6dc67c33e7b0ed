/*
 * The transmission phase of one NBD client: reads requests, validates them as
 * QEMU's server does, runs up to 16 at once on the export's node and writes
 * their replies (simple or structured) whole, in whatever order they finish.
 * DISC lets the requests in flight finish, then closes.
 */
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import { errnoOf, describeErrno } from '../../blockdev/io-error.js';
import { ioBuffers, type BufferLease } from '../../blockdev/buffer-pool.js';
import { bitmapExtents, blockStatusExtents } from './export-block-status.js';
import {
  decodeRequestHeader,
  encodeChunkHeader,
  encodeErrorPayload,
  encodeHolePayload,
  encodeOffsetHeader,
  encodeSimpleReply,
  REQUEST_HEADER_LENGTH,
  type RequestHeader,
} from '../../nbd/messages.js';
import { selectedContexts } from './meta-contexts.js';
import type { NbdExport } from './nbd-export.js';
import {
  ChunkType,
  COMMAND_NAMES,
  Command,
  CommandFlag,
  MAX_PAYLOAD,
  MAX_REQUESTS_IN_FLIGHT,
  NbdErrno,
  nbdErrorFor,
} from '../../nbd/protocol.js';
import type { NegotiatedClient } from './server-handshake.js';
import type { SocketReader } from '../../nbd/socket-reader.js';

/** The most one NBD_CMD_CACHE holds in memory at a time. */
const CACHE_CHUNK = 1 << 20;

/** A request refused before it ran: QEMU answers all of these with EINVAL. */
class RequestRefused extends Error {
  constructor(message: string, readonly error: number = NbdErrno.EINVAL) {
    super(message);
  }
}

export class ServerTransmission {
  private inFlight = 0;
  private slotWaiter: (() => void) | undefined;
  /** Replies are being gathered for one writev (see send). */
  private corked = false;
  private readonly exported: NbdExport;

  constructor(
    private readonly socket: Socket,
    private readonly reader: SocketReader,
    private readonly client: NegotiatedClient,
    private readonly log: Logger,
  ) {
    this.exported = client.exported;
    socket.on('drain', () => this.wake());
  }

  /** Serves requests until DISC, a broken request stream, or the socket closing. */
  async run(): Promise<void> {
    try {
      for (;;) {
        await this.waitForSlot();
        const request = decodeRequestHeader(await this.reader.read(REQUEST_HEADER_LENGTH));
        if (request.type === Command.DISC) break;
        let payload: BufferLease | undefined;
        if (request.type === Command.WRITE) {
          if (request.length > MAX_PAYLOAD) {
            // The payload cannot be read, so the stream is lost after the error reply.
            this.sendError(request, NbdErrno.EINVAL, `len (${request.length} ) is larger than max len (${MAX_PAYLOAD})`);
            break;
          }
          payload = ioBuffers.acquire(request.length);
          try {
            await this.reader.readInto(payload.buffer);
          } catch (error) {
            payload.release();
            throw error;
          }
        }
        this.inFlight++;
        void this.serve(request, payload?.buffer).finally(() => {
          payload?.release();
          this.inFlight--;
          this.wake();
        });
      }
    } finally {
      await this.settle();
    }
  }

  private async waitForSlot(): Promise<void> {
    while (this.inFlight >= MAX_REQUESTS_IN_FLIGHT || this.socket.writableNeedDrain) {
      await new Promise<void>((resolve) => (this.slotWaiter = resolve));
    }
  }

  private wake(): void {
    const waiter = this.slotWaiter;
    this.slotWaiter = undefined;
    waiter?.();
  }

  /** Waits for the requests in flight (their replies may still be written). */
  private async settle(): Promise<void> {
    while (this.inFlight > 0) await new Promise<void>((resolve) => (this.slotWaiter = resolve));
  }

  private async serve(request: RequestHeader, payload: Buffer | undefined): Promise<void> {
    try {
      this.validate(request);
    } catch (error) {
      if (!(error instanceof RequestRefused)) throw error;
      this.sendError(request, error.error, error.message);
      return;
    }
    let failure = 'request failed';
    try {
      const edge = this.exported.edge;
      const fua = (request.flags & CommandFlag.FUA) !== 0 || this.exported.settings.writethrough;
      switch (request.type) {
        case Command.READ:
          if (request.flags & CommandFlag.FUA) {
            failure = 'flush failed';
            await edge.flush();
          }
          failure = 'reading from file failed';
          return await this.read(request);
        case Command.WRITE:
          failure = 'writing to file failed';
          await edge.write(request.offset, payload!, { fua });
          break;
        case Command.WRITE_ZEROES:
          failure = 'writing to file failed';
          await edge.writeZeroes(request.offset, request.length, {
            fua,
            mayUnmap: !(request.flags & CommandFlag.NO_HOLE),
            noFallback: (request.flags & CommandFlag.FAST_ZERO) !== 0,
          });
          break;
        case Command.FLUSH:
          failure = 'flush failed';
          await edge.flush();
          break;
        case Command.TRIM:
          failure = 'discard failed';
          await edge.discard(request.offset, request.length);
          if (fua) await edge.flush();
          break;
        case Command.CACHE:
          failure = 'caching data failed';
          await this.prefetch(request.offset, request.length);
          break;
        case Command.BLOCK_STATUS:
          failure = "can't get block status";
          return await this.blockStatus(request);
        default:
          this.sendError(request, NbdErrno.EINVAL, `invalid request type (${request.type}) received`);
          return;
      }
      this.send(undefined, encodeSimpleReply(request.cookie, 0));
    } catch (error) {
      const code = errnoOf(error);
      this.log.debug({ err: error, type: request.type, offset: request.offset, length: request.length }, 'NBD request failed');
      this.sendError(request, nbdErrorFor(code), failure);
    }
  }

  /**
   * NBD_CMD_CACHE, a prefetch hint: reading warms the host cache and surfaces errors. It reads
   * through one pooled buffer of at most CACHE_CHUNK, so a client asking to cache 32 MiB at a
   * time on every slot cannot make the daemon allocate that much.
   */
  private async prefetch(offset: number, length: number): Promise<void> {
    if (length === 0) return;
    const lease = ioBuffers.acquire(Math.min(length, CACHE_CHUNK));
    try {
      for (let done = 0; done < length; done += lease.buffer.length) {
        await this.exported.edge.read(offset + done, lease.buffer.subarray(0, Math.min(lease.buffer.length, length - done)));
      }
    } finally {
      lease.release();
    }
  }

  /** QEMU's up-front checks, in its order. */
  private validate(request: RequestHeader): void {
    const { type, offset, length, flags } = request;
    if ((type === Command.READ || type === Command.CACHE) && length > MAX_PAYLOAD) {
      throw new RequestRefused(`len (${length} ) is larger than max len (${MAX_PAYLOAD})`);
    }
    if (this.exported.readOnly && (type === Command.WRITE || type === Command.WRITE_ZEROES || type === Command.TRIM)) {
      // The NBD spec's EPERM; QEMU 7.2 sends EINVAL here, which tells a client less.
      throw new RequestRefused('Export is read-only', NbdErrno.EPERM);
    }
    const size = this.exported.size;
    if (offset > size || length > size - offset) {
      throw new RequestRefused(`operation past EOF; From: ${offset}, Len: ${length}, Size: ${size}`);
    }
    let valid: number = CommandFlag.FUA;
    if (type === Command.READ && this.client.structuredReplies) valid |= CommandFlag.DF;
    else if (type === Command.WRITE_ZEROES) valid |= CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO;
    else if (type === Command.BLOCK_STATUS) valid |= CommandFlag.REQ_ONE;
    if (flags & ~valid) {
      throw new RequestRefused(`unsupported flags for command ${COMMAND_NAMES[type] ?? '<unknown>'} (got 0x${flags.toString(16)})`);
    }
  }

  private async read(request: RequestHeader): Promise<void> {
    const lease = ioBuffers.acquire(request.length);
    try {
      await this.readAndReply(request, lease.buffer, () => lease.release());
    } catch (error) {
      lease.release();
      throw error;
    }
  }

  /** Reads and replies; `done` runs once the reply data has left (or will never be sent). */
  private async readAndReply(request: RequestHeader, data: Buffer, done: () => void): Promise<void> {
    const { cookie, offset, length } = request;
    if (!this.client.structuredReplies) {
      await this.exported.edge.read(offset, data);
      return this.send(done, encodeSimpleReply(cookie, 0), data);
    }
    if (length === 0) return this.send(done, encodeChunkHeader(cookie, ChunkType.NONE, true, 0));
    if (request.flags & CommandFlag.DF) {
      await this.exported.edge.read(offset, data);
      return this.send(done, encodeChunkHeader(cookie, ChunkType.OFFSET_DATA, true, 8 + length), encodeOffsetHeader(offset), data);
    }
    // Sparse read: zero ranges become hole chunks, the rest is read; all chunks are prepared before any is sent so an error can still be reported.
    const chunks: Buffer[][] = [];
    const node = this.exported.edge.child;
    for (let covered = 0; covered < length; ) {
      let extent;
      try {
        extent = await node.blockStatusAbove(offset + covered, length - covered);
      } catch (error) {
        done();
        return this.sendError(request, nbdErrorFor(errnoOf(error)), `unable to check for holes: ${describeErrno(errnoOf(error))}`);
      }
      const step = Math.min(extent.length, length - covered);
      const final = covered + step === length;
      if (extent.zero) {
        chunks.push([encodeChunkHeader(cookie, ChunkType.OFFSET_HOLE, final, 12), encodeHolePayload(offset + covered, step)]);
      } else {
        const part = data.subarray(covered, covered + step);
        await this.exported.edge.read(offset + covered, part);
        chunks.push([encodeChunkHeader(cookie, ChunkType.OFFSET_DATA, final, 8 + step), encodeOffsetHeader(offset + covered), part]);
      }
      covered += step;
    }
    this.send(done, ...chunks.flat());
  }

  private async blockStatus(request: RequestHeader): Promise<void> {
    const { cookie, offset, length } = request;
    if (length === 0) return this.sendError(request, NbdErrno.EINVAL, 'need non-zero length');
    const contexts = selectedContexts(this.exported.settings, this.client.contexts);
    if (contexts.length === 0) return this.sendError(request, NbdErrno.EINVAL, 'CMD_BLOCK_STATUS not negotiated');
    const onlyOne = (request.flags & CommandFlag.REQ_ONE) !== 0;
    const parts: Buffer[] = [];
    for (const [index, context] of contexts.entries()) {
      const payload = context.bitmap
        ? bitmapExtents(context.bitmap, context.id, offset, length, onlyOne)
        : await blockStatusExtents(this.exported.edge.child, context.id, offset, length, onlyOne);
      parts.push(encodeChunkHeader(cookie, ChunkType.BLOCK_STATUS, index === contexts.length - 1, payload.length), payload);
    }
    this.send(undefined, ...parts);
  }

  private sendError(request: RequestHeader, error: number, message: string): void {
    if (!this.client.structuredReplies) return this.send(undefined, encodeSimpleReply(request.cookie, error));
    const payload = encodeErrorPayload(error, message);
    this.send(undefined, encodeChunkHeader(request.cookie, ChunkType.ERROR, true, payload.length), payload);
  }

  /**
   * Writes one reply whole, so replies of concurrent requests never interleave; `written` runs
   * once the socket is done with the buffers. The socket stays corked until the event loop's
   * check phase: the replies finished in this turn leave in one writev (a syscall per reply
   * was most of what small reads cost).
   */
  private send(written: (() => void) | undefined, ...buffers: Buffer[]): void {
    if (this.socket.destroyed) return written?.();
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      setImmediate(this.uncork);
    }
    const last = buffers.length - 1;
    for (let index = 0; index < last; index++) this.socket.write(buffers[index]!);
    this.socket.write(buffers[last]!, written);
  }

  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };
}
