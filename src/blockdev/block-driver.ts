/*
 * The driver interface. A driver definition opens a node's state from its
 * options; the state answers I/O for the node. Every call is asynchronous.
 * Optional methods are capabilities: a driver that leaves one out does not
 * support it (the node reports a clear error, or uses a generic fallback,
 * e.g. write-zeroes by writing a zero buffer). Drivers reach their children
 * only through the child edges the node gives them, which check permissions.
 */
import type { Logger } from 'pino';
import type { BlockdevDriver, SnapshotInfo } from '../generated/qapi-types.js';
import type { ChildEdge } from './child-edge.js';
import type { BlockNode } from './node.js';
import type { ChildRole, PermissionPair } from './permissions.js';

export interface WriteFlags {
  /** Force unit access: durable before the request completes. */
  fua?: boolean;
  /** The write of a job's serialised copy, which already holds its range (BlockNode.serialisedCopy). */
  serialisedCopy?: boolean;
  /**
   * The bytes written are what the node already reads (a copy-on-read or stream copy from the
   * backing chain): dirty bitmaps are not marked, as QEMU writes such copies below its dirty tracking.
   */
  contentUnchanged?: boolean;
  /**
   * Store the data compressed (QEMU's BDRV_REQ_WRITE_COMPRESSED: backup's and convert's `compress`).
   * Only nodes whose state supports compressed writes take it; the writer covers whole clusters.
   */
  compress?: boolean;
}

export interface ZeroFlags extends WriteFlags {
  /** The range may be deallocated (NBD: no NO_HOLE flag). */
  mayUnmap?: boolean;
  /** Fail with ENOTSUP rather than write zero buffers (NBD FAST_ZERO). */
  noFallback?: boolean;
}

/**
 * What a driver knows about the range starting at an offset. `length` covers
 * the run with the same answer (it may be shorter than asked, never longer).
 */
export type DriverExtent =
  | {
      length: number;
      /** Decided at this node: data stored here, or zeros recorded here (hides any backing file). */
      allocated: boolean;
      /** Reads return stored data (not a hole). */
      data: boolean;
      /** Reads return zeros for sure. */
      zero: boolean;
      /** Where the bytes are stored, when they are stored in one place (qemu-img map's "offset"). */
      hostOffset?: number;
    }
  | {
      length: number;
      /** The answer is the child's, at this offset in it (raw, filters). */
      delegate: ChildEdge;
      offset: number;
    };

export interface DriverInfo {
  /** query-named-block-nodes "file": the filename or a json: pseudo-filename. */
  filename: string;
  /** ImageInfo extras: cluster-size, dirty-flag, format-specific, backing-filename, ... */
  image?: Record<string, unknown>;
}

/** Bytes of an open host file: where an offloaded copy (copy_file_range) reads from. */
export interface HostFileRange {
  fd: number;
  offset: number;
}

/** What an internal snapshot records besides the image's tables (its times, as QEMU takes them). */
export interface NewInternalSnapshot {
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
}

/** A node's open driver state. */
export interface DriverState {
  /** Size in bytes as the node's users see it. */
  length(): number;
  /** Writes past the end grow the node (protocol drivers; the writer needs the resize permission). */
  readonly growsOnWrite?: boolean;
  /**
   * Takes writes with the `compress` flag (QEMU's bdrv_supports_compressed_writes): a format that
   * can store compressed clusters, or a filter that forwards them to a child that can.
   */
  readonly supportsCompressedWrites?: boolean;
  /** The unit the format allocates in (qcow2's cluster): copies into the node serialise whole units. */
  readonly clusterSize?: number;
  read(offset: number, buffer: Buffer): Promise<void>;
  write?(offset: number, buffer: Buffer, flags: WriteFlags): Promise<void>;
  writeZeroes?(offset: number, length: number, flags: ZeroFlags): Promise<void>;
  discard?(offset: number, length: number): Promise<void>;
  flush?(): Promise<void>;
  /**
   * An offloaded copy of [offset, offset + length) into `target` at `targetOffset` (QEMU's
   * copy_range_from): the driver finds where the bytes live and hands the copy on, down to a
   * file that passes its descriptor to the target. `flags` are the target's write flags. ENOTSUP
   * when it cannot (the caller reads and writes).
   */
  copyRangeFrom?(offset: number, length: number, target: ChildEdge, targetOffset: number, flags: WriteFlags): Promise<void>;
  /** The target's half (QEMU's copy_range_to): stores `length` bytes of a host file at `offset`. */
  copyRangeTo?(source: HostFileRange, offset: number, length: number, flags: WriteFlags): Promise<void>;
  /**
   * The driver's flush is the whole flush (QEMU: a driver with its own bdrv_co_flush): the node
   * does not then flush every child it writes to (copy-before-write flushes its source, not its target).
   */
  readonly flushCoversChildren?: boolean;
  /** Starts writing what was written to the storage, without waiting for it (protocol drivers). */
  startWriteback?(): Promise<void>;
  blockStatus(offset: number, length: number): Promise<DriverExtent>;
  /** Changes the size; exact: must not round. */
  truncate?(size: number): Promise<void>;
  /** Permissions this node's child on `edge` needs, given what the node's own users need. */
  childPermissions?(edge: ChildEdge, parents: PermissionPair): PermissionPair;
  /** Told the node's users' combined needs, e.g. to take image locks. Throws (and changes nothing) on conflict. */
  setPermissions?(needed: PermissionPair): Promise<void>;
  /** The backing file the image header names, as QEMU keeps it (auto_backing_file); formats with backing files only. */
  autoBackingFile?: string;
  /** Switches between read-only and read-write (the node is drained, and its children already switched when becoming writable). */
  reopen?(writable: boolean): Promise<void>;
  /**
   * A reopen's new options for the driver (its bdrv_reopen_prepare): refuses them in QEMU's words, or returns
   * what makes them take effect, called only once every entry of the reopen passed its checks; that in turn
   * returns what puts the old ones back (a later entry failed).
   */
  prepareReopen?(options: Record<string, unknown>, findObject: (id: string) => unknown): () => () => void;
  /** Before the node becomes read-only, while it still may write: keeps what only lives in memory (qcow2's persistent bitmaps). */
  prepareReadOnly?(): Promise<void>;
  /** The node became writable and holds its write permissions: the first writes a writer makes (qcow2 marks its bitmaps in use). */
  becameWritable?(): Promise<void>;
  /** Rewrites the backing file name (and format) the image header records; formats with backing files only. */
  changeBackingFile?(name: string | undefined, format: string | undefined): Promise<void>;
  /** Told that the node's backing child changed (a snapshot put a node under it); formats with backing files only. */
  setBacking?(backing: ChildEdge | undefined): void;
  /** Whether the image can keep a new persistent dirty bitmap; throws with QEMU's reason when not (formats that store bitmaps). */
  canStoreNewDirtyBitmap?(name: string, granularity: number): Promise<void>;
  /** Removes a persistent dirty bitmap from the image now (formats that store bitmaps). */
  removePersistentDirtyBitmap?(name: string): Promise<void>;
  /** Stores the persistent bitmaps as they are now (a new one, or one a merge changed), for a crash to find them. */
  storePersistentDirtyBitmaps?(): Promise<void>;
  /** The internal snapshots the image holds, oldest first (formats with internal snapshots: qcow2). */
  listSnapshots?(): SnapshotInfo[];
  /** Takes an internal snapshot of the image as it is now; the node is drained. */
  createSnapshot?(snapshot: NewInternalSnapshot): Promise<SnapshotInfo>;
  /** Deletes the internal snapshot with this id and/or name; undefined when there is none. */
  deleteSnapshot?(id: string | undefined, name: string | undefined): Promise<SnapshotInfo | undefined>;
  info(): DriverInfo;
  /** Bytes the node occupies on the host (ImageInfo actual-size; undefined: unknown, not reported); default: the sum over its storage children. */
  allocatedSize?(): Promise<number | undefined>;
  /** Flush what must be durable and release resources (locks, descriptors). */
  close(): Promise<void>;
}

/** One child a driver asks for while opening. */
export interface ChildRequest {
  /** The edge name, as in messages and query output: "file", "backing", "image". */
  name: string;
  role: ChildRole;
}

export interface OpenContext {
  node: BlockNode;
  log: Logger;
  /** Opens (or looks up) the child given in the options under `name`; it becomes the node's child. */
  openChild(optionsKey: string, request: ChildRequest): Promise<ChildEdge>;
  /** A user-created object by id (object-add / --object), e.g. a throttle group. */
  findObject(id: string): unknown;
  /** A node of the graph by name (QEMU's bdrv_find_node), for options that name a node which is not a child. */
  findNode(name: string): BlockNode | undefined;
  /** Opens a backing file named by an image header: read-only, generated node name, not monitor-owned. */
  openBackingFromImage?(filename: string, format: string | undefined, request: ChildRequest): Promise<ChildEdge>;
}

export interface BlockDriver<Options = Record<string, unknown>> {
  /** The schema's name, or the name of a filter only jobs insert (not in the schema, so blockdev-add cannot). */
  name: BlockdevDriver | 'commit_top' | 'mirror_top';
  /** Filters pass I/O to one child; formats and protocols own their data. */
  kind: 'protocol' | 'format' | 'filter';
  /** A filter that takes its child's filename (QEMU's commit_top and mirror_top). */
  namedAfterChild?: boolean;
  /** May have a backing child (qcow2). */
  supportsBacking?: boolean;
  /** Makes a FUA write durable by itself (qcow2's barrier, NBD's FUA flag); for other drivers the node writes, then flushes. */
  handlesFua?: boolean;
  /** False for drivers QEMU cannot reopen (no bdrv_reopen_prepare): changing the node's read-only mode fails. */
  reopenable?: boolean;
  /** Options that define what the node reads (QEMU's strong runtime options): they name it in json: filenames. */
  strongOptions: readonly string[];
  open(context: OpenContext, options: Options): Promise<DriverState>;
}
