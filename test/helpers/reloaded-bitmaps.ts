/*
 * An image's persistent bitmaps as blockd loads them when it opens the image again after a
 * crash: opened read-write (an enabled bitmap cannot go out on a read-only export), its
 * dirty-bitmaps from query-named-block-nodes, and the dirty extents of every consistent one
 * read back over an NBD export with nbdinfo --map=qemu:dirty-bitmap:NAME. Also: which part
 * of a byte range those extents miss.
 */
import { join } from 'node:path';
import { after, before } from 'node:test';
import { QmpClient } from '../../src/qmp/client.js';
import { runBlockd, type BlockdProcess } from './blockd-process.js';
import { NbdRawClient } from './nbd-raw-client.js';
import { makeTempDir } from './paths.js';
import type { LoadedBitmap } from './qemu-bitmaps.js';
import { runTool } from './qemu-tools.js';

export type ReloadedBitmap = Omit<LoadedBitmap, 'sha256'>;

export interface ByteRange {
  offset: number;
  length: number;
}

/** The first part of `range` no extent covers (extents sorted, not overlapping), or undefined. */
export function firstUncovered(range: ByteRange, extents: readonly ByteRange[]): ByteRange | undefined {
  let at = range.offset;
  const end = range.offset + range.length;
  for (const extent of extents) {
    if (extent.offset + extent.length <= at) continue;
    if (extent.offset > at) return { offset: at, length: Math.min(extent.offset, end) - at };
    at = extent.offset + extent.length;
    if (at >= end) return undefined;
  }
  return at < end ? { offset: at, length: end - at } : undefined;
}

/**
 * A blockd that opens images one at a time for their bitmaps: each open is a blockdev-add (the
 * same load at open as a daemon starting with the image), so one process serves every round.
 */
export class BitmapReader {
  private opened = 0;

  private constructor(private readonly dir: string, private readonly blockd: BlockdProcess, private readonly qmp: QmpClient) {}

  /** One reader for a test file: started before its tests, stopped after them. */
  static forTestFile(): () => BitmapReader {
    let reader: BitmapReader | undefined;
    const readerDir = makeTempDir('blockd-bitmap-reader-');
    before(async () => {
      reader = await BitmapReader.start(readerDir.dir);
    });
    after(async () => {
      await reader?.stop();
      readerDir.cleanup();
    });
    return () => reader!;
  }

  /** Starts the reader with its sockets in `dir`. */
  static async start(dir: string): Promise<BitmapReader> {
    const blockd = await runBlockd(['--nbd-server', `addr.type=unix,addr.path=${join(dir, 'reader-nbd.sock')}`, '--qmp', `unix:${join(dir, 'reader-qmp.sock')}`]);
    return new BitmapReader(dir, blockd, await QmpClient.connect(`unix:${join(dir, 'reader-qmp.sock')}`));
  }

  /** Opens `image` (qcow2) read-write and reads every consistent bitmap's dirty extents over an export. */
  async open(image: string): Promise<ReloadedImage> {
    const node = `reloaded${this.opened++}`;
    await this.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': node, file: { driver: 'file', filename: image } } as never);
    const reloaded = new ReloadedImage(this.qmp, node, join(this.dir, 'reader-nbd.sock'));
    try {
      await reloaded.load();
      return reloaded;
    } catch (error) {
      await reloaded.close();
      throw error;
    }
  }

  async stop(): Promise<void> {
    await this.qmp.close();
    const exit = await this.blockd.stop('SIGTERM', 20_000);
    if (exit.code !== 0) throw new Error(`the bitmap reader exited ${exit.code ?? exit.signal}: ${this.blockd.stderr()}`);
  }
}

export class ReloadedImage {
  bitmaps: ReloadedBitmap[] = [];
  private readonly dirty = new Map<string, ByteRange[]>();
  private exported = false;

  constructor(private readonly qmp: QmpClient, private readonly node: string, private readonly socket: string) {}

  async load(): Promise<void> {
    const nodes = await this.qmp.executeRaw('query-named-block-nodes', { flat: true }) as { 'node-name': string; 'dirty-bitmaps'?: (ReloadedBitmap & { busy: boolean })[] }[];
    this.bitmaps = (nodes.find((candidate) => candidate['node-name'] === this.node)!['dirty-bitmaps'] ?? [])
      .map(({ busy: _busy, ...bitmap }) => ({ ...bitmap, inconsistent: bitmap.inconsistent ?? false }));
    const consistent = this.bitmaps.filter((bitmap) => !bitmap.inconsistent).map((bitmap) => bitmap.name);
    await this.qmp.execute('block-export-add', { type: 'nbd', id: this.node, 'node-name': this.node, writable: true, bitmaps: consistent });
    this.exported = true;
    for (const name of consistent) this.dirty.set(name, readDirtyExtents(`nbd+unix:///${this.node}?socket=${this.socket}`, name));
  }

  bitmap(name: string): ReloadedBitmap | undefined {
    return this.bitmaps.find((bitmap) => bitmap.name === name);
  }

  /** The dirty extents of a consistent bitmap. */
  dirtyExtents(name: string): ByteRange[] {
    const extents = this.dirty.get(name);
    if (!extents) throw new Error(`bitmap ${name} was not exported (missing or inconsistent)`);
    return extents;
  }

  /** Reads ranges of the disk through the export. */
  async read(ranges: readonly ByteRange[]): Promise<Buffer[]> {
    const client = await NbdRawClient.open(this.socket, this.node, []);
    try {
      const data: Buffer[] = [];
      for (const range of ranges) data.push(await client.read(range.offset, range.length));
      return data;
    } finally {
      await client.disconnect();
    }
  }

  /** Closes the image (its bitmaps stored again, as at a clean close). */
  async close(): Promise<void> {
    if (this.exported) {
      const deleted = this.qmp.waitForEvent('BLOCK_EXPORT_DELETED', (event) => event.data?.id === this.node);
      await this.qmp.execute('block-export-del', { id: this.node });
      await deleted;
    }
    await this.qmp.execute('blockdev-del', { 'node-name': this.node });
  }
}

/** nbdinfo --map=qemu:dirty-bitmap:NAME --json: the dirty extents, merged where they touch. */
function readDirtyExtents(uri: string, name: string): ByteRange[] {
  const result = runTool('nbdinfo', [`--map=qemu:dirty-bitmap:${name}`, '--json', uri]);
  if (result.status !== 0) throw new Error(`nbdinfo --map of ${name} failed: ${result.stderr}`);
  const extents = JSON.parse(result.stdout) as { offset: number; length: number; type: number }[];
  const dirty: ByteRange[] = [];
  for (const { offset, length, type } of extents) {
    if ((type & 1) === 0) continue;
    const last = dirty[dirty.length - 1];
    if (last && last.offset + last.length === offset) last.length += length;
    else dirty.push({ offset, length });
  }
  return dirty;
}
