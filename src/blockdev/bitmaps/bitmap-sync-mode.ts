/*
 * What a backup leaves in the bitmap it was given, by bitmap-mode and by how the job
 * ended (QEMU 7.2's backup_cleanup_sync_bitmap). The job froze the bitmap with a successor
 * at its start (successor.ts); at its end:
 *   - on-success: succeeded, the bitmap becomes the writes made during the job (what it
 *     marked was copied); failed or cancelled, it is as if the job never ran (its bits plus
 *     the writes meanwhile);
 *   - always: the writes made during the job, plus, when the job failed or was cancelled,
 *     what the job had still to copy;
 *   - never: its bits plus the writes meanwhile, however the job ended.
 */
import type { BitmapSyncMode } from '../../generated/qapi-types.js';
import type { BitmapRegistry } from './bitmap-registry.js';
import type { DirtyBitmap } from './dirty-bitmap.js';
import { abdicate, reclaim } from './successor.js';

/**
 * Ends the job's hold on `bitmap` (of the node whose bitmaps are `registry`). `notCopied`: what
 * the job had not copied yet when it ended (its copy bitmap), which 'always' keeps after a
 * failure. Returns the bitmap that now has the name.
 */
export function settleSyncBitmap(registry: BitmapRegistry, bitmap: DirtyBitmap, mode: BitmapSyncMode, succeeded: boolean, notCopied: DirtyBitmap): DirtyBitmap {
  const synced = (succeeded || mode === 'always') && mode !== 'never';
  const result = synced ? abdicate(registry, bitmap) : reclaim(registry, bitmap);
  if (!succeeded && mode === 'always') result.merge(notCopied);
  return result;
}
