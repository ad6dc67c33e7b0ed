/*
 * The daemon's block exports by id: block-export-add's checks that do not
 * depend on the protocol, block-export-del's modes, query-block-exports, and
 * the end of an export (its user edge detached, BLOCK_EXPORT_DELETED) once
 * its last reference is gone, as QEMU's block/export does.
 */
import type { Logger } from 'pino';
import type { BlockGraph } from '../blockdev/graph.js';
import type { EventBus } from '../event-bus.js';
import type { BlockExportInfo, BlockExportRemoveMode, BlockExportType } from '../generated/qapi-types.js';
import { genericError } from '../errors.js';
import type { BlockExport, ExportOwner } from './block-export.js';

export class ExportRegistry implements ExportOwner {
  /** Newest first, the order QEMU lists them in. */
  private exports: BlockExport[] = [];
  private readonly deletedWaiters = new Set<() => void>();

  constructor(private readonly graph: BlockGraph, private readonly bus: EventBus, private readonly log: Logger) {}

  find(id: string): BlockExport | undefined {
    return this.exports.find((exported) => exported.id === id);
  }

  /** Fails like QEMU when `id` cannot name a new export. */
  checkNewId(id: string, wellFormed: boolean): void {
    if (!wellFormed) throw genericError('Invalid block export id');
    if (this.find(id)) throw genericError(`Block export id '${id}' is already in use`);
  }

  add(exported: BlockExport): void {
    this.exports.unshift(exported);
  }

  list(): BlockExportInfo[] {
    return this.exports.map((exported) => ({
      id: exported.id,
      type: exported.type,
      'node-name': exported.nodeName,
      'shutting-down': !exported.userOwned,
    }));
  }

  /** Resolves once the export is gone if no client holds it, else at once (it goes when they leave). */
  async delete(id: string, mode: BlockExportRemoveMode = 'safe'): Promise<void> {
    const exported = this.find(id);
    if (!exported) throw genericError(`Export '${id}' is not found`);
    if (!exported.userOwned) throw genericError(`Export '${id}' is already shutting down`);
    if (mode === 'safe' && exported.inUse) {
      throw genericError(`export '${id}' still in use`).withHint("Use mode='hard' to force client disconnect");
    }
    exported.requestShutdown();
    // Without clients QEMU deletes the export before the command replies: the event comes first.
    await exported.deleted;
  }

  async exportReleased(exported: BlockExport): Promise<void> {
    exported.releaseResources();
    await this.graph.detach(exported.edge);
    this.exports = this.exports.filter((candidate) => candidate !== exported);
    this.log.info({ id: exported.id }, 'export deleted');
    this.bus.emit('BLOCK_EXPORT_DELETED', { id: exported.id });
    for (const wake of this.deletedWaiters) wake();
  }

  /** Shuts down every export of a type (all when undefined) and waits until they are deleted. */
  async closeAll(type?: BlockExportType): Promise<void> {
    const matches = (exported: BlockExport) => type === undefined || exported.type === type;
    // Oldest first: the order in which QEMU's deferred deletions of client-less exports run.
    for (const exported of this.exports.filter(matches).reverse()) exported.requestShutdown();
    while (this.exports.some(matches)) {
      await new Promise<void>((resolve) => {
        const wake = () => {
          this.deletedWaiters.delete(wake);
          resolve();
        };
        this.deletedWaiters.add(wake);
      });
    }
  }
}
