/*
 * One scenario of a job's differential test: images made once and copied (holes kept) into
 * a fresh qemu-storage-daemon's and a fresh blockd's directory, the same QMP script run on
 * each (transcripts compared with image sizes masked), then, with both stopped, each one's
 * images checked and the images both must hold alike compared.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { startDifferentialPeers } from './differential-peers.js';
import { makeTempDir } from './paths.js';
import { assertCheckClean, qemuImgCompare } from './qemu-tools.js';
import { describeDifferences, maskImageSizes, runTranscript, type TranscriptStep } from './qmp-transcript.js';

export interface Scenario {
  /** Makes the images, alike in each daemon's directory. */
  prepare(dir: string): void;
  steps: TranscriptStep[];
  /** After both daemons stopped: checks each one's images. */
  images?(dir: string): void;
  /** Images that must read the same in both directories (a target the job left half copied, too). */
  alike?: string[];
  /** Applied to every transcript line besides the image sizes. */
  normalise?: (line: string) => string;
}

export const formatOf = (name: string) => (name.endsWith('.raw') ? 'raw' : 'qcow2');

export async function compareWithQsd(scenario: Scenario, tempPrefix = 'blockd-job-'): Promise<void> {
  const temp = makeTempDir(tempPrefix);
  const template = join(temp.dir, 'template');
  mkdirSync(template);
  scenario.prepare(template);
  const peers = await startDifferentialPeers(temp.dir, (dir) => {
    const copy = spawnSync('cp', ['-r', '--sparse=always', `${template}/.`, dir], { encoding: 'utf8' });
    assert.equal(copy.status, 0, copy.stderr);
  });
  const normalise = (line: string) => (scenario.normalise ?? ((same: string) => same))(maskImageSizes(line));
  try {
    const theirs = await runTranscript(peers.qsd.socket, peers.qsd.dir, scenario.steps, normalise);
    const ours = await runTranscript(peers.blockd.socket, peers.blockd.dir, scenario.steps, normalise).catch((error: Error) => {
      throw new Error(`${error.message}; blockd said: ${peers.blockdLog().slice(-3000)}`);
    });
    assert.equal(describeDifferences(ours, theirs), '');
    await peers.stopBlockd(); // their image locks go
    await peers.stopQsd();
    for (const dir of [peers.blockd.dir, peers.qsd.dir]) scenario.images?.(dir);
    for (const name of scenario.alike ?? []) {
      qemuImgCompare(join(peers.blockd.dir, name), join(peers.qsd.dir, name), [formatOf(name), formatOf(name)], `${name}: blockd's and qemu-storage-daemon's`);
    }
  } finally {
    await peers.stopQsd();
    await peers.stopBlockd();
    temp.cleanup();
  }
}

/** `image` reads as `expected` (a raw file of the same directory) and, for qcow2, passes qemu-img check. */
export function assertReadsAs(dir: string, image: string, expected: string): void {
  qemuImgCompare(join(dir, image), join(dir, expected), [formatOf(image), 'raw'], `${dir}: ${image}`);
  if (formatOf(image) === 'qcow2') assertCheckClean(join(dir, image), image);
}
