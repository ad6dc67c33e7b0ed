/*
 * What dirty bitmaps cost a writer, blockd against qemu-storage-daemon in the same run:
 * each daemon exports its own copy of the same qcow2 image, and the same writers run with
 * 0, 1 and 4 enabled bitmaps on the exported node (in-memory, then persistent): nbdcopy
 * writing a file of random bytes over the whole export (4 connections, 16 requests each,
 * flushed), and qemu-img bench issuing scattered 4 KiB writes at queue depth 32. Rounds
 * alternate between the daemons; the best of each is kept. Reported: throughput, the
 * blockd/QSD ratio, and each daemon's loss against its own run without bitmaps; and the first
 * round's throughput on its own, where blockd's write-intent record pays for persistent
 * bitmaps (one flush per first write into each 2 MiB region after they are added). Throughput
 * through the page cache varies by 10 % or more from round to round on this kind of machine,
 * so the daemons' user CPU seconds (least of the rounds, from /proc) are reported too: the
 * bitmaps' own work shows there (a CPU profile of blockd writing 1 GiB with one bitmap does
 * not show the bitmap code among its top functions).
 * Run: node dist/bench/bitmap-cost.js [--quick]
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { BitmapRegistry } from '../src/blockdev/bitmaps/bitmap-registry.js';
import { DirtyBitmap } from '../src/blockdev/bitmaps/dirty-bitmap.js';
import { QmpClient } from '../src/qmp/client.js';
import { runBlockd } from '../test/helpers/blockd-process.js';
import { makeTempDir } from '../test/helpers/paths.js';
import { startQsd } from '../test/helpers/qsd-process.js';
import { makeRandomFile, RANDOM_COUNT, ROUNDS, run, SIZE, STRIDE, timedWithCpu } from './bench-tools.js';


interface Workload {
  name: string;
  bytes: number;
  run(uri: string, source: string): void;
}

const WORKLOADS: Workload[] = [
  {
    name: 'nbdcopy write',
    bytes: SIZE,
    run: (uri, source) => run('nbdcopy', ['--connections=4', '--requests=16', '--flush', source, uri]),
  },
  {
    name: 'random write 4 KiB',
    bytes: RANDOM_COUNT * 4096,
    run: (uri) => run('qemu-img', ['bench', '-w', '-f', 'raw', '-t', 'writeback', '-s', '4096', '-S', String(STRIDE), '-c', String(RANDOM_COUNT), '-d', '32', uri]),
  },
];

interface Setup {
  name: string;
  bitmaps: number;
  persistent: boolean;
}

const SETUPS: Setup[] = [
  { name: 'no bitmap', bitmaps: 0, persistent: false },
  { name: '1 bitmap', bitmaps: 1, persistent: false },
  { name: '4 bitmaps', bitmaps: 4, persistent: false },
  { name: '1 persistent', bitmaps: 1, persistent: true },
  { name: '4 persistent', bitmaps: 4, persistent: true },
];

function daemonArgs(dir: string): string[] {
  return [
    '--blockdev', `driver=qcow2,node-name=disk,file.driver=file,file.filename=${join(dir, 'disk.qcow2')}`,
    '--nbd-server', `addr.type=unix,addr.path=${join(dir, 'nbd.sock')}`,
    '--export', 'type=nbd,id=e0,node-name=disk,name=disk,writable=on',
  ];
}

/** Replaces the node's bitmaps with `setup`'s. */
async function applySetup(qmp: QmpClient, previous: Setup | undefined, setup: Setup): Promise<void> {
  for (let i = 0; i < (previous?.bitmaps ?? 0); i++) await qmp.execute('block-dirty-bitmap-remove', { node: 'disk', name: `b${i}` });
  for (let i = 0; i < setup.bitmaps; i++) await qmp.execute('block-dirty-bitmap-add', { node: 'disk', name: `b${i}`, persistent: setup.persistent });
}

/**
 * The marking itself, in process: nanoseconds per markDirty of a request's range with `count`
 * bitmaps (64 KiB granules) on a disk of SIZE, for 4 KiB requests scattered as qemu-img bench
 * scatters them and for 2 MiB sequential ones.
 */
function markingNanoseconds(count: number, requestBytes: number, sequential: boolean): number {
  const registry = new BitmapRegistry();
  for (let i = 0; i < count; i++) registry.add(new DirtyBitmap(SIZE, 65536, `b${i}`));
  const requests = 1_000_000;
  let offset = 0;
  const start = process.hrtime.bigint();
  for (let i = 0; i < requests; i++) {
    registry.markDirty(offset, requestBytes);
    offset = sequential ? (offset + requestBytes) % SIZE : (offset + STRIDE) % (SIZE - requestBytes);
  }
  return Number(process.hrtime.bigint() - start) / requests;
}

async function main(): Promise<void> {
  const temp = makeTempDir('blockd-bench-bitmaps-');
  try {
    const source = join(temp.dir, 'source.raw');
    makeRandomFile(source, SIZE);
    const dirs = { qsd: join(temp.dir, 'qsd'), blockd: join(temp.dir, 'blockd') };
    for (const dir of Object.values(dirs)) {
      mkdirSync(dir);
      run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', source, join(dir, 'disk.qcow2')]);
    }
    const qsd = await startQsd(dirs.qsd, daemonArgs(dirs.qsd));
    const blockdSocket = join(dirs.blockd, 'qmp.sock');
    const blockd = await runBlockd([...daemonArgs(dirs.blockd), '--qmp', `unix:${blockdSocket}`]);
    const clients = { qsd: await QmpClient.connect(`unix:${qsd.socket}`), blockd: await QmpClient.connect(`unix:${blockdSocket}`) };
    const uri = (dir: string) => `nbd+unix:///disk?socket=${join(dir, 'nbd.sock')}`;
    process.stdout.write(`Dirty bitmap cost on NBD writes, ${SIZE >> 20} MiB qcow2 image, blockd vs qemu-storage-daemon (ratio = blockd throughput / QSD's; cost = loss against the same daemon without bitmaps)\n`);
    process.stdout.write(`${'bitmaps'.padEnd(14)} ${'workload'.padEnd(20)} ${'QSD MiB/s'.padStart(9)} ${'blockd MiB/s'.padStart(12)} ${'ratio'.padStart(6)} ${'QSD cost'.padStart(9)} ${'blockd cost'.padStart(11)} ${'1st round QSD'.padStart(13)} ${'blockd'.padStart(7)} ${'user CPU s QSD'.padStart(14)} ${'blockd'.padStart(7)} ${'CPU cost QSD'.padStart(12)} ${'blockd'.padStart(7)}\n`);
    const baseline = new Map<string, { qsd: number; blockd: number }>();
    const cpuBaseline = new Map<string, { qsd: number; blockd: number }>();
    const pids = { qsd: qsd.child.pid!, blockd: blockd.child.pid! };
    try {
      let previous: Setup | undefined;
      for (const setup of SETUPS) {
        await applySetup(clients.qsd, previous, setup);
        await applySetup(clients.blockd, previous, setup);
        previous = setup;
        for (const workload of WORKLOADS) {
          const measured = { qsd: [] as { seconds: number; cpu: number }[], blockd: [] as { seconds: number; cpu: number }[] };
          for (let round = 0; round < ROUNDS; round++) {
            measured.qsd.push(timedWithCpu(pids.qsd, () => workload.run(uri(dirs.qsd), source)));
            measured.blockd.push(timedWithCpu(pids.blockd, () => workload.run(uri(dirs.blockd), source)));
          }
          const rounds = { qsd: measured.qsd.map((m) => m.seconds), blockd: measured.blockd.map((m) => m.seconds) };
          const cpu = { qsd: Math.min(...measured.qsd.map((m) => m.cpu)), blockd: Math.min(...measured.blockd.map((m) => m.cpu)) };
          if (setup.bitmaps === 0) cpuBaseline.set(workload.name, cpu);
          const cpuBase = cpuBaseline.get(workload.name)!;
          const [qsdSeconds, blockdSeconds] = [Math.min(...rounds.qsd), Math.min(...rounds.blockd)];
          const firstRate = (seconds: number) => (workload.bytes / (1 << 20) / seconds).toFixed(1);
          const rates = { qsd: workload.bytes / (1 << 20) / qsdSeconds, blockd: workload.bytes / (1 << 20) / blockdSeconds };
          if (setup.bitmaps === 0) baseline.set(workload.name, rates);
          const base = baseline.get(workload.name)!;
          const loss = (rate: number, without: number) => `${(100 * (1 - rate / without)).toFixed(1)} %`.padStart(9);
          const extra = (used: number, without: number) => `${(100 * (used / without - 1)).toFixed(1)} %`;
          process.stdout.write(`${setup.name.padEnd(14)} ${workload.name.padEnd(20)} ${rates.qsd.toFixed(1).padStart(9)} ${rates.blockd.toFixed(1).padStart(12)} `
            + `${(rates.blockd / rates.qsd).toFixed(2).padStart(6)} ${loss(rates.qsd, base.qsd)} ${loss(rates.blockd, base.blockd).padStart(11)} `
            + `${firstRate(rounds.qsd[0]!).padStart(13)} ${firstRate(rounds.blockd[0]!).padStart(7)} `
            + `${cpu.qsd.toFixed(2).padStart(14)} ${cpu.blockd.toFixed(2).padStart(7)} ${extra(cpu.qsd, cpuBase.qsd).padStart(12)} ${extra(cpu.blockd, cpuBase.blockd).padStart(7)}\n`);
        }
      }
      // What the marking costs blockd's single event loop at the request rates measured above.
      const rateOf = (name: string) => baseline.get(name)!.blockd * (1 << 20);
      for (const count of [1, 4]) {
        const scattered = markingNanoseconds(count, 4096, false);
        const sequential = markingNanoseconds(count, 256 << 10, true);
        process.stdout.write(`marking with ${count} bitmap(s): ${scattered.toFixed(0)} ns per 4 KiB request (${(100 * scattered * 1e-9 * rateOf('random write 4 KiB') / 4096).toFixed(2)} % of the event loop at the measured rate), `
          + `${sequential.toFixed(0)} ns per 256 KiB request (${(100 * sequential * 1e-9 * rateOf('nbdcopy write') / (256 << 10)).toFixed(2)} %)\n`);
      }
    } finally {
      await clients.qsd.close();
      await clients.blockd.close();
      await blockd.stop();
      await qsd.stop();
    }
  } finally {
    temp.cleanup();
  }
}

await main();
