/*
 * block-stream with nothing to copy, against qemu-storage-daemon: a node with no
 * backing file, a base that is the node's own backing file (libvirt's "pull to the
 * immediate base"), a bottom that is the node itself. QEMU runs a job of length 0
 * whose events all precede the reply, keeps the backing link and rewrites the
 * header's backing string as any stream does (to the base's filename, or to
 * 'backing-file'). The copy-on-read filter's own checks of 'bottom' come along.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { differentialPeers } from '../helpers/differential-peers.js';
import { describeDifferences, maskImageSizes, runTranscript, type TranscriptStep } from '../helpers/qmp-transcript.js';
import { makePatternChain } from '../helpers/pattern-chains.js';
import { assertCheckClean, createQcow2, MiB, qemuImgCompare, qemuIo, runQemuImg } from '../helpers/qemu-tools.js';

const peers = differentialPeers((dir) => {
  makePatternChain(dir, 'g');
  createQcow2(join(dir, 'lone.qcow2'), 16 * MiB);
  qemuIo(join(dir, 'lone.qcow2'), ['write -P 0x51 1M 2M'], ['-f', 'qcow2']);
  runQemuImg('convert', '-O', 'raw', join(dir, 'lone.qcow2'), join(dir, 'lone-expected.raw'));
});

const qcow2 = (name: string, file: string, backing?: string | null) => ({
  execute: 'blockdev-add',
  arguments: { driver: 'qcow2', 'node-name': name, file: { driver: 'file', filename: `$DIR/${file}` }, ...(backing === undefined ? {} : { backing }) },
});
const stream = (args: object) => ({ execute: 'block-stream', arguments: args });

const STEPS: TranscriptStep[] = [
  qcow2('lone', 'lone.qcow2'),
  qcow2('g-base', 'g-base.qcow2', null),
  qcow2('g-mid', 'g-mid.qcow2', 'g-base'),
  qcow2('g-top', 'g-top.qcow2', 'g-mid'),
  // no backing file: the whole (empty) chain
  stream({ 'job-id': 's1', device: 'lone' }),
  // the base is the immediate backing file
  stream({ 'job-id': 's2', device: 'g-top', 'base-node': 'g-mid' }),
  // bottom is the node itself, kept until dismissed
  stream({ 'job-id': 's3', device: 'g-mid', bottom: 'g-mid', 'auto-dismiss': false }),
  { execute: 'query-jobs' },
  { execute: 'query-block-jobs' },
  stream({ 'job-id': 's4', device: 'g-mid', bottom: 'g-mid' }),
  { execute: 'job-dismiss', arguments: { id: 's3' } },
  // with auto-finalize off the empty job waits in pending like any other
  stream({ 'job-id': 's5', device: 'lone', 'auto-finalize': false }),
  { execute: 'query-block-jobs' },
  { execute: 'job-finalize', arguments: { id: 's5' } },
  // libvirt passes the backing string it wants recorded
  stream({ 'job-id': 's6', device: 'g-top', 'base-node': 'g-mid', 'backing-file': 'g-mid.qcow2' }),
  { execute: 'query-named-block-nodes', arguments: { flat: true } },
  // the copy-on-read filter's checks of 'bottom'
  { execute: 'blockdev-add', arguments: { driver: 'copy-on-read', 'node-name': 'cor1', file: 'lone', bottom: 'nosuch' } },
  { execute: 'blockdev-add', arguments: { driver: 'copy-on-read', 'node-name': 'cor1', file: 'lone' } },
  { execute: 'blockdev-add', arguments: { driver: 'copy-on-read', 'node-name': 'cor2', file: 'cor1', bottom: 'cor1' } },
  { execute: 'blockdev-add', arguments: { driver: 'copy-on-read', 'node-name': 'cor3', file: 'g-top', bottom: 'g-top' } },
  { execute: 'blockdev-add', arguments: { driver: 'copy-on-read', 'node-name': 'cor4', file: 'g-mid', bottom: 'g-base' } },
  ...['cor4', 'cor3', 'cor1', 'lone', 'g-top', 'g-mid', 'g-base'].map((name) => ({ execute: 'blockdev-del', arguments: { 'node-name': name } })),
];

test('a stream with nothing to copy runs a job of length 0, as in qemu-storage-daemon', async () => {
  const theirs = await runTranscript(peers.qsd.socket, peers.qsd.dir, STEPS, maskImageSizes);
  const ours = await runTranscript(peers.blockd.socket, peers.blockd.dir, STEPS, maskImageSizes).catch((error: Error) => {
    throw new Error(`${error.message}; blockd said: ${peers.blockdLog().slice(-3000)}`);
  });
  assert.equal(describeDifferences(ours, theirs), '');
  // The job's whole life precedes the reply (QEMU's job ends before the command returns).
  const s1 = ours.slice(ours.findIndex((line) => line.includes('"s1"')));
  assert.match(s1[6]!, /"status": "null"/);
  assert.match(s1[7]!, /^\{"return": \{\}\}$/);
  await peers.stopBlockd();
  await peers.stopQsd();
  const backingOf = (dir: string, image: string) =>
    (JSON.parse(runQemuImg('info', '--output=json', join(dir, image))) as { 'backing-filename'?: string })['backing-filename']?.replaceAll(dir, '$DIR');
  for (const dir of [peers.blockd.dir, peers.qsd.dir]) {
    qemuImgCompare(join(dir, 'g-top.qcow2'), join(dir, 'g-expected.raw'), ['qcow2', 'raw'], `${dir} g`);
    qemuImgCompare(join(dir, 'lone.qcow2'), join(dir, 'lone-expected.raw'), ['qcow2', 'raw'], `${dir} lone`);
    for (const image of ['g-top.qcow2', 'g-mid.qcow2', 'lone.qcow2']) assertCheckClean(join(dir, image), image);
    assert.equal(backingOf(dir, 'lone.qcow2'), undefined);
    assert.equal(backingOf(dir, 'g-top.qcow2'), 'g-mid.qcow2', 'the backing string given last');
    assert.equal(backingOf(dir, 'g-mid.qcow2'), '$DIR/g-base.qcow2', "the base's filename, as QEMU writes it");
  }
});
