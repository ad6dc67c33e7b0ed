/*
 * NBD export throughput, blockd against qemu-storage-daemon in the same run:
 * each daemon exports its own copy of the same qcow2 image, and the same
 * client commands run against both: nbdcopy reading the whole export
 * (several connections, many requests in flight), nbdcopy writing a raw
 * file into it, and qemu-img bench issuing scattered 4 KiB reads and writes
 * (stride 4 KiB x 7919, queue depth 32). Rounds alternate between the
 * daemons; the best round of each is reported, with the blockd/QSD ratio of
 * throughput (above 1 = blockd faster).
 * Run: node dist/bench/nbd-io.js [--quick]
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { runBlockd } from '../test/helpers/blockd-process.js';
import { makeTempDir } from '../test/helpers/paths.js';
import { startQsd } from '../test/helpers/qsd-process.js';
import { makeRandomFile, RANDOM_COUNT, ROUNDS, run, SIZE, STRIDE, timed } from './bench-tools.js';


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

function daemonArgs(dir: string): string[] {
  return [
    '--blockdev', `driver=qcow2,node-name=disk,file.driver=file,file.filename=${join(dir, 'disk.qcow2')}`,
    '--nbd-server', `addr.type=unix,addr.path=${join(dir, 'nbd.sock')}`,
    '--export', 'type=nbd,id=e0,node-name=disk,name=disk,writable=on',
  ];
}

async function main(): Promise<void> {
  const temp = makeTempDir('blockd-bench-nbd-');
  try {
    makeRandomFile(join(temp.dir, 'source.raw'), SIZE);
    const dirs = { qsd: join(temp.dir, 'qsd'), blockd: join(temp.dir, 'blockd') };
    for (const dir of Object.values(dirs)) {
      mkdirSync(dir);
      run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', join(temp.dir, 'source.raw'), join(dir, 'disk.qcow2')]);
    }
    const qsd = await startQsd(dirs.qsd, daemonArgs(dirs.qsd));
    const blockd = await runBlockd([...daemonArgs(dirs.blockd), '--qmp', `unix:${join(dirs.blockd, 'qmp.sock')}`]);
    const uri = (dir: string) => `nbd+unix:///disk?socket=${join(dir, 'nbd.sock')}`;
    const rows: string[] = [];
    try {
      for (const workload of WORKLOADS) {
        let qsdSeconds = Infinity;
        let blockdSeconds = Infinity;
        for (let round = 0; round < ROUNDS; round++) {
          qsdSeconds = Math.min(qsdSeconds, timed(() => workload.run(uri(dirs.qsd), dirs.qsd)));
          blockdSeconds = Math.min(blockdSeconds, timed(() => workload.run(uri(dirs.blockd), dirs.blockd)));
        }
        const rate = (seconds: number) => (workload.bytes / (1 << 20) / seconds).toFixed(1).padStart(10);
        const iops = (seconds: number) => String(Math.round(workload.count / seconds)).padStart(9);
        rows.push(`${workload.name.padEnd(26)} ${rate(qsdSeconds)} ${iops(qsdSeconds)} ${rate(blockdSeconds)} ${iops(blockdSeconds)} ${(qsdSeconds / blockdSeconds).toFixed(2).padStart(7)}`);
      }
    } finally {
      await blockd.stop();
      await qsd.stop();
    }
    process.stdout.write(`NBD export I/O, ${SIZE >> 20} MiB qcow2 image, blockd vs qemu-storage-daemon (same clients; ratio = blockd throughput / QSD's)\n`);
    process.stdout.write(`${'workload'.padEnd(26)} ${'QSD MiB/s'.padStart(10)} ${'QSD ops/s'.padStart(9)} ${'blockd MiB/s'.padStart(10)} ${'ops/s'.padStart(9)} ${'ratio'.padStart(7)}\n`);
    process.stdout.write(`${rows.join('\n')}\n`);
  } finally {
    temp.cleanup();
  }
}

await main();
