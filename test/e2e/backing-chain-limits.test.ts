/*
 * Backing chains that image headers make endless or very long. Any image can name any
 * file as its backing file: itself ("self.qcow2", "./dot.qcow2", a hard link to itself)
 * or one that names it back (A -> B -> A). Read-write, the image locks stop such a
 * chain, and blockd answers as qemu-storage-daemon does (compared below), as it does for
 * an image naming its own file as a raw backing file (a repeat, but no loop). Read-only,
 * qemu-storage-daemon 7.2 opens the same files without end and stops answering QMP;
 * blockd refuses the first repeat with qemu-img's words for it, keeps answering and
 * leaves no descriptor open. A chain of a thousand backing files opens, lists, streams
 * and closes; one more is refused (MAX_BACKING_FILES); the non-flat listing of such a
 * chain, which would nest half a million image infos, is refused with a pointer to
 * flat=true. blockd-img follows qemu-img on loops and long chains.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { linkSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { MAX_BACKING_FILES } from '../../src/blockdev/backing-trail.js';
import { differentialPeers } from '../helpers/differential-peers.js';
import { REPO_ROOT } from '../helpers/paths.js';
import { createQcow2, MiB, qemuIo, runQemuImg } from '../helpers/qemu-tools.js';
import { describeDifferences, runTranscript, type TranscriptStep } from '../helpers/qmp-transcript.js';

/** Rewrites an image's backing file name in its header, as a crafted image would have it. */
function nameAsBacking(dir: string, image: string, backing: string): void {
  runQemuImg('rebase', '-u', '-F', 'qcow2', '-b', backing, join(dir, image));
}

/**
 * deep-0000 ... deep-NNNN: each names the one before as its backing file, deep-0000 holds
 * 0x5a in its first 64 KiB. Made by copying one small overlay and rewriting the name in
 * its header (a thousand qemu-img runs would take a minute).
 */
function makeDeepChain(dir: string, images: number): void {
  const name = (i: number) => `deep-${String(i).padStart(4, '0')}.qcow2`;
  createQcow2(join(dir, name(0)), 16 * MiB, { clusterSize: 512 });
  qemuIo(join(dir, name(0)), ['write -P 0x5a 0 64k'], ['-f', 'qcow2']);
  runQemuImg('create', '-q', '-u', '-f', 'qcow2', '-o', 'cluster_size=512', '-F', 'qcow2', '-b', name(0), join(dir, 'template.qcow2'), '16M');
  const template = readFileSync(join(dir, 'template.qcow2'));
  const at = template.indexOf(name(0));
  for (let i = 1; i < images; i++) {
    const image = Buffer.from(template);
    image.write(name(i - 1), at, 'latin1');
    writeFileSync(join(dir, name(i)), image);
  }
}

const peers = differentialPeers((dir) => {
  createQcow2(join(dir, 'self.qcow2'), 16 * MiB);
  nameAsBacking(dir, 'self.qcow2', 'self.qcow2');
  createQcow2(join(dir, 'dot.qcow2'), 16 * MiB);
  nameAsBacking(dir, 'dot.qcow2', './dot.qcow2');
  createQcow2(join(dir, 'linked.qcow2'), 16 * MiB);
  linkSync(join(dir, 'linked.qcow2'), join(dir, 'link.qcow2'));
  nameAsBacking(dir, 'linked.qcow2', 'link.qcow2');
  createQcow2(join(dir, 'a.qcow2'), 16 * MiB);
  createQcow2(join(dir, 'b.qcow2'), 16 * MiB, { backing: { path: 'a.qcow2', format: 'qcow2' } });
  nameAsBacking(dir, 'a.qcow2', 'b.qcow2');
  createQcow2(join(dir, 'plain.qcow2'), 16 * MiB);
  createQcow2(join(dir, 'raw-self.qcow2'), 16 * MiB);
  runQemuImg('rebase', '-u', '-F', 'raw', '-b', 'raw-self.qcow2', join(dir, 'raw-self.qcow2'));
});

const add = (name: string, image: string, readOnly: boolean) => ({
  execute: 'blockdev-add',
  arguments: { driver: 'qcow2', 'node-name': name, 'read-only': readOnly, file: { driver: 'file', filename: `$DIR/${image}` } },
});

function blockdPid(): number {
  return Number(readFileSync(peers.blockd.pidfile, 'utf8').trim());
}

function openDescriptors(): number {
  return readdirSync(`/proc/${blockdPid()}/fd`).length;
}

test('what qemu-storage-daemon answers reads the same: read-write loops fail on the image lock, raw over its own file opens', async () => {
  const steps: TranscriptStep[] = [
    add('s', 'self.qcow2', false),
    add('a', 'a.qcow2', false),
    add('b', 'b.qcow2', false),
    add('d', 'dot.qcow2', false),
    // Its own file as a raw backing file: no loop (raw has no backing file), QEMU opens it.
    add('r', 'raw-self.qcow2', false),
    { execute: 'blockdev-del', arguments: { 'node-name': 'r' } },
    add('r', 'raw-self.qcow2', true),
    { execute: 'query-named-block-nodes' },
    { execute: 'blockdev-del', arguments: { 'node-name': 'r' } },
  ];
  const theirs = await runTranscript(peers.qsd.socket, peers.qsd.dir, steps);
  const ours = await runTranscript(peers.blockd.socket, peers.blockd.dir, steps);
  assert.equal(describeDifferences(ours, theirs), '');
  assert.match(ours[0]!, /Could not open backing file: Failed to get shared \\"write\\" lock/);
  assert.deepEqual([ours[4], ours[6]], ['{"return": {}}', '{"return": {}}'], 'raw over its own file opens');
});

test('a read-only loop is refused at its first repeat; the daemon answers on and keeps no descriptor', async () => {
  const before = openDescriptors();
  const ours = await runTranscript(peers.blockd.socket, peers.blockd.dir, [
    add('s', 'self.qcow2', true),
    add('d', 'dot.qcow2', true),
    add('l', 'linked.qcow2', true),
    add('a', 'a.qcow2', true),
    add('b', 'b.qcow2', true),
    add('p', 'plain.qcow2', true),
    { execute: 'query-named-block-nodes', arguments: { flat: true } },
    { execute: 'blockdev-del', arguments: { 'node-name': 'p' } },
  ]);
  const loop = (image: string, levels = 1) =>
    `{"error": {"class": "GenericError", "desc": "${'Could not open backing file: '.repeat(levels)}Backing file '$DIR/${image}' creates an infinite loop."}}`;
  assert.deepEqual(ours.slice(0, 6), [
    loop('self.qcow2'),
    loop('./dot.qcow2'),
    loop('link.qcow2'),
    loop('a.qcow2', 2),
    loop('b.qcow2', 2),
    '{"return": {}}',
  ]);
  assert.equal((ours[6]!.match(/"node-name"/g) ?? []).length, 2, 'only the plain image and its file are open');
  assert.equal(ours[7], '{"return": {}}');
  assert.equal(openDescriptors(), before, 'every file the refused opens used is closed again');
});

test(`a chain of ${MAX_BACKING_FILES} backing files opens, lists, streams and closes; one more is refused`, { timeout: 300_000 }, async () => {
  makeDeepChain(peers.blockd.dir, MAX_BACKING_FILES + 2);
  const top = `deep-${MAX_BACKING_FILES}.qcow2`;
  const before = openDescriptors();
  const ours = await runTranscript(peers.blockd.socket, peers.blockd.dir, [
    add('over', `deep-${MAX_BACKING_FILES + 1}.qcow2`, true),
    add('top', top, false),
    { execute: 'query-named-block-nodes', arguments: { flat: true } },
    { execute: 'query-named-block-nodes' },
    { execute: 'query-version' },
    { execute: 'blockdev-del', arguments: { 'node-name': 'top' } },
    add('top', top, false),
    { execute: 'block-stream', arguments: { 'job-id': 'pull', device: 'top' } },
    { awaitEvent: { event: 'JOB_STATUS_CHANGE', data: { id: 'pull', status: 'null' } } },
    { execute: 'blockdev-del', arguments: { 'node-name': 'top' } },
  ]);
  assert.equal(ours[0], `{"error": {"class": "GenericError", "desc": "Backing chain too long: more than ${MAX_BACKING_FILES} backing files below '$DIR/deep-${MAX_BACKING_FILES + 1}.qcow2'"}}`);
  assert.equal(ours[1], '{"return": {}}');
  const listed = JSON.parse(ours[2]!) as { return: { 'node-name': string; backing_file_depth: number }[] };
  assert.equal(listed.return.length, 2 * (MAX_BACKING_FILES + 1), 'every image and its file');
  assert.equal(ours[3], '{"error": {"class": "GenericError", "desc": "Backing chains too long to list in full (more than 100000 backing images); use flat=true"}}');
  assert.match(ours[4]!, /"qemu":/);
  assert.equal(ours[5], '{"return": {}}');
  assert.equal(ours[6], '{"return": {}}');
  const events = ours.slice(7).filter((line) => line.includes('"event"'));
  assert.ok(events.some((line) => line.includes('BLOCK_JOB_COMPLETED') && !line.includes('"error"')), ours.slice(7).join('\n'));
  assert.equal(ours.at(-1), '{"return": {}}');
  assert.equal(openDescriptors(), before, 'the whole chain is closed again');
  // The base's data was pulled up through every layer, and the top stands alone.
  const topPath = join(peers.blockd.dir, top);
  assert.equal((JSON.parse(runQemuImg('info', '--output=json', topPath)) as { 'backing-filename'?: string })['backing-filename'], undefined);
  qemuIo(topPath, ['read -P 0x5a 0 64k', 'read -P 0 64k 64k'], ['-f', 'qcow2']);
});

const BLOCKD_IMG = join(REPO_ROOT, 'bin', 'blockd-img');

function img(tool: 'qemu-img' | 'blockd-img', args: string[]): { status: number | null; stdout: string; stderr: string } {
  const [file, argv] = tool === 'blockd-img' ? [process.execPath, [BLOCKD_IMG, ...args]] : [tool, args];
  const { status, stdout, stderr, error } = spawnSync(file, argv, { cwd: peers.qsd.dir, encoding: 'utf8', timeout: 60_000, maxBuffer: 64 * MiB });
  if (error) throw error;
  return { status, stdout, stderr: stderr.replaceAll(tool, 'TOOL') };
}

test('blockd-img info --backing-chain answers as qemu-img on loops and on a long chain', { timeout: 300_000 }, () => {
  makeDeepChain(peers.qsd.dir, MAX_BACKING_FILES + 1);
  for (const image of ['self.qcow2', 'b.qcow2', 'dot.qcow2', `deep-${MAX_BACKING_FILES}.qcow2`]) {
    const args = ['info', '--backing-chain', '--output=json', image];
    const ours = img('blockd-img', args);
    const theirs = img('qemu-img', args);
    // Disk sizes depend on the filesystem's accounting of files written moments apart.
    const sizes = (text: string) => text.replace(/"actual-size": \d+/g, '"actual-size": N');
    assert.equal(sizes(ours.stdout), sizes(theirs.stdout), image);
    // The names of a chain that grows by './' at every level are long: compared without their repeats.
    const short = (text: string) => text.replace(/(\.\/){3,}/g, '(./)*');
    assert.equal(short(ours.stderr), short(theirs.stderr), image);
    assert.equal(ours.stderr.length, theirs.stderr.length, image);
    assert.equal(ours.status, theirs.status, image);
  }
});

test('blockd-img check of an image whose header names itself ends with the loop error (qemu-img never ends)', () => {
  const result = img('blockd-img', ['check', 'self.qcow2']);
  // check opens the backing file as an image of its own (to require it as qemu-img does): the loop shows one level down.
  assert.equal(result.stderr, "TOOL: Could not open 'self.qcow2': Could not open backing file: Could not open backing file: Backing file 'self.qcow2' creates an infinite loop.\n");
  assert.equal(result.status, 1);
});
