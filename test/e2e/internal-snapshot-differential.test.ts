/*
 * Internal snapshots against qemu-storage-daemon: blockdev-snapshot-internal-sync and
 * blockdev-snapshot-delete-internal-sync in one script, with writes through an NBD export
 * between them (into clusters a snapshot shares, compressed ones too), every refusal of
 * both commands, and the snapshots query-named-block-nodes lists (dates masked: they are
 * the wall clock). Each snapshot is read back with `qemu-img convert -U -l` as soon as it
 * is taken and compared with a raw model of the disk at that moment; after both daemons
 * stopped, each image passes `qemu-img check`, `qemu-img snapshot -l` lists what is left,
 * and the remaining snapshot and the active disk read as their models.
 */
import assert from 'node:assert/strict';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { compareWithQsd, assertReadsAs } from '../helpers/differential-scenario.js';
import { addImage, addRaw, exportNode, nbdServer, qemuIoExport } from '../helpers/job-steps.js';
import { createQcow2, MiB, qemuIo, qemuImgCompare, runQemuImg, runTool } from '../helpers/qemu-tools.js';
import type { TranscriptStep } from '../helpers/qmp-transcript.js';

const snap = (device: string, name: string): TranscriptStep => ({ execute: 'blockdev-snapshot-internal-sync', arguments: { device, name } });
const del = (device: string, which: { id?: string; name?: string }): TranscriptStep => ({ execute: 'blockdev-snapshot-delete-internal-sync', arguments: { device, ...which } });
const graph: TranscriptStep = { execute: 'query-named-block-nodes', arguments: { flat: true } };

/** The writes made between the snapshots, applied alike to the image (through the export) and to raw models. */
const BEFORE_S1 = ['write -P 3 3M 64k'];
const BEFORE_S2 = ['write -P 9 0 64k', 'write -P 9 2M 4k', 'write -P 9 1M 4k'];
const AFTER_S2 = ['write -P 7 64k 64k', 'write -z 3M 64k', 'write -P 6 2M 64k'];
const AFTER_DELETES = ['write -P 8 0 4k', 'write -P 4 2052k 4k'];

/** The disk as made by qemu-img: data, a compressed cluster, and a snapshot "old" taken by qemu-img. */
const INITIAL = ['write -P 1 0 128k', 'write -P 2 1M 8k'];

function prepare(dir: string): void {
  const disk = createQcow2(join(dir, 'disk.qcow2'), 4 * MiB);
  qemuIo(disk, INITIAL);
  qemuIo(disk, ['write -c -P 5 2M 64k']);
  runQemuImg('snapshot', '-c', 'old', disk);
  // Models: the raw disk at each snapshot and at the end.
  runQemuImg('create', '-q', '-f', 'raw', join(dir, 'old.raw'), String(4 * MiB));
  qemuIo(join(dir, 'old.raw'), [...INITIAL, 'write -P 5 2M 64k'], ['-f', 'raw']);
  let previous = 'old';
  for (const [name, writes] of [['s1', BEFORE_S1], ['s2', BEFORE_S2], ['after-s2', AFTER_S2], ['final', AFTER_DELETES]] as const) {
    copyFileSync(join(dir, `${previous}.raw`), join(dir, `${name}.raw`));
    qemuIo(join(dir, `${name}.raw`), [...writes], ['-f', 'raw']);
    previous = name;
  }
  runQemuImg('create', '-q', '-f', 'raw', join(dir, 'r0.raw'), String(4 * MiB));
  createQcow2(join(dir, 'ro.qcow2'), 4 * MiB);
  runQemuImg('snapshot', '-c', 'frozen', join(dir, 'ro.qcow2'));
  createQcow2(join(dir, 'x0.qcow2'), MiB);
}

/** A snapshot read with qemu-img while the daemon holds the image: it must equal its model. */
const readsAsModel = (snapshot: string, model: string): TranscriptStep => ({
  action: async (dir) => {
    const out = join(dir, `read-${snapshot}.raw`);
    const convert = runTool('qemu-img', ['convert', '-U', '-l', `snapshot.name=${snapshot}`, '-O', 'raw', join(dir, 'disk.qcow2'), out]);
    const compare = runTool('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', out, join(dir, `${model}.raw`)]);
    return `snapshot ${snapshot}: convert exit ${convert.status} ${convert.stderr.trim()}; compare with ${model}: ${compare.stdout.trim()}`;
  },
});

/** Snapshot dates are the wall clock: masked in both transcripts. */
const maskDates = (line: string) => line.replace(/"(date-sec|date-nsec|vm-clock-sec|vm-clock-nsec)": \d+/g, '"$1": 0');

const STEPS: TranscriptStep[] = [
  addImage('disk'),
  addRaw('r0'),
  addImage('ro', { 'read-only': true }),
  addImage('x0'),
  { execute: 'blockdev-add', arguments: { driver: 'copy-on-read', 'node-name': 'cx', file: 'x0' } },
  nbdServer,
  exportNode('disk', 'disk'),
  graph,
  qemuIoExport('disk', BEFORE_S1),
  snap('disk', 's1'),
  readsAsModel('s1', 's1'),
  readsAsModel('old', 'old'),
  // Refusals, in pairs that pin QEMU's order of checks.
  snap('disk', 's1'),
  snap('disk', ''),
  snap('disk-file', 'x'),
  snap('nosuch', 'x'),
  snap('r0', 'x'),
  snap('r0', ''),
  snap('ro', 'x'),
  snap('ro', ''),
  snap('x0', 'x'), // used by the filter above it: not a root node
  snap('cx', 'through-filter'), // the filter falls back to its child's image
  qemuIoExport('disk', BEFORE_S2),
  snap('disk', 's2'),
  readsAsModel('s2', 's2'),
  readsAsModel('s1', 's1'),
  qemuIoExport('disk', AFTER_S2),
  readsAsModel('s2', 's2'),
  graph,
  // Deletes: by name, by id, both, wrong pairs, refusals.
  del('disk', {}),
  del('nosuch', {}),
  del('disk-file', { name: 's1' }),
  del('r0', {}),
  del('r0', { name: 'x' }),
  del('ro', { name: 'x' }),
  del('disk', { id: '77' }),
  del('disk', { id: '2', name: 's2' }),
  del('disk', { name: '' }),
  del('disk', { name: 's1' }),
  del('disk', { name: 's1' }),
  del('disk', { id: '1' }),
  del('cx', { name: 'through-filter' }),
  qemuIoExport('disk', AFTER_DELETES),
  readsAsModel('s2', 's2'),
  snap('disk', 'last'),
  readsAsModel('last', 'final'),
  del('disk', { id: '4', name: 'last' }),
  graph,
  // Last: QEMU drops the snapshot from its list in memory although the write failed, so nothing queries "ro" after this.
  del('ro', { name: 'frozen' }),
];

test('internal snapshots: replies, listings and the data of every snapshot as qemu-storage-daemon', async () => {
  await compareWithQsd({
    prepare,
    steps: STEPS,
    normalise: maskDates,
    images(dir) {
      assertReadsAs(dir, 'disk.qcow2', 'final.raw');
      const listed = JSON.parse(runQemuImg('info', '--output=json', join(dir, 'disk.qcow2'))) as { snapshots?: { id: string; name: string }[] };
      assert.deepEqual(listed.snapshots?.map((sn) => `${sn.id} ${sn.name}`), ['3 s2'], dir);
      assert.match(runQemuImg('snapshot', '-l', join(dir, 'disk.qcow2')), /^3\s+s2\s/m);
      const s2 = join(dir, 'left-s2.raw');
      runQemuImg('convert', '-l', 'snapshot.name=s2', '-O', 'raw', join(dir, 'disk.qcow2'), s2);
      qemuImgCompare(s2, join(dir, 's2.raw'), ['raw', 'raw'], `${dir}: snapshot s2 after close`);
      // The snapshot made by qemu-img and kept by the read-only node is intact.
      assert.match(runQemuImg('snapshot', '-l', join(dir, 'ro.qcow2')), /^1\s+frozen\s/m);
      assert.equal(runTool('qemu-img', ['check', join(dir, 'x0.qcow2')]).status, 0);
    },
  }, 'blockd-internal-snapshot-');
});


