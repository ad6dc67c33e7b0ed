/*
 * Persistent dirty bitmaps as QEMU sees them, for interop tests: the bitmaps a read-only
 * qemu-storage-daemon loads from an image (query-named-block-nodes' dirty-bitmaps with
 * x-debug-block-dirty-bitmap-sha256 of each), the directory qemu-img info lists, and the
 * same sha256 computed from a blockd DirtyBitmap.
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { bitmapSha256 } from '../../src/blockdev/bitmaps/bitmap-commands.js';
import type { DirtyBitmap } from '../../src/blockdev/bitmaps/dirty-bitmap.js';
import { QmpClient, QmpCommandError } from '../../src/qmp/client.js';
import { runQemuImg } from './qemu-tools.js';
import { startQsd } from './qsd-process.js';

export interface LoadedBitmap {
  name: string;
  granularity: number;
  count: number;
  recording: boolean;
  persistent: boolean;
  inconsistent: boolean;
  /** QEMU's x-debug-block-dirty-bitmap-sha256 (absent for an inconsistent bitmap). */
  sha256?: string;
}

/** What a blockd node holds, in the shape QSD reports. */
export function blockdBitmaps(bitmaps: readonly DirtyBitmap[]): LoadedBitmap[] {
  return bitmaps.map((bitmap) => ({
    name: bitmap.name!, granularity: bitmap.granularity, count: bitmap.count(), recording: bitmap.recording,
    persistent: bitmap.persistent, inconsistent: bitmap.inconsistent, ...(bitmap.inconsistent ? {} : { sha256: bitmapSha256(bitmap) }),
  }));
}

/** The bitmaps qemu-storage-daemon loads from `image` opened read-only (newest first, as QEMU lists them), or its open error. */
export async function qsdBitmaps(image: string, workDir: string): Promise<LoadedBitmap[] | { error: string }> {
  mkdirSync(workDir, { recursive: true });
  const qsd = await startQsd(workDir);
  const qmp = await QmpClient.connect(`unix:${join(workDir, 'qsd-qmp.sock')}`);
  try {
    try {
      await qmp.executeRaw('blockdev-add', { 'node-name': 'img', driver: 'qcow2', 'read-only': true, file: { driver: 'file', filename: image } });
    } catch (error) {
      if (error instanceof QmpCommandError) return { error: error.desc };
      throw error;
    }
    const nodes = await qmp.executeRaw('query-named-block-nodes', { flat: true }) as { 'node-name': string; 'dirty-bitmaps'?: Omit<LoadedBitmap, 'sha256'>[] }[];
    const listed = nodes.find((node) => node['node-name'] === 'img')!['dirty-bitmaps'] ?? [];
    const loaded: LoadedBitmap[] = [];
    for (const bitmap of listed) {
      const entry: LoadedBitmap = { ...bitmap, inconsistent: bitmap.inconsistent ?? false };
      delete (entry as { busy?: boolean }).busy;
      if (!entry.inconsistent) {
        entry.sha256 = ((await qmp.executeRaw('x-debug-block-dirty-bitmap-sha256', { node: 'img', name: bitmap.name })) as { sha256: string }).sha256;
      }
      loaded.push(entry);
    }
    return loaded;
  } finally {
    await qmp.close();
    await qsd.stop();
  }
}

export interface ImageBitmapInfo {
  name: string;
  granularity: number;
  flags: string[];
}

/** The bitmap directory as `qemu-img info` shows it (-U: while another process holds the image). */
export function qemuImgBitmaps(image: string, forceShare = false): ImageBitmapInfo[] {
  const info = JSON.parse(runQemuImg('info', '--output=json', ...(forceShare ? ['-U'] : []), image)) as {
    'format-specific': { data: { bitmaps?: ImageBitmapInfo[] } };
  };
  return info['format-specific'].data.bitmaps ?? [];
}
