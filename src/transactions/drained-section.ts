/*
 * A node kept drained from an action's prepare to its clean (QEMU's per-action
 * bdrv_drained_begin/end): the users it reaches (jobs) stay paused across the other
 * actions, and resume when the section ends, before the transaction replies.
 */
import type { BlockNode } from '../blockdev/node.js';

export class DrainedSection {
  private finish: (() => void) | undefined;
  private done: Promise<unknown> | undefined;

  /** Drains `node`'s users (its requests go on: the action's own steps hold them where they must). */
  async begin(node: BlockNode): Promise<void> {
    let finish!: () => void;
    const ended = new Promise<void>((resolve) => (finish = resolve));
    await new Promise<void>((entered) => {
      this.done = node.drained(async () => {
        entered();
        await ended;
      }, { holdRequests: false });
    });
    this.finish = finish;
  }

  /** Ends the section; resolves once its users run again. Does nothing when it never began. */
  async end(): Promise<void> {
    const finish = this.finish;
    this.finish = undefined;
    if (!finish) return;
    finish();
    await this.done;
  }
}
