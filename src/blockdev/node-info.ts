/*
 * query-named-block-nodes' view of a node (BlockDeviceInfo), built as QEMU
 * builds it: the node's own fields, then its ImageInfo and, unless flat, the
 * ImageInfo of each node below it along filter and backing links.
 */
import type { BlockDeviceInfo, ImageInfo } from '../generated/qapi-types.js';
import { genericError } from '../errors.js';
import type { BlockNode } from './node.js';
import { snapshotHolder } from './internal-snapshot.js';

/**
 * The most ImageInfo entries a listing may nest under its nodes' "backing-image". Each node
 * lists its whole chain, so a chain of n images lists about n²/2 of them: a thousand-deep
 * chain would make a reply of hundreds of megabytes, nested deeper than QEMU's own JSON
 * parser accepts (qemu-storage-daemon works on it for minutes, answering nothing else).
 * Past this, the listing is refused; flat=true lists any chain.
 */
export const MAX_LISTED_BACKING_IMAGES = 100_000;

/** The node's filter or backing child: where query output continues down the chain. */
function filterOrBacking(node: BlockNode) {
  return node.backing() ?? (node.driver.kind === 'filter' ? node.primaryChild() : undefined);
}

async function allocatedSize(node: BlockNode): Promise<number | undefined> {
  if (node.state.allocatedSize) return node.state.allocatedSize();
  // QEMU: a filter counts its filtered child only (blklogwrites leaves its log out); others sum their children.
  const filtered = node.driver.kind === 'filter' ? node.primaryChild() : undefined;
  if (filtered) return allocatedSize(filtered.child);
  let total = 0;
  for (const edge of node.children) {
    if (edge.role === 'cow') continue;
    const size = await allocatedSize(edge.child);
    if (size === undefined) return undefined;
    total += size;
  }
  return total;
}

/** Filters and raw answer QEMU's get_info with their child's: cluster size and dirty flag come from below. */
function infoThroughFilters(node: BlockNode): Partial<ImageInfo> {
  const own = (node.state.info().image ?? {}) as Partial<ImageInfo>;
  const child = node.driver.kind === 'filter' || node.driver.name === 'raw' ? node.primaryChild() : undefined;
  if (!child) return own;
  const below = infoThroughFilters(child.child);
  return {
    ...own,
    ...(below['cluster-size'] === undefined ? {} : { 'cluster-size': below['cluster-size'] }),
    ...(below['dirty-flag'] === undefined ? {} : { 'dirty-flag': below['dirty-flag'] }),
  };
}

export async function imageInfo(node: BlockNode): Promise<ImageInfo> {
  const driverInfo = node.state.info();
  const actualSize = await allocatedSize(node);
  return {
    filename: driverInfo.filename,
    format: node.driver.name,
    'virtual-size': node.length(),
    ...(actualSize === undefined ? {} : { 'actual-size': actualSize }),
    ...infoThroughFilters(node),
    ...snapshotsOf(node),
  };
}

/** ImageInfo's snapshots: listed (through filters, as QEMU falls back to their child) when there are any. */
function snapshotsOf(node: BlockNode): Partial<ImageInfo> {
  const snapshots = snapshotHolder(node)?.state.listSnapshots?.() ?? [];
  return snapshots.length ? { snapshots } : {};
}

/** Refuses a non-flat listing of these nodes that would nest more than MAX_LISTED_BACKING_IMAGES image infos. */
export function checkListable(nodes: readonly BlockNode[]): void {
  let listed = 0;
  for (const node of nodes) {
    for (let below = filterOrBacking(node); below; below = filterOrBacking(below.child)) {
      if (++listed > MAX_LISTED_BACKING_IMAGES) {
        throw genericError(`Backing chains too long to list in full (more than ${MAX_LISTED_BACKING_IMAGES} backing images); use flat=true`);
      }
    }
  }
}

/**
 * A node's BlockDeviceInfo. `known` keeps the ImageInfo of each node met during one listing,
 * so that a chain listed under each of its nodes is read once (each use is a copy: it nests differently).
 */
export async function blockDeviceInfo(node: BlockNode, flat: boolean, known = new Map<BlockNode, ImageInfo>()): Promise<BlockDeviceInfo> {
  const infoOf = async (of: BlockNode): Promise<ImageInfo> => {
    let info = known.get(of);
    if (!info) known.set(of, (info = await imageInfo(of)));
    return { ...info };
  };
  const backing = node.backing();
  const image = await infoOf(node);
  let depth = 0;
  if (!flat) {
    let current: ImageInfo = image;
    for (let below = filterOrBacking(node); below; below = filterOrBacking(below.child)) {
      depth++;
      current['backing-image'] = await infoOf(below.child);
      current = current['backing-image'];
    }
  }
  return {
    file: node.state.info().filename,
    'node-name': node.name,
    ro: node.readOnly,
    drv: node.driver.name,
    ...(backing ? { backing_file: backing.child.state.info().filename } : {}),
    ...(node.bitmaps.size > 0 ? { 'dirty-bitmaps': node.bitmaps.list().map((bitmap) => bitmap.info()) } : {}),
    backing_file_depth: depth,
    encrypted: false,
    detect_zeroes: node.settings.detectZeroes,
    bps: 0, bps_rd: 0, bps_wr: 0, iops: 0, iops_rd: 0, iops_wr: 0,
    image,
    cache: { writeback: true, direct: node.settings.cacheDirect, 'no-flush': node.settings.cacheNoFlush },
    write_threshold: node.writeThreshold,
  };
}
