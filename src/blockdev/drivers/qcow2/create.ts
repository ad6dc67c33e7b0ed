/*
 * Creates a qcow2 image laid out byte for byte as QEMU 7.2's qcow2_co_create leaves it:
 * header at cluster 0, refcount table at cluster 1, refcount block at cluster 2, the L1
 * table next, the file ending right after the L1 entries (or after a later refcount block);
 * with metadata preallocation, L2 tables and data clusters follow, range by range.
 */
import type { FileHandle } from 'node:fs/promises';
import type { ChildEdge } from '../../child-edge.js';
import { createImageFile } from '../../image-file-creation.js';
import { describeErrno } from '../../io-error.js';
import { genericError } from '../../../errors.js';
import {
  CompatibleFeature, CompressionType, IncompatibleFeature, L1_ENTRY_SIZE, L2_ENTRY_SIZE, MAX_CLUSTER_BITS, MAX_L1_TABLE_BYTES,
  MAX_REFCOUNT_TABLE_BYTES, MIN_CLUSTER_BITS, OFLAG_COPIED, Qcow2FormatError, REFCOUNT_TABLE_ENTRY_SIZE, SUBCLUSTERS_PER_CLUSTER,
} from './format-constants.js';
import { serializeHeader, type Qcow2Header } from './header.js';
import { getRefcount, refcountBlockEntries, setRefcount, type RefcountBits } from './refcount-block.js';
import { encodeRefcountTableEntry } from './table-entries.js';

export interface Qcow2CreateOptions {
  /** Virtual size in bytes; a multiple of 512 (qemu-img rounds up before calling). */
  size: number;
  clusterSize?: number;
  refcountBits?: number;
  version?: 2 | 3;
  lazyRefcounts?: boolean;
  extendedL2?: boolean;
  compressionType?: 'zlib' | 'zstd';
  backingFile?: string;
  backingFormat?: string;
  /** metadata: every cluster allocated (L2 tables written, data clusters left as holes), as qemu-img -o preallocation=metadata. */
  preallocation?: 'off' | 'metadata';
}

/** The size needs an L1 table larger than QEMU allows (qemu-img says "image size is too large"). */
export class ImageTooLargeError extends Qcow2FormatError {
  override name = 'ImageTooLargeError';
}

const SECTOR = 512;

function fail(message: string): never {
  throw new Qcow2FormatError(message);
}

/** blockdev-create's checks for qcow2, in QEMU's order and with its texts. */
function validate(options: Qcow2CreateOptions): Required<Omit<Qcow2CreateOptions, 'backingFile' | 'backingFormat' | 'preallocation'>> {
  const { size } = options;
  if (!Number.isSafeInteger(size) || size < 0) fail(`Invalid image size ${size}`);
  if (size % SECTOR !== 0) fail(`Image size must be a multiple of ${SECTOR} bytes`);
  const version = options.version ?? 3;
  const clusterSize = options.clusterSize ?? 65536;
  const extendedL2 = options.extendedL2 ?? false;
  if (extendedL2 && version < 3) {
    fail('Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    fail(`Cluster size must be a power of two between ${1 << MIN_CLUSTER_BITS} and ${1 << (MAX_CLUSTER_BITS - 10)}k`);
  }
  const minExtendedClusterSize = (1 << MIN_CLUSTER_BITS) * SUBCLUSTERS_PER_CLUSTER;
  if (extendedL2 && clusterSize < minExtendedClusterSize) {
    fail(`Extended L2 entries are only supported with cluster sizes of at least ${minExtendedClusterSize} bytes`);
  }
  if (options.backingFormat !== undefined && options.backingFile === undefined) {
    fail('Backing format cannot be used without backing file');
  }
  const lazyRefcounts = options.lazyRefcounts ?? false;
  if (version < 3 && lazyRefcounts) {
    fail('Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  const refcountBits = options.refcountBits ?? 16;
  if (!Number.isInteger(refcountBits) || refcountBits < 1 || refcountBits > 64 || (refcountBits & (refcountBits - 1)) !== 0) {
    fail('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version < 3 && refcountBits !== 16) {
    fail('Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)');
  }
  if (options.preallocation === 'metadata' && extendedL2) fail('Metadata preallocation of images with extended L2 entries is not supported by blockd');
  const compressionType = options.compressionType ?? 'zlib';
  if (compressionType !== 'zlib' && version < 3) {
    fail('Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  return { size, clusterSize, refcountBits, version, lazyRefcounts, extendedL2, compressionType };
}

/**
 * The file being built, with QEMU's cluster allocator replayed on it. The layout of a
 * new image is whatever that allocator produces (its -EAGAIN restarts when a refcount
 * block has to be placed included), so it is modelled rather than computed.
 */
class ImageBuilder {
  table: number[];
  tableOffset: number;
  tableClusters = 1;
  /** Refcount tables replaced by a larger one: their clusters keep the old contents. */
  private readonly retired: [number, Buffer][] = [];
  private readonly blocks = new Map<number, Buffer>();
  private readonly entriesPerBlock: number;
  private freeIndex = 0;

  constructor(private readonly clusterSize: number, clusterBits: number, private readonly bits: RefcountBits) {
    this.entriesPerBlock = refcountBlockEntries(clusterBits, bits);
    this.table = new Array<number>(clusterSize / REFCOUNT_TABLE_ENTRY_SIZE).fill(0);
    this.tableOffset = clusterSize;
    // qcow2_co_create starts with a one-cluster table whose entry 0 names an empty block at cluster 2.
    this.table[0] = 2 * clusterSize;
    this.blocks.set(2 * clusterSize, Buffer.alloc(clusterSize));
  }

  private refcount(cluster: number): number {
    const offset = this.table[Math.floor(cluster / this.entriesPerBlock)] ?? 0;
    const block = offset ? this.blocks.get(offset) : undefined;
    return block ? getRefcount(block, cluster % this.entriesPerBlock, this.bits) : 0;
  }

  /** alloc_clusters_noref: the next run of clusters with refcount 0, from the free index on. */
  private findFree(count: number): number {
    for (let found = 0; found < count;) found = this.refcount(this.freeIndex++) === 0 ? found + 1 : 0;
    return this.freeIndex - count;
  }

  /** update_refcount: 'again' when a refcount block was placed and the caller must search anew. */
  private update(first: number, count: number, delta: 1 | -1): 'ok' | 'again' {
    let tableIndex = -1;
    for (let cluster = first; cluster < first + count; cluster++) {
      if (Math.floor(cluster / this.entriesPerBlock) !== tableIndex) {
        tableIndex = Math.floor(cluster / this.entriesPerBlock);
        if (this.ensureBlock(cluster) === 'again') {
          this.freeIndex = Math.min(this.freeIndex, first);
          this.update(first, cluster - first, -delta as 1 | -1); // undo what this call did
          return 'again';
        }
      }
      const block = this.blocks.get(this.table[tableIndex]!)!;
      const value = getRefcount(block, cluster % this.entriesPerBlock, this.bits) + delta;
      setRefcount(block, cluster % this.entriesPerBlock, this.bits, value);
      if (value === 0) this.freeIndex = Math.min(this.freeIndex, cluster);
    }
    return 'ok';
  }

  /** alloc_refcount_block: a missing block goes to the first free cluster and is hooked into the table. */
  private ensureBlock(cluster: number): 'ok' | 'again' {
    const tableIndex = Math.floor(cluster / this.entriesPerBlock);
    if (tableIndex < this.table.length && this.table[tableIndex]) return 'ok';
    const blockCluster = this.findFree(1);
    const block = Buffer.alloc(this.clusterSize);
    if (Math.floor(blockCluster / this.entriesPerBlock) === tableIndex) {
      setRefcount(block, blockCluster % this.entriesPerBlock, this.bits, 1); // it describes itself
    } else if (this.update(blockCluster, 1, 1) === 'again') {
      return 'again';
    }
    this.blocks.set(blockCluster * this.clusterSize, block);
    if (tableIndex < this.table.length) {
      this.table[tableIndex] = blockCluster * this.clusterSize;
    } else {
      const blocksUsed = Math.ceil((Math.max(cluster, blockCluster) + 1) / this.entriesPerBlock);
      this.growTable(blocksUsed * this.entriesPerBlock * this.clusterSize, tableIndex, blockCluster * this.clusterSize);
    }
    return 'again';
  }

  /**
   * qcow2_refcount_area: a larger table (50 % spare) plus the blocks that cover it, all
   * placed from `start` on, the end of everything used; then the old table is freed.
   */
  private growTable(start: number, newIndex: number, newBlockOffset: number): void {
    const perTableCluster = this.clusterSize / REFCOUNT_TABLE_ENTRY_SIZE;
    const totalBlocks = refcountBlocksNeeded(start / this.clusterSize, perTableCluster, this.entriesPerBlock);
    const size = Math.ceil((totalBlocks + Math.ceil(totalBlocks / 2)) / perTableCluster) * perTableCluster;
    if (size * REFCOUNT_TABLE_ENTRY_SIZE > MAX_REFCOUNT_TABLE_BYTES) throw new ImageTooLargeError('Refcount table too large');
    const table = [...this.table.slice(0, size), ...new Array<number>(Math.max(0, size - this.table.length)).fill(0)];
    table[newIndex] = newBlockOffset;
    const areaIndex = Math.floor(start / this.clusterSize / this.entriesPerBlock);
    const missing = table.slice(areaIndex, totalBlocks).filter((offset) => !offset).length;
    const tableOffset = start + missing * this.clusterSize;
    const end = tableOffset + size * REFCOUNT_TABLE_ENTRY_SIZE;
    let blockOffset = start;
    for (let i = areaIndex; i < totalBlocks; i++) {
      if (!table[i]) {
        this.blocks.set(blockOffset, Buffer.alloc(this.clusterSize));
        table[i] = blockOffset;
        blockOffset += this.clusterSize;
      }
      const covered = i * this.entriesPerBlock * this.clusterSize;
      const block = this.blocks.get(table[i]!)!;
      const last = Math.min((end - covered) / this.clusterSize, this.entriesPerBlock);
      for (let j = Math.max(0, (start - covered) / this.clusterSize); j < last; j++) setRefcount(block, j, this.bits, 1);
    }
    this.retired.push([this.tableOffset, this.serializeTable()]);
    const old = { first: this.tableOffset / this.clusterSize, count: this.tableClusters };
    Object.assign(this, { table, tableOffset, tableClusters: size / perTableCluster });
    this.update(old.first, old.count, -1);
  }

  private serializeTable(): Buffer {
    const bytes = Buffer.alloc(this.table.length * REFCOUNT_TABLE_ENTRY_SIZE);
    this.table.forEach((offset, i) => bytes.writeBigUInt64BE(offset ? encodeRefcountTableEntry(offset) : 0n, i * REFCOUNT_TABLE_ENTRY_SIZE));
    return bytes;
  }

  /** qcow2_alloc_clusters: retried until no refcount block had to be placed meanwhile. */
  allocate(bytes: number): number {
    const count = Math.ceil(bytes / this.clusterSize);
    for (;;) {
      const first = this.findFree(count);
      if (this.update(first, count, 1) === 'ok') return first * this.clusterSize;
    }
  }

  /** Every write the creation made. */
  contents(header: Buffer, tables: [number, Buffer][]): [number, Buffer][] {
    const parts: [number, Buffer][] = [[0, header], ...this.retired, [this.tableOffset, this.serializeTable()]];
    for (const [offset, block] of this.blocks) parts.push([offset, block]);
    return [...parts, ...tables.filter(([, bytes]) => bytes.length > 0)];
  }
}

/** qcow2_refcount_metadata_size with a generous increase: refcount blocks covering `clusters` and themselves. */
function refcountBlocksNeeded(clusters: number, blocksPerTableCluster: number, refcountsPerBlock: number): number {
  let table = 0;
  let blocks = 0;
  let generous = true;
  for (let n = 0, last = -1; n !== last;) {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / refcountsPerBlock);
    table = Math.ceil(blocks / blocksPerTableCluster);
    n = clusters + blocks + table;
    if (n === last && generous) {
      clusters += Math.ceil(table / 2);
      n = 0;
      generous = false;
    }
  }
  return blocks;
}

/** The header QEMU ends up with: qcow2_update_header's layout with the final field values. */
function buildHeader(options: ReturnType<typeof validate>, tables: Pick<Qcow2Header, 'l1Size' | 'l1TableOffset' |
  'refcountTableOffset' | 'refcountTableClusters'>, extra: Qcow2CreateOptions): Qcow2Header {
  const zstd = options.compressionType === 'zstd';
  return {
    version: options.version,
    clusterBits: Math.log2(options.clusterSize),
    size: options.size,
    cryptMethod: 0,
    ...tables,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: (zstd ? IncompatibleFeature.COMPRESSION_TYPE : 0n) | (options.extendedL2 ? IncompatibleFeature.EXTENDED_L2 : 0n),
    compatibleFeatures: options.lazyRefcounts ? CompatibleFeature.LAZY_REFCOUNTS : 0n,
    autoclearFeatures: 0n,
    refcountOrder: Math.log2(options.refcountBits),
    compressionType: zstd ? CompressionType.ZSTD : CompressionType.ZLIB,
    headerLength: 0,
    backingFileOffset: 0,
    backingFileSize: 0,
    unknownHeaderFields: Buffer.alloc(0),
    backingFile: extra.backingFile,
    backingFormat: extra.backingFile === undefined ? undefined : extra.backingFormat,
    featureNames: [],
    bitmapsExtensionIgnored: false,
    unknownExtensions: [],
  };
}

/**
 * QEMU's preallocate_co for metadata: for each L2 range in turn an L2 table is allocated,
 * then the range's data clusters as one run (left unwritten: holes read as zeros), and
 * every entry points at its cluster. Returns the L2 tables and where the last run ends.
 */
function preallocateMetadata(builder: ImageBuilder, size: number, clusterSize: number, l1: Buffer): { tables: [number, Buffer][]; end: number } {
  const entriesPerTable = clusterSize / L2_ENTRY_SIZE;
  const clusters = Math.ceil(size / clusterSize);
  const tables: [number, Buffer][] = [];
  let end = 0;
  for (let cluster = 0; cluster < clusters;) {
    const table = Buffer.alloc(clusterSize);
    const tableOffset = builder.allocate(clusterSize);
    l1.writeBigUInt64BE(BigInt(tableOffset) | OFLAG_COPIED, Math.floor(cluster / entriesPerTable) * L1_ENTRY_SIZE);
    const first = cluster % entriesPerTable;
    const count = Math.min(entriesPerTable - first, clusters - cluster);
    const data = builder.allocate(count * clusterSize);
    for (let i = 0; i < count; i++) table.writeBigUInt64BE(BigInt(data + i * clusterSize) | OFLAG_COPIED, (first + i) * L2_ENTRY_SIZE);
    tables.push([tableOffset, table]);
    end = data + count * clusterSize;
    cluster += count;
  }
  return { tables, end };
}

/** The image as (offset, bytes) writes, and the file's length (past the last write when data clusters are preallocated). */
export function layoutQcow2(options: Qcow2CreateOptions): { parts: [number, Buffer][]; length: number } {
  const checked = validate(options);
  const { clusterSize } = checked;
  const clusterBits = Math.log2(clusterSize);
  const builder = new ImageBuilder(clusterSize, clusterBits, checked.refcountBits as RefcountBits);
  builder.allocate(3 * clusterSize); // header, refcount table, refcount block
  const l2Bits = clusterBits - (checked.extendedL2 ? 4 : 3);
  const l1Size = Math.ceil(checked.size / 2 ** (clusterBits + l2Bits));
  if (l1Size * L1_ENTRY_SIZE > MAX_L1_TABLE_BYTES) {
    throw new ImageTooLargeError('Could not resize image: Failed to grow the L1 table: File too large');
  }
  const l1Offset = l1Size > 0 ? builder.allocate(l1Size * L1_ENTRY_SIZE) : 0;
  const l1 = Buffer.alloc(l1Size * L1_ENTRY_SIZE);
  const preallocated = options.preallocation === 'metadata' ? preallocateMetadata(builder, checked.size, clusterSize, l1) : { tables: [], end: 0 };
  const header = serializeHeader(buildHeader(checked, {
    l1Size, l1TableOffset: l1Offset, refcountTableOffset: builder.tableOffset, refcountTableClusters: builder.tableClusters,
  }, options));
  const parts = builder.contents(header, [[l1Offset, l1], ...preallocated.tables]);
  return { parts, length: Math.max(preallocated.end, ...parts.map(([offset, bytes]) => offset + bytes.length)) };
}

/**
 * Writes a new qcow2 image to `target`: a file just made by createImageFile (empty,
 * locked against other users) or a writable edge with the resize permission (emptied
 * first). Throws Qcow2FormatError with QEMU's text when the options are refused;
 * nothing is written then. The header goes last, behind a barrier: a power loss
 * before it leaves a file that is no qcow2 image yet, never one whose header points
 * at tables not on disk.
 */
export async function createQcow2(target: ChildEdge | FileHandle, options: Qcow2CreateOptions): Promise<void> {
  const { parts, length } = layoutQcow2(options);
  const [[, header], ...tables] = parts as [[0, Buffer], ...[number, Buffer][]];
  if (!('fd' in target)) {
    // Sized first so that nodes which do not grow on write (raw over a file) take the writes too.
    await target.truncate(0);
    await target.truncate(length);
    for (const [offset, bytes] of tables) await target.write(offset, bytes);
    await target.flush();
    await target.write(0, header);
    await target.flush();
    return;
  }
  for (const [offset, bytes] of tables) await target.write(bytes, 0, bytes.length, offset);
  await target.truncate(length);
  await target.datasync();
  await target.write(header, 0, header.length, 0);
  await target.datasync();
}

/**
 * Makes a new qcow2 image file at `path` (an overlay, a mirror's target): created under QEMU's
 * image locks, so a file another user holds is refused unchanged; an I/O failure in QEMU's words.
 */
export async function createQcow2File(path: string, options: Qcow2CreateOptions): Promise<void> {
  const handle = await createImageFile(path, { size: 0 });
  try {
    await createQcow2(handle, options);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw genericError(code ? `Could not create '${path}': ${describeErrno(code)}` : (error as Error).message);
  } finally {
    await handle.close();
  }
}
