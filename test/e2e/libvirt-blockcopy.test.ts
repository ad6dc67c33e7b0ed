/*
 * `virsh blockcopy` as libvirt (6.0 and later, the -blockdev era) drives it over QMP,
 * replayed end to end against qemu-storage-daemon and blockd: the replies and events
 * must be the same, and afterwards the images must hold what the guest wrote.
 * Each disk is a three-layer chain opened as libvirt opens it (a file node and a
 * format node per layer, named libvirt-N-storage / libvirt-N-format, the backing
 * named explicitly); the guest is a qemu-io writing through an NBD export of the
 * disk's top, before READY, while READY and after the job. The flows:
 * - `--shallow` (sync=top) without --reuse-external: the target made by blockdev-create
 *   (file, then qcow2 with the disk's backing file) and added over the disk's backing
 *   node; `--pivot` (job-complete); the old top's nodes deleted after job-dismiss;
 * - `--synchronous-writes` (copy-mode=write-blocking), full copy into a target the user
 *   made (--reuse-external), `--pivot`, then the whole old chain deleted;
 * - `--finish` (block-job-cancel after READY: the copy is kept, the disk stays), the
 *   target's nodes deleted;
 * - `virsh blockjob --abort` before READY.
 * libvirt reacts to JOB_STATUS_CHANGE: on concluded it asks query-jobs for the error
 * and dismisses the job. The progress figures compare exactly: the writes before READY
 * meet a job that sleeps under its speed limit (1 byte/s, `--bandwidth 1 --bytes`) until
 * block-job-set-speed lifts it, and no two writes while READY share a granule, so how
 * often the copy meets them does not depend on timing.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { assertSameTranscripts, differentialPeers } from '../helpers/differential-peers.js';
import { guestWrites as guestWritesTo, keepModel } from '../helpers/guest-model-steps.js';
import { makePatternChain } from '../helpers/pattern-chains.js';
import { maskImageSizes, untilBlockJobIdle, untilJob, type TranscriptStep } from '../helpers/qmp-transcript.js';
import { assertCheckClean, createQcow2, MiB, qemuImgCompare, runQemuImg } from '../helpers/qemu-tools.js';

/** One guest disk: its chain's letter (files a-top.qcow2 ...), libvirt's first node index and the disk's target name. */
interface Disk {
  chain: string;
  /** libvirt-<first> is the top, then the backing layers; the copy gets the next index. */
  first: number;
  /** The export name (vda, ...) and the job's id (libvirt names copy jobs after the disk's drive alias). */
  dev: string;
  job: string;
}

const DISKS = {
  shallow: { chain: 'a', first: 1, dev: 'vda', job: 'drive-virtio-disk0' },
  sync: { chain: 'b', first: 5, dev: 'vdb', job: 'drive-virtio-disk1' },
  finish: { chain: 'c', first: 9, dev: 'vdc', job: 'drive-virtio-disk2' },
  abort: { chain: 'd', first: 13, dev: 'vdd', job: 'drive-virtio-disk3' },
} satisfies Record<string, Disk>;

const LAYERS = ['top', 'mid', 'base'] as const;
const storage = (index: number) => `libvirt-${index}-storage`;
const format = (index: number) => `libvirt-${index}-format`;
const copyIndex = (disk: Disk) => disk.first + LAYERS.length;

function prepare(dir: string): void {
  for (const disk of Object.values(DISKS)) makePatternChain(dir, disk.chain);
  // --reuse-external: the user made the copy's image beforehand.
  for (const disk of [DISKS.sync, DISKS.finish, DISKS.abort]) createQcow2(join(dir, `${disk.chain}-copy.qcow2`), 64 * MiB);
}

const peers = differentialPeers(prepare);

/** blockdev-add of one image as libvirt does it (for a disk with discard='unmap'): the file node, then the format node over it. */
function addImage(index: number, path: string, readOnly: boolean, backing: string | null): TranscriptStep[] {
  return [
    { execute: 'blockdev-add', arguments: { driver: 'file', filename: path, 'node-name': storage(index), 'auto-read-only': true, discard: 'unmap' } },
    { execute: 'blockdev-add', arguments: { 'node-name': format(index), 'read-only': readOnly, driver: 'qcow2', file: storage(index), backing, discard: 'unmap' } },
  ];
}

/** The disk as libvirt opens it at start-up (base first), and its frontend: here a writable NBD export. */
function attachDisk(disk: Disk): TranscriptStep[] {
  const [top, mid, base] = [disk.first, disk.first + 1, disk.first + 2];
  const image = (layer: string) => `$DIR/${disk.chain}-${layer}.qcow2`;
  return [
    ...addImage(base, image('base'), true, null),
    ...addImage(mid, image('mid'), true, format(base)),
    ...addImage(top, image('top'), false, format(mid)),
    { execute: 'block-export-add', arguments: { type: 'nbd', id: disk.dev, 'node-name': format(top), name: disk.dev, writable: true } },
  ];
}

/** What libvirt does once a job concluded: the error from query-jobs, then job-dismiss. */
function concluded(id: string): TranscriptStep[] {
  return [untilJob(id, 'concluded'), { execute: 'query-jobs' }, { execute: 'job-dismiss', arguments: { id } }, untilJob(id, 'null')];
}

/** libvirt's blockdev-create of a new image: a job it waits for and dismisses. */
function create(id: string, options: object): TranscriptStep[] {
  return [{ execute: 'blockdev-create', arguments: { 'job-id': id, options } }, ...concluded(id)];
}

/** blockdev-del of images' format and file nodes, top first. */
function deleteImages(indexes: number[]): TranscriptStep[] {
  return indexes.flatMap((index) => [
    { execute: 'blockdev-del', arguments: { 'node-name': format(index) } },
    { execute: 'blockdev-del', arguments: { 'node-name': storage(index) } },
  ]);
}

function mirror(disk: Disk, mirrorArguments: { sync: 'full' | 'top'; 'copy-mode'?: string }): TranscriptStep {
  return {
    execute: 'blockdev-mirror',
    arguments: { 'job-id': disk.job, device: format(disk.first), target: format(copyIndex(disk)), speed: 1, ...mirrorArguments, 'auto-finalize': true, 'auto-dismiss': false },
  };
}

/**
 * The guest writes through the disk's export. While a job runs the export's node is the job's
 * filter, which (as QEMU's, opened without discard=unmap) drops discards; otherwise a discard
 * of whole clusters leaves them reading zeroes.
 */
function guestWrites(disk: Disk, commands: string[], duringJob = true): TranscriptStep {
  const effect = (command: string) => (command.startsWith('discard ') ? (duringJob ? [] : [command.replace(/^discard /, 'write -z ')]) : [command]);
  return guestWritesTo(disk, disk.dev, commands, commands.flatMap(effect));
}

/**
 * Writes racing the copy: whole and partial clusters (in what the job copied already and in what
 * it has still to copy), a zero write, a discard, data past what the chain holds.
 */
const BEFORE_READY = ['write -P 0x51 0 64k', 'write -P 0x52 6M 128k', 'write -P 0x53 40M 1M', 'write -z 32M 64k', 'write -P 0x54 1000 3000', 'write -P 0x55 33M 100', 'discard 1M 128k'];
const WHILE_READY = ['write -P 0x61 4M 64k', 'write -P 0x62 62M 512k', 'write -P 0x63 5000 100', 'write -z 7M 64k', 'discard 60M 128k'];
const AFTER_JOB = ['write -P 0x71 8M 64k', 'write -P 0x72 63M 4k', 'discard 2M 128k'];

const ready = (disk: Disk) => untilJob(disk.job, 'ready');
const unlimit = (disk: Disk): TranscriptStep => ({ execute: 'block-job-set-speed', arguments: { device: disk.job, speed: 0 } });
const graph: TranscriptStep = { execute: 'query-named-block-nodes', arguments: { flat: true } };

/** How a blockcopy ends: `--pivot` (job-complete), `--finish` (a soft cancel once READY), `virsh blockjob --abort` before READY. */
type CopyEnd = 'pivot' | 'finish' | 'abort';

/**
 * One blockcopy of `disk` onto the target `setup` added: the guest writes while the job copies
 * under its speed limit, the limit goes, READY, the guest writes again, the end, libvirt's
 * dismissal, and the nodes left over (`leftover`, libvirt image indexes) deleted; the guest
 * writes once more to what its export serves then.
 */
function blockcopy(disk: Disk, setup: TranscriptStep[], mirrorArguments: { sync: 'full' | 'top'; 'copy-mode'?: string }, end: CopyEnd, leftover: number[]): TranscriptStep[] {
  const stop: TranscriptStep = end === 'pivot'
    ? { execute: 'job-complete', arguments: { id: disk.job } }
    : { execute: 'block-job-cancel', arguments: { device: disk.job } };
  const untilReady = [unlimit(disk), ready(disk), guestWrites(disk, WHILE_READY), keepModel(disk, `at-${end}`)];
  return [
    ...setup,
    mirror(disk, mirrorArguments),
    untilBlockJobIdle(disk.job),
    graph, // the mirror's bitmap on the disk's top: recording in the background, not write-blocking
    guestWrites(disk, BEFORE_READY),
    ...(end === 'abort' ? [] : untilReady),
    stop,
    ...concluded(disk.job),
    ...deleteImages(leftover),
    guestWrites(disk, AFTER_JOB, false),
    graph,
  ];
}

/** The copy's image made by the user (`--reuse-external`), added as libvirt adds it. */
const reusedCopy = (disk: Disk) => addImage(copyIndex(disk), `$DIR/${disk.chain}-copy.qcow2`, false, null);

/** libvirt makes a `--shallow` copy's image (blockdev-create) naming the disk's backing file, and opens it over the disk's backing node. */
function shallowCopy(disk: Disk): TranscriptStep[] {
  const copy = copyIndex(disk);
  const path = `$DIR/${disk.chain}-copy.qcow2`;
  return [
    graph,
    ...create(`create-${storage(copy)}`, { driver: 'file', filename: path, size: 0 }),
    { execute: 'blockdev-add', arguments: { driver: 'file', filename: path, 'node-name': storage(copy), 'auto-read-only': true, discard: 'unmap' } },
    ...create(`create-${format(copy)}`, { driver: 'qcow2', file: storage(copy), size: 64 * MiB, 'backing-file': `$DIR/${disk.chain}-mid.qcow2`, 'backing-fmt': 'qcow2' }),
    { execute: 'blockdev-add', arguments: { 'node-name': format(copy), 'read-only': false, driver: 'qcow2', file: storage(copy), backing: format(disk.first + 1), discard: 'unmap' } },
  ];
}

const { shallow, sync, finish, abort } = DISKS;
const STEPS: TranscriptStep[] = [
  { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$DIR/nbd.sock' } } } },
  ...Object.values(DISKS).flatMap(attachDisk),
  // virsh blockcopy vda copy.qcow2 --shallow --pivot: the old top leaves, its backing chain stays under the copy.
  ...blockcopy(shallow, shallowCopy(shallow), { sync: 'top' }, 'pivot', [shallow.first]),
  // virsh blockcopy vdb copy.qcow2 --reuse-external --synchronous-writes --pivot: the whole old chain leaves.
  ...blockcopy(sync, reusedCopy(sync), { sync: 'full', 'copy-mode': 'write-blocking' }, 'pivot', [sync.first, sync.first + 1, sync.first + 2]),
  // virsh blockcopy vdc copy.qcow2 --reuse-external --finish: the copy is kept, the disk stays.
  ...blockcopy(finish, reusedCopy(finish), { sync: 'full' }, 'finish', [copyIndex(finish)]),
  // virsh blockcopy vdd copy.qcow2 --reuse-external, then virsh blockjob vdd --abort before READY.
  ...blockcopy(abort, reusedCopy(abort), { sync: 'full' }, 'abort', [copyIndex(abort)]),
  { execute: 'query-block-exports' },
  ...Object.values(DISKS).map((disk) => ({ execute: 'block-export-del', arguments: { id: disk.dev } })),
  { execute: 'nbd-server-stop' },
];

const backingChain = (image: string) =>
  (JSON.parse(runQemuImg('info', '--backing-chain', '--output=json', image)) as { filename: string }[]).map((layer) => layer.filename);

test('virsh blockcopy flows (shallow + pivot, synchronous writes + pivot, finish, abort) as libvirt sends them: as qemu-storage-daemon, and the data copied', async () => {
  await assertSameTranscripts(peers, STEPS, maskImageSizes);

  for (const dir of [peers.blockd.dir, peers.qsd.dir]) {
    const image = (disk: Disk, layer: string) => join(dir, `${disk.chain}-${layer}.qcow2`);
    const model = (disk: Disk, as = 'expected') => join(dir, `${disk.chain}-${as}.raw`);
    const same = (path: string, raw: string, what: string) => qemuImgCompare(path, raw, ['qcow2', 'raw'], `${dir}: ${what}`);

    // Pivoted: the copy holds every write, the old top what it held at the pivot.
    same(image(shallow, 'copy'), model(shallow), 'the shallow copy after the pivot');
    same(image(shallow, 'top'), model(shallow, 'at-pivot'), 'the shallow copy\'s old top');
    assert.deepEqual(backingChain(image(shallow, 'copy')), ['copy', 'mid', 'base'].map((layer) => image(shallow, layer)));
    same(image(sync, 'copy'), model(sync), 'the synchronous copy after the pivot');
    same(image(sync, 'top'), model(sync, 'at-pivot'), 'the synchronous copy\'s old chain');
    assert.deepEqual(backingChain(image(sync, 'copy')), [image(sync, 'copy')]);
    // Finished: the copy is the disk at the cancel; the disk went on.
    same(image(finish, 'copy'), model(finish, 'at-finish'), 'the finished copy');
    same(image(finish, 'top'), model(finish), 'the disk after --finish');
    // Aborted: the disk has every write.
    same(image(abort, 'top'), model(abort), 'the disk after --abort');
    for (const disk of Object.values(DISKS)) {
      for (const layer of ['copy', ...LAYERS]) assertCheckClean(image(disk, layer), `${dir} ${disk.chain}-${layer}`);
    }
  }
});
