/*
 * blockdev-reopen (QEMU 7.2): a list of nodes, each given its whole new set of
 * options, changed all together or not at all. Options left out take their
 * defaults; the ones a driver cannot change must keep their value ("Cannot
 * change the option '...'"). What can change: read-only (with the children
 * that inherit it), auto-read-only, detect-zeroes, discard, cache.direct and
 * cache.no-flush (passed on to inheriting children; direct is reported only,
 * as at open), the backing link (`null` removes it, a node name sets it), the
 * `file` link (another node's name; an inline definition reopens the file opened
 * with the node), and each driver's runtime options (REOPENABLE_OPTIONS; raw's
 * window and a throttle node's group are the driver's to check and apply).
 * Every check runs before anything changes; a change that still fails (a
 * permission conflict, an image lock) undoes the ones made before it.
 */
import type { BlockdevOptions } from '../generated/qapi-types.js';
import { genericError } from '../errors.js';
import { asQmpError, type BlockLayer } from './block-layer.js';
import type { BlockNode, NodeSettings } from './node.js';
import { nodesBelow } from './graph.js';

/** Options each driver's reopen takes a new value of besides the generic ones (QEMU's reopen_prepare). */
const REOPENABLE_OPTIONS: Record<string, readonly string[]> = {
  qcow2: ['lazy-refcounts', 'pass-discard-request', 'pass-discard-snapshot', 'pass-discard-other', 'overlap-check',
    'cache-size', 'l2-cache-size', 'l2-cache-entry-size', 'refcount-cache-size', 'cache-clean-interval'],
  file: ['drop-cache', 'x-check-cache-dropped'],
  raw: ['offset', 'size'],
  throttle: ['throttle-group'],
};

/** Of those, the ones that may also be left out to go back to their default (QEMU's mutable_opts). */
const RESETTABLE_OPTIONS: Record<string, readonly string[]> = {
  qcow2: REOPENABLE_OPTIONS.qcow2!,
  file: ['x-check-cache-dropped'],
  raw: ['offset', 'size'],
};

/** Generic options that may be left out (bdrv_reset_options_allowed's common options). */
const RESETTABLE_GENERIC = new Set(['node-name', 'discard', 'cache', 'read-only', 'auto-read-only', 'detect-zeroes']);

/** Options every node's reopen handles itself (bdrv_reopen_prepare) before the driver's. */
const GENERIC_OPTIONS = new Set(['driver', 'node-name', 'read-only', 'auto-read-only', 'detect-zeroes', 'discard', 'cache', 'force-share']);

interface ReopenPlan {
  node: BlockNode;
  options: BlockdevOptions;
  readOnly: boolean;
  settings: Pick<NodeSettings, 'autoReadOnly' | 'detectZeroes' | 'discard' | 'cacheDirect' | 'cacheNoFlush'>;
  /** The new backing node (undefined: none), when the link changes. */
  backing?: { to: BlockNode | undefined };
  /** The new file node, when the link changes. */
  file?: { to: BlockNode };
  /** Makes the driver's new options take effect (they passed its checks); returns their undo. */
  driverChange?: () => () => void;
}

type Options = Record<string, unknown>;

const same = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b);

/** Looks every entry's node up first, as QEMU queues them all before preparing any. */
function lookUp(layer: BlockLayer, list: BlockdevOptions[]): BlockNode[] {
  return list.map((options) => {
    const name = options['node-name'];
    if (name === undefined) throw genericError('node-name not specified');
    const node = layer.graph.find(name);
    if (!node) throw genericError(`Failed to find node with node-name='${name}'`);
    return node;
  });
}

/** The checks of bdrv_reopen_prepare for one node, with QEMU's texts; nothing changes yet. */
function plan(layer: BlockLayer, node: BlockNode, options: BlockdevOptions, becomingWritable: Set<BlockNode>, queue: ReopenPlan[], inheritedReadOnly = false): void {
  const next = options as unknown as Options;
  const old = node.options as unknown as Options;
  const readOnly = options['read-only'] ?? inheritedReadOnly;
  const detectZeroes = options['detect-zeroes'] ?? 'off';
  // A node whose parent is a format gets discard=unmap by default (QEMU's inherited flags), a root node "ignore".
  const discard = options.discard ?? (node.parents.some((edge) => 'node' in edge.parent) ? 'unmap' : 'ignore');
  if (detectZeroes === 'unmap' && discard !== 'unmap') {
    throw genericError('setting detect-zeroes to unmap is not allowed without setting discard operation to unmap');
  }
  // Options left out must be ones the driver can reset; QEMU checks that before what changed.
  const childNames = new Set(node.children.map((edge) => edge.name));
  for (const key of Object.keys(old)) {
    if (key in next || RESETTABLE_GENERIC.has(key) || childNames.has(key) || key === 'backing') continue;
    if (!(RESETTABLE_OPTIONS[node.driver.name] ?? []).includes(key)) throw genericError(`Option '${key}' cannot be reset to its default value`);
  }
  if (next.driver !== node.driver.name) throw genericError("Cannot change the option 'driver'");
  if ((options['force-share'] ?? false) !== node.settings.forceShare) throw genericError("Cannot change the option 'force-share'");
  if (readOnly === false && node.settings.forceShare) throw genericError('force-share=on can only be used with read-only images');

  let backing: ReopenPlan['backing'];
  let file: ReopenPlan['file'];
  const children: Array<{ node: BlockNode; options: Options }> = [];
  const mutable = new Set(REOPENABLE_OPTIONS[node.driver.name] ?? []);
  for (const [key, value] of Object.entries(next)) {
    if (GENERIC_OPTIONS.has(key) || mutable.has(key)) continue;
    if (key === 'backing' && node.driver.supportsBacking) {
      backing = backingChange(layer, node, value as string | null);
      continue;
    }
    if (key === 'file' && childNames.has(key)) {
      const current = node.children.find((edge) => edge.name === key)!.child;
      if (typeof value === 'string') file = fileChange(layer, node, current, value);
      else children.push(inlineFile(current, value as Options));
      continue;
    }
    if (childNames.has(key)) {
      const current = node.children.find((edge) => edge.name === key)!.child;
      if (value !== current.name) throw genericError(`blockd cannot replace the '${key}' child of '${node.name}' in a reopen; give its node name '${current.name}'`);
      continue;
    }
    if (same(value, old[key])) continue;
    throw genericError(`Cannot change the option '${key}'`);
  }
  // Children opened with the node take its new mode only when the entry names one (QEMU copies an explicit
  // read-only into them); otherwise they keep theirs, and a writable format cannot sit on a read-only file.
  if (!readOnly && node.readOnly && options['read-only'] === undefined) {
    const stuck = node.children.some((edge) => edge.role !== 'cow' && edge.child.readOnly && !becomingWritable.has(edge.child));
    if (stuck && node.driver.kind === 'format' && node.driver.name !== 'raw') throw genericError('Block node is read-only');
  }
  const driverChange = node.state.prepareReopen?.(next, (id) => layer.opener.findObject(id));
  if (node.driver.supportsBacking && !('backing' in next) && (node.backing() || node.state.autoBackingFile)) {
    throw genericError(`backing is missing for '${node.name}'`);
  }
  queue.push({ node, options, readOnly, backing, file, driverChange, settings: {
    autoReadOnly: options['auto-read-only'] ?? false, detectZeroes, discard,
    cacheDirect: options.cache?.direct ?? false, cacheNoFlush: options.cache?.['no-flush'] ?? false,
  } });
  // The file opened with the node, given inline, is reopened with it and takes its mode unless it names one.
  for (const child of children) plan(layer, child.node, child.options as unknown as BlockdevOptions, becomingWritable, queue, readOnly);
}

/** `file` naming a node (QEMU's bdrv_reopen_parse_file_or_backing): that node becomes the file, unless it is the current one. */
function fileChange(layer: BlockLayer, node: BlockNode, current: BlockNode, name: string): ReopenPlan['file'] {
  const to = layer.graph.find(name);
  if (!to) throw genericError(`Cannot find device='' nor node-name='${name}'`);
  if (nodesBelow(to).has(node)) throw genericError(`Making '${name}' a file child of '${node.name}' would create a cycle`);
  return to === current ? undefined : { to };
}

/**
 * `file` given inline: QEMU reopens the file with those options only when it was opened with the node (a node
 * added on its own keeps its options: its flattened 'file.driver' counts as an unchanged option that changed),
 * and the file keeps its node-name.
 */
function inlineFile(current: BlockNode, value: Options): { node: BlockNode; options: Options } {
  if (current.monitorOwned) throw genericError("Cannot change the option 'file.driver'");
  if (value['node-name'] !== undefined && value['node-name'] !== current.name) throw genericError("Cannot change the option 'node-name'");
  return { node: current, options: { ...value, 'node-name': current.name } };
}

function backingChange(layer: BlockLayer, node: BlockNode, value: string | null): ReopenPlan['backing'] {
  const to = value === null ? undefined : layer.graph.find(value);
  if (value !== null && !to) throw genericError(`Cannot find device='' nor node-name='${value}'`);
  return to === node.backing()?.child ? undefined : { to };
}

/** The cache options a reopen passes on, and the setting each is kept in. */
const CACHE_SETTINGS = [['direct', 'cacheDirect'], ['no-flush', 'cacheNoFlush']] as const;

/** Children that take a cache option given to their parent: those opened with it and without their own. */
function inheritingChildren(node: BlockNode, option: 'direct' | 'no-flush'): BlockNode[] {
  return node.children.map((edge) => edge.child).filter((child) => !child.monitorOwned && child.options.cache?.[option] === undefined);
}

/** One undoable step of the reopen. */
type Undo = () => Promise<void>;

async function apply(layer: BlockLayer, step: ReopenPlan, undo: Undo[]): Promise<void> {
  const { node } = step;
  const { graph } = layer;
  const undoDriver = step.driverChange?.() ?? (() => {});
  const previous = { options: node.options, settings: { ...node.settings } };
  undo.push(async () => {
    node.options = previous.options;
    Object.assign(node.settings, previous.settings);
  });
  Object.assign(node.settings, step.settings);
  // An explicit cache option reaches the children opened with the node (QEMU copies it into their options).
  for (const [option, setting] of CACHE_SETTINGS) {
    if (step.options.cache?.[option] === undefined) continue;
    for (const child of inheritingChildren(node, option)) {
      const had = child.settings[setting];
      child.settings[setting] = step.settings[setting];
      undo.push(async () => void (child.settings[setting] = had));
    }
  }
  if (step.readOnly !== previous.settings.readOnly) {
    if (step.readOnly) {
      await graph.reopenReadOnly(node);
      undo.push(() => graph.reopenReadWrite(node));
    } else {
      await graph.reopenReadWrite(node);
      undo.push(() => graph.reopenReadOnly(node));
    }
  }
  if (step.driverChange) undo.push(async () => void undoDriver());
  if (step.file) {
    const old = node.children.find((edge) => edge.name === 'file')!.child;
    await graph.changeFile(node, step.file.to);
    undo.push(() => graph.changeFile(node, old));
  }
  if (step.backing) {
    const old = node.backing()?.child;
    await graph.changeBacking(node, step.backing.to, { keepOrphan: true });
    undo.push(() => graph.changeBacking(node, old, { keepOrphan: true }));
  }
  // Children keep being named as they were opened (an inline definition stays in the options), unless switched.
  const kept = Object.fromEntries(node.children.filter((edge) => edge.role !== 'cow').map((edge) => [edge.name, edge.child === step.file?.to ? edge.child.name : (previous.options as unknown as Options)[edge.name]]));
  node.options = { ...step.options, ...kept } as BlockdevOptions;
}

export async function blockdevReopen(layer: BlockLayer, list: BlockdevOptions[]): Promise<void> {
  const nodes = lookUp(layer, list);
  const becomingWritable = new Set(nodes.filter((_, i) => list[i]!['read-only'] === false));
  const plans: ReopenPlan[] = [];
  list.forEach((options, i) => plan(layer, nodes[i]!, options, becomingWritable, plans));
  const undo: Undo[] = [];
  const fileOf = (node: BlockNode) => node.children.find((edge) => edge.name === 'file')?.child;
  const orphans = plans.flatMap((step) => [step.backing && step.node.backing()?.child, step.file && fileOf(step.node)]).filter((node): node is BlockNode => node !== undefined);
  try {
    await layer.graph.drainedAll(async () => {
      for (const step of plans) await apply(layer, step, undo);
    });
  } catch (error) {
    for (const step of undo.reverse()) await step().catch((failure: unknown) => layer.graph.log.error({ err: failure }, 'undoing a reopen step failed'));
    throw asQmpError(error);
  }
  // Backing files only the old links used (opened from an image header) go once nothing can undo.
  for (const orphan of orphans) await layer.graph.closeIfOrphan(orphan);
}
