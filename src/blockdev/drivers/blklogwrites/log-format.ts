/*
 * The write log's on-disk format, as Linux's dm-log-writes target and QEMU's
 * blklogwrites filter write it: a superblock in sector 0, then per entry one
 * sector holding the entry header (and a mark's text after it), followed by
 * the bytes written unless the entry is a discard. Fields are little-endian;
 * "sector" means the log's sector size, which both the log and the entries use.
 */

export const LOG_FLUSH = 1 << 0;
export const LOG_FUA = 1 << 1;
export const LOG_DISCARD = 1 << 2;
export const LOG_MARK = 1 << 3;
const LOG_FLAG_MASK = LOG_FLUSH | LOG_FUA | LOG_DISCARD | LOG_MARK;

export const WRITE_LOG_MAGIC = 0x6a736677736872n;
export const WRITE_LOG_VERSION = 1n;
const SUPERBLOCK_BYTES = 28;
export const ENTRY_HEADER_BYTES = 32;

export interface LogSuperblock {
  magic: bigint;
  version: bigint;
  entries: number;
  sectorSize: number;
}

export interface LogEntryHeader {
  /** First sector written, in log sectors. */
  sector: number;
  sectors: number;
  flags: number;
  /** A mark's text length (the only use QEMU and Linux make of it). */
  dataLength: number;
}

/** QEMU 7.2's rule: a power of two that holds the superblock and an entry header, below 16 MiB. */
export function isValidSectorSize(size: number): boolean {
  return Number.isSafeInteger(size) && size >= ENTRY_HEADER_BYTES && size < 1 << 24 && (size & (size - 1)) === 0;
}

export function encodeSuperblock(entries: number, sectorSize: number): Buffer {
  const sector = Buffer.alloc(sectorSize);
  sector.writeBigUInt64LE(WRITE_LOG_MAGIC, 0);
  sector.writeBigUInt64LE(WRITE_LOG_VERSION, 8);
  sector.writeBigUInt64LE(BigInt(entries), 16);
  sector.writeUInt32LE(sectorSize, 24);
  return sector;
}

export function decodeSuperblock(bytes: Buffer): LogSuperblock {
  const padded = bytes.length >= SUPERBLOCK_BYTES ? bytes : Buffer.concat([bytes, Buffer.alloc(SUPERBLOCK_BYTES - bytes.length)]);
  return {
    magic: padded.readBigUInt64LE(0),
    version: padded.readBigUInt64LE(8),
    entries: Number(padded.readBigUInt64LE(16)),
    sectorSize: padded.readUInt32LE(24),
  };
}

/** One log sector: the entry header, then (for a mark) its text. */
export function encodeEntrySector(header: LogEntryHeader, sectorSize: number, mark?: string): Buffer {
  const sector = Buffer.alloc(sectorSize);
  sector.writeBigUInt64LE(BigInt(header.sector), 0);
  sector.writeBigUInt64LE(BigInt(header.sectors), 8);
  sector.writeBigUInt64LE(BigInt(header.flags), 16);
  sector.writeBigUInt64LE(BigInt(header.dataLength), 24);
  if (mark !== undefined) sector.write(mark, ENTRY_HEADER_BYTES, 'latin1');
  return sector;
}

export function decodeEntryHeader(bytes: Buffer): LogEntryHeader {
  return {
    sector: Number(bytes.readBigUInt64LE(0)),
    sectors: Number(bytes.readBigUInt64LE(8)),
    flags: Number(bytes.readBigUInt64LE(16)),
    dataLength: Number(bytes.readBigUInt64LE(24)),
  };
}

export function hasValidFlags(header: LogEntryHeader): boolean {
  return (header.flags & ~LOG_FLAG_MASK) === 0;
}

/** Log sectors an entry takes: its header sector, and its data unless it is a discard. */
export function entryLogSectors(header: LogEntryHeader): number {
  return 1 + (header.flags & LOG_DISCARD ? 0 : header.sectors);
}

/** The text a mark carries in its header sector (Linux caps it one byte short of the sector). */
export function markText(sector: Buffer, header: LogEntryHeader): string {
  const length = Math.min(header.dataLength, sector.length - ENTRY_HEADER_BYTES - 1);
  return sector.toString('latin1', ENTRY_HEADER_BYTES, ENTRY_HEADER_BYTES + Math.max(0, length));
}

/** One parsed entry of a whole log read into memory. */
export interface LogEntry extends LogEntryHeader {
  index: number;
  /** The bytes written (a view into the log), for writes; absent for flushes, discards and marks. */
  data?: Buffer;
  mark?: string;
}

export interface ParsedLog {
  sectorSize: number;
  entries: LogEntry[];
}

export class WriteLogFormatError extends Error {
  override name = 'WriteLogFormatError';
}

/** Reads a whole log: the superblock's count of entries, each checked as QEMU checks it on log-append. */
export function parseWriteLog(log: Buffer): ParsedLog {
  const superblock = decodeSuperblock(log.subarray(0, SUPERBLOCK_BYTES));
  if (superblock.magic !== WRITE_LOG_MAGIC) throw new WriteLogFormatError('Invalid log superblock magic');
  if (superblock.version !== WRITE_LOG_VERSION) throw new WriteLogFormatError(`Unsupported log version ${superblock.version}`);
  const { sectorSize } = superblock;
  if (!isValidSectorSize(sectorSize)) throw new WriteLogFormatError(`Invalid log sector size ${sectorSize}`);
  const entries: LogEntry[] = [];
  let at = sectorSize;
  for (let index = 0; index < superblock.entries; index++) {
    if (at + sectorSize > log.length) throw new WriteLogFormatError(`Log entry ${index} lies past the end of the log`);
    const sector = log.subarray(at, at + sectorSize);
    const header = decodeEntryHeader(sector);
    if (!hasValidFlags(header)) throw new WriteLogFormatError(`Invalid flags 0x${header.flags.toString(16)} in log entry ${index}`);
    const entry: LogEntry = { index, ...header };
    if (header.flags & LOG_MARK) entry.mark = markText(sector, header);
    const dataBytes = (entryLogSectors(header) - 1) * sectorSize;
    if (dataBytes > 0) {
      if (at + sectorSize + dataBytes > log.length) throw new WriteLogFormatError(`The data of log entry ${index} lies past the end of the log`);
      entry.data = log.subarray(at + sectorSize, at + sectorSize + dataBytes);
    }
    entries.push(entry);
    at += entryLogSectors(header) * sectorSize;
  }
  return { sectorSize, entries };
}

/**
 * blockd's marks carry the process-wide flush sequence number (see flush-sequence.ts):
 * every entry after a mark was logged after that flush (or FUA write) began, in any log.
 */
const SEQUENCE_MARK_PREFIX = 'flush-seq=';

export function sequenceMark(sequence: number): string {
  return `${SEQUENCE_MARK_PREFIX}${sequence}`;
}

/** The sequence number a mark carries, if it is one of blockd's. */
export function parseSequenceMark(text: string): number | undefined {
  if (!text.startsWith(SEQUENCE_MARK_PREFIX)) return undefined;
  const value = Number(text.slice(SEQUENCE_MARK_PREFIX.length));
  return Number.isSafeInteger(value) && value >= 0 ? value : undefined;
}
