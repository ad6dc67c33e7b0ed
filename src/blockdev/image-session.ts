/*
 * Opens one image file with its backing chain outside the daemon, the way
 * qemu-img and qemu-io do: a private graph, a user holding the permissions
 * it asks for, and a close that flushes and releases everything. blockd-img
 * and the tests use it.
 */
import { pino, type Logger } from 'pino';
import type { BlockdevOptions } from '../generated/qapi-types.js';
import { EventBus } from '../event-bus.js';
import type { ChildEdge } from './child-edge.js';
import { BlockGraph } from './graph.js';
import { NodeOpener } from './node-opener.js';
import type { BlockNode } from './node.js';
import { PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED } from './permissions.js';

export interface ImageSession {
  node: BlockNode;
  /** The user's edge: read, write (when writable), blockStatus, length. */
  disk: ChildEdge;
  graph: BlockGraph;
  close(): Promise<void>;
}

export interface OpenImageOptions {
  /** Image format; default: probed (qcow2 magic, else raw). */
  format?: string;
  writable?: boolean;
  /** Share every permission and take no write lock (qemu-img -U). */
  forceShare?: boolean;
  /** Extra options for the format node (e.g. { backing: null }). */
  formatOptions?: Record<string, unknown>;
  log?: Logger;
  bus?: EventBus;
}

export async function probeImageFormat(path: string): Promise<string> {
  const { open } = await import('node:fs/promises');
  const handle = await open(path, 'r');
  try {
    const magic = Buffer.alloc(4);
    await handle.read(magic, 0, 4, 0);
    return magic.readUInt32BE(0) === 0x514649fb ? 'qcow2' : 'raw';
  } finally {
    await handle.close();
  }
}

export async function openImage(path: string, options: OpenImageOptions = {}): Promise<ImageSession> {
  const log = options.log ?? pino({ level: 'silent' });
  const graph = new BlockGraph(log, options.bus ?? new EventBus());
  const opener = new NodeOpener(graph, log);
  const format = options.format ?? (await probeImageFormat(path));
  const readOnly = !options.writable;
  const nodeOptions = {
    driver: format,
    'node-name': 'image',
    'read-only': readOnly,
    ...(options.forceShare ? { 'force-share': true } : {}),
    file: { driver: 'file', filename: path },
    ...options.formatOptions,
  } as unknown as BlockdevOptions;
  const node = await opener.open({ options: nodeOptions, monitorOwned: true });
  const perm = PERM_CONSISTENT_READ | (options.writable ? PERM_WRITE | PERM_RESIZE : 0);
  const shared = options.forceShare ? PERM_ALL : PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;
  let disk: ChildEdge;
  try {
    disk = await graph.attachUser({ describe: () => 'an unnamed block device' }, node, 'root', { perm, shared });
  } catch (error) {
    await graph.close(node);
    throw error;
  }
  return {
    node,
    disk,
    graph,
    close: async () => {
      await graph.detach(disk);
      await graph.close(node);
    },
  };
}
