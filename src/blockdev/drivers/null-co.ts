/*
 * The `null-co` protocol driver: a disk of a given size that stores nothing.
 * Writes succeed and vanish; reads return zeros (QEMU leaves the buffer as
 * it is without read-zeroes; zeros are the safe choice). latency-ns delays
 * every request, which makes it a handy slow disk for tests.
 */
import { genericError } from '../../errors.js';
import type { BlockDriver, DriverState } from '../block-driver.js';
import { jsonFilename } from '../node-filename.js';

interface NullOptions {
  size?: number;
  'latency-ns'?: number;
  'read-zeroes'?: boolean;
}

const DEFAULT_SIZE = 1 << 30;

class NullState implements DriverState {
  constructor(private readonly size: number, private readonly latencyMs: number, private readonly readZeroes: boolean, private readonly filename: () => string) {}

  private delay(): Promise<void> {
    return this.latencyMs > 0 ? new Promise((resolve) => setTimeout(resolve, this.latencyMs)) : Promise.resolve();
  }

  /** In whole sectors, as QEMU counts a node's length. */
  length(): number {
    return Math.ceil(this.size / 512) * 512;
  }

  async read(_offset: number, buffer: Buffer): Promise<void> {
    await this.delay();
    buffer.fill(0);
  }

  async write(): Promise<void> {
    await this.delay();
  }

  async writeZeroes(): Promise<void> {
    await this.delay();
  }

  async flush(): Promise<void> {
    await this.delay();
  }

  async blockStatus(offset: number, length: number) {
    return { length, allocated: true, data: !this.readZeroes, zero: this.readZeroes, hostOffset: offset };
  }

  info() {
    return { filename: this.filename() };
  }

  async allocatedSize(): Promise<number> {
    return 0;
  }

  async close(): Promise<void> {}
}

export const nullCoDriver: BlockDriver<NullOptions> = {
  name: 'null-co',
  kind: 'protocol',
  strongOptions: ['size', 'read-zeroes'],
  async open(context, options) {
    const size = options.size ?? DEFAULT_SIZE;
    if (size < 0) throw genericError('size is invalid');
    const latency = options['latency-ns'] ?? 0;
    if (latency < 0) throw genericError('latency-ns is invalid');
    // QEMU names the node "null-co://" unless options other than the latency were given.
    const onlyDefaults = options.size === undefined && options['read-zeroes'] === undefined;
    const filename = () => (onlyDefaults ? 'null-co://' : jsonFilename(context.node));
    return new NullState(size, latency / 1e6, options['read-zeroes'] ?? false, filename);
  },
};
