/*
 * blockdev-mirror: QEMU's checks in QEMU's order and words
 * (qmp_blockdev_mirror, blockdev_mirror_common, mirror_start_job), then the
 * mirror job. The order was observed on qemu-storage-daemon 7.2 with
 * commands that break two rules at once.
 */
import { checkNotBlocked, type BlockLayer } from '../blockdev/block-layer.js';
import { defaultGranularity } from '../blockdev/bitmaps/bitmap-commands.js';
import { checkNodeName } from '../blockdev/node-names.js';
import type { BlockNode } from '../blockdev/node.js';
import type { CommandTable } from '../command-table.js';
import { genericError } from '../errors.js';
import type { MirrorSyncMode, QmpCommandMap } from '../generated/qapi-types.js';
import { chainBelow, overlayIn, skipFilters } from './backing-chain.js';
import type { JobRegistry } from './job-registry.js';
import { DEFAULT_BUF_SIZE } from './mirror-engine.js';
import { MirrorJob, type MirrorSettings } from './mirror-job.js';
import { isRootNode } from '../blockdev/block-layer.js';

type BlockdevMirrorArguments = QmpCommandMap['blockdev-mirror']['args'];

/** What blockdev-mirror and drive-mirror share after each found its target (QEMU's blockdev_mirror_common). */
export interface MirrorRequest {
  jobId: string | undefined;
  source: BlockNode;
  target: BlockNode;
  replaces: string | undefined;
  sync: MirrorSyncMode;
  granularity: number | undefined;
  bufSize: number | undefined;
  /** The target must be made to read zeroes where the source does (QEMU's zero_target). */
  zeroTarget: boolean;
  args: Pick<BlockdevMirrorArguments, 'speed' | 'on-source-error' | 'on-target-error' | 'filter-node-name' | 'copy-mode' | 'auto-finalize' | 'auto-dismiss'>;
  unmap: boolean;
  beforePivot?: MirrorSettings['beforePivot'];
}

/** qmp_get_root_bs: the device must exist and be a root node. */
export function mirrorSource(layer: BlockLayer, device: string): BlockNode {
  const node = findNode(layer, device);
  if (!isRootNode(node)) throw genericError('Need a root block node');
  return node;
}

function findNode(layer: BlockLayer, name: string): BlockNode {
  const node = layer.graph.find(name);
  if (!node) throw genericError(`Cannot find device='${name}' nor node-name='${name}'`);
  return node;
}

/** The first image below `node` (QEMU's bdrv_backing_chain_next): what sync=top leaves to the target's backing. */
function backingImage(node: BlockNode): BlockNode | undefined {
  const backing = skipFilters(node).backing()?.child;
  return backing ? skipFilters(backing) : undefined;
}

/** Whether the target may take `replaced`'s place when the mirror of `source` completes (QEMU's bdrv_recurse_can_replace). */
function canReplace(source: BlockNode, replaced: BlockNode): boolean {
  for (let node: BlockNode | undefined = source; node; node = node.driver.kind === 'filter' ? node.primaryChild()?.child : undefined) {
    if (node === replaced) return true;
  }
  return false;
}

/** Walks the implicit filters a job put above `node` (QEMU's bdrv_skip_implicit_filters). */
export function skipImplicitFilters(node: BlockNode): BlockNode {
  let current = node;
  while (current.implicit && current.primaryChild()) current = current.primaryChild()!.child;
  return current;
}

export async function startMirror(layer: BlockLayer, jobs: JobRegistry, request: MirrorRequest): Promise<void> {
  const { source, target, args } = request;
  const { granularity, bufSize } = request;
  if (granularity !== undefined && granularity !== 0 && (granularity < 512 || granularity > 64 * 1024 * 1024)) {
    throw genericError("Parameter 'granularity' expects a value in range [512B, 64MB]");
  }
  if (granularity !== undefined && (granularity & (granularity - 1)) !== 0) throw genericError("Parameter 'granularity' expects a power of 2");
  checkNotBlocked(layer.blockers, source, 'mirror-source');
  checkNotBlocked(layer.blockers, target, 'mirror-target');
  let sync = request.sync;
  const base = backingImage(source);
  if (sync === 'top' && !base) sync = 'full';

  let replacesName = request.replaces;
  if (replacesName === undefined) {
    // Mirror from the device, but leave the implicit filters above it in place.
    const unfiltered = skipImplicitFilters(source);
    if (unfiltered !== source) replacesName = unfiltered.name;
  }
  let replaces: BlockNode | undefined;
  if (replacesName !== undefined) {
    replaces = layer.graph.find(replacesName);
    if (!replaces) throw genericError(`Failed to find node with node-name='${replacesName}'`);
    checkNotBlocked(layer.blockers, replaces, 'replace');
    if (!canReplace(source, replaces)) {
      throw genericError(`Cannot replace '${replacesName}' by a node mirrored from '${source.name}', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data`);
    }
    if (source.length() !== replaces.length()) throw genericError('cannot replace image with a mirror image of different size');
  }

  if (sync === 'incremental' || sync === 'bitmap') throw genericError(`Sync mode '${sync}' not supported`);
  if (bufSize !== undefined && bufSize < 0) throw genericError("Invalid parameter 'buf-size'");
  // Filters read what the node below them reads: mirroring through them is mirroring into itself.
  if (skipFilters(source) === skipFilters(target)) throw genericError("Can't mirror node into itself");
  const filterNodeName = args['filter-node-name'];
  if (filterNodeName !== undefined) {
    checkNodeName(filterNodeName);
    if (layer.graph.has(filterNodeName)) throw genericError(`Duplicate nodes with node-name='${filterNodeName}'`);
  }

  const kind = new MirrorJob(layer, {
    source,
    target,
    replaces,
    copyDownTo: sync === 'none' ? undefined : sync === 'top' ? overlayIn(source, base!) ?? source : [source, ...chainBelow(source)].at(-1)!,
    zeroTarget: request.zeroTarget && sync === 'full',
    unmap: request.unmap,
    granularity: granularity || defaultGranularity(target),
    bufSize: bufSize || DEFAULT_BUF_SIZE,
    onSourceError: args['on-source-error'] ?? 'report',
    onTargetError: args['on-target-error'] ?? 'report',
    copyMode: args['copy-mode'] ?? 'background',
    filterNodeName,
    beforePivot: request.beforePivot,
  });
  const options = { id: request.jobId ?? '', autoFinalize: args['auto-finalize'] ?? true, autoDismiss: args['auto-dismiss'] ?? true, speed: args.speed ?? 0 };
  await jobs.launch(kind, options, (job) => kind.setUp(job), (job) => kind.undo(job));
}

export function registerMirrorCommands(registry: CommandTable, layer: BlockLayer, jobs: JobRegistry): void {
  registry.register('blockdev-mirror', async (args: BlockdevMirrorArguments) => {
    const source = mirrorSource(layer, args.device);
    const target = findNode(layer, args.target);
    await startMirror(layer, jobs, {
      jobId: args['job-id'],
      source,
      target,
      replaces: args.replaces,
      sync: args.sync,
      granularity: args.granularity,
      bufSize: args['buf-size'],
      // blockdev-mirror leaves the target as the user opened it: a full sync must zero it where the source reads zeroes.
      zeroTarget: true,
      unmap: true,
      args,
    });
  });
}
