/*
 * One NBD export: the name clients ask for, what the handshake advertises
 * (size, transmission flags, meta contexts), and the connected clients, each
 * holding a reference so a safe delete is refused while they are there.
 * The dirty bitmaps it exports stay busy until the export is deleted.
 */
import type { DirtyBitmap } from '../../blockdev/bitmaps/dirty-bitmap.js';
import type { ChildEdge } from '../../blockdev/child-edge.js';
import { BlockExport, type ExportOwner } from '../block-export.js';
import { TransmissionFlag } from '../../nbd/protocol.js';

export interface NbdExportSettings {
  name: string;
  description?: string;
  writable: boolean;
  /** Every write is FUA (block-export-add writethrough). */
  writethrough: boolean;
  allocationDepth: boolean;
  /** Offered as qemu:dirty-bitmap:NAME contexts, in this order (ids from 2). */
  bitmaps: DirtyBitmap[];
  /** More than one client may connect (the server's max-connections is not 1): NBD's multi-conn. */
  multiConnection: boolean;
}

/** A connected client, as the export needs to know it. */
export interface NbdClientHandle {
  disconnect(): void;
}

const SECTOR = 512;

export class NbdExport extends BlockExport {
  private readonly clients = new Set<NbdClientHandle>();
  /** Called when the export stops accepting clients (its name is free again). */
  onShutdown: (() => void) | undefined;

  constructor(id: string, edge: ChildEdge, owner: ExportOwner, readonly settings: NbdExportSettings) {
    super(id, 'nbd', edge, owner);
    // Nobody may change or remove them while clients may read them (QEMU's nbd_export_create).
    for (const bitmap of settings.bitmaps) bitmap.busy = true;
  }

  get name(): string {
    return this.settings.name;
  }

  /** QEMU exports whole sectors only. */
  get size(): number {
    return Math.floor(this.edge.child.length() / SECTOR) * SECTOR;
  }

  get readOnly(): boolean {
    return !this.settings.writable;
  }

  /** Transmission flags; DF only once structured replies were negotiated. */
  transmissionFlags(structuredReplies: boolean): number {
    let flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_CACHE;
    if (this.settings.multiConnection) flags |= TransmissionFlag.CAN_MULTI_CONN;
    if (this.readOnly) flags |= TransmissionFlag.READ_ONLY;
    else flags |= TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO;
    if (structuredReplies) flags |= TransmissionFlag.SEND_DF;
    return flags;
  }

  addClient(client: NbdClientHandle): void {
    this.clients.add(client);
    this.ref();
  }

  removeClient(client: NbdClientHandle): void {
    if (this.clients.delete(client)) this.unref();
  }

  override releaseResources(): void {
    for (const bitmap of this.settings.bitmaps) bitmap.busy = false;
  }

  protected shutdown(): void {
    this.onShutdown?.();
    for (const client of [...this.clients]) client.disconnect();
  }
}
