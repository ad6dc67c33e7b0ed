/*
 * A job that owns a bitmap (a backup syncing it) gives it a successor, as QEMU's
 * bdrv_dirty_bitmap_create_successor / abdicate / reclaim: while the job runs the bitmap
 * is busy and frozen (disabled, its bits what they were at the job's start) and an
 * anonymous bitmap of the same node and granularity marks the writes in its place. At the
 * end the successor either takes the bitmap's place, name and persistence (abdicate: the
 * frozen bits are dropped), or is merged back into it (reclaim: nothing is dropped). Either
 * way no write made during the job is lost.
 */
import { genericError } from '../../errors.js';
import type { BitmapRegistry } from './bitmap-registry.js';
import { checkBitmap } from './bitmap-commands.js';
import { DirtyBitmap } from './dirty-bitmap.js';

/** Freezes `bitmap` for a job: busy, disabled, and a new anonymous successor (recording as the bitmap did) in `registry`, its node's. */
export function createSuccessor(registry: BitmapRegistry, bitmap: DirtyBitmap): DirtyBitmap {
  checkBitmap(bitmap, { busy: true });
  if (bitmap.successor) throw genericError('Cannot create a successor for a bitmap that already has one');
  const successor = new DirtyBitmap(bitmap.length, bitmap.granularity);
  successor.enabled = bitmap.enabled;
  registry.add(successor);
  bitmap.enabled = false;
  bitmap.successor = successor;
  bitmap.busy = true;
  return successor;
}

/** The successor takes the frozen bitmap's place: its name and persistence; the frozen bitmap goes. Returns the bitmap now under that name. */
export function abdicate(registry: BitmapRegistry, bitmap: DirtyBitmap): DirtyBitmap {
  const successor = bitmap.successor;
  if (!successor) throw genericError("Cannot relinquish control if there's no successor present");
  successor.name = bitmap.name;
  successor.persistent = bitmap.persistent;
  bitmap.name = undefined;
  bitmap.persistent = false;
  bitmap.successor = undefined;
  bitmap.busy = false;
  registry.remove(bitmap);
  return successor;
}

/** The successor's bits merge back into the frozen bitmap, which records again as the successor did; the successor goes. Returns the bitmap. */
export function reclaim(registry: BitmapRegistry, bitmap: DirtyBitmap): DirtyBitmap {
  const successor = bitmap.successor;
  if (!successor) throw genericError('Cannot reclaim a successor when none is present');
  bitmap.merge(successor);
  bitmap.enabled = successor.enabled;
  bitmap.busy = false;
  bitmap.successor = undefined;
  registry.remove(successor);
  return bitmap;
}
