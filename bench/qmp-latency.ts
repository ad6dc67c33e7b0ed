/*
 * QMP round-trip latency, blockd against qemu-storage-daemon in the same run:
 * 2,000 sequential query-version calls on one negotiated UNIX-socket
 * connection (after 1,000 warm-up calls, so blockd's JIT has settled), three
 * interleaved rounds per server, with the same minimal client for both.
 * Prints median, p99 and mean per server and the blockd/QSD ratios.
 * Run: npm run bench (or node dist/bench/qmp-latency.js [calls]).
 */
import net from 'node:net';
import { join } from 'node:path';
import { runBlockd } from '../test/helpers/blockd-process.js';
import { makeTempDir } from '../test/helpers/paths.js';
import { qsdAvailable, startQsd } from '../test/helpers/qsd-process.js';

const CALLS = Number(process.argv[2] ?? 2000);
const WARMUP = 1000;
const ROUNDS = 3;

/** Sends one request per reply line and times each round trip. */
async function measure(path: string): Promise<number[]> {
  const socket = net.connect(path);
  socket.setNoDelay(true);
  let buffer = '';
  let waiter: (() => void) | undefined;
  socket.on('data', (chunk) => {
    buffer += chunk.toString('latin1');
    waiter?.();
  });
  const nextLine = () => new Promise<string>((resolve) => {
    const check = () => {
      const index = buffer.indexOf('\r\n');
      if (index < 0) return false;
      const line = buffer.slice(0, index);
      buffer = buffer.slice(index + 2);
      waiter = undefined;
      resolve(line);
      return true;
    };
    if (!check()) waiter = () => void check();
  });
  await new Promise((resolve) => socket.once('connect', resolve));
  await nextLine(); // greeting
  socket.write('{"execute":"qmp_capabilities"}');
  await nextLine();
  const request = '{"execute":"query-version"}';
  const samples: number[] = [];
  for (let i = 0; i < WARMUP + CALLS; i++) {
    const start = process.hrtime.bigint();
    socket.write(request);
    const reply = await nextLine();
    const micros = Number(process.hrtime.bigint() - start) / 1000;
    if (!reply.startsWith('{"return"')) throw new Error(`unexpected reply ${reply}`);
    if (i >= WARMUP) samples.push(micros);
  }
  socket.end();
  return samples;
}

function stats(samples: number[]): { median: number; p99: number; mean: number } {
  const sorted = [...samples].sort((a, b) => a - b);
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;
  return { median: at(0.5), p99: at(0.99), mean: sorted.reduce((a, b) => a + b, 0) / sorted.length };
}

async function main(): Promise<void> {
  if (!qsdAvailable()) throw new Error('qemu-storage-daemon is not installed (apt-get install qemu-system-common)');
  const temp = makeTempDir('blockd-bench-');
  const qsd = await startQsd(temp.dir);
  const blockd = await runBlockd(['--qmp', `unix:${join(temp.dir, 'blockd.sock')}`, '--log-level', 'info']);
  try {
    // Interleave the runs so that machine noise hits both alike.
    const results: Record<string, number[]> = { qsd: [], blockd: [] };
    for (let round = 0; round < ROUNDS; round++) {
      results.qsd!.push(...(await measure(qsd.socket)));
      results.blockd!.push(...(await measure(join(temp.dir, 'blockd.sock'))));
    }
    const q = stats(results.qsd!);
    const b = stats(results.blockd!);
    const row = (name: string, s: ReturnType<typeof stats>) =>
      `${name.padEnd(22)} ${s.median.toFixed(1).padStart(9)} ${s.p99.toFixed(1).padStart(9)} ${s.mean.toFixed(1).padStart(9)}`;
    process.stdout.write(`QMP round trip, query-version, ${CALLS} calls x ${ROUNDS} interleaved rounds per server, ${WARMUP} warm-up calls each (microseconds)\n`);
    process.stdout.write(`${'server'.padEnd(22)} ${'median'.padStart(9)} ${'p99'.padStart(9)} ${'mean'.padStart(9)}\n`);
    process.stdout.write(`${row('qemu-storage-daemon', q)}\n${row('blockd', b)}\n`);
    process.stdout.write(`ratio blockd/qsd: median ${(b.median / q.median).toFixed(2)}, p99 ${(b.p99 / q.p99).toFixed(2)}, mean ${(b.mean / q.mean).toFixed(2)} (below 1 = blockd faster)\n`);
  } finally {
    await qsd.stop();
    await blockd.stop();
    temp.cleanup();
  }
}

await main();
