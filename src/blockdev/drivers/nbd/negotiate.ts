/*
 * The client side of the fixed newstyle handshake, as QEMU's client runs it:
 * STARTTLS first when the node has TLS credentials, then structured replies,
 * one meta context (base:allocation, or the one x-dirty-bitmap names), then GO
 * with a BLOCK_SIZE request, falling back to LIST + EXPORT_NAME when the
 * server does not know GO. Failures carry QEMU's texts, which blockdev-add
 * reports.
 */
import { genericError } from '../../../errors.js';
import { connectTls, TlsFailure } from '../../../net/tls-session.js';
import { switchToTls, type NbdChannel } from '../../../nbd/nbd-channel.js';
import type { TlsCreds } from '../../../objects/tls-creds.js';
import {
  GREETING_LENGTH, OPTION_REPLY_HEADER_LENGTH, ProtocolViolation, decodeExportDetails, decodeGreeting, decodeInfoReply,
  decodeMetaContextReply, decodeOptionReplyHeader, decodeServerReply, encodeInfoRequest, encodeMetaContextRequest, encodeOption,
  type BlockSizes, type OptionReplyHeader,
} from '../../../nbd/messages.js';
import {
  ClientFlag, CONTEXT_BASE_ALLOCATION, HandshakeFlag, Info, MAX_OPTION_LENGTH, Option, OPTION_NAMES, OPTION_REPLY_NAMES, OptionReply,
  isOptionError,
} from '../../../nbd/protocol.js';
import { ConnectionClosed } from '../../../nbd/socket-reader.js';

/** What the handshake settled: the export and how to talk to it. */
export interface ExportInfo {
  size: number;
  /** Transmission flags (TransmissionFlag bits). */
  flags: number;
  structuredReplies: boolean;
  /** The id of the block status context asked for (base:allocation or x-dirty-bitmap's), when the server selected it. */
  statusContext?: number;
  /** Present when the server sent INFO_BLOCK_SIZE. */
  blockSizes?: BlockSizes;
}

const EXPORT_PADDING = 124;

/** The node's TLS settings: client credentials, and the name the server's certificate must carry. */
export interface ClientTls {
  creds: TlsCreds;
  hostname: string | undefined;
}

const optionName = (option: number) => `${option} (${OPTION_NAMES[option] ?? '<unknown>'})`;
const replyName = (type: number) => `${type} (${OPTION_REPLY_NAMES[type] ?? '<unknown>'})`;

/** Why a strict option failed, in QEMU's words (nbd_handle_reply_err). */
function optionErrorText(reply: OptionReplyHeader): string {
  const option = optionName(reply.option);
  switch (reply.type) {
    case OptionReply.ERR_POLICY: return `Denied by server for option ${option}`;
    case OptionReply.ERR_INVALID: return `Invalid parameters for option ${option}`;
    case OptionReply.ERR_PLATFORM: return `Server lacks support for option ${option}`;
    case OptionReply.ERR_TLS_REQD: return `TLS negotiation required before option ${option}`;
    case OptionReply.ERR_UNKNOWN: return 'Requested export not available';
    case OptionReply.ERR_SHUTDOWN: return `Server shutting down before option ${option}`;
    case OptionReply.ERR_BLOCK_SIZE_REQD: return `Server requires INFO_BLOCK_SIZE for option ${option}`;
    default: return `Unknown error code when asking for option ${option}`;
  }
}

/**
 * How QEMU's TLS channel reports a server that hangs up, as one refusing our certificate after the
 * handshake does: an end without TLS goodbye (GnuTLS's premature termination) or a reset.
 */
function tlsReadFailure(closed: ConnectionClosed): string {
  return `Cannot read from TLS channel: ${closed.failure ? 'Input/output error' : 'Software caused connection abort'}`;
}

class Negotiation {
  private secured = false;

  constructor(private readonly channel: NbdChannel) {}

  async read(length: number, what: string): Promise<Buffer> {
    try {
      return await this.channel.reader.read(length);
    } catch (error) {
      if (!(error instanceof ConnectionClosed)) throw error;
      throw genericError(`Failed to read ${what}: ${this.secured ? tlsReadFailure(error) : 'Unexpected end-of-file before all data were read'}`);
    }
  }

  send(option: number, data?: Buffer): void {
    this.channel.socket.write(encodeOption(option, data));
  }

  /** The next reply header to `option`, and its payload. */
  async reply(option: number): Promise<{ header: OptionReplyHeader; payload: Buffer }> {
    const header = decodeOptionReplyHeader(await this.read(OPTION_REPLY_HEADER_LENGTH, 'option reply'));
    if (header.option !== option) {
      throw new ProtocolViolation(`Unexpected option type ${optionName(header.option)}, expected ${optionName(option)}`);
    }
    if (header.length > MAX_OPTION_LENGTH) throw new ProtocolViolation(`server reply ${replyName(header.type)} is too long`);
    return { header, payload: await this.read(header.length, 'option reply payload') };
  }

  /**
   * An option without data answered by a bare ACK: true when acknowledged, false when the server does not
   * support it. Strictly, only ERR_UNSUP means that and other errors fail; otherwise any error does (QEMU's
   * nbd_request_simple_option).
   */
  async simpleOption(option: number, strict: boolean): Promise<boolean> {
    this.send(option);
    const { header } = await this.reply(option);
    if (isOptionError(header.type)) {
      if (strict && header.type !== OptionReply.ERR_UNSUP) throw genericError(optionErrorText(header));
      return false;
    }
    if (header.type !== OptionReply.ACK) {
      throw new ProtocolViolation(`Server answered option ${optionName(option)} with unexpected reply ${replyName(header.type)}`);
    }
    if (header.length !== 0) throw new ProtocolViolation(`Option ${option} ('${OPTION_NAMES[option]}') response length is ${header.length} (it should be zero)`);
    return true;
  }

  /** STARTTLS, then the TLS handshake and QEMU's checks of the server; the rest of the handshake runs over TLS. */
  async startTls(tls: ClientTls): Promise<void> {
    if (!(await this.simpleOption(Option.STARTTLS, true))) throw genericError("Server don't support STARTTLS option");
    try {
      await switchToTls(this.channel, (plain) => connectTls(plain, tls.creds, tls.hostname));
    } catch (error) {
      throw error instanceof TlsFailure ? genericError(error.message) : error;
    }
    this.secured = true;
  }

  /** STRUCTURED_REPLY: any refusal just means simple replies (QEMU is lenient here). */
  structuredReplies(): Promise<boolean> {
    return this.simpleOption(Option.STRUCTURED_REPLY, false);
  }

  /** SET_META_CONTEXT with one query: the context id, or undefined when the server offers none. */
  async statusContext(exportName: string, query: string): Promise<number | undefined> {
    this.send(Option.SET_META_CONTEXT, encodeMetaContextRequest(exportName, [query]));
    let id: number | undefined;
    for (;;) {
      const { header, payload } = await this.reply(Option.SET_META_CONTEXT);
      if (isOptionError(header.type)) return undefined;
      if (header.type === OptionReply.ACK) {
        if (header.length !== 0) throw new ProtocolViolation('Unexpected length to ACK response');
        return id;
      }
      if (header.type !== OptionReply.META_CONTEXT) {
        throw new ProtocolViolation(`Unexpected reply type ${replyName(header.type)}, expected ${replyName(OptionReply.META_CONTEXT)}`);
      }
      if (id !== undefined) throw new ProtocolViolation('Server answered with more than one context');
      const context = decodeMetaContextReply(payload);
      if (context.name !== query) {
        throw new ProtocolViolation(`Failed to negotiate meta context '${query}', server answered with different context '${context.name}'`);
      }
      id = context.id;
    }
  }

  /** GO with a BLOCK_SIZE request; undefined when the server does not know GO. */
  async go(exportName: string): Promise<Omit<ExportInfo, 'structuredReplies'> | undefined> {
    this.send(Option.GO, encodeInfoRequest(exportName, [Info.BLOCK_SIZE]));
    let size: bigint | undefined;
    let flags = 0;
    let blockSizes: BlockSizes | undefined;
    for (;;) {
      const { header, payload } = await this.reply(Option.GO);
      if (header.type === OptionReply.ERR_UNSUP) return undefined;
      if (isOptionError(header.type)) throw genericError(optionErrorText(header));
      if (header.type === OptionReply.ACK) {
        if (header.length !== 0) throw new ProtocolViolation('server sent invalid NBD_REP_ACK');
        if (flags === 0 || size === undefined) throw new ProtocolViolation('broken server omitted NBD_INFO_EXPORT');
        return { size: exportSize(size), flags, ...(blockSizes ? { blockSizes } : {}) };
      }
      if (header.type !== OptionReply.INFO) {
        throw new ProtocolViolation(`unexpected reply type ${replyName(header.type)}, expected ${replyName(OptionReply.INFO)}`);
      }
      const info = decodeInfoReply(payload);
      if ('flags' in info) ({ size, flags } = info);
      if ('sizes' in info) blockSizes = checkBlockSizes(info.sizes);
    }
  }

  /** LIST, only to give a clear error for an unknown name before EXPORT_NAME (which cannot answer one). */
  async checkListed(exportName: string): Promise<void> {
    this.send(Option.LIST);
    const names: string[] = [];
    for (;;) {
      const { header, payload } = await this.reply(Option.LIST);
      if (header.type === OptionReply.ERR_UNSUP) return;
      if (isOptionError(header.type)) throw genericError(optionErrorText(header));
      if (header.type === OptionReply.ACK) break;
      if (header.type !== OptionReply.SERVER) {
        throw new ProtocolViolation(`Unexpected reply type ${replyName(header.type)}, expected ${replyName(OptionReply.SERVER)}`);
      }
      names.push(decodeServerReply(payload).name);
    }
    // An empty list may just mean the server does not list: let EXPORT_NAME decide.
    if (names.length > 0 && !names.includes(exportName)) throw genericError(`No export with name '${exportName}' available`);
  }

  async exportName(exportName: string, padded: boolean): Promise<{ size: number; flags: number }> {
    this.send(Option.EXPORT_NAME, Buffer.from(exportName, 'utf8'));
    const { size, flags } = decodeExportDetails(await this.read(10, 'export length and flags'));
    if (padded) await this.read(EXPORT_PADDING, 'reserved block');
    return { size: exportSize(size), flags };
  }
}

function exportSize(size: bigint): number {
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolViolation(`export size ${size} is too large`);
  return Number(size);
}

const isPowerOfTwo = (value: number) => value > 0 && (value & (value - 1)) === 0;

function checkBlockSizes(sizes: BlockSizes): BlockSizes {
  if (!isPowerOfTwo(sizes.minimum)) throw new ProtocolViolation(`server minimum block size ${sizes.minimum} is not a power of two`);
  if (!isPowerOfTwo(sizes.preferred) || sizes.preferred < sizes.minimum) {
    throw new ProtocolViolation(`server preferred block size ${sizes.preferred} is not valid`);
  }
  if (sizes.maximum < sizes.minimum) throw new ProtocolViolation(`server maximum block size ${sizes.maximum} is not valid`);
  return sizes;
}

/**
 * Runs the handshake on a freshly connected socket (with TLS, the channel's socket and reader
 * become TLS ones). On failure the socket is destroyed (after a courteous ABORT while options
 * are still being exchanged) and a GenericError with QEMU's wording is thrown.
 */
export async function negotiate(channel: NbdChannel, exportName: string, statusQuery: string = CONTEXT_BASE_ALLOCATION, tls?: ClientTls): Promise<ExportInfo> {
  const talk = new Negotiation(channel);
  let optionPhase = false;
  try {
    const serverFlags = decodeGreeting(await talk.read(GREETING_LENGTH, 'initial magic'));
    const fixed = (serverFlags & HandshakeFlag.FIXED_NEWSTYLE) !== 0;
    const noZeroes = (serverFlags & HandshakeFlag.NO_ZEROES) !== 0;
    const clientFlags = Buffer.alloc(4);
    clientFlags.writeUInt32BE((fixed ? ClientFlag.FIXED_NEWSTYLE : 0) | (noZeroes ? ClientFlag.NO_ZEROES : 0));
    channel.socket.write(clientFlags);
    optionPhase = true;
    if (tls) {
      if (!fixed) throw genericError('Server does not support STARTTLS');
      await talk.startTls(tls);
    }
    let structuredReplies = false;
    let statusContext: number | undefined;
    let details: Omit<ExportInfo, 'structuredReplies'> | undefined;
    if (fixed) {
      structuredReplies = await talk.structuredReplies();
      statusContext = structuredReplies ? await talk.statusContext(exportName, statusQuery) : undefined;
      details = await talk.go(exportName);
      if (!details) await talk.checkListed(exportName);
    }
    // What was negotiated before still holds after EXPORT_NAME (QEMU's fallback keeps it too).
    details ??= await talk.exportName(exportName, !noZeroes);
    optionPhase = false;
    const info: ExportInfo = { ...details, structuredReplies, ...(statusContext === undefined ? {} : { statusContext }) };
    const minimum = info.blockSizes?.minimum ?? 1;
    if (info.size % minimum !== 0) throw new ProtocolViolation(`export size ${info.size} is not multiple of minimum block size ${minimum}`);
    return info;
  } catch (error) {
    const { socket } = channel;
    if (optionPhase && !socket.destroyed) socket.end(encodeOption(Option.ABORT), () => socket.destroy());
    else socket.destroy();
    throw error instanceof ProtocolViolation ? genericError(error.message) : error;
  }
}
