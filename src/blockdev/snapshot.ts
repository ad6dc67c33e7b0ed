/*
 * External snapshots: put an overlay on top of a node so that new writes go
 * to the overlay and the node becomes its read-only backing file. The
 * overlay takes over every parent of the node (exports follow). Checks and
 * texts are qemu-storage-daemon's. These are the steps; the transaction action
 * (../transactions/snapshot-action.ts) runs them, alone or with others.
 */
import type { BlockdevOptions } from '../generated/qapi-types.js';
import { genericError } from '../errors.js';
import { createQcow2File } from './drivers/qcow2/create.js';
import { asQmpError, checkNotBlocked, type BlockLayer } from './block-layer.js';
import type { BlockNode } from './node.js';
import { PERM_CONSISTENT_READ } from './permissions.js';

/** The node to snapshot: looked up, not blocked, flushed. */
export async function snapshotSource(layer: BlockLayer, old: BlockNode | undefined, device: string | undefined, nodeName: string | undefined): Promise<BlockNode> {
  if (!old) throw genericError(`Cannot find device='${device ?? ''}' nor node-name='${nodeName ?? ''}'`);
  checkNotBlocked(layer.blockers, old, 'external-snapshot');
  if (!old.readOnly) await old.flush().catch((error: unknown) => {
    throw genericError(`Input/output error${error instanceof Error ? ` (${error.message})` : ''}`);
  });
  return old;
}

/** The checks QEMU makes on an overlay before it appends it. */
export function checkOverlay(overlay: BlockNode): void {
  if (overlay.neededPermissions().perm & PERM_CONSISTENT_READ) throw genericError('The overlay is already in use');
  if (overlay.driver.kind === 'filter') throw genericError('Filters cannot be used as overlays');
  if (overlay.backing()) throw genericError('The overlay already has a backing image');
  if (!overlay.driver.supportsBacking) throw genericError('The overlay does not support backing images');
}

/** Puts the overlay on top of the node (every parent follows); returns what takes it off again. */
export async function appendOverlay(layer: BlockLayer, old: BlockNode, overlay: BlockNode): Promise<() => Promise<void>> {
  try {
    return await layer.graph.append(overlay, old);
  } catch (error) {
    throw asQmpError(error);
  }
}

/** Once the snapshot stands: the old node becomes read-only if it can be reopened. */
export async function settleSnapshot(layer: BlockLayer, old: BlockNode): Promise<void> {
  // The reopen drains the whole subtree (jobs below pause meanwhile). Like QEMU (which passes no
  // error pointer), a node that cannot be reopened stays writable: the snapshot itself is done.
  await layer.graph.reopenReadOnly(old).catch(() => {});
}

/** blockdev-snapshot's overlay: a node of the monitor's. */
export function findOverlay(layer: BlockLayer, overlay: string): BlockNode {
  const node = layer.graph.find(overlay);
  if (!node) throw genericError(`Cannot find device='${overlay}' nor node-name='${overlay}'`);
  return node;
}

export interface SnapshotSyncArguments {
  device?: string;
  'node-name'?: string;
  'snapshot-file': string;
  'snapshot-node-name'?: string;
  format?: string;
  mode?: 'existing' | 'absolute-paths';
}

/**
 * blockdev-snapshot-sync's overlay: the image created (unless mode=existing) with the old node
 * as its backing file, then opened; the node is nobody's until appended. The file stays when
 * a later step fails, as QEMU leaves it.
 */
export async function openNewOverlay(layer: BlockLayer, old: BlockNode, args: SnapshotSyncArguments): Promise<BlockNode> {
  const format = args.format ?? 'qcow2';
  const overlayName = args['snapshot-node-name'];
  if (args['node-name'] !== undefined && overlayName === undefined) throw genericError('New overlay node-name missing');
  if (overlayName !== undefined && layer.graph.find(overlayName)) throw genericError('New overlay node-name already in use');
  const path = args['snapshot-file'];
  if ((args.mode ?? 'absolute-paths') !== 'existing') {
    if (format === 'raw') throw genericError("Backing file not supported for file format 'raw'");
    if (format !== 'qcow2') throw genericError(`Creating ${format} images is not supported by blockd`);
    const backingFile = old.state.info().filename;
    // QEMU compares the names as given; a file named otherwise is still refused by its image locks.
    if (path === backingFile) throw genericError('Error: Trying to create an image with the same filename as the backing file');
    // Refused, unchanged, when another user (a node here, another process) holds the file.
    await createQcow2File(path, { size: old.length(), backingFile, backingFormat: old.driver.name });
  }
  const options = {
    driver: format,
    ...(overlayName === undefined ? {} : { 'node-name': overlayName }),
    file: { driver: 'file', filename: path },
    backing: null,
  } as unknown as BlockdevOptions;
  return layer.opener.open({ options, monitorOwned: false });
}

/** An overlay the command opened lives only as long as something uses it (QEMU drops it at once otherwise). */
export async function dropUnusedOverlay(layer: BlockLayer, overlay: BlockNode): Promise<void> {
  if (layer.graph.find(overlay.name) === overlay && overlay.parents.length === 0) await layer.graph.close(overlay);
}
