/*
 * Reusable I/O buffers for the data paths (NBD payloads and replies, job
 * copies). Allocating a fresh Buffer for every request makes V8 run full
 * garbage collections on external-memory pressure (about 25 per GiB moved),
 * which cost more CPU than the copying; a leased buffer goes back to the pool
 * once the I/O that used it has completed.
 */

const MIN_CLASS = 12; // 4 KiB
const MAX_CLASS = 25; // 32 MiB
/** Bytes kept idle per size class at most. */
const IDLE_BYTES_PER_CLASS = 16 << 20;

export interface BufferLease {
  /** Exactly the length asked for. */
  readonly buffer: Buffer;
  release(): void;
}

export class BufferPool {
  private readonly idle = new Map<number, Buffer[]>();

  acquire(length: number): BufferLease {
    const sizeClass = Math.max(MIN_CLASS, Math.ceil(Math.log2(Math.max(length, 1))));
    if (sizeClass > MAX_CLASS) return { buffer: Buffer.allocUnsafe(length), release: () => {} };
    const free = this.idle.get(sizeClass);
    const backing = free?.pop() ?? Buffer.allocUnsafeSlow(1 << sizeClass);
    let released = false;
    return {
      buffer: backing.subarray(0, length),
      release: () => {
        if (released) return;
        released = true;
        const list = this.idle.get(sizeClass) ?? [];
        if ((list.length + 1) << sizeClass <= Math.max(IDLE_BYTES_PER_CLASS, 1 << sizeClass)) list.push(backing);
        this.idle.set(sizeClass, list);
      },
    };
  }
}

/** The pool the daemon's data paths share. */
export const ioBuffers = new BufferPool();
