/*
 * What the job benchmarks that pit the daemons against each other round by round share: one
 * qemu-storage-daemon and one blockd, started once, and ROUNDS rounds in which each side runs
 * the same case back to back, the order alternating (QSD first in even rounds). A failure on
 * blockd's side carries the end of its log.
 */
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { runBlockd } from '../test/helpers/blockd-process.js';
import { startQsd } from '../test/helpers/qsd-process.js';
import { ROUNDS } from './bench-tools.js';

export type Side = 'qsd' | 'blockd';

export interface BenchDaemon {
  /** Its QMP socket. */
  socket: string;
  child: ChildProcess;
}

/** Runs `each` for both sides in every round; returns each round's results by side. */
export async function pairedRounds<T>(dir: string, each: (daemon: BenchDaemon, side: Side, round: number) => Promise<T>): Promise<Record<Side, T>[]> {
  const qsd = await startQsd(dir);
  const blockdSocket = join(dir, 'blockd.sock');
  const blockd = await runBlockd(['--qmp', `unix:${blockdSocket}`]);
  const daemons: Record<Side, BenchDaemon> = { qsd: { socket: qsd.socket, child: qsd.child }, blockd: { socket: blockdSocket, child: blockd.child } };
  const rounds: Record<Side, T>[] = [];
  try {
    for (let round = 0; round < ROUNDS; round++) {
      const order: Side[] = round % 2 === 0 ? ['qsd', 'blockd'] : ['blockd', 'qsd'];
      const results = {} as Record<Side, T>;
      for (const side of order) {
        results[side] = await each(daemons[side], side, round).catch((error: Error) => {
          throw new Error(`${side}: ${error.message}${side === 'blockd' ? `\n${blockd.stderr().slice(-3000)}` : ''}`);
        });
      }
      rounds.push(results);
    }
  } finally {
    await blockd.stop();
    await qsd.stop();
  }
  return rounds;
}
