/*
 * Puts a crash state on disk: each logged file is its copy from before the
 * logs began with the state's entries written onto it (a discard reads as
 * zeros), each other file of the scenario a link to the unchanged original,
 * all under their own names in one directory so relative backing file names
 * in image headers find each other there.
 */
import { copyFile, open, rm, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import type { ParsedLog } from '../../../src/blockdev/drivers/blklogwrites/log-format.js';
import { changesData, isDiscard, type CrashState } from './crash-states.js';

export interface ReplayFile {
  /** The file's name in the scenario's directory (and in the replay's). */
  name: string;
  /** Its contents before the first logged entry. */
  original: string;
  /** Which log records its writes; none for files the scenario only reads. */
  log?: number;
}

export async function materialize(dir: string, files: readonly ReplayFile[], logs: readonly ParsedLog[], state: CrashState): Promise<void> {
  for (const file of files) {
    const target = join(dir, file.name);
    await rm(target, { force: true });
    if (file.log === undefined) {
      await symlink(file.original, target);
      continue;
    }
    await copyFile(file.original, target);
    await applyEntries(target, logs[file.log]!, state.prefix[file.log]!, state.dropped[file.log]!);
  }
}

async function applyEntries(path: string, log: ParsedLog, prefix: number, dropped: ReadonlySet<number>): Promise<void> {
  const handle = await open(path, 'r+');
  try {
    let size = (await handle.stat()).size;
    for (const entry of log.entries.slice(0, prefix)) {
      if (!changesData(entry) || dropped.has(entry.index)) continue;
      const offset = entry.sector * log.sectorSize;
      const length = entry.sectors * log.sectorSize;
      if (isDiscard(entry)) {
        // Discarded sectors read as zeros (never as stale data a bug could still point at); the file does not grow.
        const inside = Math.min(length, size - offset);
        if (inside > 0) await handle.write(Buffer.alloc(inside), 0, inside, offset);
      } else {
        await handle.write(entry.data!, 0, length, offset);
        size = Math.max(size, offset + length);
      }
    }
  } finally {
    await handle.close();
  }
}
