/*
 * A blockd disk and the bytes it should hold: each request goes to the disk and to an in-memory copy,
 * which a test compares with the image at the end (`qemu-img compare` against the copy as a raw file).
 */
import { readFile, rm, writeFile } from 'node:fs/promises';
import type { WriteFlags, ZeroFlags } from '../../src/blockdev/block-driver.js';
import type { ChildEdge } from '../../src/blockdev/child-edge.js';
import { convertToRaw, qemuImgCompare } from './qemu-tools.js';

export class ModelledDisk {
  constructor(readonly disk: ChildEdge, public bytes: Buffer, readonly clusterSize: number) {}

  /** What QEMU reads in the image now, its backing chain included: where a model starts (before blockd opens it). */
  static async imageBytes(image: string): Promise<Buffer> {
    const raw = `${image}.initial.raw`;
    convertToRaw(image, raw);
    const bytes = await readFile(raw);
    await rm(raw);
    return bytes;
  }

  get size(): number {
    return this.bytes.length;
  }

  async write(offset: number, data: Buffer, flags: WriteFlags = {}): Promise<void> {
    await this.disk.write(offset, data, flags);
    data.copy(this.bytes, offset);
  }

  async writeZeroes(offset: number, length: number, flags: ZeroFlags = {}): Promise<void> {
    await this.disk.writeZeroes(offset, length, flags);
    this.bytes.fill(0, offset, offset + length);
  }

  /**
   * qcow2 v3 discards whole clusters only (and the last, partial one when the request
   * reaches the end of the disk); they read as zeros afterwards.
   */
  async discard(offset: number, length: number): Promise<void> {
    await this.disk.discard(offset, length);
    const cs = this.clusterSize;
    const start = Math.ceil(offset / cs) * cs;
    const end = offset + length === this.size ? this.size : Math.floor((offset + length) / cs) * cs;
    if (end > start) this.bytes.fill(0, start, end);
  }

  /** A grown disk reads as zeros past its old end. */
  async truncate(size: number): Promise<void> {
    await this.disk.truncate(size);
    const bytes = Buffer.alloc(size);
    this.bytes.copy(bytes, 0, 0, Math.min(size, this.size));
    this.bytes = bytes;
  }

  async flush(): Promise<void> {
    await this.disk.flush();
  }

  /** The image (read by QEMU) holds exactly the model's bytes. */
  async assertImageMatches(image: string, context: string): Promise<void> {
    const raw = `${image}.expected.raw`;
    await writeFile(raw, this.bytes);
    qemuImgCompare(raw, image, ['raw', 'qcow2'], context);
    await rm(raw);
  }
}
