/*
 * Crash-consistent persistent bitmaps (issue 12, item 4): blockd is killed with SIGKILL at a
 * random moment while three NBD connections keep writes (and write-zeroes, flushes, FUA
 * writes) in flight into a qcow2 image with persistent bitmaps: two enabled at different
 * granularities, one disabled, and in some rounds one more added while the writes go on.
 * After each kill: qemu-img check finds no corruption (leaks are reported, not failed); a
 * fresh blockd loads every bitmap that was added, the enabled ones consistent; read back over
 * NBD (nbdinfo --map), each enabled bitmap covers every acknowledged write sent after it was
 * added; and the writes a flush or FUA made durable read back where no later write may have
 * overwritten them. The same rounds stopped with SIGTERM (a clean close stores the bitmaps)
 * must pass too, and there the bitmaps must also hold nothing beyond the granules written:
 * that proves the check reads the bits it judges.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { QmpClient } from '../../src/qmp/client.js';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { AckedWriter, type AckedWrite } from '../helpers/nbd-acked-writes.js';
import { makeTempDir } from '../helpers/paths.js';
import { qemuImgBitmaps } from '../helpers/qemu-bitmaps.js';
import { createQcow2, KiB, MiB, qemuImgCheck, qemuIo, SeededRandom, testSeeds } from '../helpers/qemu-tools.js';
import { BitmapReader, firstUncovered, type ReloadedImage, type ByteRange } from '../helpers/reloaded-bitmaps.js';

const DISK_SIZE = 16 * MiB;
const ROUNDS = 6;

/** One daemon opens every image again after its crash (a blockdev-add each time). */
const reader = BitmapReader.forTestFile();

interface PlannedBitmap {
  name: string;
  granularity: number;
  disabled: boolean;
  /** The writer's logical time when block-dirty-bitmap-add was sent: writes acknowledged before cannot be in the bitmap. */
  requestedAt: number;
  /** ... and when it returned: writes sent later must be covered. */
  addedAt?: number;
}

interface Daemon {
  dir: string;
  image: string;
  blockd: BlockdProcess;
  qmp: QmpClient;
}

/**
 * In a fresh directory: an image with data from before the run, and blockd serving it with a
 * QMP monitor and an NBD server; whatever `run` leaves (a failed assertion before the kill
 * too), the daemon is killed and the directory removed.
 */
async function withDaemon<T>(run: (daemon: Daemon) => Promise<T>): Promise<T> {
  const { dir, cleanup } = makeTempDir('blockd-bitmap-crash-');
  let blockd: BlockdProcess | undefined;
  try {
    const image = createQcow2(join(dir, 'disk.qcow2'), DISK_SIZE);
    qemuIo(image, ['write -P 0x11 0 4M', 'write -P 0x22 10M 1M', 'write -z 12M 512k'], ['-f', 'qcow2']);
    blockd = await runBlockd([
      '--blockdev', `driver=qcow2,node-name=disk,file.driver=file,file.filename=${image}`,
      '--nbd-server', `addr.type=unix,addr.path=${join(dir, 'nbd.sock')}`,
      '--qmp', `unix:${join(dir, 'qmp.sock')}`,
    ]);
    const qmp = await QmpClient.connect(`unix:${join(dir, 'qmp.sock')}`);
    try {
      return await run({ dir, image, blockd, qmp });
    } finally {
      await qmp.close().catch(() => {});
    }
  } finally {
    await blockd?.stop('SIGKILL');
    cleanup();
  }
}

function addBitmap(qmp: QmpClient, bitmap: PlannedBitmap): Promise<unknown> {
  return qmp.execute('block-dirty-bitmap-add', { node: 'disk', name: bitmap.name, granularity: bitmap.granularity, persistent: true, disabled: bitmap.disabled });
}

function describeWrite(write: AckedWrite): string {
  return `${write.data ? 'write' : 'write-zeroes'} ${write.offset}+${write.length} (sent at ${write.sentAt}, acknowledged at ${write.ackedAt})`;
}

function granuleSpan(range: ByteRange, granularity: number): ByteRange {
  const start = Math.floor(range.offset / granularity) * granularity;
  const end = Math.ceil((range.offset + range.length) / granularity) * granularity;
  return { offset: start, length: end - start };
}

/** `ranges` minus the parts `hole` overlaps. */
function subtract(ranges: ByteRange[], hole: ByteRange): ByteRange[] {
  return ranges.flatMap((range) => {
    const end = range.offset + range.length;
    const holeEnd = hole.offset + hole.length;
    if (holeEnd <= range.offset || hole.offset >= end) return [range];
    return [
      ...(hole.offset > range.offset ? [{ offset: range.offset, length: hole.offset - range.offset }] : []),
      ...(holeEnd < end ? [{ offset: holeEnd, length: end - holeEnd }] : []),
    ];
  });
}

/**
 * The parts of each durable write that must read as it wrote them: minus whatever another
 * write could have put there after it (one not acknowledged before this one was sent, or
 * one never acknowledged at all).
 */
function settledParts(durable: AckedWrite, sent: readonly AckedWrite[]): ByteRange[] {
  const later = sent.filter((other) => other !== durable && !(other.ackedAt > 0 && other.ackedAt < durable.sentAt));
  return subtractAll([{ offset: durable.offset, length: durable.length }], later);
}

function subtractAll(ranges: ByteRange[], holes: readonly ByteRange[]): ByteRange[] {
  return holes.reduce(subtract, ranges);
}

/** One to three stretches of the disk the round writes into, so that even a 1 MiB-granular bitmap has clean parts. */
function randomRegions(random: SeededRandom): ByteRange[] {
  return Array.from({ length: 1 + random.int(3) }, () => {
    const length = 256 * KiB + random.int(2.75 * MiB / 512) * 512;
    return { offset: random.int((DISK_SIZE - length) / 512 + 1) * 512, length };
  });
}

interface RoundSummary {
  acked: number;
  /** Writes sent and never acknowledged: in flight when the daemon died. */
  unacknowledged: number;
  durable: number;
  leaks: number;
  /** Per enabled bitmap: dirty bytes over the bytes the acknowledged writes cover, rounded to granules. */
  precision: string[];
}

async function crashRound(seed: number, round: number, signal: 'SIGKILL' | 'SIGTERM'): Promise<RoundSummary> {
  const random = new SeededRandom(seed * 1000 + round);
  const context = `seed ${seed}, round ${round} (${signal})`;
  return withDaemon(async ({ dir, image, blockd, qmp }) => {
    const bitmaps: PlannedBitmap[] = [
      { name: 'fine', granularity: random.pick([512, 4 * KiB, 16 * KiB]), disabled: false, requestedAt: 0 },
      { name: 'coarse', granularity: random.pick([64 * KiB, 1 * MiB]), disabled: false, requestedAt: 0 },
      { name: 'frozen', granularity: 64 * KiB, disabled: true, requestedAt: 0 },
    ];
    for (const bitmap of bitmaps) {
      await addBitmap(qmp, bitmap);
      bitmap.addedAt = 0;
    }
    await qmp.execute('block-export-add', { type: 'nbd', id: 'guest', 'node-name': 'disk', writable: true });
    const killAfter = 1 + random.int(160);
    const late: PlannedBitmap | undefined = random.chance(0.5) ? { name: 'late', granularity: random.pick([4 * KiB, 64 * KiB]), disabled: false, requestedAt: 0 } : undefined;
    const lateAfter = 1 + random.int(killAfter);
    let writer: AckedWriter | undefined;
    let lateAdd: Promise<void> | undefined;
    const addLate = (bitmap: PlannedBitmap) => {
      bitmap.requestedAt = writer!.now();
      lateAdd = addBitmap(qmp, bitmap).then(() => {
        bitmap.addedAt = writer!.now();
      }, () => {}); // the kill came first: nothing is required of it
    };
    writer = await AckedWriter.start({
      socket: join(dir, 'nbd.sock'), exportName: 'disk', regions: randomRegions(random), random,
      onAck: (acked) => {
        if (late && acked === lateAfter) addLate(late);
        if (acked === killAfter) {
          writer!.stop();
          blockd.child.kill(signal);
        }
      },
    });
    await writer.finished();
    const exit = await blockd.exited;
    await lateAdd;
    await qmp.close().catch(() => {});
    if (signal === 'SIGKILL') assert.equal(exit.signal, 'SIGKILL', `${context}: blockd exited ${exit.code} before the kill: ${blockd.stderr()}`);
    else assert.equal(exit.code, 0, `${context}: blockd did not quit cleanly on SIGTERM: ${blockd.stderr()}`);
    if (late) bitmaps.push(late);

    const check = qemuImgCheck(image);
    assert.ok(check.corruptions === 0 && check.checkErrors === 0 && (check.status === 0 || check.status === 3), `${context}: qemu-img check: ${check.output}`);
    if (signal === 'SIGTERM') assert.equal(check.status, 0, `${context}: a clean close leaks nothing: ${check.output}`);

    const reloaded = await reader().open(image);
    try {
      const acked = writer.acked;
      const summary: RoundSummary = { acked: acked.length, unacknowledged: writer.sent.length - acked.length, durable: acked.filter((write) => write.durable).length, leaks: check.leaks, precision: [] };
      for (const planned of bitmaps.filter((bitmap) => bitmap.addedAt !== undefined)) {
        const loaded = reloaded.bitmap(planned.name);
        assert.ok(loaded, `${context}: bitmap ${planned.name} (added before the ${signal}) is gone; blockd loaded ${JSON.stringify(reloaded.bitmaps)}, qemu-img info lists ${JSON.stringify(qemuImgBitmaps(image, true))}`);
        assert.equal(loaded.persistent, true, `${context}: ${planned.name} persistent`);
        assert.equal(loaded.granularity, planned.granularity, `${context}: ${planned.name} granularity`);
        if (planned.disabled) {
          assert.equal(loaded.recording, false, `${context}: ${planned.name} stays disabled`);
          if (signal === 'SIGTERM') assert.deepEqual([loaded.inconsistent, loaded.count], [false, 0], `${context}: ${planned.name} recorded nothing`);
          continue;
        }
        assert.equal(loaded.inconsistent, false, `${context}: enabled persistent bitmap ${planned.name} reloaded inconsistent after ${acked.length} acknowledged writes`);
        assert.equal(loaded.recording, true, `${context}: ${planned.name} records again`);
        const dirty = reloaded.dirtyExtents(planned.name);
        for (const write of acked.filter((candidate) => candidate.sentAt > planned.addedAt!)) {
          const missing = firstUncovered(write, dirty);
          assert.equal(missing, undefined, `${context}: bitmap ${planned.name} (granularity ${planned.granularity}) misses bytes ${missing?.offset}+${missing?.length} of acknowledged ${describeWrite(write)}`);
        }
        // Precision: the bytes the bitmap holds in granules no write that may be in it touched (a clean close has none).
        const mayBeIn = union(writer.sent.filter((write) => write.ackedAt === 0 || write.ackedAt > planned.requestedAt).map((write) => granuleSpan(write, planned.granularity)));
        const spurious = dirty.map((extent) => outside(extent, mayBeIn)).reduce((sum, length) => sum + length, 0);
        summary.precision.push(`${planned.name}/${planned.granularity}: ${spurious} of ${unionLength(dirty)} dirty bytes where no write was`);
        if (signal === 'SIGTERM') assert.equal(spurious, 0, `${context}: after a clean close ${planned.name} is dirty where no write was: ${JSON.stringify(dirty)}`);
      }
      await assertDurableWritesRead(reloaded, writer, context);
      return summary;
    } finally {
      await reloaded.close();
    }
  });
}

/** Sorted, merged ranges. */
function union(ranges: readonly ByteRange[]): ByteRange[] {
  const merged: ByteRange[] = [];
  for (const range of [...ranges].sort((a, b) => a.offset - b.offset)) {
    const last = merged[merged.length - 1];
    if (last && range.offset <= last.offset + last.length) last.length = Math.max(last.length, range.offset + range.length - last.offset);
    else merged.push({ ...range });
  }
  return merged;
}

function unionLength(ranges: readonly ByteRange[]): number {
  return union(ranges).reduce((sum, range) => sum + range.length, 0);
}

/** How many bytes of `range` lie outside `covering` (sorted, merged). */
function outside(range: ByteRange, covering: readonly ByteRange[]): number {
  return subtractAll([range], covering).reduce((sum, part) => sum + part.length, 0);
}

async function assertDurableWritesRead(reloaded: ReloadedImage, writer: AckedWriter, context: string): Promise<void> {
  for (const write of writer.acked.filter((candidate) => candidate.durable)) {
    const parts = settledParts(write, writer.sent);
    const data = await reloaded.read(parts);
    parts.forEach((part, i) => {
      const expected = write.data ? write.data.subarray(part.offset - write.offset, part.offset - write.offset + part.length) : Buffer.alloc(part.length);
      assert.ok(data[i]!.equals(expected), `${context}: durable ${describeWrite(write)} does not read back at ${part.offset}+${part.length}`);
    });
  }
}

async function crashRounds(t: TestContext, signal: 'SIGKILL' | 'SIGTERM', seeds: number[], rounds: number): Promise<void> {
  for (const seed of testSeeds(seeds)) {
    for (let round = 0; round < rounds; round++) {
      const summary = await crashRound(seed, round, signal);
      t.diagnostic(`seed ${seed} round ${round}: ${summary.acked} writes acknowledged (${summary.durable} durable), ${summary.unacknowledged} in flight, ` +
        `${summary.leaks} leaked clusters; ${summary.precision.join(', ')}`);
    }
  }
}

test('persistent bitmaps are in the image as soon as block-dirty-bitmap-add returns, in use while blockd writes, and survive a SIGKILL', () =>
  withDaemon(async ({ image, blockd, qmp }) => {
    await addBitmap(qmp, { name: 'on', granularity: 64 * KiB, disabled: false, requestedAt: 0 });
    await addBitmap(qmp, { name: 'off', granularity: 4 * KiB, disabled: true, requestedAt: 0 });
    // Others may be listed too (blockd's own write-intent record): only the two added are required.
    const listed = qemuImgBitmaps(image, true).filter((bitmap) => ['on', 'off'].includes(bitmap.name));
    assert.deepEqual(listed.map(({ name, granularity }) => ({ name, granularity })).sort((a, b) => a.name.localeCompare(b.name)),
      [{ name: 'off', granularity: 4 * KiB }, { name: 'on', granularity: 64 * KiB }], 'qemu-img info -U lists both bitmaps while blockd has the image');
    assert.deepEqual(listed.find((bitmap) => bitmap.name === 'on')!.flags.sort(), ['auto', 'in-use']);
    assert.ok(!listed.find((bitmap) => bitmap.name === 'off')!.flags.includes('auto'), `off is disabled: ${JSON.stringify(listed)}`);
    await blockd.stop('SIGKILL');
    await qmp.close().catch(() => {});
    const check = qemuImgCheck(image);
    assert.ok(check.corruptions === 0 && check.checkErrors === 0, check.output);
    const reloaded = await reader().open(image);
    try {
      assert.deepEqual(reloaded.bitmaps.map(({ name, granularity, persistent, recording }) => ({ name, granularity, persistent, recording })).sort((a, b) => a.name.localeCompare(b.name)), [
        { name: 'off', granularity: 4 * KiB, persistent: true, recording: false },
        { name: 'on', granularity: 64 * KiB, persistent: true, recording: true },
      ]);
      assert.equal(reloaded.bitmap('on')!.inconsistent, false);
    } finally {
      await reloaded.close();
    }
  }));

test('after a clean stop (SIGTERM) under writes in flight, the reloaded bitmaps cover every acknowledged write and no granule no write touched', (t) =>
  crashRounds(t, 'SIGTERM', [4101], 3));

test('after a SIGKILL under writes in flight, enabled persistent bitmaps reload consistent and cover every acknowledged write', (t) =>
  crashRounds(t, 'SIGKILL', [4201, 4202], ROUNDS));
