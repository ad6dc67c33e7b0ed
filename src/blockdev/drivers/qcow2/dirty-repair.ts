/*
 * The repair QEMU makes when it opens a qcow2 image with the dirty bit set
 * read-write: an image written with lazy refcounts whose writer did not close
 * it has stale refcounts. The reference of every host cluster is counted from
 * the metadata (the consistency check's count), a new refcount table and
 * blocks holding those counts are written past the end of the file, and one
 * header write switches to them and clears the dirty bit. The old refcount
 * structures become free space. A crash at any point leaves either the old,
 * still-dirty image (repaired again on the next open) or the repaired one.
 */
import type { ChildEdge } from '../../child-edge.js';
import { genericError } from '../../../errors.js';
import { IncompatibleFeature, REFCOUNT_TABLE_ENTRY_SIZE, REFT_OFFSET_MASK } from './format-constants.js';
import { serializeHeader, type Qcow2Header } from './header.js';
import { countReferences } from './consistency-check.js';
import { refcountBitsFromOrder, refcountBlockEntries, setRefcount } from './refcount-block.js';
import { encodeRefcountTableEntry } from './table-entries.js';

const REPAIR_FAILED = 'Could not repair dirty image';

/** Rebuilds the refcounts of a dirty image and clears its dirty bit; `header` is updated to match. */
export async function repairDirtyImage(file: ChildEdge, header: Qcow2Header): Promise<void> {
  const clusterSize = 2 ** header.clusterBits;
  const { result, references } = await countReferences(file);
  if (result.checkErrors || result.failure) throw genericError(`${REPAIR_FAILED}: ${result.failure ?? 'the metadata could not be read'}`);
  const counts = Array.from(references);
  // The old refcount table and blocks are not carried over: the new structure replaces them.
  const forget = (offset: number, length: number) => {
    for (let c = Math.floor(offset / clusterSize); c * clusterSize < offset + length; c++) if (counts[c]) counts[c]!--;
  };
  const oldTable = Buffer.alloc(header.refcountTableClusters * clusterSize);
  await file.read(header.refcountTableOffset, oldTable);
  forget(header.refcountTableOffset, oldTable.length);
  for (let i = 0; i < oldTable.length; i += REFCOUNT_TABLE_ENTRY_SIZE) {
    const offset = Number(oldTable.readBigUInt64BE(i) & REFT_OFFSET_MASK);
    if (offset && offset % clusterSize === 0) forget(offset, clusterSize);
  }

  const layout = planLayout(counts, Math.max(Math.ceil(file.length() / clusterSize), counts.length), header);
  for (let c = layout.start; c < layout.end; c++) counts[c] = 1;
  const bits = refcountBitsFromOrder(header.refcountOrder);
  const perBlock = refcountBlockEntries(header.clusterBits, bits);
  const table = Buffer.alloc(layout.tableClusters * clusterSize);
  for (const [i, blockIndex] of layout.blocks.entries()) {
    const block = Buffer.alloc(clusterSize);
    for (let entry = 0; entry < perBlock; entry++) {
      const count = counts[blockIndex * perBlock + entry];
      if (count) setRefcount(block, entry, bits, count);
    }
    const offset = (layout.start + i) * clusterSize;
    await file.write(offset, block);
    table.writeBigUInt64BE(encodeRefcountTableEntry(offset), blockIndex * REFCOUNT_TABLE_ENTRY_SIZE);
  }
  const tableOffset = (layout.start + layout.blocks.length) * clusterSize;
  await file.write(tableOffset, table);
  await file.flush();

  header.refcountTableOffset = tableOffset;
  header.refcountTableClusters = layout.tableClusters;
  header.incompatibleFeatures &= ~IncompatibleFeature.DIRTY;
  await file.write(0, serializeHeader(header));
  await file.flush();

  const after = await countReferences(file);
  if (after.result.corruptions || after.result.checkErrors) {
    throw genericError(`${REPAIR_FAILED}: ${after.result.corruptions + after.result.checkErrors} errors remain; run 'qemu-img check -r all' on it`);
  }
}

interface Layout {
  /** First cluster of the new structures: the blocks, then the table. */
  start: number;
  end: number;
  /** The refcount table index of each new block, in the order they are written. */
  blocks: number[];
  tableClusters: number;
}

/**
 * Where the new structures go and which blocks they need: a block for every range that
 * holds a referenced cluster, the new structures included (they count themselves).
 */
function planLayout(counts: number[], start: number, header: Qcow2Header): Layout {
  const clusterSize = 2 ** header.clusterBits;
  const perBlock = refcountBlockEntries(header.clusterBits, refcountBitsFromOrder(header.refcountOrder));
  const used = new Set<number>();
  counts.forEach((count, cluster) => count && used.add(Math.floor(cluster / perBlock)));
  let blocks = 0;
  let tableClusters = 0;
  for (;;) {
    const end = start + blocks + tableClusters;
    const needed = new Set(used);
    for (let index = Math.floor(start / perBlock); index * perBlock < end; index++) needed.add(index);
    const highest = Math.max(0, ...needed);
    const nextTable = Math.max(1, Math.ceil(((highest + 1) * REFCOUNT_TABLE_ENTRY_SIZE) / clusterSize));
    if (needed.size === blocks && nextTable === tableClusters) {
      return { start, end, blocks: [...needed].sort((a, b) => a - b), tableClusters };
    }
    blocks = needed.size;
    tableClusters = nextTable;
  }
}
