/*
 * What the job benches share: 1 GiB qcow2 layers written dense or 10 %
 * sparse (scattered 64 KiB clusters) by qemu-img bench with a non-zero
 * pattern (its default pattern is zeros, which a copy may turn into zero
 * writes instead of moving data), and a runner that times the same job on
 * qemu-storage-daemon and blockd in alternating rounds (each on its own
 * fresh copy, written back to disk first) and prints best times and ratios
 * (QSD time / blockd time: above 1 = blockd faster). Besides the whole job it
 * shows the copy phase alone (from the job's 'running' to its 'waiting' or
 * 'ready' event): blockd also flushes the copied data before it rewrites a
 * backing link, which qemu-storage-daemon 7.2 does not, and that flush is
 * in the whole time only. Each sparse case is also given as a share of its
 * dense twin's time: time should follow the allocated data (10 %).
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { QmpClient } from '../src/qmp/client.js';
import { runBlockd } from '../test/helpers/blockd-process.js';
import { makeTempDir } from '../test/helpers/paths.js';
import { startQsd } from '../test/helpers/qsd-process.js';

export const QUICK = process.argv.includes('--quick');
export const SIZE = QUICK ? 256 << 20 : 1 << 30;
const ROUNDS = QUICK ? 1 : 3;

function run(command: string, args: string[]): void {
  const result = spawnSync(command, args, { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`${command} ${args.join(' ')}: ${result.stderr}`);
}

/** A qcow2 layer in `dir` (over `backing`, a file name in the same directory), empty or filled dense or 10 % sparse. */
export function makeLayer(dir: string, name: string, fill: 'empty' | 'dense' | 'sparse', backing?: string): void {
  mkdirSync(dir, { recursive: true });
  const path = join(dir, name);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', ...(backing ? ['-b', backing, '-F', 'qcow2'] : []), path, ...(backing ? [] : [String(SIZE)])]);
  const pattern = '--pattern=0xa5';
  if (fill === 'sparse') {
    // Every tenth 64 KiB cluster: qemu-img bench writes `count` requests `step` bytes apart.
    run('qemu-img', ['bench', '-q', '-w', '-f', 'qcow2', pattern, '-s', '64K', '-S', '640K', '-c', String(Math.floor(SIZE / (640 * 1024))), '-d', '16', path]);
  } else if (fill === 'dense') {
    run('qemu-img', ['bench', '-q', '-w', '-f', 'qcow2', pattern, '-s', '1M', '-c', String(SIZE >> 20), '-d', '16', path]);
  }
}

export interface JobTiming {
  /** Seconds from the command to the job's end. */
  total: number;
  /** Seconds of the copy phase, from the daemon's own event timestamps. */
  copy: number;
}

export interface JobCase {
  /** The job and its data, as in 'stream' and 'dense': sparse cases are compared with their dense twin. */
  job: string;
  fill: 'dense' | 'sparse';
  prepare(dir: string): void;
  /** How long the job takes on the daemon at `socket` (a QMP unix socket path). */
  measure(socket: string, dir: string): Promise<JobTiming>;
}

const caseName = (job: JobCase) => `${job.job}, ${job.fill === 'dense' ? 'dense' : '90 % sparse'}`;

/** The copy phase of the one job `qmp` saw: its 'running' event to its first 'waiting' or 'ready'. */
export function copySeconds(qmp: QmpClient): number {
  const statusTimes = qmp.receivedEvents()
    .filter((event) => event.event === 'JOB_STATUS_CHANGE')
    .map((event) => ({ status: (event.data as { status: string }).status, at: event.timestamp.seconds + event.timestamp.microseconds / 1e6 }));
  const running = statusTimes.find((change) => change.status === 'running');
  const copied = statusTimes.find((change) => change.status === 'waiting' || change.status === 'ready');
  if (!running || !copied) throw new Error('the job events lack running or waiting/ready');
  return copied.at - running.at;
}

export async function compareDaemons(title: string, cases: JobCase[]): Promise<void> {
  const temp = makeTempDir('blockd-bench-jobs-');
  const rows: string[] = [];
  const shares: string[] = [];
  try {
    const qsd = await startQsd(temp.dir);
    const blockd = await runBlockd(['--qmp', `unix:${join(temp.dir, 'blockd.sock')}`]);
    try {
      const bests = new Map<JobCase, Record<'qsd' | 'blockd', JobTiming>>();
      for (const job of cases) {
        const best = { qsd: { total: Infinity, copy: Infinity }, blockd: { total: Infinity, copy: Infinity } };
        for (let round = 0; round < ROUNDS; round++) {
          for (const side of ['qsd', 'blockd'] as const) {
            const dir = join(temp.dir, `${side}-${round}`);
            rmSync(dir, { recursive: true, force: true });
            job.prepare(dir);
            run('sync', []); // the images' own writeback must not land inside the timed job
            const timing = await job.measure(side === 'qsd' ? qsd.socket : join(temp.dir, 'blockd.sock'), dir);
            best[side] = { total: Math.min(best[side].total, timing.total), copy: Math.min(best[side].copy, timing.copy) };
            rmSync(dir, { recursive: true, force: true });
          }
        }
        bests.set(job, best);
        const { qsd: q, blockd: b } = best;
        rows.push(`${caseName(job).padEnd(34)} ${q.total.toFixed(3).padStart(9)} ${b.total.toFixed(3).padStart(9)} ${(q.total / b.total).toFixed(2).padStart(7)}`
          + ` ${q.copy.toFixed(3).padStart(9)} ${b.copy.toFixed(3).padStart(9)} ${(q.copy / b.copy).toFixed(2).padStart(7)}`);
      }
      for (const [job, best] of bests) {
        const dense = [...bests].find(([twin]) => twin.job === job.job && twin.fill === 'dense')?.[1];
        if (job.fill !== 'sparse' || !dense) continue;
        const share = (side: 'qsd' | 'blockd') => `${((100 * best[side].total) / dense[side].total).toFixed(1)} %`;
        shares.push(`${job.job.padEnd(34)} ${share('qsd').padStart(9)} ${share('blockd').padStart(9)}`);
      }
    } finally {
      await blockd.stop();
      await qsd.stop();
    }
    process.stdout.write(`${title}, blockd vs qemu-storage-daemon (seconds, best of ${ROUNDS}; ratio = QSD time / blockd time)\n`);
    process.stdout.write(`${'case'.padEnd(34)} ${'QSD s'.padStart(9)} ${'blockd s'.padStart(9)} ${'ratio'.padStart(7)}`
      + ` ${'QSD copy'.padStart(9)} ${'blk copy'.padStart(9)} ${'ratio'.padStart(7)}\n${rows.join('\n')}\n`);
    if (shares.length) {
      process.stdout.write(`\nsparse time as a share of dense time (10 % of the data is allocated)\n`);
      process.stdout.write(`${'job'.padEnd(34)} ${'QSD'.padStart(9)} ${'blockd'.padStart(9)}\n${shares.join('\n')}\n`);
    }
  } finally {
    temp.cleanup();
  }
}
