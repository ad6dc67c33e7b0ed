/*
 * blockd-img map: where each range of the disk comes from, layer by layer down the backing
 * chain, merged and printed exactly as qemu-img map prints it (get_block_status,
 * entry_mergeable and dump_map_entry in qemu-img.c), as JSON lines or the human table.
 */
import { detectMetadataPreallocation } from '../blockdev/drivers/qcow2/consistency-check.js';
import type { BlockNode, NodeExtent } from '../blockdev/node.js';
import { FORCE_SHARE_OPTION, FORMAT_OPTION, ImgError, OUTPUT_OPTION, getopt, hasOption, lastOption, outputFormat, sizeOperand, usageError } from './img-args.js';
import { hexColumn } from './img-format.js';
import { withImage } from './img-open.js';
import { StatusWindow } from './img-status.js';

/** One entry of `map --output=json`, as qemu-img prints it. */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  filename?: string;
}

/** Per qcow2 node: whether QEMU would take it for metadata-preallocated (see detectMetadataPreallocation). */
type PreallocationCache = Map<BlockNode, Promise<boolean>>;

function preallocated(node: BlockNode, cache: PreallocationCache): Promise<boolean> {
  const detect = async (): Promise<boolean> => {
    const file = node.primaryChild();
    if (node.driver.name !== 'qcow2' || !file) return false;
    return detectMetadataPreallocation(file, (await file.child.state.allocatedSize?.()) ?? 0);
  };
  if (!cache.has(node)) cache.set(node, detect());
  return cache.get(node)!;
}

/**
 * bdrv_co_block_status's BDRV_BLOCK_RECURSE step: in a preallocated image, a data range reads
 * as zeros where its host file does (a hole, or past the end), and ends where the file's answer does.
 */
async function refineFromFile(extent: NodeExtent): Promise<NodeExtent> {
  const host = extent.host!;
  const fileLength = host.node.length();
  if (host.offset >= fileLength) return { ...extent, zero: true };
  const file = await host.node.blockStatus(host.offset, Math.min(extent.length, fileLength - host.offset));
  if (host.offset + file.length === fileLength && file.zero) return { ...extent, zero: true };
  return { ...extent, length: file.length, zero: file.zero };
}

/**
 * qemu-img's get_block_status: asks each layer for its own status (bdrv_block_status, which
 * reports an unallocated range as zero when no backing file shows through) and stops at
 * the first that has data or zeros there.
 */
async function blockStatus(top: BlockNode, start: number, bytes: number, cache: PreallocationCache): Promise<MapEntry> {
  let depth = 0;
  for (let node = top; ; depth++) {
    let extent = await node.blockStatus(start, Math.min(bytes, node.length() - start));
    if (extent.data && !extent.zero && extent.host && (await preallocated(node, cache))) extent = await refineFromFile(extent);
    bytes = extent.length;
    const backing = node.backing();
    const zero = extent.zero || (!extent.allocated && !extent.data && (!backing || start >= backing.child.length()));
    if (zero || extent.data) {
      return {
        start, length: bytes, depth, present: extent.allocated, zero, data: extent.data,
        ...(extent.host ? { offset: extent.host.offset, filename: extent.host.node.state.info().filename } : {}),
      };
    }
    if (!backing) return { start, length: bytes, depth, present: false, zero: false, data: false };
    node = backing.child;
  }
}

function mergeable(current: MapEntry, next: MapEntry): boolean {
  if (current.length === 0) return false;
  if (current.zero !== next.zero || current.data !== next.data || current.depth !== next.depth || current.present !== next.present) return false;
  if (current.filename !== next.filename || (current.offset === undefined) !== (next.offset === undefined)) return false;
  return current.offset === undefined || current.offset + current.length === next.offset;
}

function jsonEntry(entry: MapEntry, last: boolean): string {
  const flag = (value: boolean) => (value ? 'true' : 'false');
  return `{ "start": ${entry.start}, "length": ${entry.length}, "depth": ${entry.depth}, "present": ${flag(entry.present)}, `
    + `"zero": ${flag(entry.zero)}, "data": ${flag(entry.data)}${entry.offset === undefined ? '' : `, "offset": ${entry.offset}`}}${last ? '' : ',\n'}`;
}

/** The human table shows data extents only; it folds zero and hole together to merge more. */
function humanEntry(entry: MapEntry, next: MapEntry | undefined): string {
  if (entry.data && entry.offset === undefined) throw new ImgError('File contains external, encrypted or compressed clusters.');
  const line = entry.data && !entry.zero ? `${hexColumn(entry.start)}${hexColumn(entry.length)}${hexColumn(entry.offset ?? 0)}${entry.filename ?? ''}\n` : '';
  if (next && (!next.data || next.zero)) Object.assign(next, { data: false, zero: true });
  return line;
}

/** The merged map of [start, end) of a node's chain, entry by entry, as qemu-img map lists it. */
export async function* mapEntries(node: BlockNode, start: number, end: number): AsyncGenerator<MapEntry> {
  const cache: PreallocationCache = new Map();
  const window = new StatusWindow();
  let current: MapEntry = { start, length: 0, depth: 0, present: false, zero: false, data: false };
  while (current.start + current.length < end) {
    const offset = current.start + current.length;
    const requested = window.request(end - offset);
    const next = await blockStatus(node, offset, requested, cache);
    window.answered(next.length, requested);
    if (mergeable(current, next)) {
      current.length += next.length;
      continue;
    }
    if (current.length > 0) yield current;
    current = next;
  }
  if (current.length > 0) yield current;
}

export async function mapCommand(argv: string[]): Promise<number> {
  const args = getopt(argv, [
    FORMAT_OPTION, OUTPUT_OPTION, FORCE_SHARE_OPTION,
    { key: 's', short: 's', long: 'start-offset', takesValue: true },
    { key: 'l', short: 'l', long: 'max-length', takesValue: true },
  ]);
  const [startText, maxText] = [lastOption(args, 's'), lastOption(args, 'l')];
  const start = startText === undefined ? 0 : sizeOperand('start offset', startText);
  const maxLength = maxText === undefined ? undefined : sizeOperand('max length', maxText);
  if (args.operands.length !== 1) throw usageError('Expecting one image file name');
  const output = outputFormat(args);
  const filename = args.operands[0]!;
  const write = (text: string) => process.stdout.write(text);
  return withImage(filename, { format: lastOption(args, 'f'), forceShare: hasOption(args, 'U') }, async (session) => {
    write(output === 'json' ? '[' : `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`);
    let length = session.node.length();
    if (maxLength !== undefined) length = Math.min(start + maxLength, length);
    let previous: MapEntry | undefined;
    for await (const entry of mapEntries(session.node, start, length)) {
      if (previous) write(output === 'json' ? jsonEntry(previous, false) : humanEntry(previous, entry));
      previous = entry;
    }
    const current = previous ?? { start, length: 0, depth: 0, present: false, zero: false, data: false };
    write(output === 'json' ? jsonEntry(current, true) : humanEntry(current, undefined));
    if (output === 'json') write(']\n');
    return 0;
  });
}
