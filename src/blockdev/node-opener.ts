/*
 * Opens nodes from BlockdevOptions as blockdev-add does: checks the node
 * name, resolves the settings children inherit (cache, read-only, discard,
 * force-share), opens children given inline or by reference and backing
 * files named in image headers, then takes the permissions (and image locks)
 * the new subtree needs. On any failure everything opened on the way is
 * closed again and the graph is left as it was.
 */
import { open } from 'node:fs/promises';
import type { Logger } from 'pino';
import type { BlockdevOptions, BlockdevRef } from '../generated/qapi-types.js';
import { genericError } from '../errors.js';
import type { ChildRequest, OpenContext } from './block-driver.js';
import type { ChildEdge } from './child-edge.js';
import { BackingChainTooLong, BackingTrail, imageFileIdentity, storageOf } from './backing-trail.js';
import { driverFor } from './drivers/registry.js';
import type { BlockGraph } from './graph.js';
import { checkNodeName, generateNodeName } from './node-names.js';
import { BlockNode, type NodeSettings } from './node.js';

export interface OpenRequest {
  options: BlockdevOptions;
  monitorOwned: boolean;
  /** Settings of the parent an inline child inherits from. */
  parent?: NodeSettings;
  /** Opened as a backing file: read-only unless the options say otherwise. */
  asBacking?: boolean;
  /** Opened because an image header names it: the images above it in that chain (backing-trail.ts). */
  trail?: BackingTrail;
}

function resolveSettings(options: BlockdevOptions, request: OpenRequest): NodeSettings {
  const parent = request.parent;
  const readOnly = options['read-only'] ?? (request.asBacking ? true : parent?.readOnly ?? false);
  const settings: NodeSettings = {
    readOnly,
    autoReadOnly: options['auto-read-only'] ?? (request.asBacking ? false : parent?.autoReadOnly ?? false),
    forceShare: options['force-share'] ?? parent?.forceShare ?? false,
    // Lower layers pass discards on; only the top decides whether to honour them.
    discard: options.discard ?? (parent ? 'unmap' : 'ignore'),
    detectZeroes: options['detect-zeroes'] ?? 'off',
    cacheDirect: options.cache?.direct ?? parent?.cacheDirect ?? false,
    cacheNoFlush: options.cache?.['no-flush'] ?? parent?.cacheNoFlush ?? false,
  };
  if (settings.forceShare && !settings.readOnly) throw genericError('force-share=on can only be used with read-only images');
  if (settings.detectZeroes === 'unmap' && settings.discard !== 'unmap') {
    throw genericError('setting detect-zeroes to unmap is not allowed without setting discard operation to unmap');
  }
  return settings;
}

/**
 * The format of a backing file whose image does not record it, guessed as QEMU 7.2
 * does (qcow2 magic, else raw). Guessing is risky: a raw disk whose first bytes look
 * like qcow2 would be misread, so it is logged.
 */
async function probeFormat(filename: string, log: Logger): Promise<string> {
  const magic = Buffer.alloc(4);
  try {
    const handle = await open(filename, 'r');
    try {
      await handle.read(magic, 0, 4, 0);
    } finally {
      await handle.close();
    }
  } catch {
    return 'raw'; // opening it for real reports the error
  }
  const format = magic.readUInt32BE(0) === 0x514649fb ? 'qcow2' : 'raw';
  log.warn({ backing: filename, format }, 'backing file format not recorded in the image: probed');
  return format;
}

let nodeSequence = 0;

export class NodeOpener {
  constructor(private readonly graph: BlockGraph, private readonly log: Logger, private readonly objects?: { find(id: string): unknown }) {}

  /** A user-created object (object-add) by id, as drivers look them up. */
  findObject(id: string): unknown {
    return this.objects?.find(id);
  }

  /** Opens a node and everything it needs; the node is registered in the graph. */
  async open(request: OpenRequest): Promise<BlockNode> {
    const created: BlockNode[] = [];
    try {
      const node = await this.openTree(request, created);
      await this.graph.refreshPermissions([node]);
      return node;
    } catch (error) {
      await this.discard(created);
      throw error;
    }
  }

  private async openTree(request: OpenRequest, created: BlockNode[]): Promise<BlockNode> {
    const { options } = request;
    const explicitName = options['node-name'];
    if (explicitName !== undefined) checkNodeName(explicitName);
    const name = explicitName ?? generateNodeName();
    if (this.graph.has(name)) throw genericError(`Duplicate nodes with node-name='${name}'`);
    const settings = resolveSettings(options, request);
    const driver = driverFor(options.driver);
    const node = new BlockNode(name, driver, options, settings, request.monitorOwned, this.graph);
    const log = this.log.child({ node: name });
    // QEMU names a node once its "file" child is open and before any other child (the backing file above all).
    const named = () => {
      if (node.sequence === 0) node.sequence = ++nodeSequence;
    };
    // This node's image, once its file is open, for the loop check of the chain below it.
    let image: Promise<string | undefined> | undefined;

    const context: OpenContext = {
      node,
      log,
      findObject: (id) => this.findObject(id),
      findNode: (name) => this.graph.find(name),
      openChild: async (key: string, child: ChildRequest): Promise<ChildEdge> => {
        if (key !== 'file') named();
        const reference = (options as unknown as Record<string, BlockdevRef | undefined>)[key];
        if (reference === undefined) throw genericError(`Parameter '${key}' is missing`);
        const target = typeof reference === 'string'
          ? this.lookup(reference)
          : await this.openTree({ options: reference, monitorOwned: false, parent: settings, asBacking: child.role === 'cow' }, created);
        const edge = await this.attach(node, target, child);
        if (key === 'file' && request.trail && node.driver.supportsBacking) {
          // After the attach, so that a read-write chain fails on the image lock first, as in QEMU.
          // A repeat that cannot have a backing file (raw over the same file) ends the chain: QEMU opens it.
          image = imageFileIdentity(node);
          request.trail.refuseRepeat(await image, target.state.info().filename);
        }
        return edge;
      },
      openBackingFromImage: async (filename: string, format: string | undefined, child: ChildRequest): Promise<ChildEdge> => {
        named();
        image ??= imageFileIdentity(node);
        const trail = request.trail ? request.trail.next(await image) : BackingTrail.below(await image, storageOf(node)?.state.info().filename ?? name);
        const driverName = format ?? (await probeFormat(filename, log));
        // A backing format naming the protocol itself (a snapshot of a file node writes "file") opens the file as it is.
        const backingOptions = (driverName === 'file'
          ? { driver: 'file', filename }
          : { driver: driverName, file: { driver: 'file', filename } }) as unknown as BlockdevOptions;
        try {
          const target = await this.openTree({ options: backingOptions, monitorOwned: false, parent: settings, asBacking: true, trail }, created);
          return await this.attach(node, target, child);
        } catch (error) {
          if (error instanceof BackingChainTooLong) throw error;
          throw genericError(`Could not open backing file: ${(error as Error).message}`);
        }
      },
    };

    try {
      node.state = await driver.open(context, options as unknown as Record<string, unknown>);
    } catch (error) {
      // The node never existed: take its edges off its children (some may be nodes that existed before).
      for (const edge of [...node.children]) await this.graph.detach(edge);
      throw error;
    }
    named();
    this.graph.register(node);
    created.push(node);
    return node;
  }

  /**
   * Links a child and takes the permissions the node needs on it now, as QEMU does when it
   * attaches a child during open: the image lock is checked before the driver reads the
   * image, and a driver may update its image (header, repairs) while it opens it.
   */
  private async attach(node: BlockNode, target: BlockNode, child: ChildRequest): Promise<ChildEdge> {
    const edge = this.graph.linkChild(node, target, child.name, child.role);
    try {
      await this.graph.refreshPermissions([node]);
    } catch (error) {
      this.graph.unlink(edge);
      throw error;
    }
    return edge;
  }

  private lookup(name: string): BlockNode {
    const node = this.graph.find(name);
    if (!node) throw genericError(`Cannot find device='${name}' nor node-name='${name}'`);
    return node;
  }

  /** Undoes a failed open: unlinks and closes what this open created, newest first. */
  private async discard(created: BlockNode[]): Promise<void> {
    for (const node of created.reverse()) {
      for (const edge of [...node.children]) await this.graph.detach(edge);
      this.graph.unregister(node);
      await node.state.close().catch((error: unknown) => this.log.warn({ err: error, node: node.name }, 'close after failed open'));
    }
  }
}
