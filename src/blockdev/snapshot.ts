/*
 * External snapshots: put an overlay on top of a node so that new writes go
 * to the overlay and the node becomes its read-only backing file. The
 * overlay takes over every parent of the node (exports follow). Checks and
 * texts are qemu-storage-daemon's; the steps are split so that a transaction
 * can prepare several snapshots and commit or abort them together.
 */
import type { BlockdevOptions } from '../generated/qapi-types.js';
import { genericError } from '../errors.js';
import { createQcow2File } from './drivers/qcow2/create.js';
import { asQmpError, asTransaction, checkNotBlocked, type BlockLayer } from './block-layer.js';
import type { BlockNode } from './node.js';
import { PERM_CONSISTENT_READ } from './permissions.js';

export interface PreparedSnapshot {
  old: BlockNode;
  overlay: BlockNode;
  /** The overlay was opened by the command (snapshot-sync) and is not monitor-owned. */
  created: boolean;
}

/** The node to snapshot: looked up, not blocked, flushed. */
export async function snapshotSource(layer: BlockLayer, old: BlockNode | undefined, device: string | undefined, nodeName: string | undefined): Promise<BlockNode> {
  if (!old) throw genericError(`Cannot find device='${device ?? ''}' nor node-name='${nodeName ?? ''}'`);
  checkNotBlocked(layer.blockers, old, 'external-snapshot');
  if (!old.readOnly) await old.flush().catch((error: unknown) => {
    throw genericError(`Input/output error${error instanceof Error ? ` (${error.message})` : ''}`);
  });
  void layer;
  return old;
}

/** The checks QEMU makes on an overlay before it appends it. */
export function checkOverlay(overlay: BlockNode): void {
  if (overlay.neededPermissions().perm & PERM_CONSISTENT_READ) throw genericError('The overlay is already in use');
  if (overlay.driver.kind === 'filter') throw genericError('Filters cannot be used as overlays');
  if (overlay.backing()) throw genericError('The overlay already has a backing image');
  if (!overlay.driver.supportsBacking) throw genericError('The overlay does not support backing images');
}

/** Appends the overlay and makes the old node read-only if it can be reopened. */
export async function commitSnapshot(layer: BlockLayer, { old, overlay, created }: PreparedSnapshot): Promise<void> {
  try {
    await layer.graph.append(overlay, old);
  } catch (error) {
    throw asQmpError(error);
  }
  // The reopen drains the whole subtree (jobs below pause meanwhile). Like QEMU (which passes no
  // error pointer), a node that cannot be reopened stays writable: the snapshot itself is done.
  await layer.graph.reopenReadOnly(old).catch(() => {});
  // An overlay the command made lives only as long as something uses it (QEMU drops it at once otherwise).
  if (created && overlay.parents.length === 0) await layer.graph.close(overlay);
}

export async function blockdevSnapshot(layer: BlockLayer, args: { node: string; overlay: string }): Promise<void> {
  return asTransaction(layer, layer.graph.find(args.node), () => snapshotOnto(layer, args));
}

async function snapshotOnto(layer: BlockLayer, { node, overlay }: { node: string; overlay: string }): Promise<void> {
  const old = await snapshotSource(layer, layer.graph.find(node), node, node);
  const overlayNode = layer.graph.find(overlay);
  if (!overlayNode) throw genericError(`Cannot find device='${overlay}' nor node-name='${overlay}'`);
  checkOverlay(overlayNode);
  await commitSnapshot(layer, { old, overlay: overlayNode, created: false });
}

export interface SnapshotSyncArguments {
  device?: string;
  'node-name'?: string;
  'snapshot-file': string;
  'snapshot-node-name'?: string;
  format?: string;
  mode?: 'existing' | 'absolute-paths';
}

/** Creates (or, with mode=existing, opens) an overlay image and puts it on top of the node. */
export async function blockdevSnapshotSync(layer: BlockLayer, args: SnapshotSyncArguments): Promise<void> {
  const name = args['node-name'];
  return asTransaction(layer, name === undefined ? undefined : layer.graph.find(name), () => snapshotToNewImage(layer, args));
}

async function snapshotToNewImage(layer: BlockLayer, args: SnapshotSyncArguments): Promise<void> {
  const nodeName = args['node-name'];
  const old = await snapshotSource(layer, nodeName === undefined ? undefined : layer.graph.find(nodeName), args.device, nodeName);
  const format = args.format ?? 'qcow2';
  const overlayName = args['snapshot-node-name'];
  if (nodeName !== undefined && overlayName === undefined) throw genericError('New overlay node-name missing');
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
  const overlay = await layer.opener.open({ options, monitorOwned: false });
  try {
    checkOverlay(overlay);
    await commitSnapshot(layer, { old, overlay, created: true });
  } catch (error) {
    if (layer.graph.find(overlay.name) === overlay && overlay.parents.length === 0) await layer.graph.close(overlay);
    throw error;
  }
}
