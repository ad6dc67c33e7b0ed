/*
 * Encoders and decoders for every NBD message, the one codec both ends use:
 * the server encodes what the client decodes and the other way round.
 * Decoders take complete messages (the reader frames them) and check only
 * the layout; what a value means is for the caller to judge.
 */
import {
  CHUNK_DONE,
  ChunkType,
  HandshakeFlag,
  IHAVEOPT,
  Info,
  NBD_MAGIC,
  OPTION_REPLY_MAGIC,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from './protocol.js';

export class ProtocolViolation extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProtocolViolation';
  }
}

/** A message longer than its fields: a separate case because QEMU words it differently. */
export class TrailingBytes extends ProtocolViolation {}

// ---- handshake ------------------------------------------------------------------------------

export const GREETING_LENGTH = 18;

export function encodeGreeting(flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES): Buffer {
  const out = Buffer.alloc(GREETING_LENGTH);
  out.writeBigUInt64BE(NBD_MAGIC, 0);
  out.writeBigUInt64BE(IHAVEOPT, 8);
  out.writeUInt16BE(flags, 16);
  return out;
}

export function decodeGreeting(data: Buffer): number {
  if (data.readBigUInt64BE(0) !== NBD_MAGIC) throw new ProtocolViolation('Bad initial magic received');
  if (data.readBigUInt64BE(8) !== IHAVEOPT) throw new ProtocolViolation('Server does not speak the fixed newstyle protocol');
  return data.readUInt16BE(16);
}

export const OPTION_HEADER_LENGTH = 16;

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(OPTION_HEADER_LENGTH);
  header.writeBigUInt64BE(IHAVEOPT, 0);
  header.writeUInt32BE(option, 8);
  header.writeUInt32BE(data.length, 12);
  return Buffer.concat([header, data]);
}

export interface OptionHeader {
  option: number;
  length: number;
}

export function decodeOptionHeader(data: Buffer): OptionHeader {
  if (data.readBigUInt64BE(0) !== IHAVEOPT) throw new ProtocolViolation('Bad magic received');
  return { option: data.readUInt32BE(8), length: data.readUInt32BE(12) };
}

export const OPTION_REPLY_HEADER_LENGTH = 20;

export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(OPTION_REPLY_HEADER_LENGTH);
  header.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  header.writeUInt32BE(option, 8);
  header.writeUInt32BE(type, 12);
  header.writeUInt32BE(data.length, 16);
  return Buffer.concat([header, data]);
}

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

export function decodeOptionReplyHeader(data: Buffer): OptionReplyHeader {
  if (data.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new ProtocolViolation('Unexpected option reply magic');
  return { option: data.readUInt32BE(8), type: data.readUInt32BE(12), length: data.readUInt32BE(16) };
}

/** A length-prefixed string: u32 length, bytes. */
export function encodeString(text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  const out = Buffer.alloc(4 + bytes.length);
  out.writeUInt32BE(bytes.length, 0);
  bytes.copy(out, 4);
  return out;
}

/** Reads a u32-length-prefixed string at `offset`; returns it and the offset after it. */
export function decodeString(data: Buffer, offset: number, what: string): { text: string; next: number } {
  if (offset + 4 > data.length) throw new ProtocolViolation(`${what}: length missing`);
  const length = data.readUInt32BE(offset);
  if (offset + 4 + length > data.length) throw new ProtocolViolation(`${what}: length ${length} exceeds the option`);
  return { text: data.toString('utf8', offset + 4, offset + 4 + length), next: offset + 4 + length };
}

/** INFO and GO: export name and the info types asked for. */
export function encodeInfoRequest(name: string, infos: number[]): Buffer {
  const tail = Buffer.alloc(2 + 2 * infos.length);
  tail.writeUInt16BE(infos.length, 0);
  infos.forEach((info, index) => tail.writeUInt16BE(info, 2 + 2 * index));
  return Buffer.concat([encodeString(name), tail]);
}

export function decodeInfoRequest(data: Buffer): { name: string; infos: number[] } {
  const { text: name, next } = decodeString(data, 0, 'export name');
  if (next + 2 > data.length) throw new ProtocolViolation('information request count missing');
  const count = data.readUInt16BE(next);
  if (next + 2 + 2 * count > data.length) throw new ProtocolViolation('information requests missing');
  if (next + 2 + 2 * count < data.length) throw new TrailingBytes('bytes after the information requests');
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(next + 2 + 2 * i));
  return { name, infos };
}

export function encodeInfoExport(size: number, flags: number): Buffer {
  const out = Buffer.alloc(12);
  out.writeUInt16BE(Info.EXPORT, 0);
  out.writeBigUInt64BE(BigInt(size), 2);
  out.writeUInt16BE(flags, 10);
  return out;
}

export function encodeInfoText(type: number, text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  const out = Buffer.alloc(2 + bytes.length);
  out.writeUInt16BE(type, 0);
  bytes.copy(out, 2);
  return out;
}

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

export function encodeInfoBlockSize({ minimum, preferred, maximum }: BlockSizes): Buffer {
  const out = Buffer.alloc(14);
  out.writeUInt16BE(Info.BLOCK_SIZE, 0);
  out.writeUInt32BE(minimum, 2);
  out.writeUInt32BE(preferred, 6);
  out.writeUInt32BE(maximum, 10);
  return out;
}

/** The export size and transmission flags, as INFO_EXPORT carries them and EXPORT_NAME answers. */
export function encodeExportDetails(size: number, flags: number, zeroPadding: boolean): Buffer {
  const out = Buffer.alloc(10 + (zeroPadding ? 124 : 0));
  out.writeBigUInt64BE(BigInt(size), 0);
  out.writeUInt16BE(flags, 8);
  return out;
}

/** LIST_META_CONTEXT and SET_META_CONTEXT: export name and queries. */
export function encodeMetaContextRequest(name: string, queries: string[]): Buffer {
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  return Buffer.concat([encodeString(name), count, ...queries.map(encodeString)]);
}

export function decodeMetaContextRequest(data: Buffer): { name: string; queries: string[] } {
  const { text: name, next } = decodeString(data, 0, 'export name');
  if (next + 4 > data.length) throw new ProtocolViolation('query count missing');
  const count = data.readUInt32BE(next);
  const queries: string[] = [];
  let offset = next + 4;
  for (let i = 0; i < count; i++) {
    const query = decodeString(data, offset, 'query');
    queries.push(query.text);
    offset = query.next;
  }
  if (offset !== data.length) throw new TrailingBytes('unexpected bytes after the queries');
  return { name, queries };
}

export function encodeMetaContextReply(id: number, name: string): Buffer {
  const bytes = Buffer.from(name, 'utf8');
  const out = Buffer.alloc(4 + bytes.length);
  out.writeUInt32BE(id, 0);
  bytes.copy(out, 4);
  return out;
}

// ---- transmission --------------------------------------------------------------------------

export const REQUEST_HEADER_LENGTH = 28;

export interface RequestHeader {
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
}

export function encodeRequestHeader({ flags, type, cookie, offset, length }: RequestHeader): Buffer {
  const out = Buffer.alloc(REQUEST_HEADER_LENGTH);
  out.writeUInt32BE(REQUEST_MAGIC, 0);
  out.writeUInt16BE(flags, 4);
  out.writeUInt16BE(type, 6);
  out.writeBigUInt64BE(cookie, 8);
  out.writeBigUInt64BE(BigInt(offset), 16);
  out.writeUInt32BE(length, 24);
  return out;
}

export function decodeRequestHeader(data: Buffer): RequestHeader {
  const magic = data.readUInt32BE(0);
  if (magic !== REQUEST_MAGIC) throw new ProtocolViolation(`invalid magic (got 0x${magic.toString(16)})`);
  const offset = data.readBigUInt64BE(16);
  return {
    flags: data.readUInt16BE(4),
    type: data.readUInt16BE(6),
    cookie: data.readBigUInt64BE(8),
    // Offsets beyond 2^53 can only be out of range; keep them out of range rather than wrapping.
    offset: offset > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(offset),
    length: data.readUInt32BE(24),
  };
}

export const SIMPLE_REPLY_LENGTH = 16;
export const CHUNK_HEADER_LENGTH = 20;

export function encodeSimpleReply(cookie: bigint, error: number): Buffer {
  const out = Buffer.alloc(SIMPLE_REPLY_LENGTH);
  out.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  out.writeUInt32BE(error, 4);
  out.writeBigUInt64BE(cookie, 8);
  return out;
}

export function encodeChunkHeader(cookie: bigint, type: number, done: boolean, length: number): Buffer {
  const out = Buffer.alloc(CHUNK_HEADER_LENGTH);
  out.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  out.writeUInt16BE(done ? CHUNK_DONE : 0, 4);
  out.writeUInt16BE(type, 6);
  out.writeBigUInt64BE(cookie, 8);
  out.writeUInt32BE(length, 16);
  return out;
}

/** A reply header as the client reads it: the first 4 bytes say which kind and how long the rest is. */
export type ReplyHeader =
  | { kind: 'simple'; error: number; cookie: bigint }
  | { kind: 'chunk'; done: boolean; type: number; cookie: bigint; length: number };

export function replyHeaderLength(magic: number): number {
  if (magic === SIMPLE_REPLY_MAGIC) return SIMPLE_REPLY_LENGTH;
  if (magic === STRUCTURED_REPLY_MAGIC) return CHUNK_HEADER_LENGTH;
  throw new ProtocolViolation(`invalid reply magic 0x${magic.toString(16)}`);
}

export function decodeReplyHeader(data: Buffer): ReplyHeader {
  const magic = data.readUInt32BE(0);
  if (magic === SIMPLE_REPLY_MAGIC) return { kind: 'simple', error: data.readUInt32BE(4), cookie: data.readBigUInt64BE(8) };
  if (magic !== STRUCTURED_REPLY_MAGIC) throw new ProtocolViolation(`invalid reply magic 0x${magic.toString(16)}`);
  return {
    kind: 'chunk',
    done: (data.readUInt16BE(4) & CHUNK_DONE) !== 0,
    type: data.readUInt16BE(6),
    cookie: data.readBigUInt64BE(8),
    length: data.readUInt32BE(16),
  };
}

export function encodeOffsetHeader(offset: number): Buffer {
  const out = Buffer.alloc(8);
  out.writeBigUInt64BE(BigInt(offset), 0);
  return out;
}

export function encodeHolePayload(offset: number, length: number): Buffer {
  const out = Buffer.alloc(12);
  out.writeBigUInt64BE(BigInt(offset), 0);
  out.writeUInt32BE(length, 8);
  return out;
}

export function encodeErrorPayload(error: number, message: string): Buffer {
  const text = Buffer.from(message, 'utf8');
  const out = Buffer.alloc(6 + text.length);
  out.writeUInt32BE(error, 0);
  out.writeUInt16BE(text.length, 4);
  text.copy(out, 6);
  return out;
}

export function decodeErrorPayload(data: Buffer, type: number): { error: number; message: string; offset?: number } {
  if (data.length < 6) throw new ProtocolViolation('error chunk too short');
  const error = data.readUInt32BE(0);
  const length = data.readUInt16BE(4);
  if (6 + length > data.length) throw new ProtocolViolation('error message longer than its chunk');
  if (error === 0) throw new ProtocolViolation('error chunk without an error');
  const message = data.toString('utf8', 6, 6 + length);
  if (type === ChunkType.ERROR_OFFSET) {
    if (data.length !== 6 + length + 8) throw new ProtocolViolation('error offset chunk of the wrong length');
    return { error, message, offset: Number(data.readBigUInt64BE(6 + length)) };
  }
  return { error, message };
}

export interface StatusExtent {
  length: number;
  flags: number;
}

export function encodeBlockStatusPayload(contextId: number, extents: StatusExtent[]): Buffer {
  const out = Buffer.alloc(4 + 8 * extents.length);
  out.writeUInt32BE(contextId, 0);
  extents.forEach((extent, index) => {
    out.writeUInt32BE(extent.length, 4 + 8 * index);
    out.writeUInt32BE(extent.flags, 8 + 8 * index);
  });
  return out;
}

export function decodeBlockStatusPayload(data: Buffer): { contextId: number; extents: StatusExtent[] } {
  if (data.length < 12 || (data.length - 4) % 8 !== 0) throw new ProtocolViolation('block status chunk of the wrong length');
  const extents: StatusExtent[] = [];
  for (let offset = 4; offset < data.length; offset += 8) {
    const length = data.readUInt32BE(offset);
    if (length === 0) throw new ProtocolViolation('block status extent of length 0');
    extents.push({ length, flags: data.readUInt32BE(offset + 4) });
  }
  return { contextId: data.readUInt32BE(0), extents };
}

// ---- decoders the client needs ----------------------------------------------------------------

/** EXPORT_NAME's answer (and INFO_EXPORT's payload after the type): u64 size, u16 transmission flags. */
export function decodeExportDetails(data: Buffer): { size: bigint; flags: number } {
  if (data.length < 10) throw new ProtocolViolation('export details too short');
  return { size: data.readBigUInt64BE(0), flags: data.readUInt16BE(8) };
}

/** One REP_INFO payload: the info type and what the client understands of it (unknown types are skipped). */
export type InfoReply =
  | { type: typeof Info.EXPORT; size: bigint; flags: number }
  | { type: typeof Info.BLOCK_SIZE; sizes: BlockSizes }
  | { type: number };

export function decodeInfoReply(data: Buffer): InfoReply {
  if (data.length < 2) throw new ProtocolViolation(`NBD_REP_INFO length ${data.length} is too short`);
  const type = data.readUInt16BE(0);
  const rest = data.length - 2;
  if (type === Info.EXPORT) {
    if (rest !== 10) throw new ProtocolViolation(`remaining export info len ${rest} is unexpected size`);
    return { type, ...decodeExportDetails(data.subarray(2)) };
  }
  if (type === Info.BLOCK_SIZE) {
    if (rest !== 12) throw new ProtocolViolation(`remaining export info len ${rest} is unexpected size`);
    return { type, sizes: { minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) } };
  }
  return { type };
}

/** A REP_META_CONTEXT payload: u32 context id, then the context name. */
export function decodeMetaContextReply(data: Buffer): { id: number; name: string } {
  if (data.length <= 4) throw new ProtocolViolation(`Failed to negotiate meta context, server answered with unexpected length ${data.length}`);
  return { id: data.readUInt32BE(0), name: data.toString('utf8', 4) };
}

/** A REP_SERVER payload (LIST): u32 name length, name, then an optional description. */
export function decodeServerReply(data: Buffer): { name: string; description: string } {
  const { text: name, next } = decodeString(data, 0, 'export name');
  return { name, description: data.toString('utf8', next) };
}

/** An OFFSET_HOLE payload: u64 offset, u32 hole length. */
export function decodeHolePayload(data: Buffer): { offset: number; length: number } {
  if (data.length !== 12) throw new ProtocolViolation('Protocol error: invalid payload for NBD_REPLY_TYPE_OFFSET_HOLE');
  return { offset: decodeOffset(data), length: data.readUInt32BE(8) };
}

/** The u64 offset that starts OFFSET_DATA and OFFSET_HOLE payloads (beyond 2^53 it can only be out of range). */
export function decodeOffset(data: Buffer): number {
  const offset = data.readBigUInt64BE(0);
  return offset > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(offset);
}
