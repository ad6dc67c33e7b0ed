/*
 * One negotiated NBD connection in its transmission phase: requests go out
 * with a fresh cookie each, many at once (up to QEMU's 16), and one receive
 * loop hands every reply chunk to the request its cookie names, reassembling
 * structured READ replies. A server that breaks the protocol, or a dropped
 * socket, ends the session and fails every request still in flight.
 */
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import {
  ProtocolViolation, decodeBlockStatusPayload, decodeErrorPayload, decodeHolePayload, decodeOffset, decodeReplyHeader,
  encodeRequestHeader, replyHeaderLength, type ReplyHeader, type StatusExtent,
} from '../../../nbd/messages.js';
import {
  COMMAND_NAMES, ChunkType, Command, MAX_CHUNK_PAYLOAD, MAX_REQUESTS_IN_FLIGHT, chunkTypeName, errnoForNbdError, isErrorChunk,
} from '../../../nbd/protocol.js';
import type { SocketReader } from '../../../nbd/socket-reader.js';
import { IoError, describeErrno } from '../../io-error.js';
import type { ExportInfo } from './negotiate.js';

export interface NbdCommand {
  type: number;
  flags: number;
  offset: number;
  length: number;
  /** WRITE: the payload. */
  data?: Buffer;
  /** READ: where the `length` bytes go. */
  into?: Buffer;
}

/** The session is gone; `violation` tells a misbehaving server from a dropped connection. */
export class SessionLost extends Error {
  constructor(readonly reason: Error, readonly violation: boolean) {
    super(reason.message);
    this.name = 'SessionLost';
  }
}

interface InFlight {
  command: NbdCommand;
  /** A structured chunk came: from now on only chunks may follow. */
  structured: boolean;
  /** READ: bytes covered by data and hole chunks. */
  covered: number;
  extent?: StatusExtent;
  error?: IoError;
  resolve(extent: StatusExtent | undefined): void;
  reject(error: Error): void;
}

const protocolError = (message: string) => new ProtocolViolation(`Protocol error: ${message}`);

export class NbdSession {
  private readonly inFlight = new Map<bigint, InFlight>();
  private nextCookie = 1n;
  private freeSlots = MAX_REQUESTS_IN_FLIGHT;
  private readonly slotWaiters: (() => void)[] = [];
  private lost: SessionLost | undefined;
  /** Resolves once the session has ended, with why. */
  readonly ended: Promise<SessionLost>;

  constructor(private readonly socket: Socket, private readonly reader: SocketReader, readonly info: ExportInfo, private readonly log: Logger) {
    this.ended = this.receiveLoop();
  }

  /** Why the session ended, once it has. */
  get failure(): SessionLost | undefined {
    return this.lost;
  }

  /** Sends one request and resolves when its reply is complete (BLOCK_STATUS: with the first extent). */
  async request(command: NbdCommand): Promise<StatusExtent | undefined> {
    await this.takeSlot();
    try {
      if (this.lost) throw this.lost;
      const cookie = this.nextCookie++;
      const reply = new Promise<StatusExtent | undefined>((resolve, reject) => {
        this.inFlight.set(cookie, { command, structured: false, covered: 0, resolve, reject });
      });
      const { type, flags, offset, length } = command;
      // Header and payload in one corked write: no other request can slip in between.
      this.socket.cork();
      this.socket.write(encodeRequestHeader({ type, flags, cookie, offset, length }));
      if (command.data) this.socket.write(command.data);
      this.socket.uncork();
      return await reply;
    } finally {
      this.freeSlot();
    }
  }

  /** DISC, then close; requests must have finished (the node drains before closing). */
  disconnect(): Promise<SessionLost> {
    if (!this.lost && this.socket.writable) {
      const header = encodeRequestHeader({ type: Command.DISC, flags: 0, cookie: this.nextCookie++, offset: 0, length: 0 });
      this.socket.end(header, () => this.socket.destroy());
    }
    this.end(new SessionLost(new Error('disconnected'), false));
    return this.ended;
  }

  private async takeSlot(): Promise<void> {
    while (this.freeSlots === 0 && !this.lost) await new Promise<void>((resolve) => this.slotWaiters.push(resolve));
    this.freeSlots--;
  }

  private freeSlot(): void {
    this.freeSlots++;
    this.slotWaiters.shift()?.();
  }

  private end(lost: SessionLost): void {
    if (this.lost) return;
    this.lost = lost;
    if (!this.socket.writableEnded) this.socket.destroy();
    for (const request of this.inFlight.values()) request.reject(lost);
    this.inFlight.clear();
    for (const wake of this.slotWaiters.splice(0)) wake();
  }

  private async receiveLoop(): Promise<SessionLost> {
    try {
      for (;;) await this.receiveOne();
    } catch (error) {
      const violation = error instanceof ProtocolViolation;
      if (violation) this.log.error({ err: error }, 'NBD server broke the protocol: connection closed');
      this.end(new SessionLost(error as Error, violation));
      return this.lost!;
    }
  }

  private async receiveOne(): Promise<void> {
    const magic = await this.reader.read(4);
    const rest = await this.reader.read(replyHeaderLength(magic.readUInt32BE(0)) - 4);
    const header = decodeReplyHeader(Buffer.concat([magic, rest]));
    const request = this.inFlight.get(header.cookie);
    if (!request) throw protocolError(`reply for unknown cookie 0x${header.cookie.toString(16)}`);
    if (header.kind === 'simple') return this.simpleReply(header.cookie, request, header.error);
    if (!this.info.structuredReplies) throw protocolError('structured reply without negotiation');
    request.structured = true;
    await this.chunk(request, header);
    if (header.done) this.finish(header.cookie, request);
  }

  private async simpleReply(cookie: bigint, request: InFlight, error: number): Promise<void> {
    const { command } = request;
    if (request.structured || (command.type === Command.READ && this.info.structuredReplies)) {
      throw protocolError('simple reply when structured reply chunk was expected');
    }
    if (error !== 0) {
      request.error = new IoError(errnoForNbdError(error));
    } else if (command.type === Command.READ) {
      command.into!.set(await this.reader.read(command.length));
      request.covered = command.length;
    }
    this.finish(cookie, request);
  }

  private async chunk(request: InFlight, header: Extract<ReplyHeader, { kind: 'chunk' }>): Promise<void> {
    const { command } = request;
    const { type, length } = header;
    if (type === ChunkType.NONE) {
      if (!header.done) throw protocolError('NBD_REPLY_TYPE_NONE chunk without NBD_REPLY_FLAG_DONE flag set');
      if (length !== 0) throw protocolError('NBD_REPLY_TYPE_NONE chunk with nonzero length');
      return;
    }
    if (type === ChunkType.OFFSET_DATA && command.type === Command.READ) {
      if (length <= 8) throw protocolError('invalid payload for NBD_REPLY_TYPE_OFFSET_DATA');
      const offset = decodeOffset(await this.reader.read(8));
      this.cover(request, offset, length - 8);
      command.into!.set(await this.reader.read(length - 8), offset - command.offset);
      return;
    }
    // Anything but data is small; QEMU's client refuses more than this.
    if (length > MAX_CHUNK_PAYLOAD) throw new ProtocolViolation('Payload too large');
    const payload = await this.reader.read(length);
    if (isErrorChunk(type)) {
      const { error, message } = decodeErrorPayload(payload, type);
      const code = errnoForNbdError(error);
      request.error ??= new IoError(code, message ? `${describeErrno(code)} (server: ${message})` : undefined);
    } else if (type === ChunkType.OFFSET_HOLE && command.type === Command.READ) {
      const hole = decodeHolePayload(payload);
      this.cover(request, hole.offset, hole.length);
      command.into!.fill(0, hole.offset - command.offset, hole.offset - command.offset + hole.length);
    } else if (type === ChunkType.BLOCK_STATUS && command.type === Command.BLOCK_STATUS) {
      if (request.extent) throw new ProtocolViolation('Several BLOCK_STATUS chunks in reply');
      const status = decodeBlockStatusPayload(payload);
      const expected = this.info.statusContext;
      if (status.contextId !== expected) {
        throw protocolError(`unexpected context id ${status.contextId} for NBD_REPLY_TYPE_BLOCK_STATUS, when negotiated context id is ${expected}`);
      }
      request.extent = status.extents[0];
    } else {
      throw new ProtocolViolation(`Unexpected reply type: ${type} (${chunkTypeName(type)}) for CMD_${(COMMAND_NAMES[command.type] ?? String(command.type)).toUpperCase().replace(' ', '_')}`);
    }
  }

  /** A content chunk must lie inside its READ request and not be empty. */
  private cover(request: InFlight, offset: number, length: number): void {
    const { command } = request;
    if (length === 0 || offset < command.offset || offset + length > command.offset + command.length) {
      throw protocolError('server sent chunk exceeding requested region');
    }
    request.covered += length;
  }

  private finish(cookie: bigint, request: InFlight): void {
    const { command } = request;
    // Content chunks may not overlap, so a complete successful READ covers exactly its length.
    if (!request.error && command.type === Command.READ && request.covered !== command.length) {
      throw protocolError(`read reply covered ${request.covered} of ${command.length} bytes`);
    }
    this.inFlight.delete(cookie);
    if (request.error) return request.reject(request.error);
    if (command.type === Command.BLOCK_STATUS && !request.extent) {
      return request.reject(new IoError('EIO', 'Server did not reply with any status extents'));
    }
    request.resolve(request.extent);
  }
}
