/*
 * The `nbd` protocol driver: a disk served by an NBD server (qemu-nbd,
 * qemu-storage-daemon, nbdkit, blockd) over a unix or TCP socket, with TLS
 * when tls-creds is given. With x-dirty-bitmap its block status reads that
 * context instead of base:allocation (a dirty range shows as a hole, as in
 * QEMU). This file reads the options, checks what the export offers against
 * what the node needs, sets the request limits, and names the node as QEMU does.
 */
import type { BlockdevOptionsNbd } from '../../../generated/qapi-types.js';
import { CONTEXT_ALLOCATION_DEPTH, CONTEXT_BASE_ALLOCATION, MAX_PAYLOAD, MAX_STRING, TransmissionFlag } from '../../../nbd/protocol.js';
import { genericError } from '../../../errors.js';
import type { BlockDriver } from '../../block-driver.js';
import { jsonFilename } from '../../node-filename.js';
import type { BlockNode } from '../../node.js';
import { NbdConnection } from './connection.js';
import type { ClientTls, ExportInfo } from './negotiate.js';
import { findTlsCreds } from '../../../objects/tls-creds.js';
import { NbdState, type RequestLimits } from './nbd-state.js';

const SECTOR = 512;
/** QEMU keeps exact filenames in a PATH_MAX buffer; longer ones become json: names. */
const MAX_FILENAME = 4096;
const INT_MAX = 0x7fffffff;

/** QEMU's pseudo-filename (nbd_refresh_filename), when the address can be written as a URI. */
export function nbdUri(options: BlockdevOptionsNbd): string | undefined {
  const { server, export: name } = options;
  let uri: string | undefined;
  if (server.type === 'unix') {
    uri = name === undefined ? `nbd+unix://?socket=${server.path}` : `nbd+unix:///${name}?socket=${server.path}`;
  } else if (server.type === 'inet' && server.ipv4 === undefined && server.ipv6 === undefined && server.to === undefined) {
    uri = `nbd://${server.host}:${server.port}${name === undefined ? '' : `/${name}`}`;
  }
  return uri !== undefined && uri.length < MAX_FILENAME ? uri : undefined;
}

/** QEMU's block limits for an export (nbd_refresh_limits). */
function requestLimits(info: ExportInfo): RequestLimits {
  // Without advertised sizes: byte access when block status or an odd size needs it, else whole sectors.
  const alignment = info.blockSizes?.minimum ?? (info.size % SECTOR !== 0 || info.statusContext !== undefined ? 1 : SECTOR);
  const maximum = info.blockSizes?.maximum || MAX_PAYLOAD;
  return {
    alignment,
    maxTransfer: Math.max(alignment, Math.floor(Math.min(MAX_PAYLOAD, maximum) / alignment) * alignment),
    maxRange: Math.floor(INT_MAX / alignment) * alignment,
  };
}

/**
 * Accepts the export at open (a read-only one makes an auto-read-only node read-only) and later only the same export;
 * an x-dirty-bitmap context the server does not offer fails every connection.
 */
function exportCheck(node: BlockNode, dirtyBitmap: string | undefined): (info: ExportInfo) => void {
  let opened: { size: number; alignment: number } | undefined;
  return (info) => {
    // QEMU's text ("requested x-dirty-bitmap ... not found") is dropped on this path, as the read-only one below.
    if (dirtyBitmap !== undefined && info.statusContext === undefined) throw genericError('Could not open image: Invalid argument');
    const readOnlyExport = (info.flags & TransmissionFlag.READ_ONLY) !== 0;
    if (opened) {
      // After a reconnection the export must still be the one the node's users see.
      if (info.size !== opened.size) throw new Error(`export size changed from ${opened.size} to ${info.size}`);
      if (requestLimits(info).alignment !== opened.alignment) throw new Error('export block size changed');
      if (readOnlyExport && !node.readOnly) throw new Error('export became read-only');
      return;
    }
    if (readOnlyExport && !node.readOnly) {
      // QEMU's text: its "NBD export is read-only" message is dropped on this path.
      if (!node.settings.autoReadOnly) throw genericError('Could not open image: Permission denied');
      node.settings.readOnly = true;
    }
    opened = { size: info.size, alignment: requestLimits(info).alignment };
  };
}

/** tls-creds and the name the server's certificate must carry: tls-hostname, else a TCP server's host (QEMU's choice). */
function clientTls(options: BlockdevOptionsNbd, findObject: (id: string) => unknown): ClientTls | undefined {
  const id = options['tls-creds'];
  if (id === undefined) return undefined;
  const creds = findTlsCreds(findObject, id, 'client');
  const { server } = options;
  return { creds, hostname: options['tls-hostname'] ?? (server.type === 'inet' ? server.host : undefined) };
}

export const nbdDriver: BlockDriver<BlockdevOptionsNbd> = {
  name: 'nbd',
  kind: 'protocol',
  handlesFua: true,
  strongOptions: ['server', 'export', 'tls-creds', 'tls-hostname'],
  async open(context, options) {
    const exportName = options.export ?? '';
    if (Buffer.byteLength(exportName) > MAX_STRING) throw genericError('export name too long to send to server');
    const tls = clientTls(options, context.findObject);
    const dirtyBitmap = options['x-dirty-bitmap'];
    if (dirtyBitmap !== undefined && Buffer.byteLength(dirtyBitmap) > MAX_STRING) throw genericError('x-dirty-bitmap query too long to send to server');
    const target = {
      address: options.server,
      exportName,
      statusQuery: dirtyBitmap ?? CONTEXT_BASE_ALLOCATION,
      reconnectDelay: options['reconnect-delay'] ?? 0,
      openTimeout: options['open-timeout'] ?? 0,
      tls,
    };
    const connection = await NbdConnection.open(target, exportCheck(context.node, dirtyBitmap), context.log);
    const uri = nbdUri(options);
    const { info } = connection;
    return new NbdState(connection, info.size, requestLimits(info), () => uri ?? jsonFilename(context.node), dirtyBitmap === CONTEXT_ALLOCATION_DEPTH);
  },
};
