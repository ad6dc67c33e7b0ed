/*
 * A recorded run for the power-loss test of persistent bitmaps: disk.qcow2 (over a backing
 * file full of data) gets persistent bitmaps (two enabled at different granularities, one
 * disabled), then a guest writes through blockd in sessions ending with flushes, the file
 * logged by blklogwrites. Its probe opens each replayed image in blockd: from the moment
 * block-dirty-bitmap-add returned (the add must have left the bitmaps durable), every enabled
 * bitmap must load consistent and be dirty wherever the disk differs from what it read
 * before the writes.
 */
import { copyFile, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { LOG_FLUSH, LOG_FUA, parseWriteLog } from '../../../src/blockdev/drivers/blklogwrites/log-format.js';
import { ModelledDisk } from '../disk-model.js';
import { KiB, runQemuImg, SeededRandom } from '../qemu-tools.js';
import { firstUncovered, type BitmapReader, type ReloadedImage } from '../reloaded-bitmaps.js';
import { GuestModel, type Witness } from './guest-model.js';
import type { PowerLossScenario, StateProbe } from './power-loss-checker.js';
import { keepOriginal, loggedFile, RecordingDaemon } from './recording.js';
import { DISK_SIZE, makeOverlayOnData, writeSessions } from './write-scenarios.js';

const SECTOR = 512;

export const RECORDED_BITMAPS = [
  { name: 'fine', granularity: 4 * KiB, disabled: false },
  { name: 'coarse', granularity: 256 * KiB, disabled: false },
  { name: 'frozen', granularity: 64 * KiB, disabled: true },
];

/** Entries in a log so far (none before blklogwrites wrote its superblock). */
async function logLength(path: string): Promise<number> {
  const bytes = await readFile(path);
  return bytes.length === 0 ? 0 : parseWriteLog(bytes).entries.length;
}

/**
 * The entry that made what a command wrote durable: the last one in the log, if the command
 * logged anything (`before`: the log's length when it was sent) and ended on a flush or a FUA write.
 */
async function durableSince(path: string, log: number, before: number, what: string): Promise<Witness> {
  const entries = (await logLength(path)) === 0 ? [] : parseWriteLog(await readFile(path)).entries;
  const last = entries[entries.length - 1];
  if (entries.length <= before || !last || !(last.flags & (LOG_FLUSH | LOG_FUA))) {
    throw new Error(`${what} returned without making anything durable (log entries ${before} before, ${entries.length} after, the last ${last ? `flags ${last.flags}` : 'none'})`);
  }
  return { log, entry: last.index };
}

export interface BitmapRecording {
  scenario: PowerLossScenario;
  /** What the probe saw: the states it checked, and the most sectors one of them had changed. */
  probed: { states: number; mostChangedSectors: number };
}

/**
 * Records the run in `dir`; the scenario's probe reopens each replay with `reader`. With
 * `preAdded`, qemu-img adds the bitmaps before blockd opens the image (so only the clean close
 * at the end of the logs promises them to be consistent), instead of blockd over QMP.
 */
export async function recordBitmapWrites(dir: string, seed: number, sessions: number, reader: BitmapReader, preAdded = false): Promise<BitmapRecording> {
  makeOverlayOnData(dir);
  if (preAdded) {
    for (const { name, granularity, disabled } of RECORDED_BITMAPS) {
      runQemuImg('bitmap', '--add', '-g', String(granularity), ...(disabled ? ['--disable'] : []), join(dir, 'disk.qcow2'), name);
    }
  }
  const before = await ModelledDisk.imageBytes(join(dir, 'disk.qcow2'));
  const model = new GuestModel(before);
  const original = keepOriginal(dir, 'disk.qcow2');
  const log = join(dir, 'disk.log');
  const daemon = await RecordingDaemon.start(dir);
  let added: Witness | undefined;
  try {
    await daemon.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'disk', file: loggedFile(dir, 'disk.qcow2', 'disk.log') } as never);
    if (!preAdded) {
      const sent = await logLength(log);
      for (const { name, granularity, disabled } of RECORDED_BITMAPS) {
        await daemon.qmp.execute('block-dirty-bitmap-add', { node: 'disk', name, granularity, persistent: true, disabled });
      }
      added = await durableSince(log, 0, sent, 'block-dirty-bitmap-add');
    }
    const url = await daemon.exportNode('disk');
    await writeSessions(url, new SeededRandom(seed), sessions, model, { path: log, index: 0 });
    await daemon.quit();
  } finally {
    await daemon.kill();
  }
  const probed = { states: 0, mostChangedSectors: 0 };
  return {
    scenario: {
      name: 'persistent bitmaps under guest writes', dir, logs: [log],
      files: [{ name: 'disk.qcow2', original, log: 0 }, { name: 'base.qcow2', original: join(dir, 'base.qcow2') }],
      checked: [{ image: 'disk.qcow2' }],
      views: [{ image: 'disk.qcow2', model }],
      probes: [bitmapCoverage(reader, 'disk.qcow2', before, added, probed)],
    },
    probed,
  };
}

/** Every enabled bitmap loads consistent and is dirty at each sector that differs from `before`. */
function bitmapCoverage(reader: BitmapReader, image: string, before: Buffer, from: Witness | undefined, probed: BitmapRecording['probed']): StateProbe {
  return {
    name: 'bitmaps',
    from,
    async check(dir) {
      // A copy, next to the image so that its backing file name resolves: opening the image read-write changes it.
      const copy = join(dir, `probed-${image}`);
      await copyFile(join(dir, image), copy);
      let reloaded: ReloadedImage;
      try {
        reloaded = await reader.open(copy);
      } catch (error) {
        await rm(copy);
        return [`blockd cannot open ${image}: ${(error as Error).message}`];
      }
      try {
        const problems: string[] = [];
        const [disk] = await reloaded.read([{ offset: 0, length: DISK_SIZE }]);
        const changed: number[] = [];
        for (let at = 0; at < DISK_SIZE; at += SECTOR) {
          if (!disk!.subarray(at, at + SECTOR).equals(before.subarray(at, at + SECTOR))) changed.push(at);
        }
        probed.states++;
        probed.mostChangedSectors = Math.max(probed.mostChangedSectors, changed.length);
        for (const { name, granularity, disabled } of RECORDED_BITMAPS) {
          const loaded = reloaded.bitmap(name);
          if (!loaded) {
            problems.push(`${name} is gone`);
            continue;
          }
          if (disabled) continue;
          if (loaded.inconsistent) {
            problems.push(`${name} loaded inconsistent`);
            continue;
          }
          const dirty = reloaded.dirtyExtents(name);
          const missed = changed.filter((at) => firstUncovered({ offset: at, length: SECTOR }, dirty) !== undefined);
          if (missed.length) problems.push(`${name} (granularity ${granularity}) is clean at ${missed.length} changed sectors, the first at ${missed[0]}`);
        }
        return problems;
      } finally {
        await reloaded.close();
        await rm(copy);
      }
    },
  };
}
