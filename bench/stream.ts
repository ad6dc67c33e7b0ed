/*
 * block-stream, blockd against qemu-storage-daemon in the same run: a 1 GiB
 * base (dense: all data; sparse: 10 % of it in scattered 64 KiB clusters)
 * under an empty qcow2 overlay, streamed whole into the overlay. Each daemon
 * works on its own copy; the time from the command to BLOCK_JOB_COMPLETED is
 * taken over alternating rounds, best of each, and reported as a throughput
 * ratio (above 1 = blockd faster). The sparse case shows whether time follows
 * the allocated data.
 * Run: node dist/bench/stream.js [--quick]
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { QmpClient } from '../src/qmp/client.js';
import { runBlockd } from '../test/helpers/blockd-process.js';
import { makeTempDir } from '../test/helpers/paths.js';
import { startQsd } from '../test/helpers/qsd-process.js';

const QUICK = process.argv.includes('--quick');
const SIZE = QUICK ? 256 << 20 : 1 << 30;
const ROUNDS = QUICK ? 1 : 2;

function run(command: string, args: string[]): void {
  const result = spawnSync(command, args, { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`${command} ${args.join(' ')}: ${result.stderr}`);
}

function makeChain(dir: string, sparse: boolean): void {
  mkdirSync(dir, { recursive: true });
  const base = join(dir, 'base.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(SIZE)]);
  if (sparse) {
    // Every tenth 64 KiB cluster: qemu-img bench writes `count` requests `step` bytes apart.
    run('qemu-img', ['bench', '-q', '-w', '-f', 'qcow2', '-s', '64K', '-S', '640K', '-c', String(Math.floor(SIZE / (640 * 1024))), '-d', '16', base]);
  } else {
    run('qemu-img', ['bench', '-q', '-w', '-f', 'qcow2', '-s', '1M', '-c', String(SIZE >> 20), '-d', '16', base]);
  }
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'top.qcow2')]);
}

async function streamSeconds(socket: string, dir: string): Promise<number> {
  const qmp = await QmpClient.connect(`unix:${socket}`);
  await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: join(dir, 'top.qcow2') } });
  const start = process.hrtime.bigint();
  const done = qmp.waitForEvent('BLOCK_JOB_COMPLETED', () => true);
  await qmp.execute('block-stream', { 'job-id': 's', device: 'top' });
  const event = await done;
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  if ((event.data as { error?: string }).error) throw new Error(`stream failed: ${(event.data as { error: string }).error}`);
  await qmp.execute('blockdev-del', { 'node-name': 'top' });
  await qmp.close();
  return seconds;
}

async function main(): Promise<void> {
  const temp = makeTempDir('blockd-bench-stream-');
  const rows: string[] = [];
  try {
    const qsd = await startQsd(temp.dir);
    const blockd = await runBlockd(['--qmp', `unix:${join(temp.dir, 'blockd.sock')}`]);
    try {
      for (const sparse of [false, true]) {
        let qsdSeconds = Infinity;
        let blockdSeconds = Infinity;
        for (let round = 0; round < ROUNDS; round++) {
          for (const side of ['qsd', 'blockd'] as const) {
            const dir = join(temp.dir, `${side}-${round}`);
            rmSync(dir, { recursive: true, force: true });
            makeChain(dir, sparse);
            const seconds = await streamSeconds(side === 'qsd' ? qsd.socket : join(temp.dir, 'blockd.sock'), dir);
            if (side === 'qsd') qsdSeconds = Math.min(qsdSeconds, seconds);
            else blockdSeconds = Math.min(blockdSeconds, seconds);
            rmSync(dir, { recursive: true, force: true });
          }
        }
        const name = sparse ? 'stream, 90 % sparse base' : 'stream, dense base';
        rows.push(`${name.padEnd(28)} ${qsdSeconds.toFixed(3).padStart(9)} ${blockdSeconds.toFixed(3).padStart(9)} ${(qsdSeconds / blockdSeconds).toFixed(2).padStart(7)}`);
      }
    } finally {
      await blockd.stop();
      await qsd.stop();
    }
    process.stdout.write(`block-stream of a ${SIZE >> 20} MiB chain, blockd vs qemu-storage-daemon (seconds, best of ${ROUNDS}; ratio = QSD time / blockd time)\n`);
    process.stdout.write(`${'case'.padEnd(28)} ${'QSD s'.padStart(9)} ${'blockd s'.padStart(9)} ${'ratio'.padStart(7)}\n${rows.join('\n')}\n`);
  } finally {
    temp.cleanup();
  }
}

await main();
