/*
 * Who a drain reaches. Draining a node holds back its requests and tells every
 * user it reaches through that user's drained hook (QEMU's BdrvChildClass
 * drained_begin/drained_end): a job pauses, an export or a command holds
 * nothing extra. A drain of a node reaches the users of that node and of every
 * node above it (a drain goes up through the parents); a subtree drain (QEMU's
 * reopen) starts from every node below too; draining everything reaches the
 * users of every node.
 */
import type { BlockUser } from './child-edge.js';
import type { BlockNode } from './node.js';

/** A drain of one node reaches up through its parents; a subtree drain (a reopen) also covers every node below. */
export type DrainReach = 'node' | 'subtree';

/** What a user of a node does while a drain reaches it. begin resolves once the user is quiet (a job has parked). */
export interface DrainedHook {
  begin(): Promise<void>;
  /** Resolves once the user runs again (or stays quiet for another reason, such as an outer drain). */
  end(): Promise<void>;
  /** Users are told in the order they came (jobs pause in the order they were started, as QEMU lists them). */
  readonly order: number;
}

let hooksMade = 0;

/** A drained hook, ordered after every hook made before it. */
export function drainedHook(begin: () => Promise<void>, end: () => Promise<void>): DrainedHook {
  return { begin, end, order: hooksMade++ };
}

export interface DrainOptions {
  reach?: DrainReach;
  /** The user that drains (a job holding its own source still): it is not told (QEMU's ignore_parent). */
  ignore?: BlockUser;
  /**
   * false: the users are told, but the node's requests are not held. blockd holds requests at
   * the node, where QEMU holds them at the users (BlockBackends) and lets the drainer's own
   * requests through; a drain whose change sends requests into the node from above (a stream
   * dropping layers the top's writes still read; a reopen or a transaction whose steps each
   * hold the node they change) would wait on itself.
   */
  holdRequests?: boolean;
}

/** The users with a drained hook that a drain starting at `starts` reaches, each once, in the order they came. */
export function usersReached(starts: Iterable<BlockNode>, reach: DrainReach, ignore?: BlockUser): BlockUser[] {
  const users = new Set<BlockUser>();
  const up = new Set<BlockNode>();
  const goUp = (current: BlockNode) => {
    if (up.has(current)) return;
    up.add(current);
    for (const edge of current.parents) {
      if ('node' in edge.parent) goUp(edge.parent.node);
      else if (edge.parent.user.drained && edge.parent.user !== ignore) users.add(edge.parent.user);
    }
  };
  const down = new Set<BlockNode>();
  const goDown = (current: BlockNode) => {
    if (down.has(current)) return;
    down.add(current);
    goUp(current);
    if (reach === 'subtree') for (const edge of current.children) goDown(edge.child);
  };
  for (const start of starts) goDown(start);
  return [...users].sort((a, b) => a.drained!.order - b.drained!.order);
}

/** Runs `change` with every user in `users` told of the drain: begun before it, ended after (nested drains count). */
export async function withUsersDrained<T>(users: BlockUser[], change: () => Promise<T>): Promise<T> {
  if (users.length === 0) return change(); // nobody to wait for: the change starts in the same turn, as it always did
  await Promise.all(users.map((user) => user.drained!.begin()));
  try {
    return await change();
  } finally {
    await Promise.all(users.map((user) => user.drained!.end()));
  }
}
