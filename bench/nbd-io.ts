/*
 * NBD export throughput, blockd against qemu-storage-daemon in the same run:
 * each daemon exports its own copy of the same image of random bytes (raw, as
 * issue 16's independent benchmark; --qcow2 for a qcow2 one), and the same
 * client commands run against both: nbdcopy reading the whole export
 * (several connections, many requests in flight), nbdcopy writing a raw
 * file into it, and qemu-img bench issuing scattered 4 KiB reads and writes
 * (stride 4 KiB x 7919, queue depth 32). Rounds alternate the order of the
 * daemons; each round gives a paired ratio of throughput (above 1 = blockd
 * faster) and of the daemons' CPU seconds (user + system) per GiB moved
 * (above 1 = blockd uses more). The median round is the figure, with the
 * spread of the ratios beside it.
 * Run: node dist/bench/nbd-io.js [--quick] [--qcow2] [--only=read|write|random]
 */
import { copyFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { runBlockd } from '../test/helpers/blockd-process.js';
import { makeTempDir } from '../test/helpers/paths.js';
import { startQsd } from '../test/helpers/qsd-process.js';
import { cpuSeconds, fixed, makeRandomFile, median, RANDOM_COUNT, ROUNDS, run, SIZE, STRIDE, timed } from './bench-tools.js';

const FORMAT = process.argv.includes('--qcow2') ? 'qcow2' : 'raw';
const ONLY = process.argv.find((arg) => arg.startsWith('--only='))?.slice('--only='.length);

interface Workload {
  name: string;
  bytes: number;
  count: number;
  run(uri: string, dir: string): void;
}

const WORKLOADS: Workload[] = [
  {
    name: 'nbdcopy read (4 conns)',
    bytes: SIZE,
    count: SIZE >> 20,
    run: (uri) => run('nbdcopy', ['--connections=4', '--requests=16', uri, 'null:']),
  },
  {
    name: 'nbdcopy write (4 conns)',
    bytes: SIZE,
    count: SIZE >> 20,
    run: (uri, dir) => run('nbdcopy', ['--connections=4', '--requests=16', '--flush', join(dir, '..', 'source.raw'), uri]),
  },
  {
    name: 'random read 4 KiB',
    bytes: RANDOM_COUNT * 4096,
    count: RANDOM_COUNT,
    run: (uri) => run('qemu-img', ['bench', '-f', 'raw', '-s', '4096', '-S', String(STRIDE), '-c', String(RANDOM_COUNT), '-d', '32', uri]),
  },
  {
    name: 'random write 4 KiB',
    bytes: RANDOM_COUNT * 4096,
    count: RANDOM_COUNT,
    run: (uri) => run('qemu-img', ['bench', '-w', '-f', 'raw', '-t', 'writeback', '-s', '4096', '-S', String(STRIDE), '-c', String(RANDOM_COUNT), '-d', '32', uri]),
  },
];
const SELECTED = WORKLOADS.filter((workload) => !ONLY || workload.name.includes(ONLY));

function daemonArgs(dir: string): string[] {
  return [
    '--blockdev', `driver=${FORMAT},node-name=disk,file.driver=file,file.filename=${join(dir, `disk.${FORMAT}`)}`,
    '--nbd-server', `addr.type=unix,addr.path=${join(dir, 'nbd.sock')}`,
    '--export', 'type=nbd,id=e0,node-name=disk,name=disk,writable=on',
  ];
}

interface Measure {
  seconds: number;
  /** CPU seconds (user + system) of the daemon per GiB moved. */
  cpuPerGiB: number;
}

function measured(pid: number, bytes: number, action: () => void): Measure {
  const cpu = () => {
    const { user, system } = cpuSeconds(pid);
    return user + system;
  };
  const before = cpu();
  const seconds = timed(action);
  return { seconds, cpuPerGiB: (cpu() - before) / (bytes / (1 << 30)) };
}

async function main(): Promise<void> {
  const temp = makeTempDir('blockd-bench-nbd-');
  try {
    const source = join(temp.dir, 'source.raw');
    makeRandomFile(source, SIZE);
    const dirs = { qsd: join(temp.dir, 'qsd'), blockd: join(temp.dir, 'blockd') };
    for (const dir of Object.values(dirs)) {
      mkdirSync(dir);
      if (FORMAT === 'raw') copyFileSync(source, join(dir, 'disk.raw'));
      else run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', source, join(dir, 'disk.qcow2')]);
    }
    const qsd = await startQsd(dirs.qsd, daemonArgs(dirs.qsd));
    const blockd = await runBlockd([...daemonArgs(dirs.blockd), '--qmp', `unix:${join(dirs.blockd, 'qmp.sock')}`]);
    const pids = { qsd: qsd.child.pid!, blockd: blockd.child.pid! };
    const uri = (dir: string) => `nbd+unix:///disk?socket=${join(dir, 'nbd.sock')}`;
    const rows: string[] = [];
    try {
      for (const workload of SELECTED) {
        const rounds: { qsd: Measure; blockd: Measure }[] = [];
        for (let round = 0; round < ROUNDS; round++) {
          const order = round % 2 === 0 ? (['qsd', 'blockd'] as const) : (['blockd', 'qsd'] as const);
          const result = {} as { qsd: Measure; blockd: Measure };
          for (const side of order) result[side] = measured(pids[side], workload.bytes, () => workload.run(uri(dirs[side]), dirs[side]));
          rounds.push(result);
        }
        const ratios = rounds.map((r) => r.qsd.seconds / r.blockd.seconds);
        const cpuRatios = rounds.map((r) => r.blockd.cpuPerGiB / r.qsd.cpuPerGiB);
        const mid = (side: 'qsd' | 'blockd', field: keyof Measure) => median(rounds.map((r) => r[side][field]));
        const rate = (seconds: number) => fixed(workload.bytes / (1 << 20) / seconds, 9, 0);
        const iops = (seconds: number) => String(Math.round(workload.count / seconds)).padStart(8);
        const spread = (values: number[]) => `${Math.min(...values).toFixed(2)}-${Math.max(...values).toFixed(2)}`.padStart(10);
        rows.push(`${workload.name.padEnd(24)} ${rate(mid('qsd', 'seconds'))} ${iops(mid('qsd', 'seconds'))} ${rate(mid('blockd', 'seconds'))} ${iops(mid('blockd', 'seconds'))}`
          + ` ${fixed(median(ratios), 6, 2)} ${spread(ratios)} ${fixed(mid('qsd', 'cpuPerGiB'), 7, 2)} ${fixed(mid('blockd', 'cpuPerGiB'), 7, 2)} ${fixed(median(cpuRatios), 6, 2)} ${spread(cpuRatios)}`);
      }
    } finally {
      await blockd.stop();
      await qsd.stop();
    }
    process.stdout.write(`NBD export I/O, ${SIZE >> 20} MiB ${FORMAT} image, blockd vs qemu-storage-daemon, ${ROUNDS} alternating rounds (medians)\n`);
    process.stdout.write('ratio = QSD time / blockd time (above 1 = blockd faster); CPU = daemon user+sys s per GiB; cpu× = blockd/QSD\n');
    process.stdout.write(`${'workload'.padEnd(24)} ${'QSD MiB/s'.padStart(9)} ${'QSD op/s'.padStart(8)} ${'blk MiB/s'.padStart(9)} ${'blk op/s'.padStart(8)} ${'ratio'.padStart(6)} ${'spread'.padStart(10)} ${'QSD CPU'.padStart(7)} ${'blk CPU'.padStart(7)} ${'cpu×'.padStart(6)} ${'spread'.padStart(10)}\n`);
    process.stdout.write(`${rows.join('\n')}\n`);
  } finally {
    temp.cleanup();
  }
}

await main();
