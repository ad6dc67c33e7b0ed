/*
 * The node graph: nodes by name, the edges between them, and permission
 * bookkeeping. Every change of an edge goes through here so permissions are
 * recomputed for the part of the graph below it and checked before anything
 * changes: an attach that would let two users conflict, or whose image locks
 * another process holds, is refused and leaves the graph as it was.
 */
import type { Logger } from 'pino';
import type { EventBus } from '../event-bus.js';
import { genericError } from '../errors.js';
import { ChildEdge, type BlockUser, type EdgeParent } from './child-edge.js';
import type { BlockNode, CorruptionReport, NodeObserver } from './node.js';
import { usersReached, withUsersDrained } from './drain.js';
import { PERM_ALL, PERM_WRITE, PERM_WRITE_UNCHANGED, defaultChildPermissions, permissionConflictMessage, type ChildRole, type PermissionPair } from './permissions.js';

export class BlockGraph implements NodeObserver {
  private readonly nodes = new Map<string, BlockNode>();
  /** Nodes a reopen is making read-only right now: a writer refused on one is told so in QEMU's words. */
  private readonly turningReadOnly = new Set<BlockNode>();

  constructor(readonly log: Logger, private readonly bus: EventBus) {}

  /** Nodes newest first by the time QEMU names them, the order it lists them in. */
  list(): BlockNode[] {
    return [...this.nodes.values()].sort((a, b) => b.sequence - a.sequence);
  }

  find(name: string): BlockNode | undefined {
    return this.nodes.get(name);
  }

  has(name: string): boolean {
    return this.nodes.has(name);
  }

  register(node: BlockNode): void {
    if (this.nodes.has(node.name)) throw genericError(`Duplicate nodes with node-name='${node.name}'`);
    this.nodes.set(node.name, node);
  }

  unregister(node: BlockNode): void {
    if (this.nodes.get(node.name) === node) this.nodes.delete(node.name);
  }

  writeThresholdExceeded(node: BlockNode, amountExceeded: number, threshold: number): void {
    this.bus.emit('BLOCK_WRITE_THRESHOLD', { 'node-name': node.name, 'amount-exceeded': amountExceeded, 'write-threshold': threshold });
  }

  imageCorrupted(node: BlockNode, report: CorruptionReport): void {
    this.bus.emit('BLOCK_IMAGE_CORRUPTED', {
      device: '',
      'node-name': node.name,
      msg: report.message,
      ...(report.offset === undefined ? {} : { offset: report.offset, size: report.size ?? 0 }),
      fatal: report.fatal,
    });
  }

  // ---- drain -----------------------------------------------------------------------------

  /**
   * Runs `change` with every user of every node told of a drain (QEMU's bdrv_drain_all_begin/end:
   * every job pauses). Requests are held only by the drains of the nodes a command changes.
   */
  async drainedAll<T>(change: () => Promise<T>): Promise<T> {
    return withUsersDrained(usersReached(this.nodes.values(), 'node'), change);
  }

  // ---- edges ---------------------------------------------------------------------------

  /** Adds an edge without checking permissions yet (for nodes being opened; refresh follows). */
  linkChild(parent: BlockNode, child: BlockNode, name: string, role: ChildRole): ChildEdge {
    const edge = new ChildEdge({ node: parent }, child, name, role);
    parent.children.push(edge);
    child.parents.unshift(edge);
    return edge;
  }

  unlink(edge: ChildEdge): void {
    if ('node' in edge.parent) {
      const siblings = edge.parent.node.children;
      siblings.splice(siblings.indexOf(edge), 1);
    }
    const parents = edge.child.parents;
    const index = parents.indexOf(edge);
    if (index >= 0) parents.splice(index, 1);
  }

  /** Attaches a non-node user (export, job, command) with the permissions it needs. */
  async attachUser(user: BlockUser, node: BlockNode, name: string, needs: PermissionPair): Promise<ChildEdge> {
    const edge = new ChildEdge({ user } as EdgeParent, node, name, 'filtered');
    node.parents.unshift(edge);
    try {
      await this.refreshPermissions([node], new Map([[edge, needs]]));
    } catch (error) {
      this.unlink(edge);
      throw error;
    }
    return edge;
  }

  /** Changes what a user needs of its node (a job that is done writing keeps only its hold). */
  async updateUser(edge: ChildEdge, needs: PermissionPair): Promise<void> {
    await this.refreshPermissions([edge.child], new Map([[edge, needs]]));
  }

  /** Removes an edge and relaxes the permissions below it. */
  async detach(edge: ChildEdge): Promise<void> {
    this.unlink(edge);
    await this.refreshPermissions([edge.child]).catch((error: unknown) => {
      // Giving up permissions cannot conflict; a failure here is a lock release problem worth logging only.
      this.log.warn({ err: error, node: edge.child.name }, 'releasing permissions failed');
    });
  }

  /**
   * Closes a node that lost its last user: flushes and closes it, then lets go of
   * its children, closing in turn those that nobody else holds and the monitor does not own.
   */
  async close(node: BlockNode): Promise<void> {
    await node.drained(async () => {
      // Called on the driver itself: the node's own entry points are held back while it is drained.
      if (!node.readOnly && !node.settings.cacheNoFlush) {
        await node.state.flush?.().catch((error: unknown) => this.log.warn({ err: error, node: node.name }, 'flush on close failed'));
      }
      await node.state.close();
    });
    this.unregister(node);
    // As a flush of the node would (QEMU's bdrv_close flushes the node): a driver whose flush covers its
    // children chose which (copy-before-write: its source, never the backup's target).
    if (!node.state.flushCoversChildren) {
      for (const edge of node.children) {
        if (edge.perm & (PERM_WRITE | PERM_WRITE_UNCHANGED)) await edge.flush().catch(() => {});
      }
    }
    for (const edge of [...node.children]) {
      await this.detach(edge);
      if (edge.child.parents.length === 0 && !edge.child.monitorOwned) await this.close(edge.child);
    }
  }

  /**
   * Puts `overlay` in `old`'s place: `old` becomes the overlay's backing file and every
   * other parent of `old` now uses the overlay (QEMU's bdrv_append). Checked like any
   * attach; on a conflict the graph is left as it was. Returns what undoes it (a
   * transaction's abort): the parents go back to `old` and the overlay loses its backing.
   */
  async append(overlay: BlockNode, old: BlockNode): Promise<() => Promise<void>> {
    refuseCycle(overlay, old, 'backing');
    return old.drained(async () => {
      // As QEMU's should_update_child: a parent below the overlay keeps `old` (moving it would close a loop).
      const below = nodesBelow(overlay);
      const moved = old.parents.filter((edge) => !('node' in edge.parent && below.has(edge.parent.node)));
      const backing = this.linkChild(overlay, old, 'backing', 'cow');
      for (const edge of moved) {
        old.parents.splice(old.parents.indexOf(edge), 1);
        edge.child = overlay;
        overlay.parents.unshift(edge);
      }
      overlay.state.setBacking?.(backing);
      try {
        await this.refreshPermissions([overlay, old]);
      } catch (error) {
        for (const edge of moved) {
          overlay.parents.splice(overlay.parents.indexOf(edge), 1);
          edge.child = old;
          old.parents.unshift(edge);
        }
        this.unlink(backing);
        overlay.state.setBacking?.(undefined);
        throw error;
      }
      return () => this.unappend(overlay, old, moved, backing);
    });
  }

  /** Undoes an append: the graph before it had its permissions, so going back cannot conflict (a failure is logged). */
  private async unappend(overlay: BlockNode, old: BlockNode, moved: ChildEdge[], backing: ChildEdge): Promise<void> {
    await old.drained(async () => {
      // Newest first, so the parents come back in their order.
      this.moveParents(moved.filter((edge) => edge.child === overlay).reverse(), old);
      this.unlink(backing);
      overlay.state.setBacking?.(undefined);
      await this.refreshPermissions([overlay, old]).catch((error: unknown) => {
        this.log.error({ err: error, node: old.name }, 'undoing a snapshot: permissions did not go back');
      });
    });
  }

  /** Moves the given parent edges of one node onto another (graph changes made by jobs); undone by moving them back. */
  private moveParents(edges: ChildEdge[], to: BlockNode): void {
    for (const edge of edges) {
      const from = edge.child;
      from.parents.splice(from.parents.indexOf(edge), 1);
      edge.child = to;
      to.parents.unshift(edge);
    }
  }

  /**
   * Gives `to` every parent of `from` (QEMU's bdrv_replace_node): a job switching its result
   * in. Jobs' own holds stay where they are, and no edge moves that would make a cycle.
   * On a permission conflict the graph is left as it was.
   */
  async replaceNode(from: BlockNode, to: BlockNode): Promise<void> {
    const below = nodesBelow(to);
    const moved = from.parents.filter((edge) => ('node' in edge.parent ? !below.has(edge.parent.node) : !edge.parent.user.job));
    await from.drained(async () => {
      this.moveParents(moved, to);
      try {
        await this.refreshPermissions([to, from]);
      } catch (error) {
        this.moveParents(moved, from);
        throw error;
      }
    });
  }

  /**
   * Puts `filter` (already opened over `node`) between `node` and its other parents, as
   * QEMU's bdrv_insert_node does; on a permission conflict the graph is left as it was.
   */
  async insertFilter(filter: BlockNode, node: BlockNode): Promise<void> {
    await node.drained(async () => {
      const moved = node.parents.filter((edge) => !('node' in edge.parent && edge.parent.node === filter));
      this.moveParents(moved, filter);
      try {
        await this.refreshPermissions([filter, node]);
      } catch (error) {
        this.moveParents(moved, node);
        throw error;
      }
    });
  }

  /** Takes a filter out again: its parents use its child, and the filter closes. */
  async removeFilter(filter: BlockNode): Promise<void> {
    const below = filter.primaryChild()?.child;
    if (!below) return;
    await filter.drained(async () => {
      this.moveParents(filter.parents.slice(), below);
      // The filter, now without users, keeps its child from no one (QEMU drops its child in the same step); it
      // keeps its own permissions for the requests a drain held in it, which go on through it once the drain ends.
      const released = new Map(filter.children.map((edge) => [edge, { perm: edge.perm, shared: PERM_ALL }] as const));
      await this.refreshPermissions([below], released);
    });
    await this.close(filter);
  }

  /**
   * Points `node`'s backing edge at `backing` (or removes it), QEMU's bdrv_set_backing_hd.
   * Nodes left without users that the monitor does not own are closed, unless `keepOrphan`
   * (a reopen that may still be undone closes them once it is done).
   */
  async changeBacking(node: BlockNode, backing: BlockNode | undefined, { keepOrphan = false }: { keepOrphan?: boolean } = {}): Promise<void> {
    const edge = node.backing();
    const old = edge?.child;
    if (old === backing) return;
    if (backing) refuseCycle(node, backing, 'backing');
    await node.drained(async () => {
      if (edge && backing) {
        this.moveParents([edge], backing);
        node.state.setBacking?.(edge);
      } else if (edge) {
        this.unlink(edge);
        node.state.setBacking?.(undefined);
      } else if (backing) {
        node.state.setBacking?.(this.linkChild(node, backing, 'backing', 'cow'));
      }
      await this.refreshPermissions([node, ...(old ? [old] : [])]);
    });
    if (old && !keepOrphan) await this.closeIfOrphan(old);
  }

  /**
   * Points `node`'s file edge at `to` (a reopen naming another node as `file`). The driver keeps its
   * state: the new file must hold what the old one did. On a permission conflict the graph is left as it was.
   */
  async changeFile(node: BlockNode, to: BlockNode): Promise<void> {
    const edge = node.children.find((child) => child.name === 'file');
    const old = edge?.child;
    if (!edge || !old || old === to) return;
    refuseCycle(node, to, 'file');
    await node.drained(async () => {
      this.moveParents([edge], to);
      try {
        await this.refreshPermissions([node, to, old]);
      } catch (error) {
        this.moveParents([edge], old);
        await this.refreshPermissions([node, old]).catch(() => {});
        throw error;
      }
    });
  }

  /** Closes a node nobody uses any more and the monitor does not own. */
  async closeIfOrphan(node: BlockNode): Promise<void> {
    if (node.parents.length === 0 && !node.monitorOwned && this.find(node.name) === node) await this.close(node);
  }

  /**
   * Makes a read-only node writable (a commit writing into its base), with the children that
   * inherited its mode or may follow it (auto-read-only), lowest first: a format writes through
   * its file. On failure every node changed goes back to read-only.
   */
  async reopenReadWrite(node: BlockNode): Promise<void> {
    const changed: BlockNode[] = [];
    // Children follow unless their own options say read-only (QEMU keeps a child's explicit options on reopen).
    const follows = (child: BlockNode) => child.settings.autoReadOnly || (!child.monitorOwned && child.options['read-only'] === undefined);
    const visit = (current: BlockNode) => {
      if (!current.settings.readOnly || changed.includes(current)) return;
      if (current.settings.forceShare) throw genericError('force-share=on can only be used with read-only images');
      for (const edge of current.children) {
        if (edge.role !== 'cow' && follows(edge.child)) visit(edge.child);
      }
      changed.push(current);
    };
    visit(node);
    checkReopenable(changed);
    // As QEMU's bdrv_reopen: the users of the node and all below it are drained for the whole reopen;
    // each node's requests are held while it changes.
    await node.drained(() => this.reopenWritable(node, changed), { reach: 'subtree', holdRequests: false });
  }

  private async reopenWritable(node: BlockNode, changed: BlockNode[]): Promise<void> {
    const reopened: BlockNode[] = [];
    try {
      for (const current of changed) {
        current.settings.readOnly = false;
        reopened.push(current);
        await current.drained(async () => current.state.reopen?.(true));
      }
      await this.refreshPermissions([node]);
      // Lowest first, so a format writes through a file that already may be written.
      for (const current of changed) await current.drained(async () => current.state.becameWritable?.());
    } catch (error) {
      for (const current of reopened.reverse()) {
        current.settings.readOnly = true;
        await current.drained(async () => current.state.reopen?.(false)).catch(() => {});
      }
      await this.refreshPermissions([node]).catch(() => {});
      throw error;
    }
  }

  /** Makes a node (and the children that inherited its mode) read-only, dropping the write permissions below. */
  async reopenReadOnly(node: BlockNode): Promise<void> {
    const changed: BlockNode[] = [];
    const visit = (current: BlockNode) => {
      if (current.settings.readOnly || changed.includes(current)) return;
      changed.push(current);
      for (const edge of current.children) if (edge.role !== 'cow' && !edge.child.monitorOwned) visit(edge.child);
    };
    visit(node);
    checkReopenable(changed);
    // Drained as reopenReadWrite is.
    await node.drained(() => this.reopenUnwritable(node, changed), { reach: 'subtree', holdRequests: false });
  }

  private async reopenUnwritable(node: BlockNode, changed: BlockNode[]): Promise<void> {
    // Cached metadata (qcow2 tables, persistent bitmaps) must reach the files while they are still writable.
    for (const current of changed) {
      await current.drained(async () => {
        await current.state.prepareReadOnly?.();
        await current.state.flush?.();
      });
    }
    for (const current of changed) current.settings.readOnly = true;
    try {
      for (const current of changed) this.turningReadOnly.add(current);
      await this.refreshPermissions([node]).finally(() => this.turningReadOnly.clear());
    } catch (error) {
      for (const current of changed) current.settings.readOnly = false;
      // What prepareReadOnly wrote back is taken into use again (qcow2 marks its bitmaps in use).
      for (const current of changed) await current.drained(async () => current.state.becameWritable?.()).catch(() => {});
      throw error;
    }
    // Drivers let go of write access (a file reopens its descriptor read-only) once nobody may write.
    for (const current of changed) await current.drained(async () => current.state.reopen?.(false));
  }

  // ---- permissions -----------------------------------------------------------------------

  /**
   * Recomputes the permissions of every edge below `roots`, given explicit values for
   * some edges (users), checks QEMU's rule on every node reached, tells drivers their
   * new needs (image locks) and only then applies the new values.
   */
  async refreshPermissions(roots: BlockNode[], fixed = new Map<ChildEdge, PermissionPair>()): Promise<void> {
    const proposed = new Map<ChildEdge, PermissionPair>(fixed);
    const reached = new Set<BlockNode>(); // in the order first reached
    const queue = [...roots];
    // Compute top-down; a node is (re)visited when one of its parents changed. Graphs are acyclic, but
    // may be long (a backing chain of a thousand images): the guard grows with the graph.
    const limit = 10_000 + 100 * this.nodes.size;
    for (let guard = 0, next = 0; next < queue.length; guard++) {
      if (guard > limit) throw new Error('permission refresh does not converge (cycle in the graph?)');
      const node = queue[next++]!;
      reached.add(node);
      const needs = node.neededPermissions(node.parents, proposed);
      for (const edge of node.children) {
        const computed = node.state?.childPermissions?.(edge, needs) ?? defaultChildPermissions(edge.role, needs, !node.readOnly);
        // A child opened with force-share lets everybody do anything (qemu-img -U).
        const next = edge.child.settings.forceShare ? { perm: computed.perm, shared: PERM_ALL } : computed;
        const current = proposed.get(edge) ?? edge;
        if (!proposed.has(edge) || current.perm !== next.perm || current.shared !== next.shared) {
          proposed.set(edge, next);
          queue.push(edge.child);
        }
      }
    }
    for (const node of reached) checkParents(node, proposed, this.turningReadOnly.has(node));

    // Tell drivers (locks); undo the ones already told if one refuses.
    const told: { node: BlockNode; previous: PermissionPair }[] = [];
    try {
      for (const node of reached) {
        if (!node.state?.setPermissions) continue;
        const previous = node.neededPermissions();
        const needs = node.neededPermissions(node.parents, proposed);
        if (needs.perm === previous.perm && needs.shared === previous.shared) continue;
        await node.state.setPermissions(needs);
        told.push({ node, previous });
      }
    } catch (error) {
      for (const { node, previous } of told.reverse()) await node.state.setPermissions!(previous).catch(() => {});
      throw error;
    }
    for (const [edge, pair] of proposed) {
      edge.perm = pair.perm;
      edge.shared = pair.shared;
    }
  }
}

/** QEMU refuses a reopen when a node it would change has a driver without a reopen handler. */
function checkReopenable(nodes: readonly BlockNode[]): void {
  const stuck = nodes.find((node) => node.driver.reopenable === false);
  if (stuck) throw genericError(`Block format '${stuck.driver.name}' used by node '${stuck.name}' does not support reopening files`);
}

/**
 * QEMU's rules: for every two parents a and b of a node, what b uses must be shared by a;
 * and nobody may write to a read-only node.
 */
function checkParents(node: BlockNode, proposed: Map<ChildEdge, PermissionPair>, turningReadOnly: boolean): void {
  const pairOf = (edge: ChildEdge) => proposed.get(edge) ?? edge;
  for (const a of node.parents) {
    for (const b of node.parents) {
      if (a === b) continue;
      const conflict = pairOf(b).perm & ~pairOf(a).shared & PERM_ALL;
      if (conflict) {
        throw genericError(permissionConflictMessage(node.name, conflict, b.describeParent(), b.name, a.describeParent(), a.name));
      }
    }
  }
  if (node.readOnly && node.neededPermissions(node.parents, proposed).perm & (PERM_WRITE | PERM_WRITE_UNCHANGED)) {
    // QEMU words it by whether the node is read-only already or only about to be (a reopen).
    throw genericError(turningReadOnly ? `Read-only block node '${node.name}' cannot support read-write users` : 'Block node is read-only');
  }
}

/** `top` and every node below it, walked without recursion (a chain may be thousands deep). */
export function nodesBelow(top: BlockNode): Set<BlockNode> {
  const seen = new Set<BlockNode>();
  for (const stack = [top]; stack.length;) {
    const node = stack.pop()!;
    if (seen.has(node)) continue;
    seen.add(node);
    for (const edge of node.children) stack.push(edge.child);
  }
  return seen;
}

/** QEMU's check before an edge is added: `child` must not already reach `parent`. */
function refuseCycle(parent: BlockNode, child: BlockNode, edgeName: string): void {
  if (nodesBelow(child).has(parent)) throw genericError(`Making '${child.name}' a ${edgeName} child of '${parent.name}' would create a cycle`);
}
