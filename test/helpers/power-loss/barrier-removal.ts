/*
 * Takes one flush barrier out of a real write log, as if blockd had not
 * issued it: the writes on both sides become one span that a power loss may
 * cut anywhere and keep any subset of. The barrier chosen is the one qcow2's
 * order depends on: refcount updates before it, and an update of an L2 table
 * already in use after it (an entry pointing at a cluster whose refcount and
 * data may not be on disk yet).
 */
import { readFileSync } from 'node:fs';
import { LOG_FLUSH, LOG_MARK, type LogEntry, type ParsedLog } from '../../../src/blockdev/drivers/blklogwrites/log-format.js';
import { parseHeader } from '../../../src/blockdev/drivers/qcow2/header.js';
import { changesData } from './crash-states.js';

const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;

export interface Qcow2MetadataClusters {
  clusterSize: number;
  /** Cluster numbers of the L2 tables the L1 table links. */
  l2Tables: Set<number>;
  refcountBlocks: Set<number>;
}

/** Where an image keeps its L2 tables and refcount blocks (read from its header and top-level tables). */
export function metadataClusters(path: string): Qcow2MetadataClusters {
  const file = readFileSync(path);
  const header = parseHeader(file.subarray(0, 2 ** 16), file.length);
  const clusterSize = 2 ** header.clusterBits;
  const linked = (offset: number, count: number) => {
    const clusters = new Set<number>();
    for (let i = 0; i < count; i++) {
      const target = Number(file.readBigUInt64BE(offset + i * 8) & OFFSET_MASK);
      if (target) clusters.add(target / clusterSize);
    }
    return clusters;
  };
  return {
    clusterSize,
    l2Tables: linked(header.l1TableOffset, header.l1Size),
    refcountBlocks: linked(header.refcountTableOffset, (header.refcountTableClusters * clusterSize) / 8),
  };
}

function touches(entry: LogEntry, clusters: Set<number>, sectorSize: number, clusterSize: number): boolean {
  const first = Math.floor((entry.sector * sectorSize) / clusterSize);
  const last = Math.floor(((entry.sector + entry.sectors) * sectorSize - 1) / clusterSize);
  for (let cluster = first; cluster <= last; cluster++) if (clusters.has(cluster)) return true;
  return false;
}

/**
 * The flushes that order a refcount update before the update of a table already in use: refcount
 * blocks written since the previous flush, and part of an L2 table (not a whole new one) written
 * before the next.
 */
export function barriersBeforeL2Updates(log: ParsedLog, metadata: Qcow2MetadataClusters): number[] {
  const flushes = log.entries.filter((entry) => entry.flags & LOG_FLUSH).map((entry) => entry.index);
  const span = (from: number, to: number) => log.entries.slice(from + 1, to).filter(changesData);
  const isRefcount = (entry: LogEntry) => touches(entry, metadata.refcountBlocks, log.sectorSize, metadata.clusterSize);
  const isTableUpdate = (entry: LogEntry) => entry.sectors * log.sectorSize < metadata.clusterSize && touches(entry, metadata.l2Tables, log.sectorSize, metadata.clusterSize);
  return flushes.filter((flush, i) => i > 0 && i + 1 < flushes.length
    && span(flushes[i - 1]!, flush).some(isRefcount) && span(flush, flushes[i + 1]!).some(isTableUpdate));
}

/**
 * The log with one flush turned into a plain mark: the barrier is gone, and every entry keeps
 * its index (so the witnesses of the guest's flushes still point where they did).
 */
export function withoutFlush(log: ParsedLog, flush: number): ParsedLog {
  if (!(log.entries[flush]!.flags & LOG_FLUSH)) throw new Error(`entry ${flush} is not a flush`);
  const entries = log.entries.map((entry) => (entry.index === flush ? { ...entry, flags: LOG_MARK, mark: 'flush removed' } : entry));
  return { sectorSize: log.sectorSize, entries };
}
