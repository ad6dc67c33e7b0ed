/*
 * Internal snapshots (qcow2's snapshot table) through QMP:
 * blockdev-snapshot-internal-sync (a transaction action: transactions/
 * internal-snapshot-action.ts) and blockdev-snapshot-delete-internal-sync, with
 * qemu-storage-daemon's checks and texts. Creation writes the snapshot in the
 * action's prepare (QEMU does too: only prepare may fail); its abort deletes the
 * snapshot again and cannot fail (a failed delete is logged, as QEMU prints it).
 */
import type { SnapshotInfo } from '../generated/qapi-types.js';
import { genericError } from '../errors.js';
import { asQmpError, checkNotBlocked, lookupRootNode, type BlockLayer } from './block-layer.js';
import { describeErrno } from './io-error.js';
import type { BlockNode } from './node.js';
import type { ChildEdge } from './child-edge.js';

export interface PreparedInternalSnapshot {
  device: string;
  /** The node whose image holds the snapshot (the device, or the node it falls back to). */
  holder: BlockNode;
  snapshot: SnapshotInfo;
}

/**
 * The node whose driver keeps `node`'s internal snapshots (QEMU's bdrv_snapshot_fallback): the
 * node itself, or down through the one child that holds all its data (a filter, raw).
 */
export function snapshotHolder(node: BlockNode): BlockNode | undefined {
  for (let current: BlockNode | undefined = node; current; ) {
    if (current.state.listSnapshots) return current;
    const data: ChildEdge[] = current.children.filter((edge) => edge.role !== 'cow');
    current = data.length === 1 ? data[0]!.child : undefined;
  }
  return undefined;
}

function errnoText(error: unknown): string {
  const code = (error as { code?: string }).code;
  return code ? describeErrno(code) : (error as Error).message;
}

/**
 * QEMU's internal_snapshot_prepare after the root-node lookup (the caller drains `node` from
 * there on, as QEMU does): every check, then the snapshot is written.
 */
export async function createInternalSnapshot(layer: BlockLayer, node: BlockNode, { device, name }: { device: string; name: string }): Promise<PreparedInternalSnapshot> {
  checkNotBlocked(layer.blockers, node, 'internal-snapshot');
  if (node.readOnly) throw genericError(`Device '${device}' is read only`);
  const holder = snapshotHolder(node);
  if (!holder?.state.createSnapshot || holder.readOnly) {
    throw genericError(`Block format '${node.driver.name}' used by device '${device}' does not support internal snapshots`);
  }
  if (name === '') throw genericError('Name is empty');
  if (holder.state.listSnapshots!().some((sn) => sn.name === name)) throw genericError(`Snapshot with name '${name}' already exists on device '${device}'`);
  // QEMU takes the date from the wall clock in microseconds; a storage daemon's VM clock is that same wall clock.
  const micros = BigInt(Math.round((performance.timeOrigin + performance.now()) * 1000));
  const taken = { name, dateSec: Number(micros / 1_000_000n), dateNsec: Number(micros % 1_000_000n) * 1000, vmClockNsec: micros * 1000n };
  try {
    const snapshot = await holder.drained(() => holder.state.createSnapshot!(taken));
    return { device, holder, snapshot };
  } catch (error) {
    throw genericError(`Failed to create snapshot '${name}' on device '${device}': ${errnoText(error)}`);
  }
}

/** Deletes the snapshot prepare made; never fails (QEMU only reports a failed delete on stderr). */
export async function abortInternalSnapshot(layer: BlockLayer, { device, holder, snapshot }: PreparedInternalSnapshot): Promise<void> {
  await holder.drained(() => holder.state.deleteSnapshot!(snapshot.id, snapshot.name)).catch((error: unknown) => {
    layer.graph.log.error({ err: error, device, snapshot: snapshot.name }, `Failed to delete snapshot with id '${snapshot.id}' and name '${snapshot.name}' on device '${device}'`);
  });
}

/** blockdev-snapshot-delete-internal-sync: QEMU's checks in its order, then the delete; returns what was deleted. */
export async function blockdevSnapshotDeleteInternalSync(layer: BlockLayer, { device, id, name }: { device: string; id?: string; name?: string }): Promise<SnapshotInfo> {
  const node = lookupRootNode(layer.graph, device);
  if (id === undefined && name === undefined) throw genericError('Name or id must be provided');
  checkNotBlocked(layer.blockers, node, 'internal-snapshot-delete');
  const holder = snapshotHolder(node);
  if (!holder?.state.deleteSnapshot) throw genericError('Failed to get a snapshot list: Operation not supported');
  const missing = () => genericError(`Snapshot with id '${id ?? 'null'}' and name '${name ?? 'null'}' does not exist on device '${device}'`);
  const exists = holder.state.listSnapshots!().some((sn) => (id === undefined || sn.id === id) && (name === undefined || sn.name === name));
  if (!exists) throw missing();
  const deleted = await holder.drained(() => holder.state.deleteSnapshot!(id, name)).catch((error: unknown) => {
    throw asQmpError(error);
  });
  if (!deleted) throw missing();
  return deleted;
}
