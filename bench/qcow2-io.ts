/*
 * qcow2 driver throughput, blockd against `qemu-img bench` on the same image
 * in the same run: sequential 1 MiB and "random" 4 KiB reads and writes
 * (qemu-img bench has no random mode, so both sides step through the disk by
 * a 4 KiB x 7919 stride, which visits every block in scattered order), plus
 * allocating writes on a fresh image. Same request size, queue depth and
 * count on both sides; caches are dropped between runs when allowed. The host's
 * page-cache writeback makes single runs noisy, so both sides run several
 * rounds, alternating, and the best round of each is reported.
 * Run: npm run bench:qcow2 (or node dist/bench/qcow2-io.js [--quick]).
 */
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openImage } from '../src/blockdev/image-session.js';
import { makeTempDir } from '../test/helpers/paths.js';

const QUICK = process.argv.includes('--quick');
const SIZE = QUICK ? 256 << 20 : 1 << 30;
const STRIDE = 4096 * 7919;
const ROUNDS = QUICK ? 2 : 3;

interface Workload {
  name: string;
  write: boolean;
  requestSize: number;
  step: number;
  count: number;
  depth: number;
  /** Run on a fresh, empty image (every write allocates). */
  fresh?: boolean;
}

const WORKLOADS: Workload[] = [
  { name: 'sequential read 1 MiB', write: false, requestSize: 1 << 20, step: 1 << 20, count: SIZE >> 20, depth: 16 },
  { name: 'sequential write 1 MiB', write: true, requestSize: 1 << 20, step: 1 << 20, count: SIZE >> 20, depth: 16 },
  { name: 'random read 4 KiB', write: false, requestSize: 4096, step: STRIDE, count: QUICK ? 20_000 : 60_000, depth: 32 },
  { name: 'random write 4 KiB', write: true, requestSize: 4096, step: STRIDE, count: QUICK ? 20_000 : 60_000, depth: 32 },
  { name: 'allocating write 64 KiB', write: true, requestSize: 65536, step: 65536 * 61, count: SIZE >> 16, depth: 32, fresh: true },
];

function dropCaches(): void {
  try {
    spawnSync('sync');
    writeFileSync('/proc/sys/vm/drop_caches', '3');
  } catch {
    // not allowed here: both sides then run with whatever the page cache holds
  }
}

function qemuImg(args: string[]): string {
  const result = spawnSync('qemu-img', args, { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${result.stderr}`);
  return result.stdout;
}

function makeImage(path: string, filled: boolean): void {
  qemuImg(['create', '-q', '-f', 'qcow2', path, String(SIZE)]);
  if (filled) qemuImg(['bench', '-q', '-w', '-f', 'qcow2', '--pattern=0xa5', '-s', '1M', '-c', String(SIZE >> 20), '-d', '16', path]);
}

function qemuBench(path: string, workload: Workload): number {
  const args = ['bench', '-f', 'qcow2', '-t', 'writeback', '-s', String(workload.requestSize), '-S', String(workload.step),
    '-c', String(workload.count), '-d', String(workload.depth), ...(workload.write ? ['-w', '--pattern=0xa5'] : []), path];
  const output = qemuImg(args);
  const match = /Run completed in ([0-9.]+) seconds/.exec(output);
  if (!match) throw new Error(`unexpected qemu-img bench output: ${output}`);
  return Number(match[1]);
}

async function blockdBench(path: string, workload: Workload): Promise<number> {
  const session = await openImage(path, { format: 'qcow2', writable: workload.write });
  const buffer = Buffer.alloc(workload.requestSize, 0xa5);
  let issued = 0;
  let offset = 0;
  const start = process.hrtime.bigint();
  const worker = async () => {
    const own = Buffer.from(buffer);
    while (issued < workload.count) {
      issued++;
      const at = offset;
      offset = (offset + workload.step) % SIZE;
      if (workload.write) await session.disk.write(at, own);
      else await session.disk.read(at, own);
    }
  };
  await Promise.all(Array.from({ length: workload.depth }, worker));
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  await session.close();
  return seconds;
}

async function main(): Promise<void> {
  const temp = makeTempDir('blockd-bench-qcow2-');
  try {
    const rows: string[] = [];
    for (const workload of WORKLOADS) {
      const path = join(temp.dir, 'bench.qcow2');
      const bytes = workload.requestSize * workload.count;
      let qemuSeconds = Infinity;
      let blockdSeconds = Infinity;
      for (let round = 0; round < ROUNDS; round++) {
        makeImage(path, !workload.fresh);
        dropCaches();
        qemuSeconds = Math.min(qemuSeconds, qemuBench(path, workload));
        if (workload.fresh) makeImage(path, false);
        dropCaches();
        blockdSeconds = Math.min(blockdSeconds, await blockdBench(path, workload));
      }
      const rate = (seconds: number) => (bytes / (1 << 20) / seconds).toFixed(1).padStart(9);
      const iops = (seconds: number) => String(Math.round(workload.count / seconds)).padStart(8);
      rows.push(`${workload.name.padEnd(26)} ${rate(qemuSeconds)} ${iops(qemuSeconds)} ${rate(blockdSeconds)} ${iops(blockdSeconds)} ${(qemuSeconds / blockdSeconds).toFixed(2).padStart(7)}`);
    }
    process.stdout.write(`qcow2 I/O, ${SIZE >> 20} MiB image, blockd vs qemu-img bench (same request size, depth, count; ratio = blockd throughput / qemu's)\n`);
    process.stdout.write(`${'workload'.padEnd(26)} ${'qemu MiB/s'.padStart(9)} ${'qemu IOPS'.padStart(8)} ${'blockd MiB/s'.padStart(9)} ${'IOPS'.padStart(8)} ${'ratio'.padStart(7)}\n`);
    process.stdout.write(`${rows.join('\n')}\n`);
  } finally {
    temp.cleanup();
  }
}

await main();
