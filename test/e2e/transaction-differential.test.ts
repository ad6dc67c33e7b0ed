/*
 * transaction against qemu-storage-daemon: both daemons get the same images and the same
 * QMP script and must answer alike (replies, every event in order). Each failing
 * transaction is followed by the state as it was before it (the graph, every bitmap's
 * sha256, jobs, and the bytes and qemu-img info of every image file that existed), and a
 * test asserts that, in blockd's transcript and in QSD's, the state after equals the
 * state before: all or nothing.
 *   - every action failing first, in the middle and last, with an abort after every
 *     action, with a bitmap already present, with a missing node;
 *   - a transaction that succeeds, and the graph and jobs after it;
 *   - completion-mode grouped: the refusal of actions other than backups, two backups of
 *     which one fails (blkdebug) or is cancelled: the other is cancelled, the bitmap of a
 *     bitmap-mode on-success backup is as it was plus nothing.
 *   - blockdev-snapshot-internal-sync with other actions, deleted again by a later failure,
 *     refused in grouped mode (the snapshots each image holds, read with qemu-img -U).
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { startDifferentialPeers } from '../helpers/differential-peers.js';
import { addFailing, addRaw } from '../helpers/job-steps.js';
import { makeTempDir } from '../helpers/paths.js';
import { createQcow2, MiB, qemuIo, runQemuImg } from '../helpers/qemu-tools.js';
import { describeDifferences, maskImageSizes, maskSnapshotDates, runTranscript, untilBlockJob, untilJob, type TranscriptStep } from '../helpers/qmp-transcript.js';
import { runBlockd } from '../helpers/blockd-process.js';

const SIZE = 4 * MiB;
/** The image files the script starts with; files a transaction makes (drive-backup, snapshot-sync) are listed apart. */
const IMAGES = ['d1', 'd2', 'd3', 'ov1', 't2'];

function prepareImages(dir: string): void {
  for (const name of ['d1', 'd2', 'd3']) {
    createQcow2(join(dir, `${name}.qcow2`), SIZE);
    qemuIo(join(dir, `${name}.qcow2`), [`write -P 0x${name.slice(1)}1 0 1M`], ['-f', 'qcow2']);
  }
  createQcow2(join(dir, 'ov1.qcow2'), SIZE, { backing: { path: join(dir, 'd1.qcow2'), format: 'qcow2' } });
  createQcow2(join(dir, 't2.qcow2'), SIZE);
}

const node = (name: string, extra: object = {}): TranscriptStep => ({
  execute: 'blockdev-add',
  arguments: { driver: 'qcow2', 'node-name': name, file: { driver: 'file', filename: `$DIR/${name}.qcow2`, 'node-name': `${name}-file` }, ...extra },
});

const setUp: TranscriptStep[] = [
  node('d1'), node('d2'), node('d3'), node('ov1', { backing: null }), node('t2'),
  { execute: 'block-dirty-bitmap-add', arguments: { node: 'd1', name: 'existing' } },
  { execute: 'block-dirty-bitmap-add', arguments: { node: 'd1', name: 'other', granularity: 65536 } },
  { execute: 'block-dirty-bitmap-add', arguments: { node: 'd3', name: 'off', disabled: true } },
];

const STATE_MARK = 'state:';
const FILES_MARK = 'files: ';
/** The daemon's whole state as the transcript records it: graph, bitmaps' contents, jobs, files. */
const state: TranscriptStep[] = [
  { action: async () => STATE_MARK },
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  ...[['d1', 'existing'], ['d1', 'other'], ['d3', 'off']].map(([n, name]) => ({ execute: 'x-debug-block-dirty-bitmap-sha256', arguments: { node: n, name } })),
  { execute: 'query-jobs' },
  {
    // The files' bytes are blockd's or QSD's own: compared within one daemon's transcript only.
    action: async (dir: string) => FILES_MARK + IMAGES.map((name) => {
      const path = join(dir, `${name}.qcow2`);
      const info = runQemuImg('info', '-U', '--output=json', path).replaceAll(dir, '$DIR');
      return `${name}: ${createHash('sha256').update(readFileSync(path)).digest('hex')} ${info.replace(/\s+/g, ' ')}`;
    }).join('\n'),
  },
  { action: async () => STATE_MARK },
];

type Kind = 'abort' | 'block-dirty-bitmap-add' | 'block-dirty-bitmap-remove' | 'block-dirty-bitmap-clear' | 'block-dirty-bitmap-enable'
  | 'block-dirty-bitmap-disable' | 'block-dirty-bitmap-merge' | 'blockdev-backup' | 'drive-backup' | 'blockdev-snapshot' | 'blockdev-snapshot-sync';

/** An action that succeeds alone (backups at speed 1, so that they are still there when the transaction aborts). */
const OK: Record<Exclude<Kind, 'abort'>, object> = {
  'block-dirty-bitmap-add': { node: 'd2', name: 'new' },
  'block-dirty-bitmap-remove': { node: 'd1', name: 'other' },
  'block-dirty-bitmap-clear': { node: 'd1', name: 'existing' },
  'block-dirty-bitmap-enable': { node: 'd3', name: 'off' },
  'block-dirty-bitmap-disable': { node: 'd1', name: 'existing' },
  'block-dirty-bitmap-merge': { node: 'd1', target: 'existing', bitmaps: ['other'] },
  'blockdev-backup': { 'job-id': 'b1', device: 'd2', target: 't2', sync: 'full', speed: 1 },
  'drive-backup': { 'job-id': 'b2', device: 'd3', target: '$DIR/made-by-drive-backup.qcow2', sync: 'full', speed: 1 },
  'blockdev-snapshot': { node: 'd1', overlay: 'ov1' },
  'blockdev-snapshot-sync': { 'node-name': 'd3', 'snapshot-file': '$DIR/made-by-snapshot-sync.qcow2', 'snapshot-node-name': 'snap' },
};

/** The same action made to fail: a missing node, or a bitmap already present (add). */
const FAILING: Record<Exclude<Kind, 'abort'>, object> = {
  'block-dirty-bitmap-add': { node: 'd1', name: 'existing' },
  'block-dirty-bitmap-remove': { node: 'nowhere', name: 'other' },
  'block-dirty-bitmap-clear': { node: 'd1', name: 'missing' },
  'block-dirty-bitmap-enable': { node: 'nowhere', name: 'off' },
  'block-dirty-bitmap-disable': { node: 'd1', name: 'missing' },
  'block-dirty-bitmap-merge': { node: 'd1', target: 'existing', bitmaps: ['other', 'missing'] },
  'blockdev-backup': { 'job-id': 'b1', device: 'd2', target: 'nowhere', sync: 'full' },
  'drive-backup': { 'job-id': 'b2', device: 'nowhere', target: '$DIR/never-made.qcow2', sync: 'full' },
  'blockdev-snapshot': { node: 'd1', overlay: 'nowhere' },
  'blockdev-snapshot-sync': { 'node-name': 'nowhere', 'snapshot-file': '$DIR/never-made.qcow2', 'snapshot-node-name': 'snap' },
};

const KINDS = Object.keys(OK) as Exclude<Kind, 'abort'>[];
const action = (type: Kind, data: object = {}) => ({ type, data });
const transaction = (actions: object[], properties?: object): TranscriptStep => ({ execute: 'transaction', arguments: { actions, ...(properties ? { properties } : {}) } });

/** Two other actions that go along with `kind` in one transaction without touching what it touches. */
function companions(kind: Kind): [object, object] {
  const others = KINDS.filter((other) => other !== kind && !sameNodes(kind, other));
  const first = others[(KINDS.indexOf(kind as Exclude<Kind, 'abort'>) + 1) % others.length]!;
  const second = others.find((other) => other !== first && !sameNodes(first, other))!;
  return [action(first, OK[first]), action(second, OK[second])];
}

/** Actions on the same node or bitmap would see each other's effects (a case of its own, below). */
function sameNodes(a: Kind, b: Kind): boolean {
  const touches = (kind: Kind) => (kind === 'abort' ? [] : [String((OK[kind] as { node?: string; device?: string; 'node-name'?: string }).node ?? (OK[kind] as { device?: string }).device ?? (OK[kind] as { 'node-name'?: string })['node-name'])]);
  return touches(a).some((n) => touches(b).includes(n));
}

/** Every failing transaction: each action failing first, in the middle, last; each action then an abort. */
function failingTransactions(): TranscriptStep[] {
  const steps: TranscriptStep[] = [];
  for (const kind of [...KINDS, 'abort' as const]) {
    const failing = kind === 'abort' ? action('abort') : action(kind, FAILING[kind]);
    const [p, q] = companions(kind);
    steps.push(transaction([failing, p, q]), transaction([p, failing, q]), transaction([p, q, failing]));
    if (kind !== 'abort') steps.push(transaction([action(kind, OK[kind]), action('abort')]));
  }
  // Effects of an earlier action are seen by a later one: the same bitmap added twice, the same job id twice, the same snapshot twice.
  steps.push(
    transaction([action('block-dirty-bitmap-add', { node: 'd2', name: 'x' }), action('block-dirty-bitmap-add', { node: 'd2', name: 'x' })]),
    transaction([action('blockdev-backup', OK['blockdev-backup']), action('blockdev-backup', { ...OK['blockdev-backup'], device: 'd1' })]),
    transaction([action('blockdev-snapshot', OK['blockdev-snapshot']), action('blockdev-snapshot', OK['blockdev-snapshot'])]),
    // Two backups of one node into one target: the second is refused by the first's blockers.
    transaction([action('blockdev-backup', OK['blockdev-backup']), action('blockdev-backup', { ...OK['blockdev-backup'], 'job-id': 'b9' })]),
    // A bitmap a backup in the same transaction syncs is busy for a later action.
    transaction([
      action('blockdev-backup', { ...OK['blockdev-backup'], device: 'd1', sync: 'bitmap', bitmap: 'existing', 'bitmap-mode': 'on-success' }),
      action('block-dirty-bitmap-clear', { node: 'd1', name: 'existing' }),
    ]),
  );
  return steps;
}

/**
 * A block-dirty-bitmap-enable that fails in prepare takes qemu-storage-daemon 7.2 down (its abort
 * disables a bitmap it never found: a null pointer); blockd's transcripts of these are checked alone.
 */
function crashesQemu(step: TranscriptStep): boolean {
  const actions = (step as { arguments: { actions: { type: string; data: object }[] } }).arguments.actions;
  return actions.some((one) => one.type === 'block-dirty-bitmap-enable' && one.data === FAILING['block-dirty-bitmap-enable']);
}

/** The blocks of the transcript between state marks, in order. */
function states(transcript: string[]): string[] {
  const blocks: string[] = [];
  let current: string[] | undefined;
  for (const line of transcript) {
    if (line === STATE_MARK) {
      if (current) blocks.push(current.join('\n'));
      current = current ? undefined : [];
    } else if (current) {
      current.push(line);
    }
  }
  return blocks;
}

/** Runs the script on both daemons: the transcripts must agree; returns blockd's and QSD's. */
async function bothDaemons(prepare: (dir: string) => void, steps: TranscriptStep[], normalise: (line: string) => string = maskImageSizes): Promise<{ ours: string[]; theirs: string[] }> {
  const temp = makeTempDir('blockd-transaction-');
  const peers = await startDifferentialPeers(temp.dir, prepare);
  try {
    const theirs = await runTranscript(peers.qsd.socket, peers.qsd.dir, steps, normalise);
    const ours = await runTranscript(peers.blockd.socket, peers.blockd.dir, steps, normalise).catch((error: Error) => {
      throw new Error(`${error.message}; blockd said: ${peers.blockdLog().slice(-3000)}`);
    });
    const shared = (transcript: string[]) => transcript.filter((line) => !line.startsWith(FILES_MARK));
    assert.equal(describeDifferences(shared(ours), shared(theirs)), '');
    return { ours, theirs };
  } finally {
    await peers.stopBlockd();
    await peers.stopQsd();
    temp.cleanup();
  }
}

test('every action failing first, in the middle and last, or followed by abort: the same replies and events as qemu-storage-daemon, and nothing changed', async () => {
  const failing = failingTransactions().filter((step) => !crashesQemu(step));
  const steps = [...setUp, ...state, ...failing.flatMap((step) => [step, ...state])];
  const { ours, theirs } = await bothDaemons(prepareImages, steps);
  for (const [who, transcript] of [['blockd', ours], ['qemu-storage-daemon', theirs]] as const) {
    const blocks = states(transcript);
    assert.equal(blocks.length, failing.length + 1);
    for (const [index, block] of blocks.entries()) assert.equal(block, blocks[0], `${who}: the state after failing transaction ${index} differs from the state before`);
  }
  // Every reply to a transaction was an error.
  assert.equal(ours.filter((line) => line.startsWith('{"error"')).length, failing.length);
});

test('a transaction that succeeds: bitmap, snapshots and a backup at once, the graph and the files after as qemu-storage-daemon has them', async () => {
  await bothDaemons(prepareImages, [
    ...setUp,
    transaction([
      action('block-dirty-bitmap-add', { node: 'd1', name: 'checkpoint' }),
      action('blockdev-snapshot', OK['blockdev-snapshot']),
      action('blockdev-snapshot-sync', OK['blockdev-snapshot-sync']),
      action('blockdev-backup', { 'job-id': 'b1', device: 'd2', target: 't2', sync: 'full' }),
    ]),
    untilJob('b1', 'null'),
    { execute: 'query-named-block-nodes', arguments: { flat: true } },
    { action: async (dir: string) => `made: ${existsSync(join(dir, 'made-by-snapshot-sync.qcow2'))}` },
  ]);
});

test('completion-mode grouped: refused for other actions, with QEMU\'s text', async () => {
  await bothDaemons(prepareImages, [
    ...setUp,
    transaction([action('blockdev-backup', OK['blockdev-backup']), action('block-dirty-bitmap-add', OK['block-dirty-bitmap-add'])], { 'completion-mode': 'grouped' }),
    transaction([action('blockdev-snapshot', OK['blockdev-snapshot'])], { 'completion-mode': 'grouped' }),
    transaction([action('abort')], { 'completion-mode': 'grouped' }),
    { execute: 'query-named-block-nodes', arguments: { flat: true } },
  ]);
});

/** Images for the grouped backups: a slow one (d1 into t1) and one whose source fails a read at its end (e-src through blkdebug). */
function prepareGrouped(dir: string): void {
  prepareImages(dir);
  createQcow2(join(dir, 't1.qcow2'), SIZE);
  runQemuImg('create', '-q', '-f', 'raw', join(dir, 'e-src.raw'), String(64 * MiB));
  // Data where the read fails (a backup reads only what is allocated).
  qemuIo(join(dir, 'e-src.raw'), ['write -P 0x5e 63M 1M'], ['-f', 'raw']);
  runQemuImg('create', '-q', '-f', 'raw', join(dir, 'e-tgt.raw'), String(64 * MiB));
}

const groupedSetUp: TranscriptStep[] = [...setUp, node('t1'), addFailing('e-src', 'read_aio', 5), addRaw('e-tgt')];
const bitmapSha = { execute: 'x-debug-block-dirty-bitmap-sha256', arguments: { node: 'd1', name: 'existing' } };
/** Both grouped backups have ended (b1's null is the last event: the newest job, b2, is finalized first); then b1's bitmap and the jobs. */
const groupEnded: TranscriptStep[] = [untilJob('b1', 'null'), bitmapSha, { execute: 'query-jobs' }];
/** A backup of d1 that takes long (speed 1) and settles the bitmap `existing` as on-success says. */
const slowBitmapBackup = action('blockdev-backup', { 'job-id': 'b1', device: 'd1', target: 't1', sync: 'full', bitmap: 'existing', 'bitmap-mode': 'on-success', speed: 1 });

test('completion-mode grouped, one backup fails: the other is cancelled, events in QEMU\'s order, its bitmap as before', async () => {
  await bothDaemons(prepareGrouped, [
    ...groupedSetUp,
    { execute: 'block-dirty-bitmap-merge', arguments: { node: 'd1', target: 'existing', bitmaps: ['other'] } },
    bitmapSha,
    transaction([slowBitmapBackup, action('blockdev-backup', { 'job-id': 'b2', device: 'e-src', target: 'e-tgt', sync: 'full' })], { 'completion-mode': 'grouped' }),
    ...groupEnded,
  ]);
});

test('completion-mode grouped, one backup cancelled: every backup of the transaction is cancelled', async () => {
  await bothDaemons(prepareGrouped, [
    ...groupedSetUp,
    transaction([slowBitmapBackup, action('blockdev-backup', { 'job-id': 'b2', device: 'd2', target: 't2', sync: 'full', speed: 1 })], { 'completion-mode': 'grouped' }),
    { execute: 'job-cancel', arguments: { id: 'b2' } },
    ...groupEnded,
  ]);
});

test('completion-mode individual: one backup fails, the other goes on', async () => {
  await bothDaemons(prepareGrouped, [
    ...groupedSetUp,
    transaction([slowBitmapBackup, action('blockdev-backup', { 'job-id': 'b2', device: 'e-src', target: 'e-tgt', sync: 'full' })]),
    untilJob('b2', 'null'),
    // b1 goes on alone (how far it got is timing: not recorded), and ends well once let run.
    untilBlockJob('b1', (job) => job.status === 'running'),
    { execute: 'block-job-set-speed', arguments: { device: 'b1', speed: 0 } },
    untilJob('b1', 'null'),
    bitmapSha,
  ]);
});

/** Runs the script on blockd alone (what qemu-storage-daemon cannot answer). */
async function blockdAlone(steps: TranscriptStep[]): Promise<string[]> {
  const temp = makeTempDir('blockd-transaction-alone-');
  prepareImages(temp.dir);
  const socket = join(temp.dir, 'blockd.sock');
  const daemon = await runBlockd(['--qmp', `unix:${socket}`]);
  try {
    return await runTranscript(socket, temp.dir, steps);
  } finally {
    await daemon.stop();
    temp.cleanup();
  }
}

test('a failing block-dirty-bitmap-enable in every position (which takes qemu-storage-daemon 7.2 down): blockd replies with the lookup error and nothing changed', async () => {
  const failing = failingTransactions().filter(crashesQemu);
  assert.equal(failing.length, 3);
  const transcript = await blockdAlone([...setUp, ...state, ...failing.flatMap((step) => [step, ...state])]);
  const blocks = states(transcript);
  for (const block of blocks) assert.equal(block, blocks[0]);
  assert.equal(transcript.filter((line) => line === '{"error": {"class": "GenericError", "desc": "Node \'nowhere\' not found"}}').length, 3);
});

/**
 * The internal snapshots an image's file holds (names, not dates), read while the daemon holds it
 * (not checked here: QEMU's refcounts on disk lag behind its cache until it closes the image).
 */
const internalSnapshots = (name: string): TranscriptStep => ({
  action: async (dir) => {
    const info = JSON.parse(runQemuImg('info', '-U', '--output=json', join(dir, `${name}.qcow2`))) as { snapshots?: { id: string; name: string }[] };
    return `${name}: snapshots [${(info.snapshots ?? []).map((sn) => `${sn.id} ${sn.name}`).join(', ')}]`;
  },
});

test('blockdev-snapshot-internal-sync in transactions: taken with other actions, deleted again when a later action fails, refused in grouped mode, as qemu-storage-daemon', async () => {
  const internal = (device: string, name: string) => ({ type: 'blockdev-snapshot-internal-sync', data: { device, name } });
  const listed = [internalSnapshots('d1'), internalSnapshots('d2')];
  await bothDaemons(prepareImages, [
    node('d1'), node('d2'),
    transaction([internal('d1', 's1'), action('block-dirty-bitmap-add', { node: 'd1', name: 'b1' }), internal('d2', 's1')]),
    ...listed,
    transaction([action('block-dirty-bitmap-add', { node: 'd1', name: 'kept-not' }), internal('d1', 's2'), internal('d2', 's2'), action('abort')]),
    ...listed,
    transaction([internal('d2', 's3'), internal('d1', 's1')]),
    ...listed,
    transaction([internal('d1', 's4')], { 'completion-mode': 'grouped' }),
    { execute: 'blockdev-snapshot-internal-sync', arguments: { device: 'd1', name: 's5' } },
    ...listed,
    { execute: 'query-named-block-nodes', arguments: { flat: true } },
  ], (line) => maskSnapshotDates(maskImageSizes(line)));
});
