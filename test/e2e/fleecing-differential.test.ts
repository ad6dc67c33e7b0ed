/*
 * Pull backup (image fleecing) the QEMU 7.x way against qemu-storage-daemon: a temporary
 * qcow2 backed by the live disk, a copy-before-write filter onto it, a snapshot-access node
 * over the filter exported over NBD with the disk's bitmap, and the guest writing through an
 * export of the filter. Both daemons get the same images and QMP script and must answer alike
 * (replies, events, the graph with the filter's anonymous bitmaps, what qemu-io, qemu-img and
 * nbdinfo read through the exports):
 *   - without a bitmap: the export reads the disk as it was while the guest writes; writes to
 *     the view are refused, discards give clusters up and later reads of them fail;
 *   - with a bitmap: only its clusters are copied and readable;
 *   - on-cbw-error: a failed copy fails the guest write, or breaks the view and lets it pass;
 *   - cbw-timeout: a copy held back by a throttle group does the same after the timeout;
 *   - refusals, the order blockdev-del needs, and the images after (qemu-img check clean).
 * Where blockd parts from qemu-storage-daemon 7.2 on purpose, the script does not go:
 *   - discards are cluster-aligned: 7.2 aborts on an unaligned snapshot discard (hbitmap_reset's
 *     assertion); blockd gives up the whole clusters inside, as later QEMU does;
 *   - block status of the view once the guest wrote: 7.2 answers for the copied clusters with
 *     the live disk's status now (zero where the guest wrote zeros, though the view reads the old
 *     data), which makes a map-driven copy (nbdcopy) lose data; blockd answers the target's, as
 *     the data read (test/interop/pull-backup checks nbdcopy's result).
 */
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { assertReadsAs, compareWithQsd } from '../helpers/differential-scenario.js';
import { addImage, compareExport, file, nbdinfoMap, nbdServer, exportNode, qemuIoExport } from '../helpers/job-steps.js';
import { MiB, createQcow2, qemuIo, runQemuImg, assertCheckClean } from '../helpers/qemu-tools.js';
import type { TranscriptStep } from '../helpers/qmp-transcript.js';

const SIZE = 16 * MiB;
/** What the disk holds: 8 MiB of 0x11, the rest a hole. */
const BASE = ['write -P 0x11 0 8M'];
/** Written before fleecing starts, with bitmap b0 recording: b0's clusters. */
const BEFORE = ['write -P 0x22 1M 128k', 'write -P 0x23 6389760 100k', 'write -P 0x24 12M 64k'];
/** The guest's writes while the backup program reads (unaligned, over holes and data). */
const GUEST = ['write -P 0x55 0 64k', 'write -P 0x56 1000000 200000', 'write -z 6M 1M', 'write -P 0x57 15M 4k', 'discard 3M 1M'];

/** live.qcow2 and its expected contents: start.raw as fleecing starts, end.raw after the guest's writes; fleece.qcow2 over it. */
function prepareDisk(dir: string, names: string[] = ['live']): void {
  for (const name of names) {
    createQcow2(join(dir, `${name}.qcow2`), SIZE);
    qemuIo(join(dir, `${name}.qcow2`), BASE, ['-f', 'qcow2']);
    runQemuImg('create', '-q', '-f', 'qcow2', '-b', `${name}.qcow2`, '-F', 'qcow2', join(dir, `${name}-fleece.qcow2`));
  }
  runQemuImg('convert', '-O', 'raw', join(dir, `${names[0]}.qcow2`), join(dir, 'start.raw'));
  qemuIo(join(dir, 'start.raw'), BEFORE, ['-f', 'raw']);
  copyFileSync(join(dir, 'start.raw'), join(dir, 'end.raw'));
  qemuIo(join(dir, 'end.raw'), GUEST.filter((command) => !command.startsWith('discard')), ['-f', 'raw']);
}

const graph: TranscriptStep = { execute: 'query-named-block-nodes', arguments: { flat: true } };
const add = (args: object): TranscriptStep => ({ execute: 'blockdev-add', arguments: args });
const del = (node: string): TranscriptStep => ({ execute: 'blockdev-del', arguments: { 'node-name': node } });
const exportDel = (id: string): TranscriptStep[] => [{ execute: 'block-export-del', arguments: { id } }, { awaitEvent: { event: 'BLOCK_EXPORT_DELETED', data: { id } } }];
const cbw = (name: string, disk: string, target: string | object, extra: object = {}) => add({ driver: 'copy-before-write', 'node-name': name, file: disk, target, ...extra });
const access = (name: string, over: string) => add({ driver: 'snapshot-access', 'node-name': name, file: over, discard: 'unmap' });
const readOnlyExport = (id: string, node: string, bitmaps: (string | object)[] = []): TranscriptStep => ({ execute: 'block-export-add', arguments: { type: 'nbd', id, name: id, 'node-name': node, bitmaps } });
const readView = (id: string, commands: string[]) => qemuIoExport(id, commands, { readOnly: true });

/** The disk with bitmap b0 dirty over BEFORE's clusters, and its fleecing image over it (backing = the disk's node). */
const liveWithBitmap = (name = 'live'): TranscriptStep[] => [
  addImage(name),
  { execute: 'block-dirty-bitmap-add', arguments: { node: name, name: 'b0' } },
  exportNode(`${name}-pre`, name),
  qemuIoExport(`${name}-pre`, BEFORE),
  ...exportDel(`${name}-pre`),
  addImage(`${name}-fleece`, { backing: name }),
];

test('pull backup without a bitmap: the view is the disk at the start while the guest writes; discards give clusters up', () =>
  compareWithQsd({
    prepare: (dir) => prepareDisk(dir),
    steps: [
      nbdServer,
      ...liveWithBitmap(),
      // Refusals of the filter's options, in QEMU's order.
      cbw('cbw', 'live', 'live-fleece', { bitmap: { node: 'nonode', name: 'b0' } }),
      cbw('cbw', 'live', 'live-fleece', { bitmap: { node: 'live', name: 'nope' } }),
      cbw('cbw', 'live', 'live-fleece'),
      access('acc', 'cbw'),
      // Over a node without the snapshot API it opens, but reads fail.
      add({ driver: 'snapshot-access', 'node-name': 'noapi', file: 'live' }),
      graph,
      readOnlyExport('view', 'acc', [{ node: 'live', name: 'b0' }]),
      readOnlyExport('noapi', 'noapi'),
      exportNode('guest', 'cbw'),
      exportNode('viewrw', 'acc'),
      nbdinfoMap('view'),
      nbdinfoMap('view', 'qemu:dirty-bitmap:b0'),
      readView('noapi', ['read 0 64k']),
      qemuIoExport('guest', GUEST),
      compareExport('view', 'start.raw'),
      graph,
      // Writes to the view are not supported; discards give up whole clusters.
      qemuIoExport('viewrw', ['write -P 0x33 0 64k', 'write -z 0 64k', 'discard 0 1M', 'discard 2M 64k']),
      readView('view', ['read 0 64k', 'read 960k 64k', 'read -P 0x11 960k 64k', 'read -P 0x22 1M 64k', 'read 2M 64k', 'read -P 0x11 2162688 64k']),
      nbdinfoMap('view'),
      graph,
      // What blockdev-del refuses while the nodes are in use, then the order that works.
      del('cbw'), del('live-fleece'), del('live'), del('acc'),
      ...exportDel('view'), ...exportDel('viewrw'),
      del('cbw'),
      del('acc'), del('noapi'),
      ...exportDel('noapi'),
      del('cbw'),
      ...exportDel('guest'),
      del('cbw'),
      graph,
      del('live-fleece'),
      graph,
      { execute: 'quit' },
      { untilClosed: true },
    ],
    images(dir) {
      assertReadsAs(dir, 'live.qcow2', 'end.raw');
      assertCheckClean(join(dir, 'live-fleece.qcow2'), 'live-fleece.qcow2');
    },
    alike: ['live.qcow2'],
  }));

test('pull backup with a bitmap: only its clusters are copied and readable; a busy bitmap is refused', () =>
  compareWithQsd({
    prepare: (dir) => prepareDisk(dir),
    steps: [
      nbdServer,
      ...liveWithBitmap(),
      // b1 records what the guest writes from here: the next increment's bitmap.
      { execute: 'block-dirty-bitmap-add', arguments: { node: 'live', name: 'b1' } },
      { execute: 'block-dirty-bitmap-disable', arguments: { node: 'live', name: 'b0' } },
      readOnlyExport('busy', 'live', ['b0']),
      cbw('cbw', 'live', 'live-fleece', { bitmap: { node: 'live', name: 'b0' } }),
      ...exportDel('busy'),
      cbw('cbw', 'live', 'live-fleece', { bitmap: { node: 'live', name: 'b0' } }),
      access('acc', 'cbw'),
      graph,
      readOnlyExport('view', 'acc', [{ node: 'live', name: 'b0' }]),
      exportNode('guest', 'cbw'),
      nbdinfoMap('view', 'qemu:dirty-bitmap:b0'),
      nbdinfoMap('view'),
      readView('view', ['read -P 0x22 1M 128k', 'read -P 0x11 6291456 64k', 'read -P 0x23 6389760 100k', 'read -P 0x24 12M 64k', 'read 0 64k', 'read 1M 192k', 'read 8M 64k']),
      qemuIoExport('guest', GUEST),
      graph,
      readView('view', ['read -P 0x22 1M 128k', 'read -P 0x11 6291456 64k', 'read -P 0x23 6389760 100k', 'read -P 0x24 12M 64k', 'read 0 64k']),
      ...exportDel('view'),
      ...exportDel('guest'),
      del('acc'),
      del('cbw'),
      graph,
      del('live-fleece'),
      { execute: 'quit' },
      { untilClosed: true },
    ],
    images(dir) {
      assertReadsAs(dir, 'live.qcow2', 'end.raw');
    },
    alike: ['live.qcow2'],
  }));

/** A fleecing image whose file fails every write (blkdebug): each copy before write fails. */
const failingFleece = (name: string, disk: string): TranscriptStep =>
  add({
    driver: 'qcow2', 'node-name': name, backing: disk,
    file: { driver: 'blkdebug', 'inject-error': [{ event: 'write_aio', errno: 5 }], image: file(name) },
  });

test('on-cbw-error: a failed copy fails the guest write (break-guest-write) or breaks the view (break-snapshot)', () =>
  compareWithQsd({
    prepare: (dir) => prepareDisk(dir, ['l1', 'l2']),
    steps: [
      nbdServer,
      addImage('l1'), addImage('l2'),
      failingFleece('l1-fleece', 'l1'), failingFleece('l2-fleece', 'l2'),
      cbw('c1', 'l1', 'l1-fleece'),
      cbw('c2', 'l2', 'l2-fleece', { 'on-cbw-error': 'break-snapshot' }),
      access('a1', 'c1'), access('a2', 'c2'),
      readOnlyExport('v1', 'a1'), readOnlyExport('v2', 'a2'),
      exportNode('g1', 'c1'), exportNode('g2', 'c2'),
      qemuIoExport('g1', ['write -P 0x55 0 64k', 'write -z 1M 64k']),
      readView('v1', ['read -P 0x11 0 64k', 'read -P 0x11 1M 64k']),
      qemuIoExport('g2', ['write -P 0x55 0 64k', 'write -z 1M 64k']),
      readView('v2', ['read 0 64k', 'read 2M 64k']),
      nbdinfoMap('v2'),
      ...exportDel('v1'), ...exportDel('v2'), ...exportDel('g1'), ...exportDel('g2'),
      del('a1'), del('a2'), del('c1'), del('c2'),
      { execute: 'quit' },
      { untilClosed: true },
    ],
  }));

/** A fleecing target behind a throttle group that writes 16 KiB a second: the second 64 KiB copy is held about 4 s. */
const slowTarget = (group: string, fleece: string): TranscriptStep[] => [
  { execute: 'object-add', arguments: { 'qom-type': 'throttle-group', id: group, limits: { 'bps-write': 16384 } } },
  add({ driver: 'throttle', 'node-name': `${fleece}-slow`, 'throttle-group': group, file: fleece }),
];

test('cbw-timeout: a copy slower than the timeout fails the guest write, or breaks the view and lets the write pass', () =>
  compareWithQsd({
    prepare: (dir) => prepareDisk(dir, ['l1', 'l2']),
    steps: [
      nbdServer,
      addImage('l1'), addImage('l2'),
      addImage('l1-fleece', { backing: 'l1' }), addImage('l2-fleece', { backing: 'l2' }),
      ...slowTarget('t1', 'l1-fleece'), ...slowTarget('t2', 'l2-fleece'),
      cbw('c1', 'l1', 'l1-fleece-slow', { 'cbw-timeout': 1 }),
      cbw('c2', 'l2', 'l2-fleece-slow', { 'cbw-timeout': 1, 'on-cbw-error': 'break-snapshot' }),
      access('a1', 'c1'), access('a2', 'c2'),
      readOnlyExport('v1', 'a1'), readOnlyExport('v2', 'a2'),
      exportNode('g1', 'c1'), exportNode('g2', 'c2'),
      // The first copy goes through the empty bucket; the second waits for it to drain.
      qemuIoExport('g1', ['write -P 0x55 0 64k', 'write -P 0x56 1M 64k']),
      qemuIoExport('g2', ['write -P 0x55 0 64k', 'write -P 0x56 1M 64k']),
      readView('v1', ['read -P 0x11 0 64k']),
      readView('v2', ['read 0 64k']),
      ...exportDel('v1'), ...exportDel('v2'), ...exportDel('g1'), ...exportDel('g2'),
      del('a1'), del('a2'), del('c1'), del('c2'),
      { execute: 'quit' },
      { untilClosed: true },
    ],
  }));
