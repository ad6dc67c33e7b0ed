/*
 * blockdev-backup and drive-backup against qemu-storage-daemon: both daemons get the same
 * images and the same QMP script and must answer alike (replies, every event in order,
 * the graph). Each scenario has a fresh pair of daemons:
 *   - refusals of blockdev-backup: every check, in pairs that pin QEMU's order, and nodes
 *     held by a running stream (whose drains show as paused, running: QEMU runs each
 *     backup command as a transaction);
 *   - refusals of drive-backup, before and after its target file is made, and the files
 *     made (their backing names) and the graph after;
 *   - bitmap-mode (on-success, always, never) after success, failure and cancel: the
 *     bitmaps as the daemons list them after each job, and their sha256;
 *   - the refusals that come once the job exists, and what a running backup refuses;
 *   - each sync mode, with the target read back against the source as it was at the start;
 *   - pause, resume and set-speed; manual finalize and dismiss; drive-backup's targets;
 *   - error policies through blkdebug, on the source and on the target: the job's offset at
 *     the failure is QEMU's because its pieces start where QEMU's tasks do (cut at block
 *     status changes).
 * While a backup runs both list the job's anonymous bitmaps: the copy bitmap and the bitmap's
 * successor on the source, the access and done bitmaps on the copy-before-write filter.
 */
import { copyFileSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { assertReadsAs, compareWithQsd } from '../helpers/differential-scenario.js';
import { addChain, addFailing, addImage, addRaw, exportNode, file, nbdServer, prepareErrorCopies, qemuIoExport } from '../helpers/job-steps.js';
import { makePatternChain } from '../helpers/pattern-chains.js';
import { qcow2BitmapLayout } from '../helpers/qcow2-layout.js';
import { assertCheckClean, createQcow2, MiB, qemuIo, runQemuImg, writeAt } from '../helpers/qemu-tools.js';
import { progressAfterResume, racingReply, untilBlockJob, untilBlockJobIdle, untilJob, type TranscriptStep } from '../helpers/qmp-transcript.js';


// ---- the script's pieces ---------------------------------------------------------------------

/**
 * Only the chain's top, its backing files opened from its header (read-only, unnamed): a new image
 * naming its backing file names a plain file then, not the json: description of explicit nodes.
 */
const addTopOnly = (chain: string): TranscriptStep => ({ execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': `${chain}-top`, file: file(`${chain}-top`) } });
const addBitmap = (node: string, name: string, extra: object = {}): TranscriptStep => ({ execute: 'block-dirty-bitmap-add', arguments: { node, name, ...extra } });

const backup = (args: object): TranscriptStep => ({ execute: 'blockdev-backup', arguments: args });
const driveBackup = (args: object): TranscriptStep => ({ execute: 'drive-backup', arguments: { 'job-id': 'j', device: 'a-top', sync: 'full', ...args } });
const graph: TranscriptStep = { execute: 'query-named-block-nodes', arguments: { flat: true } };
/** A backup at speed 1 has copied its first chunk and sleeps under its limit. */
const idle = (id: string): TranscriptStep => untilBlockJobIdle(id);

/** The image files in the daemon's directory whose names start with `prefix`: which ones a command made. */
const filesMade = (prefix: string): TranscriptStep => ({
  action: async (dir) => `files: ${readdirSync(dir).filter((name) => name.startsWith(prefix)).sort().join(' ')}`,
});
/** What qemu-img says of a file a command made (format, size, backing file), once the daemon has let go of it. */
const imageInfo = (name: string): TranscriptStep => ({
  action: async (dir) => {
    const info = JSON.parse(runQemuImg('info', '-U', '--output=json', join(dir, name))) as Record<string, unknown>;
    return `${name}: ${info.format} ${info['virtual-size']} backing ${info['backing-filename'] ?? '-'} (${info['backing-filename-format'] ?? '-'})`.replaceAll(dir, '$DIR');
  },
});

/** An image with a persistent bitmap `name` (qemu-img bitmap), set dirty over the first MiB. */
function imageWithBitmap(path: string, name: string): void {
  createQcow2(path, 64 * MiB);
  runQemuImg('bitmap', '--add', path, name);
  qemuIo(path, ['write -P 0x44 0 1M'], ['-f', 'qcow2']);
}

/** As a crash leaves it: the bitmap's in-use flag set in the image, so that it loads inconsistent. */
function leaveBitmapInUse(path: string): void {
  const { directoryOffset } = qcow2BitmapLayout(readFileSync(path));
  writeAt(path, directoryOffset + 12, Buffer.from([0, 0, 0, 3]));
}

/** The rate-limited stream that held nodes for the refusals runs to its end (a cancel's event order and offset depend on timing). */
const streamEnds: TranscriptStep[] = [{ execute: 'block-job-set-speed', arguments: { device: 's', speed: 0 } }, untilJob('s', 'null')];

// ---- refusals before the job exists -----------------------------------------------------------

test('blockdev-backup refuses what qemu-storage-daemon refuses, in its order and words', async () => {
  await compareWithQsd({
    prepare(dir) {
      for (const chain of ['a', 'b']) makePatternChain(dir, chain);
      for (const name of ['tgt', 'tgt2', 'tro']) createQcow2(join(dir, `${name}.qcow2`), 64 * MiB);
      createQcow2(join(dir, 'small.qcow2'), 32 * MiB);
      runQemuImg('create', '-q', '-f', 'raw', join(dir, 'traw.raw'), String(64 * MiB));
      imageWithBitmap(join(dir, 'rosrc.qcow2'), 'rb');
      imageWithBitmap(join(dir, 'inc.qcow2'), 'ib');
      leaveBitmapInUse(join(dir, 'inc.qcow2'));
    },
    steps: [
      ...addChain('a'), ...addChain('b'),
      addImage('tgt'), addImage('tgt2'), addImage('small'), addRaw('traw', { 'node-name': 'traw-file' }),
      addImage('tro', { 'read-only': true }), addImage('rosrc', { 'read-only': true }), addImage('inc', { 'read-only': true }),
      addBitmap('a-top', 'b0'), addBitmap('a-top', 'dis', { disabled: true }),
      // Each command breaks two rules (or one, last): the first checked speaks.
      backup({ 'job-id': 'j', device: 'nosuch', target: 'nosuch2', sync: 'full' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'nosuch2', sync: 'incremental' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'a-top', sync: 'incremental' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'a-top', sync: 'bitmap' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'a-top', sync: 'incremental', bitmap: 'b0', 'bitmap-mode': 'never' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'a-top', sync: 'incremental', bitmap: 'nosuch', 'bitmap-mode': 'always' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'a-top', sync: 'incremental', bitmap: 'nosuch' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'a-top', sync: 'full', bitmap: 'nosuch' }),
      // a bitmap of another node is not found
      backup({ 'job-id': 'j', device: 'a-mid', target: 'a-top', sync: 'bitmap', bitmap: 'b0', 'bitmap-mode': 'on-success' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'a-top', sync: 'full', bitmap: 'b0' }),
      backup({ 'job-id': 'j', device: 'inc', target: 'a-top', sync: 'none', bitmap: 'ib', 'bitmap-mode': 'always' }),
      backup({ 'job-id': 'j', device: 'inc', target: 'a-top', sync: 'bitmap', bitmap: 'ib', 'bitmap-mode': 'never' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'a-top', sync: 'none', bitmap: 'b0', 'bitmap-mode': 'always' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'a-top', sync: 'full', bitmap: 'b0', 'bitmap-mode': 'never' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'a-top', sync: 'top', bitmap: 'dis', 'bitmap-mode': 'never' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'a-top', sync: 'full', 'bitmap-mode': 'never' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'a-top', sync: 'full', compress: true }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'a-top', sync: 'full' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'traw', sync: 'full', compress: true, 'x-perf': { 'max-workers': 0 } }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'traw-file', sync: 'full', compress: true }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'tgt', sync: 'full', compress: true, 'x-perf': { 'max-workers': 0 } }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'tgt', sync: 'full', speed: -1, 'x-perf': { 'max-workers': 2 ** 31 } }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'tgt', sync: 'full', speed: -1, 'x-perf': { 'max-workers': 4, 'max-chunk': -1 } }),
      // a read-only bitmap may say what to copy, but not be synced
      backup({ 'job-id': 'j', device: 'rosrc', target: 'small', sync: 'full', bitmap: 'rb', 'bitmap-mode': 'always', 'x-perf': { 'max-chunk': -1 } }),
      backup({ 'job-id': 'j', device: 'rosrc', target: 'small', sync: 'bitmap', bitmap: 'rb', 'bitmap-mode': 'on-success' }),
      backup({ 'job-id': 'j', device: 'rosrc', target: 'small', sync: 'bitmap', bitmap: 'rb', 'bitmap-mode': 'never' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'small', sync: 'full', 'x-perf': { 'max-chunk': 4096 }, 'filter-node-name': 'tgt' }),
      // what the copy-before-write filter refuses, before the job exists
      backup({ 'job-id': 'j', device: 'a-top', target: 'tgt', sync: 'full', 'x-perf': { 'max-chunk': 4096 }, 'filter-node-name': 'tgt' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'tgt', sync: 'full', 'x-perf': { 'max-chunk': 4096 }, 'filter-node-name': '1x' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'tro', sync: 'full', 'filter-node-name': 'tgt2-file' }),
      backup({ 'job-id': '1x', device: 'a-top', target: 'tro', sync: 'full', 'x-perf': { 'max-chunk': 4096 } }),
      backup({ 'job-id': '1x', device: 'a-top', target: 'tgt', sync: 'full', 'x-perf': { 'max-chunk': 4096 } }),
      backup({ 'job-id': '1x', device: 'a-top', target: 'tgt', sync: 'full', 'filter-node-name': 'a-base' }),
      backup({ 'job-id': '1x', device: 'a-top', target: 'tgt', sync: 'full', 'x-perf': { 'max-chunk': 65536 } }),
      backup({ device: 'a-top', target: 'tgt', sync: 'full' }),
      // nodes a running stream holds (its filter named): each command drains it
      { execute: 'block-stream', arguments: { 'job-id': 's', device: 'b-top', 'base-node': 'b-base', speed: 1, 'filter-node-name': 'sf' } },
      untilBlockJobIdle('s'),
      backup({ 'job-id': 'j', device: 'nosuch', target: 'tgt', sync: 'full' }),
      backup({ 'job-id': 'j', device: 'b-top', target: 'tgt', sync: 'bitmap' }),
      backup({ 'job-id': 'j', device: 'b-top', target: 'b-mid', sync: 'full' }),
      backup({ 'job-id': 'j', device: 'sf', target: 'tgt', sync: 'full' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'b-mid', sync: 'full', 'x-perf': { 'max-workers': 0 } }),
      backup({ 'job-id': 'j', device: 'a-top', target: 'sf', sync: 'full' }),
      backup({ 'job-id': 's', device: 'a-top', target: 'tgt', sync: 'full' }),
      ...streamEnds,
      graph,
    ],
    images(dir) {
      for (const chain of ['a', 'b']) assertReadsAs(dir, `${chain}-top.qcow2`, `${chain}-expected.raw`);
      for (const image of ['tgt', 'tro', 'rosrc']) assertCheckClean(join(dir, `${image}.qcow2`), image);
    },
  });
});

test('drive-backup refuses what qemu-storage-daemon refuses, before and after it makes the target file', async () => {
  await compareWithQsd({
    prepare(dir) {
      for (const chain of ['a', 'b']) makePatternChain(dir, chain);
      createQcow2(join(dir, 'busy.qcow2'), 64 * MiB);
      createQcow2(join(dir, 'x-small.qcow2'), 32 * MiB);
      runQemuImg('create', '-q', '-f', 'raw', join(dir, 'x-raw.raw'), String(64 * MiB));
      runQemuImg('convert', '-O', 'qcow2', join(dir, 'a-base.qcow2'), join(dir, 'copy-of-base.qcow2'));
      createQcow2(join(dir, 'x-shallow.qcow2'), undefined, { backing: { path: 'copy-of-base.qcow2', format: 'qcow2' } });
    },
    steps: [
      addTopOnly('a'), ...addChain('b'), addImage('busy'),
      addBitmap('a-top', 'b0'),
      // refused before the target file is made
      driveBackup({ device: 'nosuch', target: '$DIR/n-1.qcow2' }),
      driveBackup({ target: '$DIR/n-2.qcow2', format: 'nosuchfmt', sync: 'incremental' }),
      driveBackup({ target: '$DIR/no/such/dir.qcow2', sync: 'incremental' }),
      driveBackup({ target: '$DIR/busy.qcow2', sync: 'incremental' }),
      driveBackup({ device: 'a-top', sync: 'top', target: '$DIR/n-3.raw', format: 'raw' }),
      driveBackup({ mode: 'existing', target: '$DIR/missing.qcow2', sync: 'incremental' }),
      driveBackup({ mode: 'existing', target: '$DIR/x-raw.raw', format: 'nosuchfmt' }),
      filesMade('n-'),
      // refused once the target is made (and left behind), or opened
      driveBackup({ target: '$DIR/n-4.qcow2', sync: 'incremental' }),
      driveBackup({ target: '$DIR/n-5.qcow2', sync: 'top', bitmap: 'nosuch', 'bitmap-mode': 'on-success' }),
      driveBackup({ target: '$DIR/n-6.qcow2', sync: 'none', bitmap: 'b0' }),
      driveBackup({ device: 'b-base', target: '$DIR/n-7.qcow2', sync: 'top', bitmap: 'b0', 'bitmap-mode': 'never' }),
      driveBackup({ target: '$DIR/n-8.raw', format: 'raw', compress: true }),
      driveBackup({ target: '$DIR/n-9.qcow2', 'job-id': '1x' }),
      driveBackup({ target: '$DIR/n-10.qcow2', 'x-perf': { 'max-workers': 0 } }),
      driveBackup({ target: '$DIR/n-11.qcow2', 'filter-node-name': 'a-top' }),
      driveBackup({ target: '$DIR/n-12.qcow2', 'job-id': undefined }),
      driveBackup({ mode: 'existing', target: '$DIR/x-small.qcow2' }),
      driveBackup({ mode: 'existing', target: '$DIR/x-raw.raw', format: 'qcow2' }),
      driveBackup({ mode: 'existing', target: '$DIR/x-raw.raw', format: 'raw', sync: 'none' }),
      driveBackup({ mode: 'existing', target: '$DIR/x-shallow.qcow2', sync: 'top', 'job-id': '1x' }),
      filesMade('n-'),
      graph,
      // nodes a running stream holds: refused before the file is made
      { execute: 'block-stream', arguments: { 'job-id': 's', device: 'b-top', 'base-node': 'b-base', speed: 1 } },
      untilBlockJobIdle('s'),
      driveBackup({ device: 'b-top', target: '$DIR/n-13.qcow2', sync: 'incremental' }),
      driveBackup({ device: 'b-mid', target: '$DIR/n-14.qcow2' }),
      filesMade('n-'),
      ...streamEnds,
      imageInfo('n-4.qcow2'), imageInfo('n-5.qcow2'), imageInfo('n-6.qcow2'), imageInfo('n-7.qcow2'), imageInfo('n-8.raw'),
    ],
    images(dir) {
      assertReadsAs(dir, 'a-top.qcow2', 'a-expected.raw');
      assertReadsAs(dir, 'busy.qcow2', 'x-raw.raw');
      for (const image of ['n-4', 'n-5', 'n-6', 'n-7', 'x-shallow', 'x-small']) assertCheckClean(join(dir, `${image}.qcow2`), image);
    },
  });
});

// ---- once the job exists -----------------------------------------------------------------------

test('blockdev-backup refuses once the job exists, and a running backup refuses other operations, as qemu-storage-daemon does', async () => {
  await compareWithQsd({
    prepare(dir) {
      for (const chain of ['a', 'b']) makePatternChain(dir, chain);
      for (const name of ['t1', 't2', 't3']) createQcow2(join(dir, `${name}.qcow2`), 64 * MiB);
    },
    steps: [
      ...addChain('a'), ...addChain('b'), addImage('t1'), addImage('t2'), addImage('t3'),
      addBitmap('a-top', 'bm'),
      // the job exists (created, null) when the speed is checked
      backup({ 'job-id': 'j', device: 'a-top', target: 't1', sync: 'full', speed: -1 }),
      graph,
      // a backup at speed 1 with its filter named, syncing a bitmap
      backup({ 'job-id': 'b', device: 'a-top', target: 't1', sync: 'full', speed: 1, 'filter-node-name': 'bf', bitmap: 'bm', 'bitmap-mode': 'on-success' }),
      idle('b'),
      { execute: 'query-block-jobs' },
      graph,
      backup({ 'job-id': 'b', device: 'b-top', target: 't2', sync: 'full' }),
      backup({ 'job-id': 'j', device: 'a-top', target: 't2', sync: 'bitmap', bitmap: 'bm', 'bitmap-mode': 'never' }),
      { execute: 'block-dirty-bitmap-remove', arguments: { node: 'a-top', name: 'bm' } },
      { execute: 'block-dirty-bitmap-clear', arguments: { node: 'a-top', name: 'bm' } },
      { execute: 'block-dirty-bitmap-disable', arguments: { node: 'a-top', name: 'bm' } },
      addBitmap('a-top', 'bm2'),
      { execute: 'block-dirty-bitmap-merge', arguments: { node: 'a-top', target: 'bm2', bitmaps: ['bm'] } },
      backup({ 'job-id': 'j', device: 'b-top', target: 't1', sync: 'full' }),
      backup({ 'job-id': 'j', device: 't1', target: 't2', sync: 'full' }),
      backup({ 'job-id': 'j', device: 'bf', target: 't2', sync: 'full' }),
      backup({ 'job-id': 'j', device: 'b-top', target: 'bf', sync: 'full' }),
      { execute: 'blockdev-mirror', arguments: { 'job-id': 'm', device: 't1', target: 't2', sync: 'full' } },
      { execute: 'blockdev-mirror', arguments: { 'job-id': 'm', device: 'b-top', target: 't1', sync: 'full' } },
      { execute: 'blockdev-mirror', arguments: { 'job-id': 'm', device: 'a-top', target: 't2', sync: 'full' } },
      { execute: 'block-stream', arguments: { 'job-id': 's', device: 't1' } },
      { execute: 'block-stream', arguments: { 'job-id': 's', device: 'bf' } },
      { execute: 'block-commit', arguments: { 'job-id': 'c', device: 'bf' } },
      { execute: 'blockdev-del', arguments: { 'node-name': 't1' } },
      { execute: 'blockdev-del', arguments: { 'node-name': 'a-top' } },
      { execute: 'blockdev-del', arguments: { 'node-name': 'bf' } },
      { execute: 'block_resize', arguments: { 'node-name': 't1', size: 128 * MiB } },
      { execute: 'block_resize', arguments: { 'node-name': 'a-top', size: 128 * MiB } },
      { execute: 'blockdev-snapshot-sync', arguments: { 'node-name': 't1', 'snapshot-file': '$DIR/snap.qcow2', 'snapshot-node-name': 'snap' } },
      { execute: 'job-complete', arguments: { id: 'b' } },
      // a second backup of the same source runs beside it (two filters)
      backup({ 'job-id': 'b2', device: 'a-top', target: 't3', sync: 'full', speed: 1 }),
      idle('b2'),
      graph,
      { execute: 'job-cancel', arguments: { id: 'b2' } },
      untilJob('b2', 'null'),
      { execute: 'job-cancel', arguments: { id: 'b' } },
      untilJob('b', 'null'),
      graph,
      // once it has gone, the same commands work
      { execute: 'blockdev-del', arguments: { 'node-name': 't1' } },
      graph,
    ],
    images(dir) {
      assertReadsAs(dir, 'a-top.qcow2', 'a-expected.raw');
    },
  });
});

test('blockdev-backup copies as qemu-storage-daemon does: sync full, top, none, incremental twice, bitmap, while a client writes', async () => {
  await compareWithQsd({
    prepare(dir) {
      for (const chain of ['a', 'b', 'c', 'd']) makePatternChain(dir, chain);
      for (const name of ['tfull', 'tinc0', 'tinc1', 'tinc2', 'tbm']) createQcow2(join(dir, `${name}.qcow2`), 64 * MiB);
      // top: the target has the source's backing; none: an overlay of the source (fleecing)
      createQcow2(join(dir, 'ttop.qcow2'), undefined, { backing: { path: 'b-mid.qcow2', format: 'qcow2' } });
      createQcow2(join(dir, 'tnone.qcow2'), undefined, { backing: { path: 'c-top.qcow2', format: 'qcow2' } });
      copyFileSync(join(dir, 'a-expected.raw'), join(dir, 'a-at-start.raw'));
    },
    steps: [
      ...['a', 'b', 'c', 'd'].flatMap((chain) => addChain(chain)),
      addImage('tfull'), addImage('ttop', { backing: 'b-mid' }), addImage('tinc0'), addImage('tinc1'), addImage('tinc2'), addImage('tbm'),
      addImage('tnone', { backing: 'c-top' }),
      nbdServer, exportNode('ea', 'a-top'), exportNode('ec', 'c-top'), exportNode('ed', 'd-top'),
      // full, with a write through the export while it runs at speed 1: the target is the disk at the start
      backup({ 'job-id': 'f', device: 'a-top', target: 'tfull', sync: 'full', speed: 1 }),
      idle('f'),
      qemuIoExport('ea', ['write -P 0x77 40M 1M']),
      { execute: 'query-block-jobs' },
      { execute: 'block-job-set-speed', arguments: { device: 'f', speed: 0 } },
      untilJob('f', 'null'),
      // top: only the top layer's data
      backup({ 'job-id': 't', device: 'b-top', target: 'ttop', sync: 'top' }),
      untilJob('t', 'null'),
      // none: copy-before-write only, until cancelled
      backup({ 'job-id': 'n', device: 'c-top', target: 'tnone', sync: 'none' }),
      qemuIoExport('ec', ['write -P 0x78 6M 64k']),
      untilBlockJob('n', (job) => job.offset === 65536),
      { execute: 'query-block-jobs' },
      graph,
      { execute: 'job-cancel', arguments: { id: 'n' } },
      untilJob('n', 'null'),
      // incremental: a full backup starts the chain, two increments follow, each of what was written since
      addBitmap('d-top', 'inc'),
      backup({ 'job-id': 'i0', device: 'd-top', target: 'tinc0', sync: 'full', bitmap: 'inc', 'bitmap-mode': 'on-success' }),
      untilJob('i0', 'null'),
      qemuIoExport('ed', ['write -P 0x81 1M 128k']),
      graph,
      backup({ 'job-id': 'i1', device: 'd-top', target: 'tinc1', sync: 'incremental', bitmap: 'inc' }),
      untilJob('i1', 'null'),
      qemuIoExport('ed', ['write -P 0x82 50M 64k']),
      backup({ 'job-id': 'i2', device: 'd-top', target: 'tinc2', sync: 'incremental', bitmap: 'inc' }),
      untilJob('i2', 'null'),
      graph,
      // bitmap with mode never: the bitmap stays as it was
      qemuIoExport('ed', ['write -P 0x83 20M 64k']),
      backup({ 'job-id': 'bm', device: 'd-top', target: 'tbm', sync: 'bitmap', bitmap: 'inc', 'bitmap-mode': 'never' }),
      untilJob('bm', 'null'),
      graph,
      { execute: 'x-debug-block-dirty-bitmap-sha256', arguments: { node: 'd-top', name: 'inc' } },
    ],
    images(dir) {
      assertReadsAs(dir, 'tfull.qcow2', 'a-at-start.raw');
      assertReadsAs(dir, 'ttop.qcow2', 'b-expected.raw');
      assertReadsAs(dir, 'tnone.qcow2', 'c-expected.raw');
      assertReadsAs(dir, 'tinc0.qcow2', 'd-expected.raw');
      qemuIo(join(dir, 'tinc1.qcow2'), ['read -P 0x81 1M 128k', 'read -P 0 0 1M', 'read -P 0 2M 62M'], ['-f', 'qcow2']);
      qemuIo(join(dir, 'tinc2.qcow2'), ['read -P 0x82 50M 64k', 'read -P 0 0 50M'], ['-f', 'qcow2']);
      qemuIo(join(dir, 'tbm.qcow2'), ['read -P 0x83 20M 64k'], ['-f', 'qcow2']);
    },
    alike: ['tfull.qcow2', 'ttop.qcow2', 'tnone.qcow2', 'tinc0.qcow2', 'tinc1.qcow2', 'tinc2.qcow2', 'tbm.qcow2'],
  });
});

/** One backup per case syncing a bitmap of a raw source onto a raw target; `failing`: the target's last write fails. */
interface BitmapCase {
  id: string;
  mode: 'on-success' | 'always' | 'never';
  end: 'success' | 'failure' | 'cancel';
}

const BITMAP_CASES: BitmapCase[] = (['on-success', 'always', 'never'] as const).flatMap((mode) => (['success', 'failure', 'cancel'] as const).map((end) => ({ id: `${mode[0]}${end[0]}`, mode, end })));

test('bitmap-mode after success, failure and cancel leaves the bitmaps qemu-storage-daemon leaves', async () => {
  await compareWithQsd({
    prepare(dir) {
      makePatternChain(dir, 'a');
      prepareErrorCopies(dir, BITMAP_CASES.map(({ id }) => id));
    },
    steps: BITMAP_CASES.flatMap(({ id, mode, end }) => [
      addRaw(`${id}-src`),
      end === 'failure' ? addFailing(`${id}-tgt`, 'write_aio', 5) : addRaw(`${id}-tgt`),
      // dirty: the first 8 MiB and the disk's last MiB (where the failure hits)
      addBitmap(`${id}-src`, 'bm'),
      nbdServer,
      exportNode(`e${id}`, `${id}-src`),
      qemuIoExport(`e${id}`, ['write -P 0x91 0 8M', 'write -P 0x92 63M 1M']),
      // Under a speed limit at first, so that a failure never comes before the reply; a write while it waits.
      backup({ 'job-id': id, device: `${id}-src`, target: `${id}-tgt`, sync: mode === 'never' ? 'bitmap' : 'full', bitmap: 'bm', 'bitmap-mode': mode, speed: 1 }),
      idle(id),
      qemuIoExport(`e${id}`, ['write -P 0x93 32M 64k']),
      end === 'cancel' ? { execute: 'job-cancel', arguments: { id } } : { execute: 'block-job-set-speed', arguments: { device: id, speed: 0 } },
      untilJob(id, 'null'),
      { execute: 'query-named-block-nodes', arguments: { flat: true } },
      { execute: 'x-debug-block-dirty-bitmap-sha256', arguments: { node: `${id}-src`, name: 'bm' } },
      { execute: 'block-export-del', arguments: { id: `e${id}` } },
      { execute: 'nbd-server-stop' },
    ]),
    alike: BITMAP_CASES.map(({ id }) => `${id}-tgt.raw`),
    // blockd orders a blkdebug rule's errno and event the other way round in a json: filename (not backup's doing).
    normalise: (line) => line.replaceAll('\\"inject-error.0.errno\\": 5, ', ''),
  });
});

const pb = progressAfterResume('p');

test('a backup pauses, resumes, changes speed and is finalized and dismissed by hand as in qemu-storage-daemon', async () => {
  await compareWithQsd({
    prepare(dir) {
      makePatternChain(dir, 'a');
      for (const name of ['tp', 'tm']) createQcow2(join(dir, `${name}.qcow2`), 64 * MiB);
    },
    steps: [
      ...addChain('a'), addImage('tp'), addImage('tm'),
      backup({ 'job-id': 'p', device: 'a-top', target: 'tp', sync: 'full', speed: 1 }),
      idle('p'),
      { execute: 'block-job-pause', arguments: { device: 'p' } },
      { execute: 'query-block-jobs' },
      { execute: 'block-job-cancel', arguments: { device: 'p' } },
      { execute: 'job-complete', arguments: { id: 'p' } },
      pb.mark,
      { execute: 'block-job-set-speed', arguments: { device: 'p', speed: 2 * MiB } },
      { execute: 'block-job-resume', arguments: { device: 'p' } },
      pb.moved,
      { execute: 'block-job-set-speed', arguments: { device: 'p', speed: -1 } },
      { execute: 'block-job-set-speed', arguments: { device: 'p', speed: 0 } },
      untilJob('p', 'null'),
      backup({ 'job-id': 'm', device: 'a-top', target: 'tm', sync: 'full', 'auto-finalize': false, 'auto-dismiss': false }),
      { awaitEvent: { event: 'BLOCK_JOB_PENDING', data: { id: 'm' } } },
      { execute: 'query-jobs' },
      graph,
      { execute: 'job-dismiss', arguments: { id: 'm' } },
      { execute: 'job-finalize', arguments: { id: 'm' } },
      untilJob('m', 'concluded'),
      { execute: 'query-jobs' },
      { execute: 'job-dismiss', arguments: { id: 'm' } },
      graph,
    ],
    images(dir) {
      assertReadsAs(dir, 'tp.qcow2', 'a-expected.raw');
      assertReadsAs(dir, 'tm.qcow2', 'a-expected.raw');
    },
    alike: ['tp.qcow2', 'tm.qcow2'],
  });
});

/** One backup per case: a raw copy of chain a's contents onto a blank raw target, the source's reads or the target's writes failing once. */
interface ErrorCase {
  id: string;
  failing: 'source' | 'target';
  errno: number;
  policies: object;
  steps(id: string): TranscriptStep[];
  copied: boolean;
}

/** The error, then the pause it causes (a backup also says paused when it starts, in its command's drained section). */
const stoppedByError = (id: string): TranscriptStep[] => [{ awaitEvent: { event: 'BLOCK_JOB_ERROR', data: { device: id } } }, untilJob(id, 'paused')];

const ERROR_CASES: ErrorCase[] = [
  { id: 'r1', failing: 'source', errno: 5, policies: {}, steps: (id) => [untilJob(id, 'null')], copied: false },
  { id: 'r2', failing: 'source', errno: 5, policies: { 'on-source-error': 'ignore', 'on-target-error': 'stop' }, steps: (id) => [untilJob(id, 'null')], copied: true },
  {
    id: 'r3', failing: 'source', errno: 5, policies: { 'on-source-error': 'stop' }, copied: true,
    steps: (id) => [...stoppedByError(id), { execute: 'query-block-jobs' }, { execute: 'block-job-resume', arguments: { device: id } }, untilJob(id, 'null')],
  },
  { id: 'r4', failing: 'source', errno: 5, policies: { 'on-source-error': 'enospc' }, steps: (id) => [untilJob(id, 'null')], copied: false },
  { id: 'w1', failing: 'target', errno: 5, policies: {}, steps: (id) => [untilJob(id, 'null')], copied: false },
  { id: 'w2', failing: 'target', errno: 5, policies: { 'on-target-error': 'ignore', 'on-source-error': 'stop' }, steps: (id) => [untilJob(id, 'null')], copied: true },
  {
    id: 'w3', failing: 'target', errno: 28, policies: { 'on-target-error': 'enospc' }, copied: true,
    steps: (id) => [...stoppedByError(id), { execute: 'query-block-jobs' }, { execute: 'job-resume', arguments: { id } }, untilJob(id, 'null')],
  },
  { id: 'w4', failing: 'target', errno: 5, policies: { 'on-target-error': 'enospc' }, steps: (id) => [untilJob(id, 'null')], copied: false },
];

test('a backup meets I/O errors as qemu-storage-daemon does: on-source-error and on-target-error', async () => {
  await compareWithQsd({
    prepare(dir) {
      makePatternChain(dir, 'a');
      prepareErrorCopies(dir, ERROR_CASES.map(({ id }) => id));
    },
    steps: ERROR_CASES.flatMap(({ id, failing, errno, policies, steps }) => [
      failing === 'source' ? addFailing(`${id}-src`, 'read_aio', errno) : addRaw(`${id}-src`),
      failing === 'target' ? addFailing(`${id}-tgt`, 'write_aio', errno) : addRaw(`${id}-tgt`),
      // Started under a speed limit, so the failure (in the last sector) never comes before the reply.
      backup({ 'job-id': id, device: `${id}-src`, target: `${id}-tgt`, sync: 'full', speed: 1, ...policies }),
      idle(id),
      // The job, woken, may meet the error before the reply goes out (in QEMU too).
      racingReply({ execute: 'block-job-set-speed', arguments: { device: id, speed: 0 } }),
      ...steps(id),
    ]),
    images(dir) {
      for (const { id, copied } of ERROR_CASES) if (copied) assertReadsAs(dir, `${id}-tgt.raw`, 'a-expected.raw');
    },
    alike: ERROR_CASES.map(({ id }) => `${id}-tgt.raw`),
  });
});

test('drive-backup makes, opens and lets go of its targets as qemu-storage-daemon does', async () => {
  await compareWithQsd({
    prepare(dir) {
      for (const chain of ['a', 'b']) makePatternChain(dir, chain);
      createQcow2(join(dir, 'x-old.qcow2'), 64 * MiB);
      qemuIo(join(dir, 'x-old.qcow2'), ['write -P 0x0e 0 64M'], ['-f', 'qcow2']);
    },
    steps: [
      addTopOnly('a'), ...addChain('b'),
      nbdServer, exportNode('eb', 'b-top'),
      // the job exists when its speed is checked; the target it opened closes again
      driveBackup({ target: '$DIR/n-speed.qcow2', speed: -1 }),
      filesMade('n-'),
      graph,
      driveBackup({ 'job-id': 'f', target: '$DIR/n-full.qcow2' }),
      untilJob('f', 'null'),
      driveBackup({ 'job-id': 't', sync: 'top', target: '$DIR/n-top.qcow2' }),
      untilJob('t', 'null'),
      driveBackup({ 'job-id': 'c', target: '$DIR/n-cancelled.qcow2', speed: 1 }),
      idle('c'),
      graph,
      { execute: 'job-cancel', arguments: { id: 'c' } },
      untilJob('c', 'null'),
      driveBackup({ 'job-id': 'r', format: 'raw', target: '$DIR/n-raw.raw' }),
      untilJob('r', 'null'),
      driveBackup({ 'job-id': 'e', mode: 'existing', target: '$DIR/x-old.qcow2' }),
      untilJob('e', 'null'),
      // none: the target's backing is the source itself while it runs
      driveBackup({ 'job-id': 'n', device: 'b-top', sync: 'none', target: '$DIR/n-none.qcow2' }),
      qemuIoExport('eb', ['write -P 0x79 6M 64k']),
      untilBlockJob('n', (job) => job.offset === 65536),
      graph,
      { execute: 'job-cancel', arguments: { id: 'n' } },
      untilJob('n', 'null'),
      graph,
      imageInfo('n-full.qcow2'), imageInfo('n-top.qcow2'), imageInfo('n-none.qcow2'),
    ],
    images(dir) {
      assertReadsAs(dir, 'n-full.qcow2', 'a-expected.raw');
      assertReadsAs(dir, 'n-raw.raw', 'a-expected.raw');
      assertReadsAs(dir, 'x-old.qcow2', 'a-expected.raw');
      qemuIo(join(dir, 'n-none.qcow2'), ['read -P 0x31 6M 64k'], ['-f', 'qcow2']);
    },
    alike: ['n-full.qcow2', 'n-raw.raw', 'x-old.qcow2'],
  });
});
