/*
 * What every block export is, whatever protocol serves it (QEMU's
 * BlockExport): an id, the user edge through which it reaches its node, and
 * a reference count held by the monitor and by each connected client. The
 * export is deleted, with BLOCK_EXPORT_DELETED, when the last reference goes.
 */
import type { ChildEdge } from '../blockdev/child-edge.js';
import type { BlockExportType } from '../generated/qapi-types.js';

export interface ExportOwner {
  /** Called once, when the last reference is dropped; resolves when the export is gone. */
  exportReleased(exported: BlockExport): Promise<void>;
}

export abstract class BlockExport {
  /** False once a delete was asked for: query-block-exports' shutting-down. */
  userOwned = true;
  /** Set once the last reference is gone: the deletion under way. */
  deleted: Promise<void> | undefined;
  private references = 1;

  constructor(readonly id: string, readonly type: BlockExportType, readonly edge: ChildEdge, private readonly owner: ExportOwner) {}

  /** The exported node; graph changes (a snapshot on top) move the edge. */
  get nodeName(): string {
    return this.edge.child.name;
  }

  get inUse(): boolean {
    return this.references > 1;
  }

  ref(): void {
    this.references++;
  }

  unref(): void {
    if (--this.references === 0) this.deleted = this.owner.exportReleased(this);
  }

  /** Gives back what the export held besides its edge (an NBD export's bitmaps), once it is deleted. */
  releaseResources(): void {}

  /** Stops accepting clients and disconnects the connected ones (safe mode only gets here without any). */
  protected abstract shutdown(): void;

  /** Drops the monitor's reference once; the export goes when its clients are gone too. */
  requestShutdown(): void {
    if (!this.userOwned) return;
    this.userOwned = false;
    this.shutdown();
    this.unref();
  }
}
