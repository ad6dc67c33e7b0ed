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
import { assertCheckClean, createQcow2, MiB, qemuImgCheck, qemuIo, qemuImgCompare, runQemuImg, runTool } from '../helpers/qemu-tools.js';
import { maskSnapshotDates, untilBlockJobIdle, type TranscriptStep } from '../helpers/qmp-transcript.js';

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
  // Many L2 tables (512-byte clusters), a v2 image, 1-bit refcounts: each snapshotted under writes.
  for (const [name, options] of [['small', { clusterSize: 512 }], ['v2', { compat: '0.10' }], ['narrow', { refcountBits: 1 }]] as const) {
    qemuIo(createQcow2(join(dir, `${name}.qcow2`), 4 * MiB, options), ['write -P 0x41 0 3M']);
  }
  // A chain whose top a rate-limited commit of its middle layer holds (the top stays a root node).
  createQcow2(join(dir, 'cbase.qcow2'), 4 * MiB);
  createQcow2(join(dir, 'cmid.qcow2'), 4 * MiB, { backing: { path: 'cbase.qcow2', format: 'qcow2' } });
  qemuIo(join(dir, 'cmid.qcow2'), ['write -P 0x51 0 4M']);
  createQcow2(join(dir, 'ctop.qcow2'), 4 * MiB, { backing: { path: 'cmid.qcow2', format: 'qcow2' } });
}

/** The other images: snapshot, write through the export, snapshot again, delete the first. */
const OTHER_IMAGES = ['small', 'v2', 'narrow'];
const otherImageSteps: TranscriptStep[] = OTHER_IMAGES.flatMap((name) => [
  addImage(name),
  exportNode(name, name),
  snap(name, 'a'),
  qemuIoExport(name, ['write -P 0x42 1M 1M', 'write -z 2M 512k', 'write -P 0x43 3584k 8k']),
  snap(name, 'b'),
  qemuIoExport(name, ['write -P 0x44 0 4M']),
  del(name, { name: 'a' }),
]);

/** A snapshot read with qemu-img while the daemon holds the image: it must equal its model. */
const readsAsModel = (snapshot: string, model: string): TranscriptStep => ({
  action: async (dir) => {
    const out = join(dir, `read-${snapshot}.raw`);
    const convert = runTool('qemu-img', ['convert', '-U', '-l', `snapshot.name=${snapshot}`, '-O', 'raw', join(dir, 'disk.qcow2'), out]);
    const compare = runTool('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', out, join(dir, `${model}.raw`)]);
    return `snapshot ${snapshot}: convert exit ${convert.status} ${convert.stderr.trim()}; compare with ${model}: ${compare.stdout.trim()}`;
  },
});

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
  ...otherImageSteps,
  graph,
  // A job holds the node: both commands are refused with the blocker's reason.
  addImage('cbase'),
  addImage('cmid', { backing: 'cbase' }),
  addImage('ctop', { backing: 'cmid' }),
  { execute: 'block-commit', arguments: { 'job-id': 'cj', device: 'ctop', 'top-node': 'cmid', 'base-node': 'cbase', speed: 1 } },
  untilBlockJobIdle('cj'),
  snap('ctop', 'x'),
  del('ctop', { name: 'x' }),
  snap('cmid', 'x'),
  { execute: 'block-job-set-speed', arguments: { device: 'cj', speed: 0 } },
  { awaitEvent: { event: 'JOB_STATUS_CHANGE', data: { id: 'cj', status: 'null' } } },
  snap('ctop', 'after-commit'),
  // Last: QEMU drops the snapshot from its list in memory although the write failed, so nothing queries "ro" after this.
  del('ro', { name: 'frozen' }),
];

test('internal snapshots: replies, listings and the data of every snapshot as qemu-storage-daemon', async () => {
  await compareWithQsd({
    prepare,
    steps: STEPS,
    normalise: maskSnapshotDates,
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
      // 1-bit refcounts cannot count a second reference: both refuse the snapshot; QEMU leaks its L1 copy, blockd nothing.
      const narrow = qemuImgCheck(join(dir, 'narrow.qcow2'));
      assert.ok(narrow.corruptions === 0 && narrow.checkErrors === 0 && (dir.endsWith('qsd') || narrow.status === 0), narrow.output);
      assert.doesNotMatch(runQemuImg('snapshot', '-l', join(dir, 'narrow.qcow2')), /\d+\s+[ab]\s/);
      qemuIo(join(dir, 'narrow.qcow2'), ['read -P 0x44 0 4M']);
      for (const name of ['small', 'v2']) {
        const image = join(dir, `${name}.qcow2`);
        assertCheckClean(image, name);
        assert.match(runQemuImg('snapshot', '-l', image), /^2\s+b\s/m, name);
        qemuIo(image, ['read -P 0x44 0 4M']);
        const b = join(dir, `${name}-b.raw`);
        runQemuImg('convert', '-l', 'snapshot.name=b', '-O', 'raw', image, b);
        qemuIo(b, ['read -P 0x41 0 1M', 'read -P 0x42 1M 1M', 'read -P 0 2M 512k', 'read -P 0x41 2560k 512k', 'read -P 0 3M 512k', 'read -P 0x43 3584k 8k', 'read -P 0 3592k 504k'], ['-f', 'raw']);
      }
    },
  }, 'blockd-internal-snapshot-');
});


