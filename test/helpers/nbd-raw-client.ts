/*
 * A wire-level NBD client for tests: sends exactly the options and requests a
 * test asks for and returns the replies as decoded by the shared codec, so
 * tests can check what a server puts on the wire (and send it garbage).
 */
import net from 'node:net';
import { connect as connectTls, type ConnectionOptions } from 'node:tls';
import {
  decodeBlockStatusPayload,
  decodeErrorPayload,
  decodeGreeting,
  decodeOptionReplyHeader,
  decodeReplyHeader,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequestHeader,
  GREETING_LENGTH,
  OPTION_REPLY_HEADER_LENGTH,
  replyHeaderLength,
  type StatusExtent,
} from '../../src/nbd/messages.js';
import { ChunkType, ClientFlag, Command, Info, Option, OptionReply } from '../../src/nbd/protocol.js';
import { SocketReader } from '../../src/nbd/socket-reader.js';

export interface OptionReplyMessage {
  option: number;
  type: number;
  data: Buffer;
}

export interface Chunk {
  type: number;
  done: boolean;
  cookie: bigint;
  payload: Buffer;
}

export interface SimpleReply {
  kind: 'simple';
  error: number;
  cookie: bigint;
  data?: Buffer;
}

/** Option replies as one line: option, reply type and data (hex, or as text for messages). */
export function describeOptionReplies(replies: OptionReplyMessage[], encoding: 'hex' | 'latin1' = 'hex'): string {
  return replies.map((reply) => `opt ${reply.option} type 0x${reply.type.toString(16)} ${reply.data.toString(encoding)}`).join(' | ');
}

export class NbdRawClient {
  /** Replaced, with the socket, by their TLS counterparts once startTls() has run. */
  reader: SocketReader;
  handshakeFlags = 0;
  size = 0;
  transmissionFlags = 0;
  private nextCookie = 1n;

  private constructor(public socket: net.Socket) {
    this.reader = new SocketReader(socket);
    socket.on('error', () => {}); // a reset by the server shows as the close a test waits for
  }

  /** Connects and reads the greeting; nothing is sent yet. */
  static async connect(path: string): Promise<NbdRawClient> {
    const socket = net.connect(path);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const client = new NbdRawClient(socket);
    client.handshakeFlags = decodeGreeting(await client.reader.read(GREETING_LENGTH));
    return client;
  }

  /** The usual start: fixed newstyle + no zeroes, structured replies, contexts, GO. */
  static async open(path: string, exportName: string, contexts: string[] = ['base:allocation']): Promise<NbdRawClient> {
    const client = await NbdRawClient.connect(path);
    client.sendClientFlags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES);
    await client.option(Option.STRUCTURED_REPLY);
    if (contexts.length) await client.option(Option.SET_META_CONTEXT, encodeMetaContextRequest(exportName, contexts));
    const replies = await client.option(Option.GO, encodeInfoRequest(exportName, [Info.BLOCK_SIZE]));
    const final = replies[replies.length - 1]!;
    if (final.type !== OptionReply.ACK) throw new Error(`GO failed: ${final.type.toString(16)} ${final.data.toString()}`);
    return client;
  }

  /** The TLS handshake, after the server acknowledged STARTTLS; everything after goes over TLS. */
  async startTls(options: ConnectionOptions): Promise<void> {
    this.reader.detach();
    const tls = connectTls({ ...options, socket: this.socket });
    await new Promise<void>((resolve, reject) => {
      tls.once('secureConnect', resolve);
      tls.once('error', reject);
    });
    tls.on('error', () => {});
    this.socket = tls;
    this.reader = new SocketReader(tls);
  }

  sendClientFlags(flags: number): void {
    const data = Buffer.alloc(4);
    data.writeUInt32BE(flags, 0);
    this.socket.write(data);
  }

  /** Sends an option and collects its replies up to the final one (ACK or an error). */
  async option(option: number, data?: Buffer): Promise<OptionReplyMessage[]> {
    this.socket.write(encodeOption(option, data));
    return this.readOptionReplies();
  }

  async readOptionReplies(): Promise<OptionReplyMessage[]> {
    const replies: OptionReplyMessage[] = [];
    for (;;) {
      const header = decodeOptionReplyHeader(await this.reader.read(OPTION_REPLY_HEADER_LENGTH));
      const message = { option: header.option, type: header.type, data: await this.reader.read(header.length) };
      replies.push(message);
      if (message.type === OptionReply.INFO) {
        if (message.data.readUInt16BE(0) === Info.EXPORT) {
          this.size = Number(message.data.readBigUInt64BE(2));
          this.transmissionFlags = message.data.readUInt16BE(10);
        }
        continue;
      }
      if (message.type === OptionReply.SERVER || message.type === OptionReply.META_CONTEXT) continue;
      return replies;
    }
  }

  /** Sends a request; returns its cookie. */
  request(type: number, offset: number, length: number, flags = 0, payload?: Buffer): bigint {
    const cookie = this.nextCookie++;
    this.socket.write(encodeRequestHeader({ flags, type, cookie, offset, length }));
    if (payload) this.socket.write(payload);
    return cookie;
  }

  /** Reads one reply message: a simple reply (with `dataLength` bytes of data if it is a successful read) or one chunk. */
  async readReply(dataLength = 0): Promise<SimpleReply | ({ kind: 'chunk' } & Chunk)> {
    const start = await this.reader.read(4);
    const rest = await this.reader.read(replyHeaderLength(start.readUInt32BE(0)) - 4);
    const header = decodeReplyHeader(Buffer.concat([start, rest]));
    if (header.kind === 'simple') {
      const data = header.error === 0 && dataLength > 0 ? await this.reader.read(dataLength) : undefined;
      return { kind: 'simple', error: header.error, cookie: header.cookie, data };
    }
    return { kind: 'chunk', type: header.type, done: header.done, cookie: header.cookie, payload: await this.reader.read(header.length) };
  }

  /** Reads chunks until the one with DONE (for one request in flight). */
  async readChunks(): Promise<Chunk[]> {
    const chunks: Chunk[] = [];
    for (;;) {
      const reply = await this.readReply();
      if (reply.kind !== 'chunk') throw new Error('simple reply where chunks were expected');
      chunks.push(reply);
      if (reply.done) return chunks;
    }
  }

  /** A structured read, reassembled; throws on an error chunk. */
  async read(offset: number, length: number, flags = 0): Promise<Buffer> {
    this.request(0, offset, length, flags);
    const data = Buffer.alloc(length);
    for (const chunk of await this.readChunks()) {
      if (chunk.type === ChunkType.OFFSET_DATA) chunk.payload.copy(data, Number(chunk.payload.readBigUInt64BE(0)) - offset, 8);
      else if (chunk.type & 0x8000) throw new Error(`read failed: ${decodeErrorPayload(chunk.payload, chunk.type).message}`);
    }
    return data;
  }

  async blockStatus(offset: number, length: number, flags = 0): Promise<Map<number, StatusExtent[]>> {
    this.request(7, offset, length, flags);
    const answer = new Map<number, StatusExtent[]>();
    for (const chunk of await this.readChunks()) {
      if (chunk.type !== ChunkType.BLOCK_STATUS) throw new Error(`block status failed: ${decodeErrorPayload(chunk.payload, chunk.type).message}`);
      const { contextId, extents } = decodeBlockStatusPayload(chunk.payload);
      answer.set(contextId, extents);
    }
    return answer;
  }

  /** A write, write-zeroes, trim or flush, one in flight: resolves with the reply's error (0 for success). */
  async change(type: number, offset: number, length: number, flags = 0, payload?: Buffer): Promise<number> {
    this.request(type, offset, length, flags, payload);
    const reply = await this.readReply();
    if (reply.kind === 'simple') return reply.error;
    return reply.type & 0x8000 ? decodeErrorPayload(reply.payload, reply.type).error : 0;
  }

  /** Resolves when the server closes the connection. */
  closed(): Promise<void> {
    return new Promise((resolve) => {
      if (this.socket.destroyed) return resolve();
      this.socket.once('close', () => resolve());
    });
  }

  close(): void {
    this.socket.destroy();
  }

  /** Leaves as a client should (NBD_CMD_DISC) and resolves once the server has closed the connection. */
  async disconnect(): Promise<void> {
    if (this.socket.writable) this.request(Command.DISC, 0, 0);
    await this.closed();
  }
}
