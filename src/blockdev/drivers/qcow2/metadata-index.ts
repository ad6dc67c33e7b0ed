/*
 * Where a qcow2 image keeps its metadata, for QEMU's overlap check: before any
 * write to the image file, the clusters it touches are looked up here, and a
 * write that would land on metadata (other than the structure being written)
 * means the image is corrupt. Kept as sorted, disjoint runs of clusters, each
 * with a count per kind of metadata (a corrupt image can have two structures
 * in one cluster, or two L1 entries naming one table), updated as tables are
 * allocated and freed: a lookup is a binary search, never a scan of the tables.
 */

/** The structures QEMU's default overlap check ("cached") covers, in the order it checks them. */
export enum MetadataKind {
  Header,
  ActiveL1,
  RefcountTable,
  SnapshotTable,
  InactiveL1,
  ActiveL2,
  RefcountBlock,
  BitmapDirectory,
}

/** QEMU's metadata_ol_names, as they appear in "overlaps with ...". */
const KIND_NAMES: Record<MetadataKind, string> = {
  [MetadataKind.Header]: 'qcow2_header',
  [MetadataKind.ActiveL1]: 'active L1 table',
  [MetadataKind.RefcountTable]: 'refcount table',
  [MetadataKind.SnapshotTable]: 'snapshot table',
  [MetadataKind.InactiveL1]: 'inactive L1 table',
  [MetadataKind.ActiveL2]: 'active L2 table',
  [MetadataKind.RefcountBlock]: 'refcount block',
  [MetadataKind.BitmapDirectory]: 'bitmap directory',
};

const KINDS = Object.keys(KIND_NAMES).length;

export function metadataName(kind: MetadataKind): string {
  return KIND_NAMES[kind];
}

/** Clusters [start, end) holding the same structures. */
interface Run {
  start: number;
  end: number;
  counts: number[];
}

export class MetadataIndex {
  private runs: Run[] = [];

  constructor(private readonly clusterSize: number) {}

  /** Notes that bytes [offset, offset+length) hold a structure of this kind. */
  add(kind: MetadataKind, offset: number, length: number): void {
    const [first, end] = this.clusters(offset, length);
    if (first >= end) return;
    let i = this.firstEndingAfter(first);
    for (let at = first; at < end; i++) {
      const run = this.runs[i];
      if (run === undefined || run.start >= end || run.start > at) {
        // A gap: a new run up to the next one (or the end of the range).
        const gapEnd = Math.min(end, run?.start ?? end);
        const counts = new Array<number>(KINDS).fill(0);
        counts[kind] = 1;
        this.runs.splice(i, 0, { start: at, end: gapEnd, counts });
        at = gapEnd;
        continue;
      }
      if (run.start < at) {
        this.split(i, at);
        continue; // the right part, starting at `at`, is next
      }
      if (run.end > end) this.split(i, end);
      this.runs[i]!.counts[kind]!++;
      at = this.runs[i]!.end;
    }
  }

  /** Undoes one add() of the same range and kind. */
  remove(kind: MetadataKind, offset: number, length: number): void {
    const [first, end] = this.clusters(offset, length);
    let i = this.firstEndingAfter(first);
    while (i < this.runs.length && this.runs[i]!.start < end) {
      const run = this.runs[i]!;
      if (run.counts[kind]! > 0) run.counts[kind]!--;
      if (run.counts.every((count) => count === 0)) this.runs.splice(i, 1);
      else i++;
    }
  }

  /**
   * The structure a write of [offset, offset+length) would overwrite, the first in QEMU's
   * order, apart from `ignore` (the structure being written itself); undefined when none.
   */
  overlap(offset: number, length: number, ignore?: MetadataKind): MetadataKind | undefined {
    const [first, end] = this.clusters(offset, length);
    let found: MetadataKind | undefined;
    for (let i = this.firstEndingAfter(first); i < this.runs.length && this.runs[i]!.start < end; i++) {
      const { counts } = this.runs[i]!;
      for (let kind = 0; kind < (found ?? KINDS); kind++) {
        if (counts[kind]! > 0 && kind !== ignore) found = kind;
      }
    }
    return found;
  }

  /** The runs, for tests: [first cluster, end cluster, kinds]. */
  describe(): [number, number, string[]][] {
    return this.runs.map((run) => [run.start, run.end, run.counts.flatMap((count, kind) => (count ? [KIND_NAMES[kind as MetadataKind]] : []))]);
  }

  private clusters(offset: number, length: number): [number, number] {
    if (length <= 0) return [0, 0];
    return [Math.floor(offset / this.clusterSize), Math.ceil((offset + length) / this.clusterSize)];
  }

  /** The index of the first run that ends after `cluster` (runs are sorted and disjoint). */
  private firstEndingAfter(cluster: number): number {
    let low = 0;
    let high = this.runs.length;
    while (low < high) {
      const middle = (low + high) >>> 1;
      if (this.runs[middle]!.end <= cluster) low = middle + 1;
      else high = middle;
    }
    return low;
  }

  private split(i: number, at: number): void {
    const run = this.runs[i]!;
    this.runs.splice(i + 1, 0, { start: at, end: run.end, counts: [...run.counts] });
    run.end = at;
  }
}
