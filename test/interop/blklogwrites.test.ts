/*
 * The blklogwrites filter against real files and real QEMU: what a guest
 * (qemu-io over NBD) writes, zeroes and discards through blockd is logged so
 * that replaying the whole log onto the original file rebuilds the file byte
 * for byte, with unaligned requests widened to whole log sectors (512 and
 * 4096) and each flush behind a flush-seq mark; a FUA write is followed by
 * a flush (blockd emulates FUA on a file as QEMU does, which it used not to);
 * qemu-storage-daemon continues a log blockd wrote (log-append) and blockd one
 * that QEMU continued, numbering its marks on after the ones it found.
 */
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { LOG_DISCARD, LOG_FLUSH, LOG_MARK, parseSequenceMark, parseWriteLog, type ParsedLog } from '../../src/blockdev/drivers/blklogwrites/log-format.js';
import { runBlockd } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { LogTimeline } from '../helpers/power-loss/crash-states.js';
import { materialize } from '../helpers/power-loss/replay.js';
import { qemuIo, runQemuImg } from '../helpers/qemu-tools.js';
import { startQsd } from '../helpers/qsd-process.js';

/** Replays the whole log onto the original and requires the result to equal the file. */
async function assertLogRebuilds(dir: string, file: string, original: string, log: ParsedLog): Promise<void> {
  const replay = join(dir, 'replay');
  mkdirSync(replay, { recursive: true });
  await materialize(replay, [{ name: file, original, log: 0 }], [log], new LogTimeline([log]).finalState());
  const rebuilt = readFileSync(join(replay, file));
  const real = readFileSync(join(dir, file));
  assert.equal(rebuilt.length, real.length, 'the replay is as long as the file');
  assert.ok(rebuilt.equals(real), 'replaying the whole log rebuilds the file');
}

/** Each flush comes right after a mark with a higher flush-seq number than the one before. */
function assertFlushesMarked(log: ParsedLog): number[] {
  const sequences: number[] = [];
  for (const entry of log.entries.filter((candidate) => candidate.flags & LOG_FLUSH)) {
    const mark = log.entries[entry.index - 1];
    assert.ok(mark && mark.flags === LOG_MARK, `flush ${entry.index} follows a mark`);
    const sequence = parseSequenceMark(mark.mark ?? '');
    assert.ok(sequence !== undefined && sequence > (sequences.at(-1) ?? 0), `flush ${entry.index} has a new flush-seq (${mark.mark})`);
    sequences.push(sequence);
  }
  return sequences;
}

/** disk.raw of `size` (filled with `fill` if given), its copy disk.orig, and an empty disk.log. */
function prepareRawDisk(dir: string, size: string, fill?: string): void {
  runQemuImg('create', '-q', '-f', 'raw', join(dir, 'disk.raw'), size);
  if (fill) qemuIo(join(dir, 'disk.raw'), [fill], ['-f', 'raw']);
  copyFileSync(join(dir, 'disk.raw'), join(dir, 'disk.orig'));
  writeFileSync(join(dir, 'disk.log'), '');
}

async function writeThroughBlockd(dir: string, sectorSize: number, commands: string[]): Promise<ParsedLog> {
  const blockd = await runBlockd([
    '--blockdev', JSON.stringify({
      driver: 'raw', 'node-name': 'disk', discard: 'unmap',
      file: { driver: 'blklogwrites', 'log-sector-size': sectorSize, file: { driver: 'file', filename: join(dir, 'disk.raw') }, log: { driver: 'file', filename: join(dir, 'disk.log') } },
    }),
    '--nbd-server', `addr.type=unix,addr.path=${join(dir, 'nbd.sock')}`,
    '--export', 'type=nbd,id=e,node-name=disk,name=disk,writable=on',
  ]);
  try {
    qemuIo(`nbd+unix:///disk?socket=${join(dir, 'nbd.sock')}`, commands, ['-f', 'raw', '-t', 'writeback']);
  } finally {
    await blockd.stop();
  }
  return parseWriteLog(readFileSync(join(dir, 'disk.log')));
}

for (const sectorSize of [512, 4096]) {
  test(`writes, zero writes and discards replay to the file they changed (log-sector-size ${sectorSize})`, async () => {
    const temp = makeTempDir();
    try {
      const { dir } = temp;
      prepareRawDisk(dir, '1M', 'write -P 0x5a 0 1M');
      const log = await writeThroughBlockd(dir, sectorSize, [
        'write -P 0x01 0 64k', 'write -P 0x02 100 1000', 'flush', 'aio_write -P 0x03 8292 7000', 'aio_write -P 0x04 65536 4096',
        'aio_flush', 'write -z 131072 65536', 'write -z 200000 3000', 'discard 262144 131072', 'flush', 'write -P 0x05 1048000 576',
      ]);
      assert.equal(log.sectorSize, sectorSize);
      assert.ok(log.entries.some((entry) => entry.flags === LOG_DISCARD && entry.data === undefined), 'the discard is logged, without data');
      assert.ok(assertFlushesMarked(log).length >= 2, 'both flushes are logged');
      await assertLogRebuilds(dir, 'disk.raw', join(dir, 'disk.orig'), log);
    } finally {
      temp.cleanup();
    }
  });
}

test('unaligned writes in flight together inside the same sectors all land, and the log replays them', async () => {
  const temp = makeTempDir();
  try {
    const { dir } = temp;
    prepareRawDisk(dir, '64k');
    // Eight 300-byte writes side by side across the first sectors, all sent before any reply.
    const writes = Array.from({ length: 8 }, (_, i) => ({ offset: 10 + i * 300, pattern: 0x30 + i }));
    const log = await writeThroughBlockd(dir, 4096, [...writes.map((w) => `aio_write -P 0x${w.pattern.toString(16)} ${w.offset} 300`), 'aio_flush']);
    qemuIo(join(dir, 'disk.raw'), writes.map((w) => `read -P 0x${w.pattern.toString(16)} ${w.offset} 300`), ['-f', 'raw']);
    await assertLogRebuilds(dir, 'disk.raw', join(dir, 'disk.orig'), log);
  } finally {
    temp.cleanup();
  }
});

test('a FUA write is made durable by a flush right after it, as QEMU emulates FUA for a file', async () => {
  const temp = makeTempDir();
  try {
    const { dir } = temp;
    prepareRawDisk(dir, '1M');
    const log = await writeThroughBlockd(dir, 512, ['write -f -P 0x08 8k 4k', 'write -P 0x07 0 4k']);
    const kinds = log.entries.filter((entry) => !(entry.flags & LOG_MARK)).map((entry) => (entry.flags & LOG_FLUSH ? 'flush' : `write ${entry.sector}`));
    // The last flush is qemu-io's as it disconnects.
    assert.deepEqual(kinds, ['write 16', 'flush', 'write 0', 'flush']);
    await assertLogRebuilds(dir, 'disk.raw', join(dir, 'disk.orig'), log);
  } finally {
    temp.cleanup();
  }
});

test('qemu-storage-daemon appends to a log blockd wrote, and blockd to one QEMU appended to', async () => {
  const temp = makeTempDir();
  try {
    const { dir } = temp;
    runQemuImg('create', '-q', '-f', 'qcow2', join(dir, 'disk.qcow2'), '4M');
    copyFileSync(join(dir, 'disk.qcow2'), join(dir, 'disk.orig'));
    writeFileSync(join(dir, 'disk.log'), '');
    const node = (append: boolean) => JSON.stringify({
      driver: 'qcow2', 'node-name': 'disk',
      file: { driver: 'blklogwrites', ...(append ? { 'log-append': true } : {}), file: { driver: 'file', filename: join(dir, 'disk.qcow2') }, log: { driver: 'file', filename: join(dir, 'disk.log') } },
    });
    const nbd = ['--nbd-server', `addr.type=unix,addr.path=${join(dir, 'nbd.sock')}`, '--export', 'type=nbd,id=e,node-name=disk,name=disk,writable=on'];
    const url = `nbd+unix:///disk?socket=${join(dir, 'nbd.sock')}`;
    // qemu-io's default cache mode (writethrough) would make every write FUA.
    const entries = () => parseWriteLog(readFileSync(join(dir, 'disk.log'))).entries;

    const first = await runBlockd(['--blockdev', node(false), ...nbd]);
    qemuIo(url, ['write -P 0x01 0 64k', 'flush', 'write -P 0x02 1M 4k'], ['-f', 'raw', '-t', 'writeback']);
    await first.stop();
    const byBlockd = entries();
    const highest = Math.max(...byBlockd.map((entry) => parseSequenceMark(entry.mark ?? '') ?? 0));

    const qsd = await startQsd(dir, ['--blockdev', node(true), ...nbd]);
    qemuIo(url, ['write -P 0x03 2M 64k', 'flush'], ['-f', 'raw', '-t', 'writeback']);
    await qsd.stop();
    const byQemu = entries();
    assert.ok(byQemu.length > byBlockd.length, 'QEMU appended entries');
    assert.deepEqual(byQemu.slice(0, byBlockd.length), byBlockd, "QEMU kept blockd's entries");
    assert.ok(byQemu.slice(byBlockd.length).every((entry) => entry.mark === undefined), 'QEMU writes no marks');

    const again = await runBlockd(['--blockdev', node(true), ...nbd]);
    qemuIo(url, ['write -P 0x04 3M 4k', 'flush'], ['-f', 'raw', '-t', 'writeback']);
    await again.stop();
    const all = entries();
    assert.deepEqual(all.slice(0, byQemu.length), byQemu, "blockd kept QEMU's entries");
    const resumed = all.slice(byQemu.length).map((entry) => parseSequenceMark(entry.mark ?? '')).find((sequence) => sequence !== undefined);
    assert.ok(resumed !== undefined && resumed > highest, `blockd's first mark after appending (${resumed}) numbers on after ${highest}`);

    await assertLogRebuilds(dir, 'disk.qcow2', join(dir, 'disk.orig'), parseWriteLog(readFileSync(join(dir, 'disk.log'))));
    assert.equal(JSON.parse(runQemuImg('check', '--output=json', join(dir, 'disk.qcow2'))).corruptions ?? 0, 0);
    qemuIo(join(dir, 'disk.qcow2'), ['read -P 0x01 0 64k', 'read -P 0x02 1M 4k', 'read -P 0x03 2M 64k', 'read -P 0x04 3M 4k'], ['-f', 'qcow2']);
  } finally {
    temp.cleanup();
  }
});
