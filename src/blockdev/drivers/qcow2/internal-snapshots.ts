/*
 * qcow2 internal snapshots, created and deleted as QEMU does (qcow2_snapshot_create and
 * _delete) and in its crash-safe order. A snapshot is a copy of the active L1 table plus
 * one more reference on every L2 table and data cluster that table reaches; the COPIED
 * flags of the active tables are cleared (refcount > 1), so the next write to any of
 * those clusters copies it first. A crash at any point leaks clusters at most: every
 * reference count goes up before a table that counts on it becomes durable, and goes
 * down only after the table that held the reference is gone from the disk.
 */
import type { NewInternalSnapshot } from '../../block-driver.js';
import { IoError } from '../../io-error.js';
import type { SnapshotEntry } from './consistency-check.js';
import { L1_ENTRY_SIZE, L2_ENTRY_SIZE, MAX_SNAPSHOTS, OFLAG_COPIED } from './format-constants.js';
import { MetadataKind } from './metadata-index.js';
import type { Qcow2Image } from './qcow2-image.js';
import { findSnapshot, nextSnapshotId, serializeSnapshotTable } from './snapshot-table.js';
import { decodeL1Entry, decodeL2Entry } from './table-entries.js';

export class InternalSnapshots {
  /** The table as on disk (the header's nb_snapshots entries at snapshots_offset). */
  private entries: SnapshotEntry[];
  private tableSize: number;

  constructor(private readonly image: Qcow2Image, loaded: { snapshots: SnapshotEntry[]; size: number }) {
    this.entries = loaded.snapshots;
    this.tableSize = loaded.size;
  }

  list(): readonly SnapshotEntry[] {
    return this.entries;
  }

  /** Creates a snapshot of the active tables; the caller drained the node. Returns the entry. */
  async create(info: NewInternalSnapshot): Promise<SnapshotEntry> {
    const { image } = this;
    if (this.entries.length >= MAX_SNAPSHOTS) throw new IoError('EFBIG', 'Too many snapshots');
    const release = await image.locks.acquire(0, Number.MAX_SAFE_INTEGER, true);
    try {
      return await image.metadata.run(async () => {
        // The copy is made from memory: every table the L1 links must already be on disk.
        await image.writeBackMetadata();
        const l1 = [...image.tables.activeL1()];
        const l1Bytes = Buffer.alloc(l1.length * L1_ENTRY_SIZE);
        l1.forEach((raw, i) => l1Bytes.writeBigUInt64BE(raw, i * L1_ENTRY_SIZE));
        let l1Offset = 0;
        if (l1Bytes.length) {
          [l1Offset] = await image.refcounts.allocate(Math.ceil(l1Bytes.length / image.clusterSize), { contiguous: true });
          image.checkWrite(l1Offset!, l1Bytes.length);
          await image.file.write(l1Offset!, l1Bytes);
        }
        // One more reference on everything the active tables reach; COPIED cleared where now shared.
        const applied: number[] = [];
        try {
          await this.updateReferences(l1, 1, true, applied);
        } catch (error) {
          // A count at its maximum (1-bit refcounts): nothing of the snapshot stays, in memory or on disk.
          for (const cluster of applied) await image.refcounts.update(cluster, -1);
          await this.updateReferences(l1, 0, true);
          if (l1Bytes.length) await image.refcounts.release(l1Offset!, l1Bytes.length);
          await image.writeBackMetadata();
          throw error;
        }
        await image.tables.writeBack(); // refcounts, barrier, L2 tables, barrier, L1 entries
        await image.barrier.flush();
        image.overlaps.add(MetadataKind.InactiveL1, l1Offset!, l1Bytes.length);
        const entry: SnapshotEntry = {
          id: nextSnapshotId(this.entries),
          name: info.name,
          l1TableOffset: l1Offset!,
          l1Size: l1.length,
          vmStateSize: 0,
          dateSec: info.dateSec,
          dateNsec: info.dateNsec,
          vmClockNsec: info.vmClockNsec,
          diskSize: image.size,
          unknownExtra: Buffer.alloc(0),
        };
        await this.writeTable([...this.entries, entry]);
        return entry;
      });
    } finally {
      release();
    }
  }

  /** Deletes the snapshot found by id and/or name (QEMU's rules); returns it, or undefined when there is none. */
  async delete(id: string | undefined, name: string | undefined): Promise<SnapshotEntry | undefined> {
    const { image } = this;
    const release = await image.locks.acquire(0, Number.MAX_SAFE_INTEGER, true);
    try {
      return await image.metadata.run(async () => {
        const index = findSnapshot(this.entries, id, name);
        if (index < 0) return undefined;
        const sn = this.entries[index]!;
        await image.writeBackMetadata();
        // First the table stops naming the snapshot; only then may its references go.
        await this.writeTable(this.entries.filter((_, i) => i !== index)).catch((error: Error) => {
          throw new IoError((error as IoError).code ?? 'EIO', `Failed to remove snapshot from snapshot list: ${error.message}`);
        });
        const l1Bytes = Buffer.alloc(sn.l1Size * L1_ENTRY_SIZE);
        await image.file.read(sn.l1TableOffset, l1Bytes);
        const l1 = Array.from({ length: sn.l1Size }, (_, i) => l1Bytes.readBigUInt64BE(i * L1_ENTRY_SIZE));
        await this.updateReferences(l1, -1, false);
        if (l1Bytes.length) await image.refcounts.release(sn.l1TableOffset, l1Bytes.length);
        image.overlaps.remove(MetadataKind.InactiveL1, sn.l1TableOffset, l1Bytes.length);
        // Clusters only the active tables use now are theirs again (COPIED set), once the counts are durable.
        await this.updateReferences([...image.tables.activeL1()], 0, true);
        await image.tables.writeBack();
        await image.barrier.flush();
        return sn;
      });
    } finally {
      release();
    }
  }

  /**
   * QEMU's qcow2_update_snapshot_refcount: adds `delta` to the refcount of every L2 table
   * and cluster the L1 entries reach and, for the active table, sets each COPIED flag to
   * "refcount is 1". Changes stay in memory until the next write-back.
   */
  private async updateReferences(l1: bigint[], delta: -1 | 0 | 1, active: boolean, applied: number[] = []): Promise<void> {
    const { image } = this;
    const { refcounts, tables } = image;
    const bump = async (cluster: number) => {
      await refcounts.update(cluster, delta);
      applied.push(cluster);
    };
    const cs = image.clusterSize;
    const context = { clusterBits: image.header.clusterBits, version: image.header.version, externalDataFile: false };
    for (let l1Index = 0; l1Index < l1.length; l1Index++) {
      const l1Entry = decodeL1Entry(l1[l1Index]!, image.header.clusterBits);
      if (l1Entry.type !== 'ALLOCATED') continue;
      const table = await tables.readTable(l1Entry.l2Offset);
      const changed: [number, bigint][] = [];
      for (let i = 0; i < cs / L2_ENTRY_SIZE; i++) {
        const raw = table.readBigUInt64BE(i * L2_ENTRY_SIZE);
        const entry = decodeL2Entry(raw, context);
        let refcount = 0;
        if (entry.type === 'NORMAL' || entry.type === 'ZERO_ALLOC') {
          const cluster = entry.hostOffset / cs;
          if (delta) await bump(cluster);
          refcount = await refcounts.get(cluster);
        } else if (entry.type === 'COMPRESSED') {
          const { hostOffset, compressedSize } = entry.compressed;
          const last = Math.floor((hostOffset + compressedSize - 1) / cs);
          if (delta) for (let cluster = Math.floor(hostOffset / cs); cluster <= last; cluster++) await bump(cluster);
          // refcount stays 0: compressed clusters never carry COPIED
        } else if (entry.type === 'INVALID') {
          image.corrupt(`Invalid cluster entry found  (L2 offset: 0x${l1Entry.l2Offset.toString(16)}, L2 index: 0x${i.toString(16)}): ${entry.reason}`);
        } else {
          continue;
        }
        const flagged = refcount === 1 ? raw | OFLAG_COPIED : raw & ~OFLAG_COPIED;
        if (active && flagged !== raw) changed.push([i, flagged]);
      }
      if (changed.length) tables.setTableEntries(l1Entry.l2Offset, changed);
      const tableCluster = l1Entry.l2Offset / cs;
      if (delta) await bump(tableCluster);
      const tableRefcount = await refcounts.get(tableCluster);
      if (tableRefcount === 0) tables.forgetTable(l1Entry.l2Offset);
      if (active) {
        const raw = l1[l1Index]!;
        const flagged = tableRefcount === 1 ? raw | OFLAG_COPIED : raw & ~OFLAG_COPIED;
        if (flagged !== raw) tables.setL1Entry(l1Index, flagged);
      }
    }
  }

  /**
   * QEMU's qcow2_write_snapshots: the new table goes to new clusters and is durable (with its
   * refcounts) before one header write switches to it; the old table's clusters are freed after.
   */
  private async writeTable(entries: SnapshotEntry[]): Promise<void> {
    const { image } = this;
    const bytes = serializeSnapshotTable(entries);
    let offset = 0;
    if (bytes.length) {
      [offset] = await image.refcounts.allocate(Math.ceil(bytes.length / image.clusterSize), { contiguous: true });
      image.checkWrite(offset!, bytes.length);
      await image.file.write(offset!, bytes);
      await image.refcounts.writeBack();
      await image.barrier.flush();
    }
    const { header } = image;
    const old = { offset: header.snapshotsOffset, size: this.tableSize, count: header.nbSnapshots };
    header.snapshotsOffset = offset!;
    header.nbSnapshots = entries.length;
    try {
      await image.writeHeader();
    } catch (error) {
      header.snapshotsOffset = old.offset;
      header.nbSnapshots = old.count;
      throw error;
    }
    image.overlaps.remove(MetadataKind.SnapshotTable, old.offset, old.size);
    image.overlaps.add(MetadataKind.SnapshotTable, offset!, bytes.length);
    this.entries = entries;
    this.tableSize = bytes.length;
    if (old.size) await image.refcounts.release(old.offset, old.size);
    await image.refcounts.writeBack();
  }
}
