/*
 * Crash safety of blockd's qcow2 driver: a child writing many slots at once is SIGKILLed at random moments;
 * `qemu-img check` must exit 0 or 3, and whatever was acknowledged before a completed flush must read back.
 * Some runs write most slots compressed (packed several to a host cluster, so a lost refcount shows).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { dirname, extname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { after, describe, test, type TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import { ModelledDisk } from '../helpers/disk-model.js';
import { makeTempDir } from '../helpers/paths.js';
import { compressedSlotContents, slotContents, type SlotOperation } from '../helpers/qcow2-crash-writer.js';
import { KiB, SeededRandom, convertToRaw, createQcow2, qemuImgCheck, qemuIo } from '../helpers/qemu-tools.js';

const { dir, cleanup } = makeTempDir('blockd-qcow2-crash-');
after(cleanup);

const here = fileURLToPath(import.meta.url);
const WRITER = join(dirname(here), '..', 'helpers', `qcow2-crash-writer${extname(here)}`);
// Run from TypeScript sources (tsx) the child needs the same loader.
const NODE_ARGS = extname(here) === '.ts' ? ['--import', 'tsx'] : [];

interface CrashRun {
  seed: number;
  clusterSize: number;
  /** Slots straddle cluster boundaries, so neighbours allocate the same cluster concurrently. */
  slotSize: number;
  slotCount: number;
  inFlight: number;
  withBacking: boolean;
  /** Most slots written compressed: slots are whole clusters, and the image starts with plain zero clusters only (compression never overwrites). */
  compressed?: boolean;
  /** Kill this long after the child is ready, or right after this flush completed. */
  kill: { afterMs: number } | { afterFlush: number };
}

interface ChildLog {
  started: Map<number, SlotOperation>;
  /** Slots whose request was acknowledged before a flush that completed. */
  durable: Set<number>;
  acknowledged: number;
  flushes: number;
  /** The writer finished every slot before the kill. */
  finished: boolean;
}

/** Runs the writer until the kill, reading its log as it goes. */
async function runAndKill(image: string, run: CrashRun): Promise<ChildLog> {
  const child = spawn(process.execPath, [...NODE_ARGS, WRITER, image, String(run.seed), String(run.slotSize), String(run.slotCount), String(run.inFlight), run.compressed ? '1' : '0'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const log: ChildLog = { started: new Map(), durable: new Set(), acknowledged: 0, flushes: 0, finished: false };
  const acked: number[] = [];
  const ackedAtFlush = new Map<number, number>();
  let durableCount = 0;
  let timer: NodeJS.Timeout | undefined;
  const kill = () => child.kill('SIGKILL');
  try {
    for await (const line of createInterface({ input: child.stdout })) {
      const [word, a, b] = line.split(' ');
      if (word === 'ready') {
        if ('afterMs' in run.kill) timer = setTimeout(kill, run.kill.afterMs);
      } else if (word === 'start') {
        log.started.set(Number(a), b as SlotOperation);
      } else if (word === 'ack') {
        acked.push(Number(a));
      } else if (word === 'flush') {
        ackedAtFlush.set(Number(a), acked.length);
      } else if (word === 'flushed') {
        durableCount = Math.max(durableCount, ackedAtFlush.get(Number(a))!);
        log.flushes++;
        if ('afterFlush' in run.kill && Number(a) === run.kill.afterFlush) kill();
      } else if (word === 'done') {
        log.finished = true;
        kill();
      } else {
        assert.fail(`crash writer (seed ${run.seed}): ${line}\n${stderr}`);
      }
    }
  } finally {
    kill();
  }
  clearTimeout(timer);
  const code = await exited;
  assert.equal(code, null, `crash writer (seed ${run.seed}) exited by itself (${code}): ${stderr}`);
  log.acknowledged = acked.length;
  for (const slot of acked.slice(0, durableCount)) log.durable.add(slot);
  return log;
}

/** Bytes a completed operation leaves in a slot: discard zeroes only the whole clusters inside it. */
function expectedSlot(run: CrashRun, slot: number, operation: SlotOperation, before: Buffer): Buffer {
  const start = slot * run.slotSize;
  switch (operation) {
    case 'write': return slotContents(run.seed, slot, run.slotSize);
    case 'compress': return compressedSlotContents(run.seed, slot, run.slotSize);
    case 'zero':
    case 'unmap': return Buffer.alloc(run.slotSize);
    case 'discard': {
      const cs = run.clusterSize;
      const result = Buffer.from(before);
      const from = Math.ceil(start / cs) * cs - start;
      const to = Math.floor((start + run.slotSize) / cs) * cs - start;
      if (to > from) result.fill(0, from, to);
      return result;
    }
  }
}

async function crashOnce(run: CrashRun, t: TestContext): Promise<void> {
  const context = `seed=${run.seed} cluster_size=${run.clusterSize}${run.compressed ? ' compressed' : ''} kill=${JSON.stringify(run.kill)}`;
  const name = `crash-${run.seed}-${run.clusterSize}`;
  const size = run.slotSize * run.slotCount;
  const random = new SeededRandom(run.seed);
  let backing: { path: string; format: string } | undefined;
  if (run.withBacking) {
    const base = createQcow2(join(dir, `${name}-base.qcow2`), size);
    qemuIo(base, [`write -P 0xa5 0 ${size}`]);
    backing = { path: base, format: 'qcow2' };
  }
  const image = createQcow2(join(dir, `${name}.qcow2`), size, { clusterSize: run.clusterSize, backing });
  // Some slots start with data, some with zeros, some unallocated, so every operation changes something.
  qemuIo(image, Array.from({ length: 12 }, (_, i) => {
    if (run.compressed) {
      const cs = run.clusterSize;
      const offset = random.int(size / cs) * cs;
      return `write -z ${offset} ${Math.min(size - offset, cs * (1 + random.int(8)))}`;
    }
    const offset = random.int(size / 512) * 512;
    return `write ${i % 4 === 3 ? '-z' : `-P 0x${(0x30 + i).toString(16)}`} ${offset} ${Math.min(size - offset, 512 * (1 + random.int(size / 512 / 8)))}`;
  }));
  const before = await ModelledDisk.imageBytes(image);

  const log = await runAndKill(image, run);
  t.diagnostic(`started ${log.started.size}, acknowledged ${log.acknowledged}, durable ${log.durable.size}, flushes ${log.flushes} of ${run.slotCount} slots`);
  assert.ok(!log.finished, `${context}: the writer finished before the kill; nothing was interrupted`);
  if ('afterFlush' in run.kill) assert.ok(log.durable.size > 0, `${context}: killed after a flush, yet nothing was durable`);
  const check = qemuImgCheck(image);
  assert.ok(check.status === 0 || check.status === 3, `${context}: qemu-img check exit ${check.status} (0 or 3 expected): ${check.output}`);
  assert.equal(check.corruptions, 0, `${context}: ${check.output}`);

  const raw = join(dir, `${name}.raw`);
  convertToRaw(image, raw);
  const after = await readFile(raw);
  assert.equal(after.length, size, context);
  for (let slot = 0; slot < run.slotCount; slot++) {
    const start = slot * run.slotSize;
    const old = before.subarray(start, start + run.slotSize);
    const now = after.subarray(start, start + run.slotSize);
    const operation = log.started.get(slot);
    const where = `${context}: slot ${slot} [${start}, +${run.slotSize})`;
    if (operation === undefined) {
      assert.ok(now.equals(old), `${where} was never written but changed`);
      continue;
    }
    const expected = expectedSlot(run, slot, operation, old);
    if (log.durable.has(slot)) {
      assert.ok(now.equals(expected), `${where}: ${operation} acknowledged before a completed flush is lost`);
      continue;
    }
    // Not flushed: each sector holds the old or the new bytes, nothing else.
    for (let sector = 0; sector < run.slotSize; sector += 512) {
      const bytes = now.subarray(sector, sector + 512);
      assert.ok(bytes.equals(old.subarray(sector, sector + 512)) || bytes.equals(expected.subarray(sector, sector + 512)),
        `${where}: sector at +${sector} after an interrupted ${operation} holds neither the old nor the new bytes`);
    }
  }
}

describe('qcow2 images killed mid-write', () => {
  const runs: CrashRun[] = [];
  const kinds = [
    { clusterSize: 64 * KiB, slotSize: 96 * KiB + 512, slotCount: 800, withBacking: false },
    { clusterSize: 4 * KiB, slotSize: 6 * KiB + 512, slotCount: 1500, withBacking: true },
    { clusterSize: 512, slotSize: 1536 + 512, slotCount: 2000, withBacking: false },
  ];
  for (let i = 0; i < 15; i++) {
    const kind = kinds[i % kinds.length]!;
    const kill = i < 9 ? { afterMs: 20 + ((i * 173) % 480) } : { afterFlush: 1 + ((i * 5) % 8) };
    runs.push({ seed: 101 + i, inFlight: 16, ...kind, kill });
  }
  const compressedKinds = [
    { clusterSize: 64 * KiB, slotSize: 128 * KiB, slotCount: 600, withBacking: false },
    { clusterSize: 4 * KiB, slotSize: 8 * KiB, slotCount: 1500, withBacking: true },
    { clusterSize: 512, slotSize: 1024, slotCount: 2000, withBacking: false },
  ];
  for (let i = 0; i < 6; i++) {
    const kind = compressedKinds[i % compressedKinds.length]!;
    const kill = i < 3 ? { afterMs: 80 + ((i * 211) % 400) } : { afterFlush: 1 + ((i * 3) % 6) };
    runs.push({ seed: 201 + i, inFlight: 16, ...kind, compressed: true, kill });
  }
  for (const run of runs) {
    test(`seed=${run.seed} cluster_size=${run.clusterSize}${run.withBacking ? ' over a backing file' : ''}${run.compressed ? ', compressed' : ''}, killed ${JSON.stringify(run.kill)}`, (t) => crashOnce(run, t));
  }
});
