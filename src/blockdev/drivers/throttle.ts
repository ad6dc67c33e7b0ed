/*
 * The `throttle` filter: every request through it waits for its throttle
 * group (an object created with object-add) to admit it, so several nodes
 * can share one set of I/O limits.
 */
import { genericError } from '../../errors.js';
import { ThrottleGroup } from '../../objects/throttle-group.js';
import type { BlockDriver, WriteFlags, ZeroFlags } from '../block-driver.js';
import type { ChildEdge } from '../child-edge.js';
import { jsonFilename } from '../node-filename.js';
import type { BlockNode } from '../node.js';
import { PassThroughFilter } from './pass-through-filter.js';

interface ThrottleOptions {
  'throttle-group': string;
}

/** The throttle group an id names, refused in QEMU's words when there is none. */
function groupNamed(id: string, findObject: (id: string) => unknown): ThrottleGroup {
  const group = findObject(id);
  if (!(group instanceof ThrottleGroup)) throw genericError(`Throttle group '${id}' does not exist`);
  return group;
}

class ThrottleState extends PassThroughFilter {
  constructor(file: ChildEdge, private group: ThrottleGroup, node: BlockNode) {
    super(file, node);
  }

  /** A reopen may put the node in another group (QEMU's throttle_reopen_prepare); requests then wait for that one. */
  prepareReopen(options: Record<string, unknown>, findObject: (id: string) => unknown): () => () => void {
    const group = groupNamed(options['throttle-group'] as string, findObject);
    const join = (from: ThrottleGroup, to: ThrottleGroup) => {
      from.users--;
      to.users++;
      this.group = to;
    };
    return () => {
      const old = this.group;
      join(old, group);
      return () => join(group, old);
    };
  }

  /** As QEMU's filter, it forwards compressed writes (a backup with `compress` may target it). */
  protected override get forwardsCompressedWrites(): boolean {
    return true;
  }

  override async read(offset: number, buffer: Buffer): Promise<void> {
    await this.group.admit(false, buffer.length);
    return this.filtered.read(offset, buffer);
  }

  override async write(offset: number, buffer: Buffer, flags: WriteFlags): Promise<void> {
    await this.group.admit(true, buffer.length);
    return this.filtered.write(offset, buffer, flags);
  }

  override async writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    await this.group.admit(true, length);
    return this.filtered.writeZeroes(offset, length, flags);
  }

  override async discard(offset: number, length: number): Promise<void> {
    await this.group.admit(true, length);
    return this.filtered.discard(offset, length);
  }

  override info() {
    return { filename: jsonFilename(this.node) };
  }

  override async close(): Promise<void> {
    this.group.users--;
  }
}

export const throttleDriver: BlockDriver<ThrottleOptions> = {
  name: 'throttle',
  kind: 'filter',
  strongOptions: ['throttle-group'],
  async open(context, options) {
    const group = groupNamed(options['throttle-group'], context.findObject);
    const file = await context.openChild('file', { name: 'file', role: 'filtered' });
    group.users++;
    return new ThrottleState(file, group, context.node);
  },
};
