/*
 * The `throttle` filter: every request through it waits for its throttle
 * group (an object created with object-add) to admit it, so several nodes
 * can share one set of I/O limits.
 */
import { genericError } from '../../errors.js';
import { ThrottleGroup } from '../../objects/throttle-group.js';
import type { BlockDriver, DriverState, WriteFlags, ZeroFlags } from '../block-driver.js';
import type { ChildEdge } from '../child-edge.js';
import { jsonFilename } from '../node-filename.js';
import type { BlockNode } from '../node.js';

interface ThrottleOptions {
  'throttle-group': string;
}

class ThrottleState implements DriverState {
  constructor(private readonly file: ChildEdge, private readonly group: ThrottleGroup, private readonly node: BlockNode) {}

  length(): number {
    return this.file.length();
  }

  /** A format above may write past the end when the file below grows on write. */
  get growsOnWrite(): boolean {
    return this.file.growsOnWrite;
  }

  async read(offset: number, buffer: Buffer): Promise<void> {
    await this.group.admit(false, buffer.length);
    return this.file.read(offset, buffer);
  }

  async write(offset: number, buffer: Buffer, flags: WriteFlags): Promise<void> {
    await this.group.admit(true, buffer.length);
    return this.file.write(offset, buffer, flags);
  }

  async writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    await this.group.admit(true, length);
    return this.file.writeZeroes(offset, length, flags);
  }

  async discard(offset: number, length: number): Promise<void> {
    await this.group.admit(true, length);
    return this.file.discard(offset, length);
  }

  async blockStatus(offset: number, length: number) {
    return { length, delegate: this.file, offset };
  }

  truncate(size: number): Promise<void> {
    return this.file.truncate(size);
  }

  info() {
    return { filename: jsonFilename(this.node) };
  }

  async close(): Promise<void> {
    this.group.users--;
  }
}

export const throttleDriver: BlockDriver<ThrottleOptions> = {
  name: 'throttle',
  kind: 'filter',
  strongOptions: ['throttle-group'],
  async open(context, options) {
    const group = context.findObject(options['throttle-group']);
    if (!(group instanceof ThrottleGroup)) throw genericError(`Throttle group '${options['throttle-group']}' does not exist`);
    const file = await context.openChild('file', { name: 'file', role: 'filtered' });
    group.users++;
    return new ThrottleState(file, group, context.node);
  },
};
