/*
 * blockdev-mirror, blockd against qemu-storage-daemon in the same run: a 1 GiB qcow2 of
 * random data, dense or 90 % sparse (random-images.ts, as issue 16's benchmark builds its
 * cases), mirrored with sync=full into a new empty qcow2. Timed from the command to
 * BLOCK_JOB_READY, and on to BLOCK_JOB_COMPLETED after job-complete (the pivot, flush
 * included); with each daemon's CPU seconds (user, and system) over the whole job. Each
 * round runs both daemons back to back on the same source file, the order alternating
 * round by round, each after the page cache was brought to the same state and the source
 * read into it; the copy is compared with the source afterwards (untimed). Ratios are paired
 * (the two runs of one round): QSD time / blockd time, above 1 = blockd faster; the median
 * of the rounds is the figure. The sparse case should take about the dense time's share of
 * the allocated data (10 %). Each round also times `dd conv=fdatasync` of the dense source:
 * what the disk allows a job that flushes its copy.
 * The rounds' spread (lowest and highest paired ratio) is printed beside the medians: on a
 * machine shared with other work, one round can differ from the next by a factor of two.
 * Run: node dist/bench/mirror.js [--quick] [--rounds=N]   (--quick: 256 MiB, 2 rounds)
 */
import { join } from 'node:path';
import { rmSync } from 'node:fs';
import type { ChildProcess } from 'node:child_process';
import { QmpClient } from '../src/qmp/client.js';
import { runBlockd } from '../test/helpers/blockd-process.js';
import { makeTempDir } from '../test/helpers/paths.js';
import { startQsd } from '../test/helpers/qsd-process.js';
import { cpuSeconds, fixed, median, ROUNDS, run, SIZE } from './bench-tools.js';
import { allocatedBytes, flushedCopySeconds, levelPageCache, makeRandomQcow2, readIntoCache, type Fill } from './random-images.js';

type Side = 'qsd' | 'blockd';

interface MirrorTiming {
  /** Seconds from blockdev-mirror to BLOCK_JOB_READY. */
  ready: number;
  /** Seconds from blockdev-mirror to BLOCK_JOB_COMPLETED (job-complete sent at READY). */
  total: number;
  user: number;
  system: number;
}

interface Daemon {
  socket: string;
  child: ChildProcess;
}

const seconds = (since: bigint) => Number(process.hrtime.bigint() - since) / 1e9;

/** One mirror of `source` into a new qcow2 at `target` on one daemon. */
async function mirrorOnce(daemon: Daemon, source: string, target: string): Promise<MirrorTiming> {
  const qmp = await QmpClient.connect(`unix:${daemon.socket}`);
  try {
    await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: source } });
    await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: { driver: 'file', filename: target } });
    const cpuBefore = cpuSeconds(daemon.child.pid!);
    const start = process.hrtime.bigint();
    const readyEvent = qmp.waitForEvent('BLOCK_JOB_READY', () => true, 600_000);
    const completed = qmp.waitForEvent('BLOCK_JOB_COMPLETED', () => true, 600_000);
    await qmp.execute('blockdev-mirror', { 'job-id': 'm', device: 'src', target: 'tgt', sync: 'full' });
    await readyEvent;
    const ready = seconds(start);
    await qmp.execute('job-complete', { id: 'm' });
    const event = await completed;
    const total = seconds(start);
    const cpuAfter = cpuSeconds(daemon.child.pid!);
    const error = (event.data as { error?: string }).error;
    if (error) throw new Error(`the mirror failed: ${error}`);
    await qmp.execute('blockdev-del', { 'node-name': 'tgt' });
    await qmp.execute('blockdev-del', { 'node-name': 'src' });
    return { ready, total, user: cpuAfter.user - cpuBefore.user, system: cpuAfter.system - cpuBefore.system };
  } finally {
    await qmp.close();
  }
}

const temp = makeTempDir('blockd-bench-mirror-');
try {
  const qsd = await startQsd(temp.dir);
  const blockdSocket = join(temp.dir, 'blockd.sock');
  const blockd = await runBlockd(['--qmp', `unix:${blockdSocket}`]);
  const daemons: Record<Side, Daemon> = { qsd: { socket: qsd.socket, child: qsd.child }, blockd: { socket: blockdSocket, child: blockd.child } };
  const lines: string[] = [];
  const totals = new Map<Fill, Record<Side, number>>();
  const limits: number[] = [];
  try {
    for (const fill of ['dense', 'sparse'] as const) {
      const source = join(temp.dir, `source-${fill}.qcow2`);
      makeRandomQcow2(source, SIZE, fill);
      const rounds: Record<Side, MirrorTiming>[] = [];
      for (let round = 0; round < ROUNDS; round++) {
        if (fill === 'dense') limits.push(flushedCopySeconds(source, temp.dir));
        const order: Side[] = round % 2 === 0 ? ['qsd', 'blockd'] : ['blockd', 'qsd'];
        const timing = {} as Record<Side, MirrorTiming>;
        for (const side of order) {
          const target = join(temp.dir, `target-${side}.qcow2`);
          run('qemu-img', ['create', '-q', '-f', 'qcow2', target, String(SIZE)]);
          levelPageCache(temp.dir, SIZE);
          readIntoCache(source);
          timing[side] = await mirrorOnce(daemons[side], source, target).catch((error: Error) => {
            throw new Error(`${side}: ${error.message}${side === 'blockd' ? `\n${blockd.stderr().slice(-3000)}` : ''}`);
          });
          run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'qcow2', source, target]);
          rmSync(target);
        }
        rounds.push(timing);
      }
      const mib = allocatedBytes(fill, SIZE) / (1 << 20);
      const name = `${fill === 'dense' ? 'dense' : '90 % sparse'}`;
      for (const [index, { qsd: q, blockd: b }] of rounds.entries()) {
        lines.push(`${`${name}, round ${index + 1}`.padEnd(22)} ${fixed(q.ready, 8)} ${fixed(b.ready, 8)} ${fixed(q.ready / b.ready, 6, 2)}`
          + ` ${fixed(q.total, 8)} ${fixed(b.total, 8)} ${fixed(q.total / b.total, 6, 2)}`
          + ` ${fixed(mib / q.total, 8, 0)} ${fixed(mib / b.total, 8, 0)}`
          + ` ${fixed(q.user, 6, 2)}/${fixed(q.system, 4, 2)} ${fixed(b.user, 6, 2)}/${fixed(b.system, 4, 2)}`);
      }
      const medianOf = (pick: (timing: Record<Side, MirrorTiming>) => number) => median(rounds.map(pick));
      const qTotal = medianOf((t) => t.qsd.total);
      const bTotal = medianOf((t) => t.blockd.total);
      totals.set(fill, { qsd: qTotal, blockd: bTotal });
      lines.push(`${`${name}, median`.padEnd(22)} ${fixed(medianOf((t) => t.qsd.ready), 8)} ${fixed(medianOf((t) => t.blockd.ready), 8)}`
        + ` ${fixed(medianOf((t) => t.qsd.ready / t.blockd.ready), 6, 2)}`
        + ` ${fixed(qTotal, 8)} ${fixed(bTotal, 8)} ${fixed(medianOf((t) => t.qsd.total / t.blockd.total), 6, 2)}`
        + ` ${fixed(mib / qTotal, 8, 0)} ${fixed(mib / bTotal, 8, 0)}`
        + ` ${fixed(medianOf((t) => t.qsd.user), 6, 2)}/${fixed(medianOf((t) => t.qsd.system), 4, 2)}`
        + ` ${fixed(medianOf((t) => t.blockd.user), 6, 2)}/${fixed(medianOf((t) => t.blockd.system), 4, 2)}`
        + `   CPU ratio (QSD/blockd, user+system) ${fixed(medianOf((t) => (t.qsd.user + t.qsd.system) / (t.blockd.user + t.blockd.system)), 4, 2)}`);
      const spread = (pick: (timing: Record<Side, MirrorTiming>) => number) => {
        const ratios = rounds.map(pick);
        return `${Math.min(...ratios).toFixed(2)}-${Math.max(...ratios).toFixed(2)}`;
      };
      lines.push(`${`${name}, spread`.padEnd(22)} ratios to READY ${spread((t) => t.qsd.ready / t.blockd.ready)}, to COMPLETED ${spread((t) => t.qsd.total / t.blockd.total)}`);
      rmSync(source);
    }
  } finally {
    await blockd.stop();
    await qsd.stop();
  }
  process.stdout.write(`blockdev-mirror (sync=full) of a ${SIZE >> 20} MiB qcow2 of random data into a new qcow2, blockd vs qemu-storage-daemon, ${ROUNDS} alternating rounds\n`);
  process.stdout.write('seconds from the command; ratio = QSD time / blockd time (above 1 = blockd faster); MiB/s of allocated data to COMPLETED; CPU s = user/system\n');
  process.stdout.write(`${'case'.padEnd(22)} ${'QSD rdy'.padStart(8)} ${'blk rdy'.padStart(8)} ${'ratio'.padStart(6)} ${'QSD done'.padStart(8)} ${'blk done'.padStart(8)} ${'ratio'.padStart(6)}`
    + ` ${'QSD MiB/s'.padStart(8)} ${'blk MiB/s'.padStart(8)} ${'QSD CPU s'.padStart(11)} ${'blk CPU s'.padStart(11)}\n${lines.join('\n')}\n`);
  const dense = totals.get('dense')!;
  const sparse = totals.get('sparse')!;
  const share = (side: Side) => `${((100 * sparse[side]) / dense[side]).toFixed(1)} %`;
  process.stdout.write(`\nsparse time to COMPLETED as a share of dense (10 % of the data allocated): QSD ${share('qsd')}, blockd ${share('blockd')}\n`);
  const limit = median(limits);
  process.stdout.write(`the disk's limit, dd conv=fdatasync of the dense source: ${limit.toFixed(3)} s (${((SIZE >> 20) / limit).toFixed(0)} MiB/s);`
    + ` dense COMPLETED reaches ${((100 * limit) / dense.qsd).toFixed(0)} % of it (QSD), ${((100 * limit) / dense.blockd).toFixed(0)} % (blockd)\n`);
} finally {
  temp.cleanup();
}
