/*
 * A node kept drained from an action's prepare to its clean (QEMU's per-action
 * bdrv_drained_begin/end): the users it reaches (jobs) stay paused across the other
 * actions, and resume when the section ends, before the transaction replies.
 */
import { withUsersDrained } from '../blockdev/drain.js';
import type { BlockUser } from '../blockdev/child-edge.js';
import type { BlockNode } from '../blockdev/node.js';

export class DrainedSection {
  private finish: (() => void) | undefined;
  private done: Promise<unknown> | undefined;

  /** Drains `node`'s users (its requests go on: the action's own steps hold them where they must). */
  begin(node: BlockNode): Promise<void> {
    return this.hold((section) => node.drained(section, { holdRequests: false }));
  }

  /** Drains only these users (a job that joined a drained node after the drain began). */
  beginUsers(users: BlockUser[]): Promise<void> {
    return this.hold((section) => withUsersDrained(users, section));
  }

  private async hold(drained: (section: () => Promise<void>) => Promise<unknown>): Promise<void> {
    let finish!: () => void;
    const ended = new Promise<void>((resolve) => (finish = resolve));
    await new Promise<void>((entered) => {
      this.done = drained(async () => {
        entered();
        await ended;
      });
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
