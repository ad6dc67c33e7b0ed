/*
 * Commands that arrive exactly while a job ends, against qemu-storage-daemon. A
 * client reacts to the job's own events (waiting, pending, aborting, null) by
 * sending job-cancel, blockdev-add/-del, a new block-stream, quit or SIGTERM at
 * once. In QEMU a job's end (prepare, commit or abort, clean, its events, its
 * release) is one main-loop step, so such a command meets the job finished: the
 * transcripts must agree, and the images must read as before, pass qemu-img
 * check and name the backing file QEMU names. Each scenario has a fresh pair of
 * daemons; blockd must never have needed its unhandled-rejection safety net.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { startDifferentialPeers } from '../helpers/differential-peers.js';
import { makeTempDir } from '../helpers/paths.js';
import { makePatternChain } from '../helpers/pattern-chains.js';
import { describeDifferences, maskImageSizes, runTranscript, type TranscriptStep } from '../helpers/qmp-transcript.js';
import { assertCheckClean, qemuImgCompare, runQemuImg } from '../helpers/qemu-tools.js';

const temp = makeTempDir();
after(() => temp.cleanup());

const CHAINS = ['p', 'q'];

const file = (name: string) => ({ driver: 'file', filename: `$DIR/${name}` });
const addChain = (chain: string, midFile: object = file(`${chain}-mid.qcow2`)): TranscriptStep[] => [
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': `${chain}-base`, file: file(`${chain}-base.qcow2`), backing: null } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': `${chain}-mid`, file: midFile, backing: `${chain}-base` } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': `${chain}-top`, file: file(`${chain}-top.qcow2`), backing: `${chain}-mid` } },
];
/** The middle layer reads through blkdebug: its first read at 8 MiB fails with EIO. */
const failingMid = { driver: 'blkdebug', 'inject-error': [{ event: 'read_aio', errno: 5, sector: 16384, once: true }], image: file('p-mid.qcow2') };
const stream = (args: object): TranscriptStep => ({ execute: 'block-stream', arguments: args });
const status = (id: string, value: string): TranscriptStep => ({ awaitEvent: { event: 'JOB_STATUS_CHANGE', data: { id, status: value } } });
const sigterm: TranscriptStep = {
  action: async (dir: string) => {
    const pidfile = ['qsd.pid', 'blockd.pid'].map((name) => join(dir, name)).find((path) => {
      try {
        return readFileSync(path, 'utf8').trim() !== '';
      } catch {
        return false;
      }
    })!;
    process.kill(Number(readFileSync(pidfile, 'utf8').trim()), 'SIGTERM');
    return 'SIGTERM';
  },
};
const untilClosed: TranscriptStep = { untilClosed: true };

interface Scenario {
  name: string;
  steps: TranscriptStep[];
  /** What each chain's top names as its backing file afterwards (relative to the daemon's directory). */
  backing: Record<string, string | undefined>;
  /** Other layers that must read as the chain did before (a base that received a commit). */
  alsoReadAsTheChain?: string[];
  /** Masks what legitimately differs (a cancelled job's progress depends on timing). */
  normalise?: (line: string) => string;
}

const SCENARIOS: Scenario[] = [
  {
    name: "job-cancel sent on 'pending' meets the job completed; its layer can go at once",
    steps: [
      ...addChain('p'),
      stream({ 'job-id': 's', device: 'p-top', 'base-node': 'p-base' }),
      status('s', 'pending'),
      { execute: 'job-cancel', arguments: { id: 's' } },
      { execute: 'blockdev-del', arguments: { 'node-name': 'p-mid' } },
      { execute: 'query-named-block-nodes', arguments: { flat: true } },
    ],
    backing: { p: '$DIR/p-base.qcow2' },
  },
  {
    name: "on 'aborting' of a failed stream: its filter's name is free, a new stream may start",
    steps: [
      ...addChain('p', failingMid),
      stream({ 'job-id': 's', device: 'p-top', 'base-node': 'p-base', 'filter-node-name': 'cor' }),
      status('s', 'aborting'),
      { execute: 'blockdev-add', arguments: { driver: 'null-co', 'node-name': 'cor', size: 65536 } },
      stream({ 'job-id': 's2', device: 'p-top', 'base-node': 'p-base' }),
      status('s2', 'null'),
      { execute: 'query-jobs' },
    ],
    backing: { p: '$DIR/p-base.qcow2' },
  },
  {
    name: "blockdev-del sent on 'pending' of an intermediate commit meets the committed layer let go of",
    steps: [
      ...addChain('p'),
      { execute: 'block-commit', arguments: { 'job-id': 'c', device: 'p-top', 'top-node': 'p-mid', 'base-node': 'p-base' } },
      status('c', 'pending'),
      { execute: 'blockdev-del', arguments: { 'node-name': 'p-mid' } },
      { execute: 'query-named-block-nodes', arguments: { flat: true } },
    ],
    backing: { p: '$DIR/p-base.qcow2' },
  },
  {
    name: "an active commit completed: the graph asked for on 'pending' is the switched one",
    steps: [
      ...addChain('p'),
      { execute: 'block-commit', arguments: { 'job-id': 'a', device: 'p-top' } },
      { awaitEvent: { event: 'BLOCK_JOB_READY', data: { device: 'a' } } },
      { execute: 'job-complete', arguments: { id: 'a' } },
      status('a', 'pending'),
      { execute: 'query-named-block-nodes', arguments: { flat: true } },
      { execute: 'blockdev-del', arguments: { 'node-name': 'p-top' } },
    ],
    backing: { p: 'p-mid.qcow2' },
    alsoReadAsTheChain: ['p-base'],
  },
  {
    name: "quit sent on 'waiting' lets the stream complete first",
    steps: [
      ...addChain('p'),
      stream({ 'job-id': 's', device: 'p-top' }),
      status('s', 'waiting'),
      { execute: 'quit' },
      untilClosed,
    ],
    backing: { p: undefined },
  },
  {
    name: "SIGTERM on 'pending' lets the stream complete first",
    steps: [
      ...addChain('p'),
      stream({ 'job-id': 's', device: 'p-top', 'base-node': 'p-base' }),
      status('s', 'pending'),
      sigterm,
      untilClosed,
    ],
    backing: { p: '$DIR/p-base.qcow2' },
  },
  {
    name: 'quit cancels a running stream, dismisses a concluded one and aborts a pending one, newest first',
    steps: [
      ...addChain('p'),
      ...addChain('q'),
      { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': 'r', file: file('r.qcow2') } },
      stream({ 'job-id': 'pending', device: 'p-top', 'auto-finalize': false }),
      status('pending', 'pending'),
      stream({ 'job-id': 'concluded', device: 'r', 'auto-dismiss': false }),
      stream({ 'job-id': 'running', device: 'q-top', 'base-node': 'q-base', speed: 1 }),
      { execute: 'quit' },
      untilClosed,
    ],
    backing: { p: 'p-mid.qcow2', q: 'q-mid.qcow2' },
    normalise: (line) => line.replace(/"offset": \d+/, '"offset": N'),
  },
  {
    name: 'SIGTERM cancels a running stream',
    steps: [
      ...addChain('p'),
      stream({ 'job-id': 's', device: 'p-top', 'base-node': 'p-base', speed: 1 }),
      sigterm,
      untilClosed,
    ],
    backing: { p: 'p-mid.qcow2' },
    normalise: (line) => line.replace(/"offset": \d+/, '"offset": N'),
  },
];

function prepare(dir: string): void {
  for (const chain of CHAINS) makePatternChain(dir, chain);
  runQemuImg('create', '-q', '-f', 'qcow2', join(dir, 'r.qcow2'), '1M');
}

for (const [index, scenario] of SCENARIOS.entries()) {
  test(scenario.name, async () => {
    const peers = await startDifferentialPeers(join(temp.dir, String(index)), prepare);
    const normalise = (line: string) => maskImageSizes(scenario.normalise?.(line) ?? line);
    let ours: string[];
    let theirs: string[];
    try {
      theirs = await runTranscript(peers.qsd.socket, peers.qsd.dir, scenario.steps, normalise);
      ours = await runTranscript(peers.blockd.socket, peers.blockd.dir, scenario.steps, normalise).catch((error: Error) => {
        throw new Error(`${error.message}; blockd said: ${peers.blockdLog().slice(-3000)}`);
      });
    } finally {
      await peers.stopQsd();
      await peers.stopBlockd();
    }
    assert.equal(describeDifferences(ours, theirs), '');
    assert.doesNotMatch(peers.blockdLog(), /unhandled promise rejection|job machinery failed/, 'the safety net was never needed');
    for (const dir of [peers.blockd.dir, peers.qsd.dir]) {
      for (const layer of scenario.alsoReadAsTheChain ?? []) {
        const image = join(dir, `${layer}.qcow2`);
        qemuImgCompare(image, join(dir, `${layer.split('-')[0]}-expected.raw`), ['qcow2', 'raw'], `${dir} ${layer}`);
        assertCheckClean(image, `${dir} ${layer}`);
      }
      for (const chain of Object.keys(scenario.backing)) {
        const top = join(dir, `${chain}-top.qcow2`);
        qemuImgCompare(top, join(dir, `${chain}-expected.raw`), ['qcow2', 'raw'], `${dir} ${chain}`);
        assertCheckClean(top, `${dir} ${chain}-top`);
        const info = JSON.parse(runQemuImg('info', '--output=json', top)) as { 'backing-filename'?: string };
        assert.equal(info['backing-filename']?.replaceAll(dir, '$DIR'), scenario.backing[chain], `${dir} ${chain}: backing file`);
      }
    }
  });
}
