/*
 * blockdev-reopen and change-backing-file against qemu-storage-daemon: one script with
 * read-only <-> read-write (children that inherit the mode follow), the backing link
 * removed, set back and switched to another image (read through an NBD export: the new
 * backing file's data shows), each option QEMU lets change (auto-read-only, detect-zeroes,
 * discard, cache.no-flush, qcow2's runtime options) and those it refuses, lists of nodes
 * changed together, and lists where one entry fails, after which the graph is as before.
 * Replies and query-named-block-nodes must be equal; after both daemons stopped, each
 * image passes qemu-img check and records the backing file change-backing-file wrote.
 * A second script changes links and driver options QEMU lets change: a node's `file`
 * switched to another node (and its refusals: missing node, cycle, a node another parent
 * writes, an inline definition), raw's offset/size window and a throttle node's group,
 * each read through an NBD export afterwards, and lists whose later entry fails.
 */
import assert from 'node:assert/strict';
import { copyFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { compareWithQsd } from '../helpers/differential-scenario.js';
import { exportNode, nbdServer, qemuIoExport } from '../helpers/job-steps.js';
import { assertCheckClean, createQcow2, MiB, qemuIo, runQemuImg } from '../helpers/qemu-tools.js';
import type { TranscriptStep } from '../helpers/qmp-transcript.js';

const fileOf = (name: string, extension = 'qcow2') => ({ driver: 'file', 'node-name': `${name}-file`, filename: `$DIR/${name}.${extension}` });
const add = (name: string, extra: object = {}): TranscriptStep => ({ execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': name, file: fileOf(name), ...extra } });
const reopen = (...options: object[]): TranscriptStep => ({ execute: 'blockdev-reopen', arguments: { options } });
const qcow2 = (name: string, extra: object = {}) => ({ driver: 'qcow2', 'node-name': name, file: `${name}-file`, ...extra });
const fileNode = (name: string, extra: object = {}, extension = 'qcow2') => ({ driver: 'file', 'node-name': `${name}-file`, filename: `$DIR/${name}.${extension}`, ...extra });
const changeBackingFile = (device: string, image: string, backingFile: string): TranscriptStep => ({
  execute: 'change-backing-file', arguments: { device, 'image-node-name': image, 'backing-file': backingFile },
});
const graph: TranscriptStep = { execute: 'query-named-block-nodes', arguments: { flat: true } };

function prepare(dir: string): void {
  qemuIo(createQcow2(join(dir, 'base.qcow2'), 4 * MiB), ['write -P 1 0 1M']);
  qemuIo(createQcow2(join(dir, 'alt.qcow2'), 4 * MiB), ['write -P 2 0 2M']);
  createQcow2(join(dir, 'top.qcow2'), 4 * MiB, { backing: { path: 'base.qcow2', format: 'qcow2' } });
  qemuIo(join(dir, 'top.qcow2'), ['write -P 3 3M 64k']);
  createQcow2(join(dir, 'other.qcow2'), 4 * MiB);
  runQemuImg('create', '-q', '-f', 'raw', join(dir, 'plain.raw'), String(4 * MiB));
}

const STEPS: TranscriptStep[] = [
  add('base', { 'read-only': true }),
  add('alt', { 'read-only': true }),
  add('top', { backing: 'base' }),
  add('other'),
  { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'plain', file: fileOf('plain', 'raw') } },
  nbdServer,
  exportNode('top', 'top'),
  graph,
  // Read-only <-> read-write; the file opened with the node follows it.
  reopen(qcow2('base', { 'read-only': false })),
  graph,
  reopen(qcow2('base', { 'read-only': true })),
  graph,
  // Refusals, each leaving everything as it was.
  reopen({ driver: 'qcow2', 'node-name': 'base' }),
  reopen({ driver: 'raw', 'node-name': 'base', file: 'base-file' }),
  reopen(qcow2('nosuch')),
  reopen({ driver: 'qcow2', file: 'base-file' }),
  reopen(qcow2('top')),
  reopen(qcow2('top', { backing: 'nosuch' })),
  reopen(qcow2('top', { backing: 'base', 'force-share': true })),
  reopen(qcow2('top', { backing: 'base', 'detect-zeroes': 'unmap' })),
  reopen(fileNode('plain', { locking: 'off' }, 'raw')),
  reopen(fileNode('plain', { aio: 'native' }, 'raw')),
  reopen(fileNode('other', {}, 'raw')),
  reopen(fileNode('plain', { 'drop-cache': false }, 'raw')),
  reopen(qcow2('base', { 'read-only': true, backing: 'top' })),
  reopen(qcow2('top', { backing: 'top' })),
  reopen({ driver: 'raw', 'node-name': 'plain', file: 'plain-file', backing: null }),
  reopen(qcow2('top', { backing: 'base', 'overlap-check': 'none' }), qcow2('top', { backing: 'base' })),
  graph,
  // The backing link: removed, set again, switched to another image (its data shows through the export).
  reopen(qcow2('top', { backing: null })),
  graph,
  qemuIoExport('top', ['read -P 0 0 1M', 'read -P 3 3M 64k']),
  reopen(qcow2('top', { backing: 'base' })),
  qemuIoExport('top', ['read -P 1 0 1M', 'read -P 0 1M 1M']),
  reopen(qcow2('top', { backing: 'alt' })),
  graph,
  qemuIoExport('top', ['read -P 2 0 2M', 'read -P 3 3M 64k']),
  reopen(qcow2('top', { backing: 'base' })),
  // Options QEMU lets change.
  reopen(qcow2('top', { backing: 'base', 'lazy-refcounts': true, 'cache-clean-interval': 5, 'pass-discard-request': false, discard: 'unmap', 'detect-zeroes': 'unmap' })),
  graph,
  reopen(qcow2('top', { backing: 'base', cache: { 'no-flush': true } })),
  graph,
  reopen(qcow2('top', { backing: 'base', cache: { direct: true } })),
  graph,
  reopen(qcow2('top', { backing: 'base', 'auto-read-only': true, 'detect-zeroes': 'on' })),
  graph,
  reopen(fileNode('plain', { 'read-only': true, 'x-check-cache-dropped': true }, 'raw')),
  reopen({ driver: 'raw', 'node-name': 'plain', file: 'plain-file', 'read-only': true }),
  graph,
  // Lists: all or nothing.
  reopen(qcow2('other', { 'read-only': true }), { driver: 'raw', 'node-name': 'plain', file: 'plain-file' }, qcow2('top', { backing: 'nosuch' })),
  graph,
  reopen(qcow2('other', { 'read-only': true }), qcow2('top', { backing: null }), qcow2('base', { 'read-only': false, 'detect-zeroes': 'on' })),
  graph,
  // The last entry fails only when applied (the export writes to "top"): the first is undone.
  reopen(qcow2('base', { 'read-only': false, 'detect-zeroes': 'off' }), qcow2('top', { backing: null, 'read-only': true })),
  graph,
  // "other" was made read-only with its file; without an explicit read-only the file stays so: refused.
  reopen(qcow2('other'), qcow2('top', { backing: 'base' }), qcow2('base', { 'read-only': true })),
  graph,
  reopen(qcow2('other', { 'read-only': false }), qcow2('top', { backing: 'base' }), qcow2('base', { 'read-only': true })),
  graph,
  // change-backing-file: the header's name only.
  changeBackingFile('top', 'top', 'renamed-base.qcow2'),
  changeBackingFile('top', 'base', 'x.qcow2'),
  changeBackingFile('base', 'base', 'x.qcow2'),
  changeBackingFile('nosuch', 'base', 'x.qcow2'),
  changeBackingFile('top', 'nosuch', 'x.qcow2'),
  changeBackingFile('top', 'other', 'x.qcow2'),
  changeBackingFile('plain', 'plain', 'x.qcow2'),
  graph,
];

const M = MiB;

function prepareLinks(dir: string): void {
  qemuIo(createQcow2(join(dir, 'top.qcow2'), 4 * MiB), ['write -P 3 0 1M']);
  // A copy with the same clusters and other data: the qcow2 driver keeps its metadata over a new file, as QEMU's does.
  copyFileSync(join(dir, 'top.qcow2'), join(dir, 'copy.qcow2'));
  qemuIo(join(dir, 'copy.qcow2'), ['write -P 4 0 1M']);
  writeFileSync(join(dir, 'plain.raw'), Buffer.concat([Buffer.alloc(M, 5), Buffer.alloc(M, 6), Buffer.alloc(2 * M, 7)]));
  writeFileSync(join(dir, 'small.raw'), Buffer.alloc(2 * M, 8));
}

const raw = (name: string, file: string | object, extra: object = {}) => ({ driver: 'raw', 'node-name': name, file, ...extra });
const throttle = (group: string, file = 'plain') => ({ driver: 'throttle', 'node-name': 'thr', file, 'throttle-group': group });
const throttleGroup = (id: string): TranscriptStep => ({ execute: 'object-add', arguments: { 'qom-type': 'throttle-group', id, limits: { 'iops-total': 100000 } } });

const LINK_STEPS: TranscriptStep[] = [
  add('top'),
  { execute: 'blockdev-add', arguments: fileNode('copy') },
  { execute: 'blockdev-add', arguments: raw('plain', fileOf('plain', 'raw')) },
  { execute: 'blockdev-add', arguments: fileNode('small', {}, 'raw') },
  { execute: 'blockdev-add', arguments: raw('win', { ...fileOf('win', 'raw'), filename: '$DIR/plain.raw' }, { offset: M, size: M }) },
  nbdServer,
  exportNode('top', 'top'),
  exportNode('plain', 'plain'),
  exportNode('win', 'win'),
  graph,
  // `file` naming another node: refusals first, each leaving the graph as it was.
  reopen(qcow2('top', { file: 'nosuch' })),
  reopen(qcow2('top', { file: 'top' })),
  reopen(qcow2('top', { file: 'plain-file' })),
  reopen(qcow2('top', { file: 'plain' })),
  reopen(qcow2('top', { file: { driver: 'file', 'node-name': 'other-file', filename: '$DIR/top.qcow2' } })),
  reopen(qcow2('top', { file: { driver: 'file', 'node-name': 'top-file', filename: '$DIR/top.qcow2', 'x-check-cache-dropped': true } })),
  reopen(qcow2('top', { file: { driver: 'file', filename: '$DIR/copy.qcow2' } })),
  reopen(qcow2('top', { file: { driver: 'raw', file: 'plain-file' } })),
  reopen(raw('plain', 'plain-file', { backing: 'small-file' })),
  // An inline definition reopens the file opened with the node with its options.
  reopen(qcow2('top', { file: { driver: 'file', filename: '$DIR/top.qcow2', 'detect-zeroes': 'on', cache: { 'no-flush': true } } })),
  graph,
  // A later entry that fails only when applied (the export writes to "top") undoes the switch before it.
  reopen(raw('plain', 'small-file'), qcow2('top', { file: 'top-file', 'read-only': true })),
  graph,
  qemuIoExport('plain', ['read -P 5 0 1M']),
  // The switch: the export reads the new file's data; the file opened with the node is closed.
  reopen(qcow2('top', { file: 'copy-file' })),
  graph,
  qemuIoExport('top', ['read -P 4 0 1M', 'read -P 0 1M 3M']),
  reopen(qcow2('top', { file: 'top-file' })), // gone with the switch
  reopen(raw('plain', 'small-file')),
  graph,
  qemuIoExport('plain', ['read -P 8 0 2M']),
  // raw's window: moved, grown, refused beyond the file, dropped.
  reopen(raw('win', 'win-file', { offset: 2 * M, size: M })),
  qemuIoExport('win', ['read -P 7 0 1M']),
  reopen(raw('win', 'win-file', { offset: 2 * M, size: 4 * M })),
  reopen(raw('win', 'win-file', { offset: 8 * M })),
  reopen(raw('win', 'win-file', { size: 1000 })),
  reopen(raw('win', 'win-file', { offset: 512, size: M }), raw('plain', 'nosuch')),
  reopen(raw('win', 'win-file', { offset: 512, size: M }), qcow2('top', { file: 'copy-file', 'read-only': true })),
  graph,
  qemuIoExport('win', ['read -P 7 0 1M']),
  reopen(raw('win', 'win-file', { size: M })),
  qemuIoExport('win', ['read -P 5 0 1M']),
  reopen(raw('win', 'win-file', { offset: 2 * M, size: 2 * M })),
  graph,
  reopen(raw('win', 'win-file')),
  graph,
  // A throttle node's group.
  throttleGroup('tg1'),
  throttleGroup('tg2'),
  { execute: 'blockdev-add', arguments: throttle('tg1', 'small-file') },
  reopen(throttle('nosuch', 'small-file')),
  reopen({ driver: 'throttle', 'node-name': 'thr', file: 'small-file' }),
  reopen(throttle('tg2', 'small-file'), raw('plain', 'nosuch')),
  // The group a node is in cannot be deleted: the failed list left it in tg1, the next one moves it to tg2.
  { execute: 'object-del', arguments: { id: 'tg1' } },
  reopen(throttle('tg2', 'small-file')),
  { execute: 'object-del', arguments: { id: 'tg1' } },
  { execute: 'object-del', arguments: { id: 'tg2' } },
  reopen(throttle('tg1', 'small-file')),
  graph,
];

test('blockdev-reopen of links and driver options (file, raw window, throttle group) as qemu-storage-daemon', async () => {
  await compareWithQsd({
    prepare: prepareLinks,
    steps: LINK_STEPS,
    images(dir) {
      for (const name of ['top', 'copy']) assertCheckClean(join(dir, `${name}.qcow2`), name);
    },
  }, 'blockd-reopen-links-');
});

test('blockdev-reopen and change-backing-file as qemu-storage-daemon', async () => {
  await compareWithQsd({
    prepare,
    steps: STEPS,
    images(dir) {
      symlinkSync('base.qcow2', join(dir, 'renamed-base.qcow2')); // the name top.qcow2 now records
      for (const name of ['base', 'alt', 'top', 'other']) assertCheckClean(join(dir, `${name}.qcow2`), name);
      const info = JSON.parse(runQemuImg('info', '--output=json', join(dir, 'top.qcow2'))) as Record<string, string>;
      assert.equal(info['backing-filename'], 'renamed-base.qcow2');
      assert.equal(info['backing-filename-format'], 'qcow2');
    },
  }, 'blockd-reopen-');
});
