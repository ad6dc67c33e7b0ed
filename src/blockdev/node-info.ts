/*
 * query-named-block-nodes' view of a node (BlockDeviceInfo), built as QEMU
 * builds it: the node's own fields, then its ImageInfo and, unless flat, the
 * ImageInfo of each node below it along filter and backing links.
 */
import type { BlockDeviceInfo, ImageInfo } from '../generated/qapi-types.js';
import type { BlockNode } from './node.js';

/** The node's filter or backing child: where query output continues down the chain. */
function filterOrBacking(node: BlockNode) {
  return node.backing() ?? (node.driver.kind === 'filter' ? node.primaryChild() : undefined);
}

async function allocatedSize(node: BlockNode): Promise<number> {
  if (node.state.allocatedSize) return node.state.allocatedSize();
  let total = 0;
  for (const edge of node.children) if (edge.role !== 'cow') total += await allocatedSize(edge.child);
  return total;
}

export async function imageInfo(node: BlockNode): Promise<ImageInfo> {
  const driverInfo = node.state.info();
  return {
    filename: driverInfo.filename,
    format: node.driver.name,
    'virtual-size': node.length(),
    'actual-size': await allocatedSize(node),
    ...(driverInfo.image as Partial<ImageInfo>),
  };
}

export async function blockDeviceInfo(node: BlockNode, flat: boolean): Promise<BlockDeviceInfo> {
  const backing = node.backing();
  const image = await imageInfo(node);
  let depth = 0;
  if (!flat) {
    let current: ImageInfo = image;
    for (let below = filterOrBacking(node); below; below = filterOrBacking(below.child)) {
      depth++;
      current['backing-image'] = await imageInfo(below.child);
      current = current['backing-image'];
    }
  }
  return {
    file: node.state.info().filename,
    'node-name': node.name,
    ro: node.readOnly,
    drv: node.driver.name,
    ...(backing ? { backing_file: backing.child.state.info().filename } : {}),
    backing_file_depth: depth,
    encrypted: false,
    detect_zeroes: node.settings.detectZeroes,
    bps: 0, bps_rd: 0, bps_wr: 0, iops: 0, iops_rd: 0, iops_wr: 0,
    image,
    cache: { writeback: true, direct: node.settings.cacheDirect, 'no-flush': node.settings.cacheNoFlush },
    write_threshold: node.writeThreshold,
  };
}
