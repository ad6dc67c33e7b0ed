/*
 * The power-loss checker's crash states on small hand-made logs: epochs from
 * flush-seq marks (or from flushes, in a log without marks), what a flush
 * makes durable, FUA writes durable at once, flush points across two logs,
 * random moments that never cut another log's entries from the flush that
 * opened their epoch, and the sweep of single dropped writes.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { LOG_DISCARD, LOG_FLUSH, LOG_FUA, LOG_MARK, sequenceMark, type LogEntry, type ParsedLog } from '../../src/blockdev/drivers/blklogwrites/log-format.js';
import { LogTimeline } from '../helpers/power-loss/crash-states.js';
import { SeededRandom } from '../helpers/qemu-tools.js';

type Step = { write: number } | { fua: number } | { discard: number } | { flush: true } | { mark: number };

function log(...steps: Step[]): ParsedLog {
  const entries: LogEntry[] = steps.map((step, index) => {
    if ('mark' in step) return { index, sector: 0, sectors: 0, flags: LOG_MARK, dataLength: 0, mark: sequenceMark(step.mark) };
    if ('flush' in step) return { index, sector: 0, sectors: 0, flags: LOG_FLUSH, dataLength: 0 };
    if ('discard' in step) return { index, sector: step.discard, sectors: 1, flags: LOG_DISCARD, dataLength: 0 };
    const sector = 'write' in step ? step.write : step.fua;
    return { index, sector, sectors: 1, flags: 'fua' in step ? LOG_FUA : 0, dataLength: 0, data: Buffer.alloc(512, sector) };
  });
  return { sectorSize: 512, entries };
}

// base: writes, flush 1, a write; top: (after flush 1) a header write, flush 2.
const base = log({ mark: 0 }, { write: 1 }, { write: 2 }, { mark: 1 }, { flush: true }, { write: 3 });
const top = log({ mark: 1 }, { write: 0 }, { mark: 2 }, { flush: true });

test('epochs follow the marks; a flush makes what its log held before it durable, a FUA write is durable at once', () => {
  const timeline = new LogTimeline([base, top]);
  assert.deepEqual(timeline.allEpochs, [0, 1, 2]);
  assert.deepEqual([0, 1, 2, 3, 4, 5].map((i) => timeline.epochOf(0, i)), [0, 0, 0, 1, 1, 1]);
  assert.deepEqual(timeline.volatileEntries(0, 3), [1, 2]);
  assert.deepEqual(timeline.volatileEntries(0, 6), [5]);
  const alone = new LogTimeline([log({ write: 1 }, { fua: 2 }, { discard: 3 })]);
  assert.deepEqual(alone.volatileEntries(0, 3), [0, 2]);
});

test('a flush point takes every log up to the flush\'s epoch and nothing dropped', () => {
  const timeline = new LogTimeline([base, top]);
  assert.deepEqual(timeline.flushes(), [{ log: 0, index: 4 }, { log: 1, index: 3 }]);
  assert.deepEqual(timeline.flushPoint({ log: 0, index: 4 }).prefix, [5, 0]);
  assert.deepEqual(timeline.flushPoint({ log: 1, index: 3 }).prefix, [6, 4]);
  assert.deepEqual(timeline.finalState().prefix, [6, 4]);
});

test('a random moment in an epoch keeps the flush that opened it whenever it takes entries of that epoch', () => {
  const timeline = new LogTimeline([base, top]);
  const random = new SeededRandom(5);
  for (let i = 0; i < 200; i++) {
    const state = timeline.randomPoint(1, random);
    assert.ok(state.prefix[0]! >= 5, `base keeps flush 1: ${state.prefix}`);
    assert.ok(state.prefix[1]! <= 2, `top stays in epoch 1: ${state.prefix}`);
    for (const index of state.dropped[0]!) assert.ok(index > 4, 'only writes after the flush may be dropped');
  }
  const early = timeline.randomPoint(0, new SeededRandom(1));
  assert.equal(early.prefix[1], 0, 'nothing of top belongs to epoch 0');
});

test('the single-drop sweep leaves out each write not yet durable alone', () => {
  const timeline = new LogTimeline([base, top]);
  assert.deepEqual(timeline.singleDrops(1).map((state) => [state.prefix, state.dropped.map((set) => [...set])]), [
    [[6, 2], [[5], []]],
    [[6, 2], [[], [1]]],
  ]);
});

test('a log without marks counts its own flushes; two such logs cannot be merged', () => {
  const plain = log({ write: 1 }, { flush: true }, { write: 2 }, { fua: 3 }, { write: 4 });
  const timeline = new LogTimeline([plain]);
  assert.deepEqual([0, 1, 2, 3, 4].map((i) => timeline.epochOf(0, i)), [0, 1, 1, 1, 2]);
  assert.throws(() => new LogTimeline([plain, plain]), /cannot be merged/);
});
