/*
 * drive-mirror against qemu-storage-daemon: the same images and script —
 * refusals before and after the target file is made (in QEMU's order), a
 * raw target cancelled, sync=top into a new image that names the source's
 * backing file and gets the source's backing node at the pivot (the NBD
 * export follows), sync=none soft-cancelled after READY, and mode=existing
 * targets for sync=full (the old data is zeroed where the source reads
 * zeroes) and sync=top (the chain its header names opens at the pivot) —
 * must give the same transcript. The targets must then read as the source
 * did, name the expected backing files and pass qemu-img check.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { assertSameTranscripts, differentialPeers } from '../helpers/differential-peers.js';
import { maskImageSizes, untilBlockJob, untilJob, type TranscriptStep } from '../helpers/qmp-transcript.js';
import { assertCheckClean, createQcow2, MiB, qemuImgCompare, qemuIo, runQemuImg } from '../helpers/qemu-tools.js';

/** base (8 MiB of 0x01 at 0) <- top (8 MiB of 0x02 at 16 MiB); existing targets, one full of old data. */
function makeImages(dir: string): void {
  createQcow2(join(dir, 'base.qcow2'), 64 * MiB);
  qemuIo(join(dir, 'base.qcow2'), ['write -P 0x01 0 8M'], ['-f', 'qcow2']);
  createQcow2(join(dir, 'top.qcow2'), undefined, { backing: { path: 'base.qcow2', format: 'qcow2' } });
  qemuIo(join(dir, 'top.qcow2'), ['write -P 0x02 16M 8M'], ['-f', 'qcow2']);
  runQemuImg('convert', '-O', 'raw', join(dir, 'top.qcow2'), join(dir, 'expected.raw'));
  createQcow2(join(dir, 'old-data.qcow2'), 64 * MiB);
  qemuIo(join(dir, 'old-data.qcow2'), ['write -P 0x0e 0 64M'], ['-f', 'qcow2']);
  runQemuImg('convert', '-O', 'qcow2', join(dir, 'base.qcow2'), join(dir, 'copy-of-base.qcow2'));
  createQcow2(join(dir, 'shallow.qcow2'), undefined, { backing: { path: 'copy-of-base.qcow2', format: 'qcow2' } });
  createQcow2(join(dir, 'busy.qcow2'), 64 * MiB);
}

const peers = differentialPeers(makeImages);

const mirror = (args: object): TranscriptStep => ({ execute: 'drive-mirror', arguments: { 'job-id': 'j', device: 'src', target: '$DIR/new.qcow2', sync: 'full', ...args } });
const ready = (device: string): TranscriptStep => ({ awaitEvent: { event: 'BLOCK_JOB_READY', data: { device } } });
const graph: TranscriptStep = { execute: 'query-named-block-nodes', arguments: { flat: true } };
const exports: TranscriptStep = { execute: 'query-block-exports' };

const STEPS: TranscriptStep[] = [
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'base', 'read-only': true, file: { driver: 'file', filename: '$DIR/base.qcow2' }, backing: null } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', 'node-name': 'src-file', filename: '$DIR/top.qcow2' }, backing: 'base' } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'busy', file: { driver: 'file', filename: '$DIR/busy.qcow2' } } },
  { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$DIR/nbd.sock' } } } },
  { execute: 'block-export-add', arguments: { type: 'nbd', id: 'disk', 'node-name': 'src', writable: true } },
  // refused before the target is made
  mirror({ device: 'nosuch' }),
  mirror({ device: 'src-file' }),
  mirror({ replaces: 'src' }),
  mirror({ format: 'nosuchfmt' }),
  mirror({ mode: 'existing', target: '$DIR/missing.qcow2' }),
  mirror({ target: '$DIR/no/such/dir.qcow2' }),
  mirror({ target: '$DIR/busy.qcow2' }),
  // refused once the target is made (and left behind)
  mirror({ sync: 'incremental' }),
  mirror({ granularity: 1000 }),
  mirror({ 'node-name': 'src' }),
  mirror({ 'node-name': 'x y' }),
  mirror({ 'job-id': 'a b' }),
  mirror({ speed: -1 }),
  graph,
  // a raw target, cancelled while rate-limited
  mirror({ format: 'raw', target: '$DIR/new.raw', speed: 1, 'job-id': 'r' }),
  // Its first round is the base's 8 MiB (the top's data is the next run): then it waits at speed 1.
  untilBlockJob('r', (job) => !job.busy && job.offset === 8 * MiB),
  graph,
  { execute: 'block-job-cancel', arguments: { device: 'r' } },
  untilJob('r', 'null'),
  // sync=top into a new image named t3: completed, it takes the source's place (and its export)
  mirror({ sync: 'top', target: '$DIR/t3.qcow2', 'node-name': 't3', 'job-id': 't' }),
  ready('t'),
  { execute: 'query-block-jobs' },
  graph,
  { execute: 'job-complete', arguments: { id: 't' } },
  untilJob('t', 'null'),
  graph,
  exports,
  // sync=none from t3, soft-cancelled after READY: no pivot
  mirror({ device: 't3', sync: 'none', target: '$DIR/n4.qcow2', 'job-id': 'n' }),
  ready('n'),
  { execute: 'block-job-cancel', arguments: { device: 'n' } },
  untilJob('n', 'null'),
  graph,
  // mode=existing, sync=full: the old data is overwritten or zeroed; auto-dismiss off
  mirror({ device: 't3', mode: 'existing', target: '$DIR/old-data.qcow2', 'node-name': 'f', 'job-id': 'f', 'auto-dismiss': false }),
  ready('f'),
  { execute: 'block-job-complete', arguments: { device: 'f' } },
  untilJob('f', 'concluded'),
  { execute: 'query-jobs' },
  { execute: 'job-dismiss', arguments: { id: 'f' } },
  graph,
  exports,
  // mode=existing, sync=top from the old source (now without users): its backing chain opens from the header
  mirror({ mode: 'existing', sync: 'top', target: '$DIR/shallow.qcow2', 'node-name': 'sh', 'job-id': 's', format: 'qcow2' }),
  ready('s'),
  { execute: 'job-complete', arguments: { id: 's' } },
  untilJob('s', 'null'),
  graph,
];

test('drive-mirror follows qemu-storage-daemon: refusals, targets made and opened, pivots and cancels', async () => {
  await assertSameTranscripts(peers, STEPS, maskImageSizes);
  for (const dir of [peers.blockd.dir, peers.qsd.dir]) {
    const image = (name: string) => join(dir, name);
    const info = (name: string) => JSON.parse(runQemuImg('info', '--output=json', image(name))) as { 'backing-filename'?: string; format: string };
    const expected = image('expected.raw');
    // t3 holds the top's data and names the base; it read as the source did, and so does f (all of it, old data gone).
    assert.equal(info('t3.qcow2')['backing-filename'], image('base.qcow2'));
    qemuImgCompare(image('t3.qcow2'), expected, ['qcow2', 'raw'], `${dir} t3`);
    qemuImgCompare(image('old-data.qcow2'), expected, ['qcow2', 'raw'], `${dir} f`);
    qemuImgCompare(image('shallow.qcow2'), expected, ['qcow2', 'raw'], `${dir} shallow`);
    // The none target names its source; the raw one was made raw.
    assert.equal(info('new.raw').format, 'raw');
    for (const name of ['t3.qcow2', 'old-data.qcow2', 'shallow.qcow2', 'n4.qcow2', 'new.qcow2', 'top.qcow2']) assertCheckClean(image(name), name);
  }
});
