/*
 * The server side of the fixed newstyle handshake, answering options as
 * QEMU 7.2's server does (replies, their order, error types and texts) until
 * the client picks an export with EXPORT_NAME or GO, aborts, or breaks the
 * protocol. A broken client only ends its own connection. With TLS
 * credentials, every option but STARTTLS is refused until TLS has started
 * (QEMU's forced TLS), and the rest of the handshake runs over TLS.
 */
import { acceptTls } from '../../net/tls-session.js';
import type { TlsCreds } from '../../objects/tls-creds.js';
import {
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeOptionHeader,
  encodeExportDetails,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoText,
  encodeMetaContextReply,
  encodeOptionReply,
  encodeString,
  OPTION_HEADER_LENGTH,
  ProtocolViolation,
  TrailingBytes,
} from '../../nbd/messages.js';
import { NO_CONTEXTS, selectContexts, selectedContexts, type ContextSelection } from './meta-contexts.js';
import type { NbdExport } from './nbd-export.js';
import { ClientFlag, Info, MAX_OPTION_LENGTH, MAX_PAYLOAD, MAX_STRING, OPTION_NAMES, Option, OptionReply } from '../../nbd/protocol.js';
import { switchToTls, type NbdChannel } from '../../nbd/nbd-channel.js';

/** What the transmission phase needs from a finished handshake. */
export interface NegotiatedClient {
  exported: NbdExport;
  structuredReplies: boolean;
  contexts: ContextSelection;
}

export interface ExportLookup {
  findExport(name: string): NbdExport | undefined;
  /** Exports in the order LIST reports them. */
  listExports(): NbdExport[];
}

/** Why the server hangs up without an error reply it could send. */
export class HandshakeAborted extends Error {}

/** The server's TLS settings (nbd-server-start's tls-creds and tls-authz). */
export interface ServerTls {
  creds: TlsCreds;
  authzId: string | undefined;
  findObject(id: string): unknown;
}

const hex = (option: number) => `0x${option.toString(16)}`;

export async function negotiate(channel: NbdChannel, lookup: ExportLookup, tls?: ServerTls): Promise<NegotiatedClient | undefined> {
  channel.socket.write(encodeGreeting());
  const clientFlags = (await channel.reader.read(4)).readUInt32BE(0);
  const unknown = clientFlags & ~(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES);
  if (unknown) throw new ProtocolViolation(`Unknown client flags 0x${unknown.toString(16)} received`);
  const fixedNewstyle = (clientFlags & ClientFlag.FIXED_NEWSTYLE) !== 0;
  const noZeroes = (clientFlags & ClientFlag.NO_ZEROES) !== 0;
  const state = { structuredReplies: false, contexts: NO_CONTEXTS, contextsExport: undefined as NbdExport | undefined };

  const reply = (option: number, type: number, data?: Buffer) => channel.socket.write(encodeOptionReply(option, type, data));
  const replyError = (option: number, type: number, message: string) => reply(option, type, Buffer.from(message, 'utf8'));
  let secured = false;

  for (;;) {
    const { reader, socket } = channel;
    const { option, length } = decodeOptionHeader(await reader.read(OPTION_HEADER_LENGTH));
    if (length > MAX_OPTION_LENGTH) throw new ProtocolViolation(`len (${length} ) is larger than max len (${MAX_PAYLOAD})`);
    const name = OPTION_NAMES[option] ?? '<unknown>';

    if (tls && !secured) {
      if (!fixedNewstyle) throw new ProtocolViolation(`Unsupported option ${hex(option)}`);
      // EXPORT_NAME cannot be answered with an error: the connection ends.
      if (option === Option.EXPORT_NAME) throw new ProtocolViolation(`Option ${hex(option)} not permitted before TLS`);
      await reader.read(length);
      if (option !== Option.STARTTLS) {
        replyError(option, OptionReply.ERR_TLS_REQD, `Option ${hex(option)} not permitted before TLS`);
        if (option === Option.ABORT) return undefined;
        continue;
      }
      if (length) {
        replyError(option, OptionReply.ERR_INVALID, "option 'starttls' has unexpected length");
        throw new ProtocolViolation("option 'starttls' has unexpected length");
      }
      reply(option, OptionReply.ACK);
      await switchToTls(channel, (plain) => acceptTls(plain, tls.creds, tls.authzId, tls.findObject));
      secured = true;
      continue;
    }

    if (option === Option.EXPORT_NAME) {
      if (length > MAX_STRING) throw new ProtocolViolation('Bad length received');
      const exported = lookup.findExport((await reader.read(length)).toString('utf8'));
      if (!exported) throw new HandshakeAborted('export not found');
      socket.write(encodeExportDetails(exported.size, exported.transmissionFlags(state.structuredReplies), !noZeroes));
      return finish(exported);
    }
    if (!fixedNewstyle) throw new ProtocolViolation(`Unsupported option ${option} (${name})`);

    const data = await reader.read(length);
    const unexpectedLength = () => replyError(option, OptionReply.ERR_INVALID, `option '${name}' has unexpected length`);
    switch (option) {
      case Option.ABORT:
        reply(option, OptionReply.ACK);
        return undefined;

      case Option.LIST:
        if (length) {
          unexpectedLength();
          break;
        }
        for (const exported of lookup.listExports()) {
          const description = Buffer.from(exported.settings.description ?? '', 'utf8');
          reply(option, OptionReply.SERVER, Buffer.concat([encodeString(exported.name), description]));
        }
        reply(option, OptionReply.ACK);
        break;

      case Option.STARTTLS:
        if (length) unexpectedLength();
        else if (tls) replyError(option, OptionReply.ERR_INVALID, 'TLS already enabled');
        else replyError(option, OptionReply.ERR_POLICY, 'TLS not configured');
        break;

      case Option.STRUCTURED_REPLY:
        if (length) unexpectedLength();
        else if (state.structuredReplies) replyError(option, OptionReply.ERR_INVALID, 'structured reply already negotiated');
        else {
          state.structuredReplies = true;
          reply(option, OptionReply.ACK);
        }
        break;

      case Option.INFO:
      case Option.GO: {
        let request;
        try {
          request = decodeInfoRequest(data);
        } catch (error) {
          replyError(option, OptionReply.ERR_INVALID, invalidOptionText(error, name));
          break;
        }
        if (Buffer.byteLength(request.name) > MAX_STRING) {
          replyError(option, OptionReply.ERR_INVALID, `Invalid name length: ${Buffer.byteLength(request.name)}`);
          break;
        }
        const exported = lookup.findExport(request.name);
        if (!exported) {
          replyError(option, OptionReply.ERR_UNKNOWN, `export '${sanitize(request.name)}' not present`);
          break;
        }
        if (request.infos.includes(Info.NAME)) reply(option, OptionReply.INFO, encodeInfoText(Info.NAME, request.name));
        if (exported.settings.description !== undefined) {
          reply(option, OptionReply.INFO, encodeInfoText(Info.DESCRIPTION, exported.settings.description));
        }
        // Every node serves byte-granular requests; the maximum is QEMU's buffer limit.
        reply(option, OptionReply.INFO, encodeInfoBlockSize({ minimum: 1, preferred: 4096, maximum: MAX_PAYLOAD }));
        reply(option, OptionReply.INFO, encodeInfoExport(exported.size, exported.transmissionFlags(state.structuredReplies)));
        reply(option, OptionReply.ACK);
        if (option === Option.GO) return finish(exported);
        break;
      }

      case Option.LIST_META_CONTEXT:
      case Option.SET_META_CONTEXT: {
        const listing = option === Option.LIST_META_CONTEXT;
        if (!listing && !state.structuredReplies) {
          replyError(option, OptionReply.ERR_INVALID, `request option '${name}' when structured reply is not negotiated`);
          break;
        }
        if (!listing) state.contexts = NO_CONTEXTS; // a SET replaces the selection even when it fails
        let request;
        try {
          request = decodeMetaContextRequest(data);
        } catch (error) {
          replyError(option, OptionReply.ERR_INVALID, invalidOptionText(error, name));
          break;
        }
        const exported = lookup.findExport(request.name);
        if (!exported) {
          replyError(option, OptionReply.ERR_UNKNOWN, `export '${sanitize(request.name)}' not present`);
          break;
        }
        const selection = selectContexts(exported.settings, request.queries.filter((query) => Buffer.byteLength(query) <= MAX_STRING), listing);
        for (const context of selectedContexts(exported.settings, selection)) {
          reply(option, OptionReply.META_CONTEXT, encodeMetaContextReply(listing ? 0 : context.id, context.name));
        }
        reply(option, OptionReply.ACK);
        if (!listing) {
          state.contexts = selection;
          state.contextsExport = exported;
        }
        break;
      }

      default:
        replyError(option, OptionReply.ERR_UNSUP, `Unsupported option ${option} (${name})`);
    }
  }

  function finish(exported: NbdExport): NegotiatedClient {
    // Contexts chosen for another export than the one picked are forgotten.
    const contexts = state.contextsExport === exported ? state.contexts : NO_CONTEXTS;
    return { exported, structuredReplies: state.structuredReplies, contexts };
  }
}

function invalidOptionText(error: unknown, optionName: string): string {
  if (error instanceof TrailingBytes) return `option '${optionName}' has unexpected length`;
  if (error instanceof ProtocolViolation) return `Inconsistent lengths in option ${optionName}`;
  throw error;
}

/** Names from clients go back into messages shortened and printable, as QEMU does. */
function sanitize(name: string): string {
  const printable = name.replace(/[^\x20-\x7e]/g, '?');
  return printable.length > 80 ? `${printable.slice(0, 80)}...` : printable;
}
