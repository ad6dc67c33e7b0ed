/*
 * What the block commands work on (the graph and the node opener) and the
 * small lookups and error conversions they share.
 */
import { QmpError, genericError } from '../errors.js';
import type { BlockGraph } from './graph.js';
import type { BlockOperation, OpBlockers } from '../opblockers/op-blockers.js';
import type { NodeOpener } from './node-opener.js';
import type { BlockNode } from './node.js';

/** A command acting on a node for its duration, described as QEMU describes its temporary BlockBackend. */
export const COMMAND_USER = { describe: () => 'an unnamed block device' };

/** Domain errors (I/O errors) reach clients as GenericError with their message. */
export function asQmpError(error: unknown): QmpError {
  return error instanceof QmpError ? error : genericError((error as Error).message);
}

export interface BlockLayer {
  graph: BlockGraph;
  opener: NodeOpener;
  /** QEMU's op blockers: which operations each node refuses, and why. */
  blockers: OpBlockers;
}

/** Refuses `operation` on a blocked node with QEMU's text. */
export function checkNotBlocked(blockers: OpBlockers, node: BlockNode, operation: BlockOperation): void {
  const reason = blockers.reason(node, operation);
  if (reason) throw genericError(`Node '${node.name}' is busy: ${reason}`);
}

/** Looks a node up the way commands with separate device/node-name arguments do (no named devices in a storage daemon). */
export function lookupDeviceOrNode(graph: BlockGraph, device: string | undefined, nodeName: string | undefined): BlockNode {
  const node = nodeName === undefined ? undefined : graph.find(nodeName);
  if (!node) throw genericError(`Cannot find device='${device ?? ''}' nor node-name='${nodeName ?? ''}'`);
  return node;
}


/**
 * A root node: no other node and no job holds it, only exports and commands
 * (QEMU's bdrv_is_root_node: BlockBackends are the only parents).
 */
export function isRootNode(node: BlockNode): boolean {
  return node.parents.every((edge) => 'user' in edge.parent && !edge.parent.user.job);
}

/** QEMU's qmp_get_root_bs: the device looked up by name, which must be a root node. */
export function lookupRootNode(graph: BlockGraph, device: string): BlockNode {
  const node = graph.find(device);
  if (!node) throw genericError(`Cannot find device='${device}' nor node-name='${device}'`);
  if (!isRootNode(node)) throw genericError('Need a root block node');
  return node;
}
