/*
 * The qcow2 snapshot table as QEMU writes it (qcow2_write_snapshots): one
 * entry per snapshot, each starting on an 8-byte boundary, with the 24 bytes
 * of extra data QEMU knows (VM state size, disk size, icount) followed by any
 * extra data a newer writer left, then the id and the name. Reading lives in
 * consistency-check.ts (readSnapshots), which the check and open share.
 */
import type { SnapshotInfo } from '../../../generated/qapi-types.js';
import type { SnapshotEntry } from './consistency-check.js';
import { SNAPSHOT_HEADER_SIZE } from './format-constants.js';

/** The extra data QEMU 7.2 writes for every entry: vm_state_size_large, disk_size, icount. */
const KNOWN_EXTRA_SIZE = 24;

function entrySize(sn: SnapshotEntry): number {
  return SNAPSHOT_HEADER_SIZE + KNOWN_EXTRA_SIZE + sn.unknownExtra.length + Buffer.byteLength(sn.id) + Buffer.byteLength(sn.name);
}

/** The table's bytes (empty for no snapshots). */
export function serializeSnapshotTable(snapshots: readonly SnapshotEntry[]): Buffer {
  let size = 0;
  for (const sn of snapshots) size = Math.ceil(size / 8) * 8 + entrySize(sn);
  const table = Buffer.alloc(size);
  let offset = 0;
  for (const sn of snapshots) {
    offset = Math.ceil(offset / 8) * 8;
    const id = Buffer.from(sn.id);
    const name = Buffer.from(sn.name);
    table.writeBigUInt64BE(BigInt(sn.l1TableOffset), offset);
    table.writeUInt32BE(sn.l1Size, offset + 8);
    table.writeUInt16BE(id.length, offset + 12);
    table.writeUInt16BE(name.length, offset + 14);
    table.writeUInt32BE(sn.dateSec, offset + 16);
    table.writeUInt32BE(sn.dateNsec, offset + 20);
    table.writeBigUInt64BE(sn.vmClockNsec, offset + 24);
    table.writeUInt32BE(sn.vmStateSize >>> 0, offset + 32); // the legacy 32-bit field, truncated as QEMU does
    table.writeUInt32BE(KNOWN_EXTRA_SIZE + sn.unknownExtra.length, offset + 36);
    let at = offset + SNAPSHOT_HEADER_SIZE;
    table.writeBigUInt64BE(BigInt(sn.vmStateSize), at);
    table.writeBigUInt64BE(BigInt(sn.diskSize), at + 8);
    table.writeBigUInt64BE(sn.icount === undefined ? 0xffffffffffffffffn : BigInt.asUintN(64, sn.icount), at + 16);
    at += KNOWN_EXTRA_SIZE;
    at += sn.unknownExtra.copy(table, at);
    at += id.copy(table, at);
    at += name.copy(table, at);
    offset = at;
  }
  return table;
}

/** QEMU's find_new_snapshot_id: one more than the largest numeric id (ids that are not numbers count as 0). */
export function nextSnapshotId(snapshots: readonly SnapshotEntry[]): string {
  let max = 0;
  for (const sn of snapshots) {
    const match = /^\s*\+?(\d+)/.exec(sn.id);
    const value = match ? Number(match[1]) : 0;
    if (value > max) max = value;
  }
  return String(max + 1);
}

/**
 * QEMU's find_snapshot_by_id_and_name: with both, the entry must have both; with one, the first
 * entry that has it.
 */
export function findSnapshot(snapshots: readonly SnapshotEntry[], id: string | undefined, name: string | undefined): number {
  return snapshots.findIndex((sn) => (id === undefined || sn.id === id) && (name === undefined || sn.name === name));
}

/** A table entry as QMP and qemu-img info show it (SnapshotInfo). */
export function snapshotInfo(sn: SnapshotEntry): SnapshotInfo {
  return {
    id: sn.id, name: sn.name, 'vm-state-size': sn.vmStateSize, 'date-sec': sn.dateSec, 'date-nsec': sn.dateNsec,
    'vm-clock-sec': Number(sn.vmClockNsec / 1_000_000_000n), 'vm-clock-nsec': Number(sn.vmClockNsec % 1_000_000_000n),
    ...(sn.icount === undefined ? {} : { icount: Number(sn.icount) }),
  };
}
