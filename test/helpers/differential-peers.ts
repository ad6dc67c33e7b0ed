/*
 * The two daemons a differential test compares: qemu-storage-daemon and blockd, each with
 * its own directory (prepared alike by the test), one QMP socket and a pid file. Either
 * registered as the file's before/after hooks (differentialPeers), or started and stopped
 * by a test itself when each scenario needs a fresh pair (startDifferentialPeers).
 */
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before } from 'node:test';
import { runBlockd } from './blockd-process.js';
import { makeTempDir } from './paths.js';
import { describeDifferences, runTranscript, type TranscriptStep } from './qmp-transcript.js';
import { startQsd } from './qsd-process.js';

export interface Peer {
  dir: string;
  socket: string;
  /** The daemon's pid file (actions of a transcript may signal it). */
  pidfile: string;
}

export interface DifferentialPeers {
  qsd: Peer;
  blockd: Peer;
  /** Stops blockd early (e.g. to release image locks before qemu-img looks at its files). */
  stopBlockd(): Promise<unknown>;
  stopQsd(): Promise<unknown>;
  /** blockd's stderr so far, for failure messages. */
  blockdLog(): string;
}

function peerDirs(root: string): { qsd: Peer; blockd: Peer } {
  const qsdDir = join(root, 'qsd');
  const blockdDir = join(root, 'blockd');
  return {
    qsd: { dir: qsdDir, socket: join(qsdDir, 'qsd-qmp.sock'), pidfile: join(qsdDir, 'qsd.pid') },
    blockd: { dir: blockdDir, socket: join(blockdDir, 'blockd.sock'), pidfile: join(blockdDir, 'blockd.pid') },
  };
}

/**
 * Prepares root/qsd and root/blockd alike and starts a daemon in each; `daemonArgs` gives both the
 * same command-line options beyond their monitor (e.g. --blockdev, --nbd-server, --export).
 */
export async function startDifferentialPeers(root: string, prepare: (dir: string) => void = () => {}, daemonArgs: (dir: string) => string[] = () => []): Promise<DifferentialPeers> {
  const { qsd, blockd } = peerDirs(root);
  for (const dir of [qsd.dir, blockd.dir]) {
    mkdirSync(dir, { recursive: true });
    prepare(dir);
  }
  const qsdProcess = await startQsd(qsd.dir, daemonArgs(qsd.dir));
  const blockdProcess = await runBlockd([...daemonArgs(blockd.dir), '--qmp', `unix:${blockd.socket}`, '--pidfile', blockd.pidfile]);
  return {
    qsd,
    blockd,
    stopBlockd: () => blockdProcess.stop(),
    stopQsd: () => qsdProcess.stop(),
    blockdLog: () => blockdProcess.stderr(),
  };
}

export function differentialPeers(prepare: (dir: string) => void = () => {}, daemonArgs?: (dir: string) => string[]): DifferentialPeers {
  const temp = makeTempDir();
  let running: DifferentialPeers | undefined;
  before(async () => {
    running = await startDifferentialPeers(temp.dir, prepare, daemonArgs);
  });
  after(async () => {
    await running?.stopQsd();
    await running?.stopBlockd();
    temp.cleanup();
  });
  return {
    ...peerDirs(temp.dir),
    stopBlockd: async () => running?.stopBlockd(),
    stopQsd: async () => running?.stopQsd(),
    blockdLog: () => running?.blockdLog() ?? '',
  };
}

/**
 * Runs `steps` on qemu-storage-daemon, then on blockd, and requires the same transcripts
 * (`normalise` applied to each line); then stops both, so that their images are closed for
 * the checks that follow.
 */
export async function assertSameTranscripts(peers: DifferentialPeers, steps: readonly TranscriptStep[], normalise?: (line: string) => string): Promise<void> {
  const theirs = await runTranscript(peers.qsd.socket, peers.qsd.dir, steps, normalise);
  const ours = await runTranscript(peers.blockd.socket, peers.blockd.dir, steps, normalise).catch((error: Error) => {
    throw new Error(`${error.message}; blockd said: ${peers.blockdLog().slice(-3000)}`);
  });
  assert.equal(describeDifferences(ours, theirs), '');
  await peers.stopBlockd();
  await peers.stopQsd();
}
