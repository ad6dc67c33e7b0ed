/*
 * Push backups, blockd against qemu-storage-daemon in the same run. The source is a dense
 * 1 GiB qcow2 of random data (random-images.ts, as issue 16's benchmark builds its cases),
 * exported writable over NBD and carrying a dirty bitmap. A full backup (blockdev-backup
 * sync=full into a new qcow2) is timed from the command to BLOCK_JOB_COMPLETED; then 5 % of
 * the disk is dirtied through the export (every twentieth 64 KiB cluster) and an
 * incremental backup (sync=incremental with the bitmap) is timed the same way; it should
 * take about 5 % of the full one. With each daemon's CPU seconds over each job. Each round
 * runs both daemons back to back on their own copy of the source, the order alternating,
 * each after the page cache was brought to the same state and the source read into it;
 * the full backup is compared with the source (untimed). Ratios are paired (QSD time /
 * blockd time, above 1 = blockd faster); the median of the rounds is the figure.
 * Run: node dist/bench/backup.js [--quick]   (--quick: 256 MiB, 2 rounds)
 */
import { copyFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { QmpClient } from '../src/qmp/client.js';
import { makeTempDir } from '../test/helpers/paths.js';
import { cpuSeconds, fixed, median, ROUNDS, run, SIZE } from './bench-tools.js';
import { pairedRounds, type BenchDaemon, type Side } from './paired-rounds.js';
import { levelPageCache, makeRandomQcow2, readIntoCache } from './random-images.js';

type Kind = 'full' | 'incremental';

interface Timing {
  seconds: number;
  cpu: number;
}

const CLUSTER = 64 << 10;
/** Every twentieth cluster: 5 % of the disk. */
const DIRTY_EVERY = 20;

async function backupOnce(qmp: QmpClient, daemon: BenchDaemon, target: string, kind: Kind): Promise<Timing> {
  run('qemu-img', ['create', '-q', '-f', 'qcow2', target, String(SIZE)]);
  await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: { driver: 'file', filename: target } });
  const cpuBefore = cpuSeconds(daemon.child.pid!);
  const start = process.hrtime.bigint();
  const completed = qmp.waitForEvent('BLOCK_JOB_COMPLETED', () => true, 600_000);
  await qmp.execute('blockdev-backup', {
    'job-id': 'b', device: 'src', target: 'tgt',
    ...(kind === 'full' ? { sync: 'full' } : { sync: 'incremental', bitmap: 'b0' }),
  });
  const event = await completed;
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  const cpuAfter = cpuSeconds(daemon.child.pid!);
  const error = (event.data as { error?: string }).error;
  if (error) throw new Error(`the ${kind} backup failed: ${error}`);
  await qmp.execute('blockdev-del', { 'node-name': 'tgt' });
  return { seconds, cpu: cpuAfter.user + cpuAfter.system - cpuBefore.user - cpuBefore.system };
}

/** Dirties every twentieth cluster of the export with a pattern, in one qemu-io run. */
function dirtyThroughExport(nbdSocket: string): void {
  const commands: string[] = [];
  for (let offset = 0; offset < SIZE; offset += CLUSTER * DIRTY_EVERY) commands.push('-c', `write -P 0x5a ${offset} ${CLUSTER}`);
  run('qemu-io', ['-f', 'raw', ...commands, `nbd+unix:///src?socket=${nbdSocket}`]);
}

/** A full backup, 5 % dirtied, an incremental one; each daemon on its own copy of the source. */
async function roundOn(daemon: BenchDaemon, dir: string, side: Side, pristine: string): Promise<Record<Kind, Timing>> {
  const source = join(dir, `source-${side}.qcow2`);
  copyFileSync(pristine, source);
  const nbdSocket = join(dir, `nbd-${side}.sock`);
  const qmp = await QmpClient.connect(`unix:${daemon.socket}`);
  try {
    await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: source } });
    await qmp.execute('block-dirty-bitmap-add', { node: 'src', name: 'b0' });
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbdSocket } } });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'src', writable: true });
    levelPageCache(dir, SIZE);
    readIntoCache(source);
    const fullTarget = join(dir, `full-${side}.qcow2`);
    const full = await backupOnce(qmp, daemon, fullTarget, 'full');
    // The full backup is the disk as it was; the bitmap then records only what follows.
    await qmp.execute('block-dirty-bitmap-clear', { node: 'src', name: 'b0' });
    run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'qcow2', pristine, fullTarget]);
    rmSync(fullTarget);
    dirtyThroughExport(nbdSocket);
    levelPageCache(dir, SIZE);
    readIntoCache(source);
    const incrementalTarget = join(dir, `incremental-${side}.qcow2`);
    const incremental = await backupOnce(qmp, daemon, incrementalTarget, 'incremental');
    rmSync(incrementalTarget);
    await qmp.execute('block-export-del', { id: 'e' });
    await qmp.execute('nbd-server-stop');
    await qmp.execute('blockdev-del', { 'node-name': 'src' }).catch(async () => {
      // The export goes asynchronously: try again once it has.
      await new Promise((resolve) => setTimeout(resolve, 200));
      await qmp.execute('blockdev-del', { 'node-name': 'src' });
    });
    return { full, incremental };
  } finally {
    await qmp.close();
    rmSync(source, { force: true });
  }
}

const temp = makeTempDir('blockd-bench-backup-');
try {
  const pristine = join(temp.dir, 'pristine.qcow2');
  makeRandomQcow2(pristine, SIZE, 'dense');
  const rounds = await pairedRounds(temp.dir, (daemon, side) => roundOn(daemon, temp.dir, side, pristine));
  const mib = SIZE >> 20;
  process.stdout.write(`blockdev-backup of a dense ${mib} MiB qcow2 of random data into a new qcow2, blockd vs qemu-storage-daemon, ${ROUNDS} alternating rounds\n`);
  process.stdout.write('seconds from the command to BLOCK_JOB_COMPLETED; ratio = QSD time / blockd time (above 1 = blockd faster); CPU s = user+system\n');
  process.stdout.write(`${'case'.padEnd(26)} ${'QSD s'.padStart(8)} ${'blockd s'.padStart(8)} ${'ratio'.padStart(6)} ${'QSD MiB/s'.padStart(9)} ${'blk MiB/s'.padStart(9)} ${'QSD CPU'.padStart(7)} ${'blk CPU'.padStart(7)}\n`);
  for (const kind of ['full', 'incremental'] as const) {
    const data = kind === 'full' ? mib : mib / DIRTY_EVERY;
    const line = (label: string, q: Timing, b: Timing, ratio: number) => process.stdout.write(
      `${label.padEnd(26)} ${fixed(q.seconds, 8)} ${fixed(b.seconds, 8)} ${fixed(ratio, 6, 2)} ${fixed(data / q.seconds, 9, 0)} ${fixed(data / b.seconds, 9, 0)} ${fixed(q.cpu, 7, 2)} ${fixed(b.cpu, 7, 2)}\n`);
    for (const [index, timing] of rounds.entries()) line(`${kind}, round ${index + 1}`, timing.qsd[kind], timing.blockd[kind], timing.qsd[kind].seconds / timing.blockd[kind].seconds);
    const pick = (side: Side, field: keyof Timing) => median(rounds.map((timing) => timing[side][kind][field]));
    line(`${kind}, median`, { seconds: pick('qsd', 'seconds'), cpu: pick('qsd', 'cpu') }, { seconds: pick('blockd', 'seconds'), cpu: pick('blockd', 'cpu') },
      median(rounds.map((timing) => timing.qsd[kind].seconds / timing.blockd[kind].seconds)));
  }
  const share = (side: Side) => (100 * median(rounds.map((t) => t[side].incremental.seconds))) / median(rounds.map((t) => t[side].full.seconds));
  process.stdout.write(`\nincremental time as a share of the full one (5 % of the disk dirty): QSD ${share('qsd').toFixed(1)} %, blockd ${share('blockd').toFixed(1)} %\n`);
} finally {
  temp.cleanup();
}
