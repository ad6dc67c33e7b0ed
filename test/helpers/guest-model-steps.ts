/*
 * Transcript steps for a guest writing to a disk through its NBD export (at $DIR/nbd.sock)
 * while a test keeps a model of the disk: `<chain>-expected.raw` (pattern-chains.ts) gets
 * the same writes, and copies of it record what a job started at some moment must hold.
 */
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import type { TranscriptStep } from './qmp-transcript.js';
import { qemuIo, qemuIoInBackground } from './qemu-tools.js';

/** The guest of `disk` writes `commands` through `exportName`; `modelled` (by default the same) go to the model. */
export function guestWrites(disk: { chain: string; dev: string }, exportName: string, commands: string[], modelled = commands): TranscriptStep {
  return {
    action: async (dir) => {
      await qemuIoInBackground(`nbd+unix:///${exportName}?socket=${join(dir, 'nbd.sock')}`, commands, ['-f', 'raw']);
      qemuIo(join(dir, `${disk.chain}-expected.raw`), modelled, ['-f', 'raw']);
      return `(the guest of ${disk.dev} wrote: ${commands.join('; ')})`;
    },
  };
}

/** Keeps the model as it is now, as `<chain>-<as>.raw` (what a copy made at this moment must hold). */
export function keepModel(disk: { chain: string; dev: string }, as: string): TranscriptStep {
  return {
    action: async (dir) => {
      copyFileSync(join(dir, `${disk.chain}-expected.raw`), join(dir, `${disk.chain}-${as}.raw`));
      return `(model of ${disk.dev} kept as ${as})`;
    },
  };
}
