/*
 * libvirt's backup, checkpoint and disk-only snapshot flows (8.x/9.x, the -blockdev era) as it
 * sends them over QMP, replayed end to end against qemu-storage-daemon and blockd: replies and
 * events must be the same, and afterwards every image must hold what the guest wrote.
 * The disks are three-layer chains opened as libvirt opens them (libvirt-N-storage and
 * libvirt-N-format per layer); the guest is a qemu-io writing through an NBD export of each
 * disk's top, before, during and after every job. The flows:
 * - `virsh backup-begin` push, full, creating checkpoint chk1 (one transaction: the
 *   checkpoint's persistent bitmap and blockdev-backup sync=full into a target libvirt made
 *   with blockdev-create), then an incremental relative to chk1 creating chk2 (a temporary
 *   disabled bitmap merged from chk1, sync=incremental into a target backed by the disk), each
 *   ended as libvirt ends them: on `concluded` query-jobs, job-dismiss, blockdev-del of the
 *   target, the temporary bitmap removed. The full backup with the increment rebased onto it
 *   reads as the disk when the increment started.
 * - `virsh backup-begin` pull, full then incremental: a scratch image backed by the disk,
 *   blockdev-backup sync=none into it in the transaction, block-export-add (with the temporary
 *   bitmap for the increment), a backup program reading the export while the guest writes
 *   (the incremental one only the extents the bitmap marks, as nbdinfo lists them), and
 *   `virsh domjobabort`: block-job-cancel force, then on `concluded` nbd-server-stop and the
 *   scratch's blockdev-del. What the program read is the disk at the transaction.
 * - `virsh checkpoint-create` alone: one transaction adding a bitmap per disk.
 * - `virsh snapshot-create-as --disk-only` of three disks: overlays made one by one with
 *   blockdev-create and added with backing null, then one transaction propagating the
 *   checkpoint bitmaps and taking the three snapshots; the guest then writes to the overlays.
 * Here the guests' frontends are exports of the same NBD server a pull backup uses, so the
 * server is already running when libvirt would start it, and libvirt's nbd-server-stop at
 * the end of a pull takes the guests' exports too: the test attaches them again.
 */
import assert from 'node:assert/strict';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { assertSameTranscripts, differentialPeers } from '../helpers/differential-peers.js';
import { guestWrites as guestWritesTo, keepModel } from '../helpers/guest-model-steps.js';
import { makePatternChain } from '../helpers/pattern-chains.js';
import { maskImageBitmaps, maskImageSizes, untilJob, type TranscriptStep } from '../helpers/qmp-transcript.js';
import { assertCheckClean, MiB, qemuImgCompare, runQemuImg, runTool, writeAt } from '../helpers/qemu-tools.js';

interface Disk {
  /** Its chain's letter: files a-top.qcow2, a-mid.qcow2, a-base.qcow2, and the model a-expected.raw. */
  chain: string;
  /** libvirt-<first> is the top, then the backing layers. */
  first: number;
  /** The disk's target name (vda ...): libvirt's names for jobs, bitmaps and exports derive from it. */
  dev: string;
}

const VDA: Disk = { chain: 'a', first: 1, dev: 'vda' };
const VDB: Disk = { chain: 'b', first: 4, dev: 'vdb' };
const VDC: Disk = { chain: 'c', first: 7, dev: 'vdc' };
const DISKS = [VDA, VDB, VDC];
const LAYERS = ['top', 'mid', 'base'] as const;
const SIZE = 64 * MiB;

const storage = (index: number) => `libvirt-${index}-storage`;
const format = (index: number) => `libvirt-${index}-format`;
const image = (disk: Disk, name: string) => `$DIR/${disk.chain}-${name}.qcow2`;
const guestExport = (disk: Disk) => `guest-${disk.dev}`;
const backupJob = (disk: Disk) => `backup-${disk.dev}-${format(disk.first)}`;

/** The images libvirt makes: it creates each as an empty file itself, then formats it over QMP. */
const MADE = { vda: ['full', 'inc'], vdb: ['scratch1', 'scratch2'], vdc: [] as string[] };

function prepare(dir: string): void {
  for (const disk of DISKS) makePatternChain(dir, disk.chain);
  for (const disk of DISKS) for (const name of [...MADE[disk.dev as keyof typeof MADE], 'snap']) writeFileSync(join(dir, `${disk.chain}-${name}.qcow2`), '');
}

const peers = differentialPeers(prepare);

const graph: TranscriptStep = { execute: 'query-named-block-nodes', arguments: { flat: true } };

/** blockdev-add of an image as libvirt does it: the file node, then the format node over it. */
function addImage(index: number, path: string, readOnly: boolean, backing: string | null): TranscriptStep[] {
  return [
    { execute: 'blockdev-add', arguments: { driver: 'file', filename: path, 'node-name': storage(index), 'auto-read-only': true, discard: 'unmap' } },
    { execute: 'blockdev-add', arguments: { 'node-name': format(index), 'read-only': readOnly, driver: 'qcow2', file: storage(index), backing } },
  ];
}

/** The guest's frontend: a writable export of the disk's top. */
const attachGuest = (disk: Disk): TranscriptStep => ({
  execute: 'block-export-add', arguments: { type: 'nbd', id: guestExport(disk), 'node-name': format(disk.first), name: guestExport(disk), writable: true },
});

/** The disk as libvirt opens it at start-up (base first). */
function attachDisk(disk: Disk): TranscriptStep[] {
  const [top, mid, base] = [disk.first, disk.first + 1, disk.first + 2];
  return [...addImage(base, image(disk, 'base'), true, null), ...addImage(mid, image(disk, 'mid'), true, format(base)), ...addImage(top, image(disk, 'top'), false, format(mid)), attachGuest(disk)];
}

/** What libvirt does once a job concluded: the error from query-jobs, then job-dismiss. */
function concluded(id: string): TranscriptStep[] {
  return [untilJob(id, 'concluded'), { execute: 'query-jobs' }, { execute: 'job-dismiss', arguments: { id } }, untilJob(id, 'null')];
}

/** An image libvirt made (an empty file) formatted by a blockdev-create job and opened: backing named in the header, and the node's backing. */
function makeImage(disk: Disk, index: number, name: string, backing: { file: string; node: string | null } | null): TranscriptStep[] {
  const id = `create-${format(index)}`;
  return [
    { execute: 'blockdev-add', arguments: { driver: 'file', filename: image(disk, name), 'node-name': storage(index), 'auto-read-only': true, discard: 'unmap' } },
    {
      execute: 'blockdev-create',
      arguments: { 'job-id': id, options: { driver: 'qcow2', file: storage(index), size: SIZE, 'cluster-size': 65536, ...(backing ? { 'backing-file': backing.file, 'backing-fmt': 'qcow2' } : {}) } },
    },
    ...concluded(id),
    { execute: 'blockdev-add', arguments: { 'node-name': format(index), 'read-only': false, driver: 'qcow2', file: storage(index), backing: backing?.node ?? null } },
  ];
}

const deleteImage = (index: number): TranscriptStep[] => [
  { execute: 'blockdev-del', arguments: { 'node-name': format(index) } },
  { execute: 'blockdev-del', arguments: { 'node-name': storage(index) } },
];

const checkpoint = (disk: Disk, name: string, granularity?: number) => ({
  type: 'block-dirty-bitmap-add', data: { node: format(disk.first), name, persistent: true, disabled: false, ...(granularity ? { granularity } : {}) },
});

/** The temporary bitmap of an incremental backup (on `node`): disabled, filled from the checkpoint's bitmap. */
const temporaryBitmap = (disk: Disk, node: string, since: string) => [
  { type: 'block-dirty-bitmap-add', data: { node, name: `backup-${disk.dev}`, persistent: false, disabled: true, granularity: 65536 } },
  { type: 'block-dirty-bitmap-merge', data: { node, target: `backup-${disk.dev}`, bitmaps: [{ node: format(disk.first), name: since }] } },
];

const backupAction = (disk: Disk, target: number, sync: 'full' | 'incremental' | 'none') => ({
  type: 'blockdev-backup',
  data: { device: format(disk.first), 'job-id': backupJob(disk), target: format(target), sync, ...(sync === 'incremental' ? { bitmap: `backup-${disk.dev}` } : {}), 'auto-finalize': true, 'auto-dismiss': false },
});

const transaction = (actions: object[]): TranscriptStep => ({ execute: 'transaction', arguments: { actions } });

const guestWrites = (disk: Disk, commands: string[]) => guestWritesTo(disk, guestExport(disk), commands);

const exportUri = (dir: string, name: string) => `nbd+unix:///${name}?socket=${join(dir, 'nbd.sock')}`;

/** A backup program reads the whole pull export into a raw file. */
function pullAll(disk: Disk, into: string): TranscriptStep {
  return {
    action: async (dir) => {
      runQemuImg('convert', '-f', 'raw', '-O', 'raw', exportUri(dir, disk.dev), join(dir, `${disk.chain}-${into}.raw`));
      return `(the backup program read all of ${disk.dev})`;
    },
  };
}

/**
 * A backup program reads only the extents the export's bitmap marks dirty (nbdinfo --map), each
 * with its own read, and patches them into its copy of the previous backup (`onto`).
 */
function pullDirty(disk: Disk, onto: string, into: string): TranscriptStep {
  return {
    action: async (dir) => {
      const uri = exportUri(dir, disk.dev);
      const listed = runTool('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:backup-${disk.dev}`, uri]);
      assert.equal(listed.status, 0, listed.stderr);
      const map = JSON.parse(listed.stdout) as { offset: number; length: number; type: number }[];
      const dirty = map.filter((extent) => (extent.type & 1) !== 0);
      const restored = join(dir, `${disk.chain}-${into}.raw`);
      copyFileSync(join(dir, `${disk.chain}-${onto}.raw`), restored);
      for (const { offset, length } of dirty) {
        const piece = join(dir, 'piece.raw');
        runQemuImg('convert', '--image-opts', `driver=raw,offset=${offset},size=${length},file.driver=nbd,file.path=${join(dir, 'nbd.sock')},file.export=${disk.dev}`, '-O', 'raw', piece);
        writeAt(restored, offset, readFileSync(piece));
      }
      return `(the backup program read the dirty extents of ${disk.dev}: ${dirty.map(({ offset, length }) => `${offset}+${length}`).join(' ')})`;
    },
  };
}

const W = {
  before: ['write -P 0x41 0 64k', 'write -P 0x42 5M 128k', 'write -z 33M 64k'],
  during: ['write -P 0x51 0 64k', 'write -P 0x52 40M 1M', 'write -P 0x53 1000 3000', 'write -z 6M 64k'],
  between: ['write -P 0x61 4M 64k', 'write -P 0x62 62M 512k', 'write -P 0x63 7000 100'],
  after: ['write -P 0x71 8M 64k', 'write -P 0x72 63M 4k'],
};

// ---- the flows --------------------------------------------------------------------------

/** virsh backup-begin (push, full) creating checkpoint chk1 on vda. */
const pushFull: TranscriptStep[] = [
  graph,
  ...makeImage(VDA, 10, 'full', null),
  keepModel(VDA, 'at-full'),
  transaction([checkpoint(VDA, 'chk1'), backupAction(VDA, 10, 'full')]),
  guestWrites(VDA, W.during),
  ...concluded(backupJob(VDA)),
  ...deleteImage(10),
];

/** virsh backup-begin (push, incremental since chk1) creating checkpoint chk2. */
const pushIncremental: TranscriptStep[] = [
  graph,
  ...makeImage(VDA, 11, 'inc', { file: image(VDA, 'top'), node: format(VDA.first) }),
  keepModel(VDA, 'at-inc'),
  transaction([checkpoint(VDA, 'chk2'), ...temporaryBitmap(VDA, format(VDA.first), 'chk1'), backupAction(VDA, 11, 'incremental')]),
  guestWrites(VDA, W.during),
  ...concluded(backupJob(VDA)),
  ...deleteImage(11),
  { execute: 'block-dirty-bitmap-remove', arguments: { node: format(VDA.first), name: `backup-${VDA.dev}` } },
  graph,
];

/** A pull backup of vdb into scratch image `index`: begun, read while the guest writes, then aborted as virsh domjobabort does. */
function pull(index: number, scratch: string, actions: object[], read: TranscriptStep, model: string): TranscriptStep[] {
  return [
    graph,
    ...makeImage(VDB, index, scratch, { file: image(VDB, 'top'), node: format(VDB.first) }),
    keepModel(VDB, model),
    transaction(actions),
    {
      execute: 'block-export-add',
      arguments: { type: 'nbd', id: `libvirt-nbd-${format(index)}`, 'node-name': format(index), writable: false, name: VDB.dev, ...(scratch === 'scratch2' ? { bitmaps: [`backup-${VDB.dev}`] } : {}) },
    },
    guestWrites(VDB, W.during),
    read,
    guestWrites(VDB, W.between),
    { execute: 'query-jobs' },
    { execute: 'block-job-cancel', arguments: { device: backupJob(VDB), force: true } },
    ...concluded(backupJob(VDB)),
    { execute: 'nbd-server-stop' },
    ...deleteImage(index),
    // The guests' frontends went with the server (see the file's comment).
    { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$DIR/nbd.sock' } } } },
    ...DISKS.map(attachGuest),
  ];
}

const pullFull = pull(12, 'scratch1', [checkpoint(VDB, 'chk1'), backupAction(VDB, 12, 'none')], pullAll(VDB, 'pulled-full'), 'at-pull-full');
const pullIncremental = pull(13, 'scratch2', [checkpoint(VDB, 'chk2'), ...temporaryBitmap(VDB, format(13), 'chk1'), backupAction(VDB, 13, 'none')],
  pullDirty(VDB, 'pulled-full', 'pulled-inc'), 'at-pull-inc');

/** virsh checkpoint-create of vdc (and of the others: one bitmap per disk). */
const checkpointCreate: TranscriptStep[] = [transaction(DISKS.map((disk) => checkpoint(disk, 'chk3')))];

/** virsh snapshot-create-as --disk-only of the three disks: overlays made one by one, then one transaction. */
const snapshotIndex = (disk: Disk) => 20 + DISKS.indexOf(disk);
const snapshotDiskOnly: TranscriptStep[] = [
  graph,
  ...DISKS.flatMap((disk) => makeImage(disk, snapshotIndex(disk), 'snap', { file: image(disk, 'top'), node: null })),
  ...DISKS.map((disk) => keepModel(disk, 'at-snapshot')),
  transaction(DISKS.flatMap((disk) => [
    // The disk's recording persistent bitmaps go onto the overlay first.
    ...(disk === VDA ? ['chk1', 'chk2', 'chk3'] : disk === VDB ? ['chk1', 'chk2', 'chk3'] : ['chk3']).map((name) => ({
      type: 'block-dirty-bitmap-add', data: { node: format(snapshotIndex(disk)), name, persistent: true, disabled: false, granularity: 65536 },
    })),
    { type: 'blockdev-snapshot', data: { node: format(disk.first), overlay: format(snapshotIndex(disk)) } },
  ])),
  ...DISKS.map((disk) => guestWrites(disk, W.after)),
  graph,
];

const STEPS: TranscriptStep[] = [
  { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$DIR/nbd.sock' } } } },
  ...DISKS.flatMap(attachDisk),
  ...DISKS.map((disk) => guestWrites(disk, W.before)),
  ...pushFull,
  guestWrites(VDA, W.between),
  ...pushIncremental,
  ...pullFull,
  ...pullIncremental,
  ...checkpointCreate,
  ...snapshotDiskOnly,
  ...DISKS.map((disk) => ({ execute: 'block-export-del', arguments: { id: guestExport(disk) } })),
  { execute: 'nbd-server-stop' },
];

test('libvirt\'s push and pull backups, checkpoint and disk-only snapshot flows: as qemu-storage-daemon, and the data', async () => {
  // blockd stores a new persistent bitmap at once, QEMU at close: the stored lists are compared after both stopped.
  await assertSameTranscripts(peers, STEPS, (line) => maskImageBitmaps(maskImageSizes(line)));
  await peers.stopBlockd();
  await peers.stopQsd();

  // The checkpoints as each daemon left them in the images: the same bitmaps, with the same flags.
  const storedBitmaps = (dir: string) => DISKS.flatMap((disk) => ['top', 'snap'].map((name) => {
    const info = JSON.parse(runQemuImg('info', '--output=json', join(dir, `${disk.chain}-${name}.qcow2`))) as { 'format-specific': { data: { bitmaps?: unknown[] } } };
    return `${disk.chain}-${name}: ${JSON.stringify(info['format-specific'].data.bitmaps ?? [])}`;
  }));
  assert.deepEqual(storedBitmaps(peers.blockd.dir), storedBitmaps(peers.qsd.dir));

  for (const dir of [peers.blockd.dir, peers.qsd.dir]) {
    const path = (disk: Disk, name: string) => join(dir, `${disk.chain}-${name}.qcow2`);
    const model = (disk: Disk, as: string) => join(dir, `${disk.chain}-${as}.raw`);
    const same = (a: string, formats: [string, string], b: string, what: string) => qemuImgCompare(a, b, formats, `${dir}: ${what}`);

    // Push: the full backup is the disk at its transaction; the increment rebased onto it, the disk at the increment's.
    same(path(VDA, 'full'), ['qcow2', 'raw'], model(VDA, 'at-full'), 'the full push backup');
    runQemuImg('rebase', '-u', '-f', 'qcow2', '-b', 'a-full.qcow2', '-F', 'qcow2', path(VDA, 'inc'));
    same(path(VDA, 'inc'), ['qcow2', 'raw'], model(VDA, 'at-inc'), 'the full push backup and its increment');
    // Pull: what the program read is the disk at each transaction.
    assert.ok(readFileSync(model(VDB, 'pulled-full')).equals(readFileSync(model(VDB, 'at-pull-full'))), `${dir}: the full pull`);
    assert.ok(readFileSync(model(VDB, 'pulled-inc')).equals(readFileSync(model(VDB, 'at-pull-inc'))), `${dir}: the full pull patched with the incremental one`);
    // Snapshots: the overlays' chains are the disks now, the old tops the disks at the snapshot.
    for (const disk of DISKS) {
      same(path(disk, 'snap'), ['qcow2', 'raw'], model(disk, 'expected'), `${disk.dev} through its overlay`);
      same(path(disk, 'top'), ['qcow2', 'raw'], model(disk, 'at-snapshot'), `${disk.dev}'s old top`);
      for (const name of ['snap', ...LAYERS, ...MADE[disk.dev as keyof typeof MADE]]) assertCheckClean(path(disk, name), `${dir} ${disk.chain}-${name}`);
    }
  }
});
