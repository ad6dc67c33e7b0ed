/*
 * Compressed qcow2 writes, blockd's driver against `qemu-img convert -c`, on the same
 * 256 MiB of data in the same run: a raw file (no zero clusters, so every cluster is
 * written) of mixed 64 KiB clusters, half text-like (words from a small vocabulary),
 * a quarter structured binary (counters), a quarter random (stays uncompressed). qemu-img
 * converts it into a new qcow2 (64 KiB clusters, cache writeback, its default 8 coroutines,
 * in order); blockd opens a new qcow2 of the same size and writes the file into it in
 * 2 MiB compressed requests, 8 in flight, then closes it (a flush, as qemu-img's close).
 * Both outputs are compared with the source. Alternating rounds, best of each: MiB/s of
 * source data, CPU seconds (user + system, all threads: blockd's deflate runs on libuv's
 * pool), the image sizes, and the blockd/qemu-img throughput ratio.
 * Run: node dist/bench/qcow2-compress.js [--quick] (--quick: one round).
 */
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, openSync, readSync, rmSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { openImage } from '../src/blockdev/image-session.js';
import { makeTempDir } from '../test/helpers/paths.js';
import { run } from './bench-tools.js';

const SIZE = 256 << 20;
const CLUSTER = 64 << 10;
const REQUEST = 2 << 20;
const IN_FLIGHT = 8;
const ROUNDS = process.argv.includes('--quick') ? 1 : 3;

const WORDS = ['block', 'cluster', 'qcow2', 'refcount', 'table', 'entry', 'image', 'backing', 'flush', 'write', 'the', 'of', 'and', 'data', 'node', 'job'];

/** One cluster of source data, by kind. */
function sourceCluster(index: number, state: { seed: number }): Buffer {
  const cluster = Buffer.alloc(CLUSTER);
  const next = () => (state.seed = (Math.imul(state.seed, 1103515245) + 12345) >>> 0);
  switch (index % 4) {
    case 0:
    case 2: {
      let at = 0;
      while (at < CLUSTER) at += cluster.write(`${WORDS[next() % WORDS.length]}${next() % 7 === 0 ? '\n' : ' '}`, at);
      return cluster;
    }
    case 1:
      for (let at = 0; at + 8 <= CLUSTER; at += 8) cluster.writeUInt32LE(index * 8192 + at / 8, at), cluster.writeUInt32LE(next() & 0xff, at + 4);
      return cluster;
    default:
      return randomFillSync(cluster);
  }
}

function makeSource(path: string): void {
  const fd = openSync(path, 'w');
  const state = { seed: 1 };
  for (let i = 0; i < SIZE / CLUSTER; i++) writeSync(fd, sourceCluster(i, state));
  closeSync(fd);
}

interface Result {
  seconds: number;
  cpu: number;
  bytes: number;
}

function qemuImgConvert(source: string, target: string): Result {
  rmSync(target, { force: true });
  const result = spawnSync('/usr/bin/time', ['-f', '%e %U %S', 'qemu-img', 'convert', '-c', '-t', 'writeback', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${CLUSTER}`, source, target], { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`qemu-img convert: ${result.stderr}`);
  const [elapsed, user, system] = result.stderr.trim().split('\n').pop()!.split(' ').map(Number);
  return { seconds: elapsed!, cpu: user! + system!, bytes: statSync(target).size };
}

async function blockdCompress(source: string, target: string): Promise<Result> {
  rmSync(target, { force: true });
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER}`, target, String(SIZE)]);
  const cpuBefore = process.cpuUsage();
  const start = process.hrtime.bigint();
  const session = await openImage(target, { format: 'qcow2', writable: true });
  const fd = openSync(source, 'r');
  try {
    let next = 0;
    const worker = async () => {
      while (next < SIZE) {
        const offset = next;
        next += REQUEST;
        const buffer = Buffer.alloc(REQUEST);
        readSync(fd, buffer, 0, REQUEST, offset);
        await session.disk.write(offset, buffer, { compress: true });
      }
    };
    await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
  } finally {
    closeSync(fd);
    await session.close();
  }
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  const cpu = process.cpuUsage(cpuBefore);
  return { seconds, cpu: (cpu.user + cpu.system) / 1e6, bytes: statSync(target).size };
}

function compare(source: string, target: string): void {
  run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', source, target]);
  run('qemu-img', ['check', target]);
}

async function main(): Promise<void> {
  const temp = makeTempDir('blockd-bench-compress-');
  try {
    const source = join(temp.dir, 'source.raw');
    makeSource(source);
    const best = { qemu: undefined as Result | undefined, blockd: undefined as Result | undefined };
    const better = (a: Result | undefined, b: Result) => (a === undefined || b.seconds < a.seconds ? b : a);
    for (let round = 0; round < ROUNDS; round++) {
      const order = round % 2 === 0 ? ['qemu', 'blockd'] : ['blockd', 'qemu'];
      for (const side of order) {
        const target = join(temp.dir, `${side}.qcow2`);
        const result = side === 'qemu' ? qemuImgConvert(source, target) : await blockdCompress(source, target);
        compare(source, target);
        best[side as 'qemu' | 'blockd'] = better(best[side as 'qemu' | 'blockd'], result);
        console.log(`round ${round + 1} ${side}: ${result.seconds.toFixed(2)} s, ${(SIZE / 2 ** 20 / result.seconds).toFixed(1)} MiB/s, CPU ${result.cpu.toFixed(2)} s`);
      }
    }
    const row = (name: string, result: Result) =>
      `| ${name} | ${(SIZE / 2 ** 20 / result.seconds).toFixed(1)} | ${result.cpu.toFixed(2)} | ${(result.bytes / 2 ** 20).toFixed(1)} |`;
    console.log(`\ncompressed writes of ${SIZE >> 20} MiB (64 KiB clusters), best of ${ROUNDS}`);
    console.log('| writer | MiB/s | CPU s | image MiB |\n|---|---|---|---|');
    console.log(row('qemu-img convert -c', best.qemu!));
    console.log(row('blockd (compress flag)', best.blockd!));
    console.log(`blockd/qemu-img throughput: ${(best.qemu!.seconds / best.blockd!.seconds).toFixed(2)}`);
  } finally {
    temp.cleanup();
  }
}

await main();
