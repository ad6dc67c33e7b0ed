/*
 * QMP handlers for exports: nbd-server-start/stop, block-export-add/del,
 * query-block-exports and the legacy nbd-server-add/remove, with
 * qemu-storage-daemon's checks in its order and its error texts.
 */
import type { Logger } from 'pino';
import { COMMAND_USER, lookupDeviceOrNode, type BlockLayer } from '../blockdev/block-layer.js';
import { isIdentifier } from '../blockdev/node-names.js';
import { PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE } from '../blockdev/permissions.js';
import type { BlockExportOptions, NbdServerOptions, SocketAddress, SocketAddressLegacy } from '../generated/qapi-types.js';
import type { CommandTable } from '../command-table.js';
import { genericError, QmpError } from '../errors.js';
import type { BlockExport } from './block-export.js';
import type { ExportRegistry } from './export-registry.js';
import { resolveExportBitmaps } from './nbd/export-bitmaps.js';
import { NbdExport } from './nbd/nbd-export.js';
import { NbdServer, type NbdListenAddress } from './nbd/nbd-server.js';
import { MAX_STRING } from '../nbd/protocol.js';
import { findTlsCreds } from '../objects/tls-creds.js';

export interface ExportLayer extends BlockLayer {
  exports: ExportRegistry;
  log: Logger;
  /** User-created objects by id (TLS credentials, authz). */
  findObject(id: string): unknown;
}

/** The NBD server the daemon runs, at most one, as in QEMU. */
export class NbdService {
  server: NbdServer | undefined;

  constructor(private readonly layer: ExportLayer) {}

  async start({ addr, 'tls-creds': tlsCreds, 'tls-authz': tlsAuthz, 'max-connections': maxConnections }: NbdServerOptions): Promise<void> {
    if (this.server) throw genericError('NBD server already running');
    const address = listenAddress(addr);
    const { findObject } = this.layer;
    // tls-authz is looked up when a client connects, as in QEMU.
    const tls = tlsCreds === undefined ? undefined : () => ({ creds: findTlsCreds(findObject, tlsCreds, 'server'), authzId: tlsAuthz, findObject });
    try {
      this.server = await NbdServer.start(address, maxConnections ?? 0, this.layer.log.child({ component: 'nbd-server' }), tls);
    } catch (error) {
      throw error instanceof QmpError ? error : genericError((error as Error).message);
    }
  }

  async stop(): Promise<void> {
    if (!this.server) throw genericError('NBD server not running');
    await this.layer.exports.closeAll('nbd');
    await this.server.stop();
    this.server = undefined;
  }

  async addExport(options: BlockExportOptions & { type: 'nbd' }): Promise<BlockExport> {
    const { graph, exports } = this.layer;
    exports.checkNewId(options.id, isIdentifier(options.id));
    const node = lookupDeviceOrNode(graph, undefined, options['node-name']);
    const writable = options.writable ?? false;
    if (node.readOnly && writable) throw genericError('Cannot export read-only node as writable');
    if (options.iothread !== undefined) throw genericError(`iothread "${options.iothread}" not found`);

    const perm = PERM_CONSISTENT_READ | (writable ? PERM_WRITE : 0);
    const edge = await graph.attachUser(COMMAND_USER, node, 'root', { perm, shared: PERM_ALL });
    try {
      const server = this.server;
      if (!server) throw genericError('NBD server not running');
      const name = options.name ?? options['node-name'];
      if (Buffer.byteLength(name) > MAX_STRING) throw genericError(`export name '${name}' too long`);
      const description = options.description;
      if (description !== undefined && Buffer.byteLength(description) > MAX_STRING) throw genericError(`description '${description}' too long`);
      if (server.findExport(name)) throw genericError(`NBD server already has export named '${name}'`);
      // While exported, the node's size is fixed: clients were told it.
      await graph.refreshPermissions([node], new Map([[edge, { perm, shared: PERM_ALL & ~PERM_RESIZE }]]));
      const bitmaps = resolveExportBitmaps(graph, node, options.bitmaps ?? [], !writable);
      const exported = new NbdExport(options.id, edge, exports, {
        name,
        description,
        writable,
        writethrough: options.writethrough ?? false,
        allocationDepth: options['allocation-depth'] ?? false,
        bitmaps,
        multiConnection: server.maxConnections !== 1,
      });
      server.addExport(exported);
      exports.add(exported);
      return exported;
    } catch (error) {
      await graph.detach(edge);
      throw error;
    }
  }
}

function listenAddress(addr: SocketAddress): NbdListenAddress {
  switch (addr.type) {
    case 'unix':
      return { type: 'unix', path: addr.path };
    case 'inet': {
      const port = Number(addr.port);
      // QEMU resolves service names through getaddrinfo; blockd takes numbers only.
      if (!/^[0-9]+$/.test(addr.port) || port > 65535) {
        throw genericError(`address resolution failed for ${addr.host}:${addr.port}: Servname not supported for ai_socktype`);
      }
      return { type: 'inet', host: addr.host.replace(/^\[(.*)\]$/, '$1'), port };
    }
    default:
      throw genericError(`blockd cannot listen on '${addr.type}' socket addresses`);
  }
}

/** The nested legacy form nbd-server-start takes, flattened (QEMU's socket_address_flatten). */
function flattenAddress(addr: SocketAddressLegacy): SocketAddress {
  return { type: addr.type, ...addr.data } as SocketAddress;
}

export function registerExportCommands(registry: CommandTable, layer: ExportLayer, nbd: NbdService): void {
  const { exports, graph } = layer;

  registry.register('nbd-server-start', (args) => nbd.start({ ...args, addr: flattenAddress(args.addr) }));
  registry.register('nbd-server-stop', () => nbd.stop());

  registry.register('block-export-add', async (options) => {
    if (options.type !== 'nbd') throw genericError(`Export type '${options.type}' is not supported by blockd (only 'nbd')`);
    await nbd.addExport(options);
  });
  registry.register('block-export-del', ({ id, mode }) => exports.delete(id, mode));
  registry.register('query-block-exports', () => exports.list());

  registry.register('nbd-server-add', async ({ device, name, description, writable, bitmap }) => {
    const node = lookupDeviceOrNode(graph, device, device);
    const exportName = name ?? device;
    await nbd.addExport({
      type: 'nbd',
      id: exportName,
      'node-name': node.name,
      // The legacy command quietly exports a read-only node read-only.
      writable: node.readOnly ? false : writable,
      name: exportName,
      description,
      bitmaps: bitmap === undefined ? undefined : [bitmap],
    });
  });
  registry.register('nbd-server-remove', async ({ name, mode }) => {
    const exported = exports.find(name);
    if (exported && exported.type !== 'nbd') throw genericError(`Block export '${name}' is not an NBD export`);
    await exports.delete(name, mode);
  });
}
