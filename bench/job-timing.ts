/*
 * What the job benches share: 1 GiB qcow2 layers written dense or 10 %
 * sparse (scattered 64 KiB clusters) by qemu-img bench, and a runner that
 * times the same job on qemu-storage-daemon and blockd in alternating
 * rounds (each on its own fresh copy) and prints best times and ratios
 * (QSD time / blockd time: above 1 = blockd faster).
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { runBlockd } from '../test/helpers/blockd-process.js';
import { makeTempDir } from '../test/helpers/paths.js';
import { startQsd } from '../test/helpers/qsd-process.js';

export const QUICK = process.argv.includes('--quick');
export const SIZE = QUICK ? 256 << 20 : 1 << 30;
const ROUNDS = QUICK ? 1 : 2;

function run(command: string, args: string[]): void {
  const result = spawnSync(command, args, { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`${command} ${args.join(' ')}: ${result.stderr}`);
}

/** A qcow2 layer in `dir` (over `backing`, a file name in the same directory), empty or filled dense or 10 % sparse. */
export function makeLayer(dir: string, name: string, fill: 'empty' | 'dense' | 'sparse', backing?: string): void {
  mkdirSync(dir, { recursive: true });
  const path = join(dir, name);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', ...(backing ? ['-b', backing, '-F', 'qcow2'] : []), path, ...(backing ? [] : [String(SIZE)])]);
  if (fill === 'sparse') {
    // Every tenth 64 KiB cluster: qemu-img bench writes `count` requests `step` bytes apart.
    run('qemu-img', ['bench', '-q', '-w', '-f', 'qcow2', '-s', '64K', '-S', '640K', '-c', String(Math.floor(SIZE / (640 * 1024))), '-d', '16', path]);
  } else if (fill === 'dense') {
    run('qemu-img', ['bench', '-q', '-w', '-f', 'qcow2', '-s', '1M', '-c', String(SIZE >> 20), '-d', '16', path]);
  }
}

export interface JobCase {
  name: string;
  prepare(dir: string): void;
  /** Seconds the job takes on the daemon at `socket` (a QMP unix socket path). */
  measure(socket: string, dir: string): Promise<number>;
}

export async function compareDaemons(title: string, cases: JobCase[]): Promise<void> {
  const temp = makeTempDir('blockd-bench-jobs-');
  const rows: string[] = [];
  try {
    const qsd = await startQsd(temp.dir);
    const blockd = await runBlockd(['--qmp', `unix:${join(temp.dir, 'blockd.sock')}`]);
    try {
      for (const job of cases) {
        const best = { qsd: Infinity, blockd: Infinity };
        for (let round = 0; round < ROUNDS; round++) {
          for (const side of ['qsd', 'blockd'] as const) {
            const dir = join(temp.dir, `${side}-${round}`);
            rmSync(dir, { recursive: true, force: true });
            job.prepare(dir);
            const seconds = await job.measure(side === 'qsd' ? qsd.socket : join(temp.dir, 'blockd.sock'), dir);
            best[side] = Math.min(best[side], seconds);
            rmSync(dir, { recursive: true, force: true });
          }
        }
        rows.push(`${job.name.padEnd(34)} ${best.qsd.toFixed(3).padStart(9)} ${best.blockd.toFixed(3).padStart(9)} ${(best.qsd / best.blockd).toFixed(2).padStart(7)}`);
      }
    } finally {
      await blockd.stop();
      await qsd.stop();
    }
    process.stdout.write(`${title}, blockd vs qemu-storage-daemon (seconds, best of ${ROUNDS}; ratio = QSD time / blockd time)\n`);
    process.stdout.write(`${'case'.padEnd(34)} ${'QSD s'.padStart(9)} ${'blockd s'.padStart(9)} ${'ratio'.padStart(7)}\n${rows.join('\n')}\n`);
  } finally {
    temp.cleanup();
  }
}
