/*
 * A node's dirty bitmaps: the named ones a user adds and the anonymous ones jobs keep
 * (successors among them), in the order they were created. Every write to the node marks them through markDirty
 * (the node calls it once per changing request, whoever the writer is), and they follow
 * the node's size.
 */
import { genericError } from '../../errors.js';
import type { DirtyBitmap } from './dirty-bitmap.js';

export class BitmapRegistry {
  private readonly bitmaps: DirtyBitmap[] = [];

  get size(): number {
    return this.bitmaps.length;
  }

  add(bitmap: DirtyBitmap): void {
    if (bitmap.name !== undefined && this.find(bitmap.name)) throw genericError(`Bitmap already exists: ${bitmap.name}`);
    this.bitmaps.push(bitmap);
  }

  remove(bitmap: DirtyBitmap): void {
    const index = this.bitmaps.indexOf(bitmap);
    if (index >= 0) this.bitmaps.splice(index, 1);
  }

  find(name: string): DirtyBitmap | undefined {
    return this.bitmaps.find((bitmap) => bitmap.name === name);
  }

  /** Whether any bitmap satisfies `test` (without copying the list, for the write path). */
  some(test: (bitmap: DirtyBitmap) => boolean): boolean {
    return this.bitmaps.some(test);
  }

  /** Newest first, as QEMU lists a node's bitmaps. */
  list(): DirtyBitmap[] {
    return [...this.bitmaps].reverse();
  }

  /** The write hook: bytes [offset, offset+length) of the node may have changed. */
  markDirty(offset: number, length: number): void {
    for (const bitmap of this.bitmaps) if (bitmap.marksWrites) bitmap.set(offset, length);
  }

  resize(length: number): void {
    for (const bitmap of this.bitmaps) bitmap.resize(length);
  }
}
