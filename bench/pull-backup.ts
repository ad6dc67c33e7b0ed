/*
 * Pull backup (image fleecing), blockd against qemu-storage-daemon in the same run. The disk
 * is a dense 1 GiB qcow2 of random data (random-images.ts); each daemon gets its own copy with
 * a fleecing qcow2 backed by it, a copy-before-write filter onto the fleecing image and a
 * snapshot-access node over the filter, exported over NBD. The backup program is nbdcopy,
 * reading the whole view to null: (what it reads is compared with the disk once, untimed).
 * Timed: nbdcopy's run, with the daemon's user CPU seconds meanwhile. Each round runs both
 * daemons back to back, the order alternating, each after the page cache was brought to the
 * same state and the disk read into it. Ratios are paired (QSD time / blockd time, above 1 =
 * blockd faster); the median of the rounds is the figure.
 * Run: node dist/bench/pull-backup.js [--quick]   (--quick: 256 MiB, 2 rounds)
 */
import { copyFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { QmpClient } from '../src/qmp/client.js';
import { makeTempDir } from '../test/helpers/paths.js';
import { fixed, median, ROUNDS, run, SIZE, timedWithCpu } from './bench-tools.js';
import { pairedRounds, type BenchDaemon, type Side } from './paired-rounds.js';
import { levelPageCache, makeRandomQcow2, readIntoCache } from './random-images.js';

interface Timing {
  seconds: number;
  cpu: number;
}

/** One pull of the whole view by nbdcopy, on the daemon's own copy of the disk. */
async function pullOn(daemon: BenchDaemon, dir: string, side: Side, pristine: string, check: boolean): Promise<Timing> {
  const disk = join(dir, `disk-${side}.qcow2`);
  const fleece = join(dir, `fleece-${side}.qcow2`);
  copyFileSync(pristine, disk);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', disk, '-F', 'qcow2', fleece]);
  const nbdSocket = join(dir, `nbd-${side}.sock`);
  const view = `nbd+unix:///view?socket=${nbdSocket}`;
  const qmp = await QmpClient.connect(`unix:${daemon.socket}`);
  try {
    await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'disk', file: { driver: 'file', filename: disk } });
    await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'fleece', file: { driver: 'file', filename: fleece }, backing: 'disk' } as never);
    await qmp.execute('blockdev-add', { driver: 'copy-before-write', 'node-name': 'cbw', file: 'disk', target: 'fleece' } as never);
    await qmp.execute('blockdev-add', { driver: 'snapshot-access', 'node-name': 'view', file: 'cbw' } as never);
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbdSocket } } });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'view' });
    if (check) run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', view, pristine]);
    levelPageCache(dir, SIZE);
    readIntoCache(disk);
    const timing = timedWithCpu(daemon.child.pid!, () => run('nbdcopy', [view, 'null:']));
    const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', () => true);
    await qmp.execute('block-export-del', { id: 'e' });
    await deleted;
    await qmp.execute('nbd-server-stop');
    for (const node of ['view', 'cbw', 'fleece', 'disk']) await qmp.execute('blockdev-del', { 'node-name': node });
    return timing;
  } finally {
    await qmp.close();
    rmSync(disk, { force: true });
    rmSync(fleece, { force: true });
  }
}

const temp = makeTempDir('blockd-bench-pull-backup-');
try {
  const pristine = join(temp.dir, 'pristine.qcow2');
  makeRandomQcow2(pristine, SIZE, 'dense');
  const rounds = await pairedRounds(temp.dir, (daemon, side, round) => pullOn(daemon, temp.dir, side, pristine, round === 0));
  const mib = SIZE >> 20;
  process.stdout.write(`pull backup: nbdcopy reads a snapshot-access export (copy-before-write over a fleecing qcow2) of a dense ${mib} MiB qcow2 of random data, blockd vs qemu-storage-daemon, ${ROUNDS} alternating rounds\n`);
  process.stdout.write('seconds of nbdcopy; ratio = QSD time / blockd time (above 1 = blockd faster); CPU s = the daemon\'s user CPU\n');
  process.stdout.write(`${'case'.padEnd(16)} ${'QSD s'.padStart(8)} ${'blockd s'.padStart(8)} ${'ratio'.padStart(6)} ${'QSD MiB/s'.padStart(9)} ${'blk MiB/s'.padStart(9)} ${'QSD CPU'.padStart(7)} ${'blk CPU'.padStart(7)}\n`);
  const line = (label: string, q: Timing, b: Timing, ratio: number) => process.stdout.write(
    `${label.padEnd(16)} ${fixed(q.seconds, 8)} ${fixed(b.seconds, 8)} ${fixed(ratio, 6, 2)} ${fixed(mib / q.seconds, 9, 0)} ${fixed(mib / b.seconds, 9, 0)} ${fixed(q.cpu, 7, 2)} ${fixed(b.cpu, 7, 2)}\n`);
  for (const [index, timing] of rounds.entries()) line(`round ${index + 1}`, timing.qsd, timing.blockd, timing.qsd.seconds / timing.blockd.seconds);
  const pick = (side: Side, field: keyof Timing) => median(rounds.map((timing) => timing[side][field]));
  line('median', { seconds: pick('qsd', 'seconds'), cpu: pick('qsd', 'cpu') }, { seconds: pick('blockd', 'seconds'), cpu: pick('blockd', 'cpu') },
    median(rounds.map((timing) => timing.qsd.seconds / timing.blockd.seconds)));
} finally {
  temp.cleanup();
}
