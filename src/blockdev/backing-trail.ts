/*
 * What an open remembers while it follows backing file names from image headers:
 * the images already opened above in the same chain, and how deep it is. Any image
 * can name any file as its backing file, so a header that names itself (or A -> B -> A)
 * would be opened again and again without end when read-only (QEMU 7.2 does exactly
 * that: qemu-storage-daemon stops answering and its descriptors grow; read-write, the
 * image locks stop it). blockd refuses the first image that repeats one above it,
 * recognised by device and inode (so "./a", "a" and a hard link of a are one image),
 * and refuses to follow a chain further than MAX_BACKING_FILES: QEMU has no limit of
 * its own, and every walk over a chain, and the time the daemon spends opening it
 * (with every other command waiting), grows with its length.
 */
import { stat } from 'node:fs/promises';
import { QmpError } from '../errors.js';
import type { BlockNode } from './node.js';

/** The most backing files one node's chain may have below it when they are opened from image headers. */
export const MAX_BACKING_FILES = 1000;

/** The chain is too long: passed up unchanged (not prefixed at every level it passes, which would repeat 1,000 times). */
export class BackingChainTooLong extends QmpError {
  constructor(top: string) {
    super('GenericError', `Backing chain too long: more than ${MAX_BACKING_FILES} backing files below '${top}'`);
  }
}

/** The protocol node an image is stored in, found through its format and filter layers. */
export function storageOf(node: BlockNode): BlockNode | undefined {
  let current: BlockNode | undefined = node;
  while (current && current.driver.kind !== 'protocol') current = current.primaryChild()?.child;
  return current;
}

/** The file an image is stored in, as device and inode; undefined when it is not a local file (then it is not compared). */
export async function imageFileIdentity(node: BlockNode): Promise<string | undefined> {
  const storage = storageOf(node);
  if (!storage || storage.driver.name !== 'file') return undefined;
  try {
    const { dev, ino } = await stat(storage.state.info().filename, { bigint: true });
    return `${dev}:${ino}`;
  } catch {
    return undefined; // gone since it was opened: nothing to compare
  }
}

export class BackingTrail {
  private constructor(
    /** The image at this level (the overlay of the next backing file). */
    private readonly image: string | undefined,
    private readonly above: BackingTrail | undefined,
    /** How many backing files below the top the next one is. */
    readonly depth: number,
    private readonly top: string,
  ) {}

  /** The trail below the top of a chain: an image opened by other means than a header's name. */
  static below(image: string | undefined, topFilename: string): BackingTrail {
    return new BackingTrail(image, undefined, 1, topFilename);
  }

  /** The trail below the backing file this trail led to (whose image is `image`); refused past the limit. */
  next(image: string | undefined): BackingTrail {
    if (this.depth >= MAX_BACKING_FILES) throw new BackingChainTooLong(this.top);
    return new BackingTrail(image, this, this.depth + 1, this.top);
  }

  /** Refuses a backing file that is one of the images above it: its header would lead back here forever. */
  refuseRepeat(image: string | undefined, filename: string): void {
    if (image === undefined) return;
    for (let level: BackingTrail | undefined = this; level; level = level.above) {
      // qemu-img's words for the same finding (info --backing-chain).
      if (level.image === image) throw new QmpError('GenericError', `Backing file '${filename}' creates an infinite loop.`);
    }
  }
}
