/*
 * The `copy-on-read` filter: data read from the backing chain below the top
 * image (down to `bottom`, if given) is written into the top image on the
 * way up, so later reads find it there. The write does not change what the
 * disk reads (QEMU's write-unchanged permission).
 */
import { genericError } from '../../errors.js';
import type { BlockDriver, OpenContext } from '../block-driver.js';
import type { ChildEdge } from '../child-edge.js';
import type { BlockNode } from '../node.js';
import { PERM_WRITE_UNCHANGED, defaultChildPermissions, type PermissionPair } from '../permissions.js';
import { PassThroughFilter } from './pass-through-filter.js';

interface CorOptions {
  bottom?: string;
}

class CopyOnReadState extends PassThroughFilter {
  /** While the filter is open, copies into the top and writes to it never interleave (BlockNode.serialisedCopy). */
  private readonly endSerialising: () => void;

  constructor(file: ChildEdge, private readonly bottom: BlockNode | undefined, node: BlockNode) {
    super(file, node);
    this.endSerialising = file.child.beginSerialising();
  }

  /** As QEMU's filter, it forwards compressed writes (a backup with `compress` may target it). */
  protected override get forwardsCompressedWrites(): boolean {
    return true;
  }

  /** Whether data at `offset` comes from a layer that may be copied up (below the top, down to `bottom`). */
  private async copyableRun(offset: number, length: number): Promise<{ length: number; copy: boolean }> {
    const top = this.filtered.child;
    const status = await top.blockStatus(offset, length);
    if (status.allocated || this.bottom === top) return { length: status.length, copy: false };
    // Walk down to the layer the data comes from; stop at bottom.
    for (let layer = top.below(); layer; layer = layer.below()) {
      const below = await layer.blockStatus(offset, Math.min(status.length, Math.max(1, layer.length() - offset)));
      if (below.allocated || layer === this.bottom) return { length: Math.min(status.length, below.length), copy: below.allocated && !below.zero };
    }
    return { length: status.length, copy: false };
  }

  private async anythingToCopy(offset: number, length: number): Promise<boolean> {
    for (let done = 0; done < length;) {
      const run = await this.copyableRun(offset + done, length - done);
      if (run.copy) return true;
      done += run.length;
    }
    return false;
  }

  override async read(offset: number, buffer: Buffer): Promise<void> {
    // Most reads find nothing to copy up; they need no serialising.
    if (!(await this.anythingToCopy(offset, buffer.length))) return this.filtered.read(offset, buffer);
    // Read, then write back, with no write to these clusters in between (QEMU's serialising
    // copy-on-read request): a client write acknowledged meanwhile would be overwritten with
    // the older data read here. Under the lock the top's allocation cannot change, so what is
    // copied is decided after the read.
    const top = this.filtered.child;
    await top.serialisedCopy(offset, buffer.length, async () => {
      await this.filtered.read(offset, buffer);
      for (let done = 0; done < buffer.length;) {
        const run = await this.copyableRun(offset + done, buffer.length - done);
        if (run.copy) await this.filtered.write(offset + done, buffer.subarray(done, done + run.length), { serialisedCopy: true, contentUnchanged: true });
        done += run.length;
      }
    });
  }

  childPermissions(edge: ChildEdge, parents: PermissionPair): PermissionPair {
    const pair = defaultChildPermissions(edge.role, parents, !this.node.readOnly);
    return { perm: pair.perm | PERM_WRITE_UNCHANGED, shared: pair.shared };
  }

  override async close(): Promise<void> {
    this.endSerialising();
  }
}

/**
 * The lowest layer reads copy from, checked as QEMU's cor_open checks it. The file's own node
 * is allowed (nothing is then copied: a stream with nothing to stream inserts such a filter).
 */
function findBottom(context: OpenContext, top: BlockNode, name: string): BlockNode {
  const node = context.findNode(name);
  if (!node) throw genericError(`Bottom node '${name}' not found`);
  if (node.driver.kind === 'filter') throw genericError(`Bottom node '${name}' is a filter`);
  for (let layer: BlockNode | undefined = top; layer; layer = layer.below()) if (layer === node) return node;
  // QEMU 7.2 hangs on a bottom outside the chain; blockd refuses it.
  throw genericError(`Bottom node '${name}' not found in the backing chain`);
}

export const copyOnReadDriver: BlockDriver<CorOptions> = {
  name: 'copy-on-read',
  kind: 'filter',
  strongOptions: [], // as in QEMU, 'bottom' is not part of the filter's json: filename
  async open(context, options) {
    const file = await context.openChild('file', { name: 'file', role: 'filtered' });
    const bottom = options.bottom === undefined ? undefined : findBottom(context, file.child, options.bottom);
    return new CopyOnReadState(file, bottom, context.node);
  },
};
