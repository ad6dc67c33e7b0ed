/*
 * Opening a write log as QEMU 7.2's blk_log_writes_open does, with its checks
 * and texts: a new log starts at sector 1; with log-append the superblock is
 * read (an empty file counts as an empty log of 512-byte sectors) and its
 * entries are walked to find the end. The walk also finds the last flush
 * sequence number the log recorded, so that this process numbers on after it.
 */
import { genericError } from '../../../errors.js';
import type { ChildEdge } from '../../child-edge.js';
import { observeFlushSequence } from './flush-sequence.js';
import { LogAppender, type LogPosition } from './log-appender.js';
import {
  ENTRY_HEADER_BYTES, LOG_MARK, WRITE_LOG_MAGIC, WRITE_LOG_VERSION, decodeEntryHeader, decodeSuperblock, entryLogSectors,
  hasValidFlags, isValidSectorSize, markText, parseSequenceMark,
} from './log-format.js';

export interface LogOptions {
  'log-sector-size'?: number;
  'log-append'?: boolean;
  'log-super-update-interval'?: number;
}

const DEFAULT_SECTOR_SIZE = 512;
const DEFAULT_SUPER_INTERVAL = 4096;

/** The end of an existing log: walks `entries` entries as QEMU does (reads past the end give zeros). */
async function findLogEnd(log: ChildEdge, sectorSize: number, entries: number): Promise<LogPosition> {
  let sector = 1;
  let lastSequence: number | undefined;
  const header = Buffer.alloc(sectorSize);
  for (let index = 0; index < entries; index++) {
    try {
      await log.read(sector * sectorSize, header);
    } catch (error) {
      throw genericError(`Failed to read log entry ${index}: ${(error as Error).message}`);
    }
    const entry = decodeEntryHeader(header.subarray(0, ENTRY_HEADER_BYTES));
    if (!hasValidFlags(entry)) throw genericError(`Invalid flags 0x${entry.flags.toString(16)} in log entry ${index}`);
    if (entry.flags & LOG_MARK) lastSequence = parseSequenceMark(markText(header, entry)) ?? lastSequence;
    sector += entryLogSectors(entry);
  }
  return { sectorSize, nextSector: sector, entries, lastSequence, existing: true };
}

async function appendPosition(log: ChildEdge, options: LogOptions): Promise<LogPosition> {
  if (options['log-sector-size'] !== undefined) throw genericError('log-append and log-sector-size are mutually exclusive');
  let superblock = { magic: WRITE_LOG_MAGIC, version: WRITE_LOG_VERSION, entries: 0, sectorSize: DEFAULT_SECTOR_SIZE };
  if (log.length() > 0) {
    const bytes = Buffer.alloc(ENTRY_HEADER_BYTES);
    try {
      await log.read(0, bytes);
    } catch (error) {
      throw genericError(`Could not read log superblock: ${(error as Error).message}`);
    }
    superblock = decodeSuperblock(bytes);
  }
  if (superblock.magic !== WRITE_LOG_MAGIC) throw genericError('Invalid log superblock magic');
  if (superblock.version !== WRITE_LOG_VERSION) throw genericError(`Unsupported log version ${superblock.version}`);
  if (!isValidSectorSize(superblock.sectorSize)) throw genericError(`Invalid log sector size ${superblock.sectorSize}`);
  // An empty file has no superblock on disk yet: the first entry writes one.
  if (log.length() === 0) return { sectorSize: superblock.sectorSize, nextSector: 1, entries: 0, existing: false };
  return findLogEnd(log, superblock.sectorSize, superblock.entries);
}

export async function openLog(log: ChildEdge, options: LogOptions): Promise<LogAppender> {
  let position: LogPosition;
  if (options['log-append']) {
    position = await appendPosition(log, options);
  } else {
    const sectorSize = options['log-sector-size'] ?? DEFAULT_SECTOR_SIZE;
    if (!isValidSectorSize(sectorSize)) throw genericError(`Invalid log sector size ${sectorSize}`);
    position = { sectorSize, nextSector: 1, entries: 0, existing: false };
  }
  const interval = options['log-super-update-interval'] ?? DEFAULT_SUPER_INTERVAL;
  if (interval === 0) throw genericError(`Invalid log superblock update interval ${interval}`);
  if (position.lastSequence !== undefined) observeFlushSequence(position.lastSequence);
  return new LogAppender(log, position, interval);
}
