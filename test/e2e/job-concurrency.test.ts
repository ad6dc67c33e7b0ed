/*
 * Random pairs of operations on random chains. For each cell, a fresh chain
 * i0 <- i1 <- i2 <- i3 <- i4 (a pattern at every layer); operation A starts
 * (a job slowed to a crawl, or nothing), then operation B is asked for on one
 * node X. Every reply and event must equal qemu-storage-daemon's for the same
 * script, and B's verdict must be the one the op-blocker matrix predicts from
 * where A's claims are (src/opblockers: held role x requested operation, in
 * QEMU's order of checks). Then every job runs to its end and each chain's
 * top must still read as it did (qemu-img compare) and pass qemu-img check.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { verdictOf, type BlockOperation, type HeldRole } from '../../src/opblockers/op-blockers.js';
import { differentialPeers } from '../helpers/differential-peers.js';
import { describeDifferences, runTranscript, untilBlockJobGone, untilBlockJobIdle, untilBlockJobsRest, untilJob, type TranscriptStep } from '../helpers/qmp-transcript.js';
import { assertCheckClean, createQcow2, MiB, qemuImgCompare, qemuIo, runQemuImg, SeededRandom, testSeeds } from '../helpers/qemu-tools.js';

const LAYERS = ['i0', 'i1', 'i2', 'i3', 'i4'] as const;
type Layer = (typeof LAYERS)[number];
const level = (layer: Layer) => LAYERS.indexOf(layer);

/** A running operation: its command, and its footprint (which node it claims under which role, where its filter sits). */
interface Running {
  name: string;
  start: (p: (layer: Layer) => string) => TranscriptStep | undefined;
  claims: Partial<Record<Layer | 'filter', HeldRole>>;
  /** The node its filter was inserted above. */
  filterAbove?: Layer;
  /** Nodes it opened a BlockBackend on (blockdev-del: "Node X is in use"). */
  backends: Layer[];
}

const RUNNING: Running[] = [
  { name: 'nothing', start: () => undefined, claims: {}, backends: [] },
  {
    name: 'stream i4 -> i2', start: (p) => ({ execute: 'block-stream', arguments: { 'job-id': 'A', device: p('i4'), 'base-node': p('i2'), speed: 1 } }),
    claims: { filter: 'stream.filter', i4: 'stream.active', i3: 'stream.inter' }, filterAbove: 'i4', backends: [],
  },
  {
    name: 'stream i2 -> i0', start: (p) => ({ execute: 'block-stream', arguments: { 'job-id': 'A', device: p('i2'), 'base-node': p('i0'), speed: 1 } }),
    claims: { filter: 'stream.filter', i2: 'stream.active', i1: 'stream.inter' }, filterAbove: 'i2', backends: [],
  },
  {
    name: 'commit i3 -> i1', start: (p) => ({ execute: 'block-commit', arguments: { 'job-id': 'A', device: p('i4'), 'top-node': p('i3'), 'base-node': p('i1'), speed: 1 } }),
    claims: { i4: 'commit.main', i3: 'commit.top', i2: 'commit.inter', i1: 'commit.base' }, filterAbove: 'i3', backends: ['i3', 'i1'],
  },
  {
    name: 'active commit i4 -> i2', start: (p) => ({ execute: 'block-commit', arguments: { 'job-id': 'A', device: p('i4'), 'base-node': p('i2'), speed: 1 } }),
    claims: { filter: 'active-commit.filter', i4: 'active-commit.source', i3: 'active-commit.inter', i2: 'active-commit.base' }, filterAbove: 'i4', backends: ['i2'],
  },
];

/** A requested operation on node X. */
interface Requested {
  name: string;
  applies: (x: Layer) => boolean;
  command: (x: Layer, p: (layer: Layer) => string, cell: number) => TranscriptStep;
}

const REQUESTED: Requested[] = [
  { name: 'stream', applies: (x) => level(x) >= 2, command: (x, p) => ({ execute: 'block-stream', arguments: { 'job-id': 'B', device: p(x), 'base-node': p(LAYERS[level(x) - 2]!) } }) },
  { name: 'commit', applies: (x) => level(x) >= 1, command: (x, p) => ({ execute: 'block-commit', arguments: { 'job-id': 'B', device: p('i4'), 'top-node': p(x), 'base-node': p(LAYERS[level(x) - 1]!) } }) },
  { name: 'del', applies: () => true, command: (x, p) => ({ execute: 'blockdev-del', arguments: { 'node-name': p(x) } }) },
  { name: 'snapshot', applies: () => true, command: (x, p, cell) => ({ execute: 'blockdev-snapshot', arguments: { node: p(x), overlay: `c${cell}-ov` } }) },
  { name: 'resize', applies: () => true, command: (x, p) => ({ execute: 'block_resize', arguments: { 'node-name': p(x), size: 16 * MiB } }) },
  { name: 'export', applies: () => true, command: (x, p, cell) => ({ execute: 'block-export-add', arguments: { type: 'nbd', id: `e${cell}`, 'node-name': p(x), name: `e${cell}` } }) },
];

type Prediction = { kind: 'busy'; node: string; reason: string } | { kind: 'root' } | { kind: 'in-use'; node: string } | { kind: 'free' };

/** The matrix's verdict on the first node of a walk that refuses `operation`. */
function firstRefusal(running: Running, walk: (Layer | 'filter')[], operation: BlockOperation, p: (layer: Layer) => string): Prediction | undefined {
  for (const node of walk) {
    const roles: HeldRole[] = [];
    const claim = running.claims[node];
    if (claim) roles.push(claim);
    // Backing links: every layer below the top is its overlay's backing file (a filter above it is the job's, and claimed).
    if (node !== 'filter' && node !== 'i4' && running.filterAbove !== node) roles.push('graph.backing');
    for (const role of roles) {
      const verdict = verdictOf(role, operation);
      if (!verdict.allow) {
        const overlay = node === 'filter' ? '' : LAYERS[level(node) + 1] ?? '';
        return { kind: 'busy', node: node === 'filter' ? '#blockN' : p(node), reason: verdict.reason.replace('{type}', role.startsWith('stream') ? 'stream' : 'commit').replace('{parent}', overlay ? p(overlay as Layer) : '') };
      }
    }
  }
  return undefined;
}

/** The chain walked from `from` down to `to` (inclusive or not), A's filter included where it sits. */
function walkDown(running: Running, from: Layer, to: Layer, inclusive: boolean): (Layer | 'filter')[] {
  const walk: (Layer | 'filter')[] = [];
  for (let at = level(from); at >= level(to); at--) {
    const layer = LAYERS[at]!;
    if (at !== level(from) && running.filterAbove === layer && running.claims.filter) walk.push('filter');
    if (at === level(to) && !inclusive) break;
    walk.push(layer);
  }
  return walk;
}

/** What the matrix (with QEMU's order of checks) says about B on X while A runs. */
function predict(running: Running, requested: Requested, x: Layer, p: (layer: Layer) => string): Prediction {
  switch (requested.name) {
    case 'stream':
      return firstRefusal(running, walkDown(running, x, LAYERS[level(x) - 2]!, false), 'stream', p) ?? { kind: 'free' };
    case 'commit': {
      // The device must be a root: no job holds it and no filter sits above it.
      if (running.claims.i4 || running.filterAbove === 'i4') return { kind: 'root' };
      const walk = walkDown(running, x, LAYERS[level(x) - 1]!, true);
      // An intermediate commit also asks on the overlay of its top (A's filter, when one sits above the top).
      if (x !== 'i4') walk.push(running.filterAbove === x && running.claims.filter ? 'filter' : LAYERS[level(x) + 1]!);
      return firstRefusal(running, walk, 'commit-target', p) ?? { kind: 'free' };
    }
    case 'del':
      if (running.backends.includes(x)) return { kind: 'in-use', node: p(x) };
      return firstRefusal(running, [x], 'drive-del', p) ?? { kind: 'free' };
    case 'snapshot':
      return firstRefusal(running, [x], 'external-snapshot', p) ?? { kind: 'free' };
    case 'resize': {
      const refused = firstRefusal(running, [x], 'resize', p);
      return refused ? { kind: 'busy', node: '', reason: "Device '(null)' is in use" } : { kind: 'free' };
    }
    default:
      return { kind: 'free' }; // exports meet permissions only
  }
}

function checkAgainstMatrix(reply: string, prediction: Prediction, context: string): void {
  const desc = (JSON.parse(reply) as { error?: { desc: string } }).error?.desc;
  const refusedByMatrix = (text: string | undefined) => text !== undefined && /is busy: |^Need a root block node$|is in use$/.test(text);
  switch (prediction.kind) {
    case 'busy':
      assert.equal(desc, prediction.node ? `Node '${prediction.node}' is busy: ${prediction.reason}` : prediction.reason, context);
      break;
    case 'root':
      assert.equal(desc, 'Need a root block node', context);
      break;
    case 'in-use':
      assert.equal(desc, `Node ${prediction.node} is in use`, context);
      break;
    case 'free':
      assert.ok(!refusedByMatrix(desc), `${context}: the matrix allows it, but: ${desc}`);
  }
}

interface Cell {
  index: number;
  running: Running;
  requested: Requested;
  x: Layer;
}

function chooseCells(seed: number, count: number): Cell[] {
  const all = RUNNING.flatMap((running) => REQUESTED.flatMap((requested) => LAYERS.filter((x) => requested.applies(x)).map((x) => ({ running, requested, x }))));
  const random = new SeededRandom(seed);
  return Array.from({ length: count }, (_, index) => ({ index, ...random.pick(all) }));
}

const CELLS = testSeeds([7]).flatMap((seed, round) => chooseCells(seed, 16).map((cell) => ({ ...cell, index: round * 100 + cell.index })));

function makeCells(dir: string): void {
  for (const { index } of CELLS) {
    const path = (name: string) => join(dir, `c${index}-${name}.qcow2`);
    LAYERS.forEach((layer, at) => {
      if (at === 0) createQcow2(path(layer), 16 * MiB);
      else createQcow2(path(layer), undefined, { backing: { path: `c${index}-${LAYERS[at - 1]}.qcow2`, format: 'qcow2' } });
      qemuIo(path(layer), [`write -P 0x${at + 1}${at + 1} ${at * 2}M 3M`, `write -z ${at * 2 + 1}M 64k`], ['-f', 'qcow2']);
    });
    createQcow2(path('ov'), 16 * MiB);
    runQemuImg('convert', '-O', 'raw', path('i4'), join(dir, `c${index}-expected.raw`));
  }
}

const peers = differentialPeers(makeCells);

function cellSteps(cell: Cell): { before: TranscriptStep[]; request: TranscriptStep; after: TranscriptStep[] } {
  const p = (layer: Layer) => `c${cell.index}-${layer}`;
  const file = (name: string) => ({ driver: 'file', 'node-name': `c${cell.index}-${name}-file`, filename: `$DIR/c${cell.index}-${name}.qcow2` });
  const add = (layer: Layer, at: number): TranscriptStep => ({
    execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': p(layer), file: file(layer), backing: at === 0 ? null : p(LAYERS[at - 1]!) },
  });
  const start = cell.running.start(p);
  // A stream or an intermediate commit B that is let in runs to its end at full speed: wait for it, not for a fixed time.
  const runsToItsEnd = (cell.requested.name === 'stream' || (cell.requested.name === 'commit' && cell.x !== 'i4'))
    && predict(cell.running, cell.requested, cell.x, p).kind === 'free';
  return {
    before: [
      ...LAYERS.map(add),
      { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': `c${cell.index}-ov`, file: file('ov'), backing: null } },
      ...(start ? [start, untilBlockJobIdle('A')] : []),
    ],
    request: cell.requested.command(cell.x, p, cell.index),
    after: [
      ...(runsToItsEnd ? [untilJob('B', 'null')] : []),
      untilBlockJobsRest,
      { execute: 'block-job-set-speed', arguments: { device: 'A', speed: 0 } },
      untilBlockJobsRest,
      { execute: 'job-complete', arguments: { id: 'A' } },
      untilBlockJobGone('A'),
      { execute: 'job-complete', arguments: { id: 'B' } },
      untilBlockJobGone('B'),
      { execute: 'query-jobs' },
      ...(cell.requested.name === 'export' ? [{ execute: 'block-export-del', arguments: { id: `e${cell.index}` } }] : []),
    ],
  };
}

test('random pairs of operations: the same replies and events as qemu-storage-daemon, the verdicts the matrix predicts, the data unchanged', async () => {
  for (const peer of [peers.qsd, peers.blockd]) {
    await runTranscript(peer.socket, peer.dir, [{ execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: `$DIR/nbd.sock` } } } }]);
  }
  for (const cell of CELLS) {
    const context = `cell ${cell.index}: ${cell.running.name}, then ${cell.requested.name} ${cell.x}`;
    const steps = cellSteps(cell);
    const transcripts: string[][] = [];
    for (const peer of [peers.qsd, peers.blockd]) {
      const before = await runTranscript(peer.socket, peer.dir, steps.before);
      // The request and what follows share one connection: the events of a job B that ends at once are not lost between two.
      const rest = await runTranscript(peer.socket, peer.dir, [steps.request, { action: async () => '-- after' }, ...steps.after]);
      transcripts.push([...before, '-- request', ...rest]);
    }
    const [theirs, ours] = transcripts as [string[], string[]];
    assert.equal(describeDifferences(ours, theirs), '', `${context}; blockd said: ${peers.blockdLog().slice(-1500)}`);
    const reply = ours[ours.indexOf('-- after') - 1]!;
    checkAgainstMatrix(reply, predict(cell.running, cell.requested, cell.x, (layer) => `c${cell.index}-${layer}`), context);
  }
  await peers.stopBlockd();
  await peers.stopQsd();
  for (const dir of [peers.blockd.dir, peers.qsd.dir]) {
    for (const { index } of CELLS) {
      const image = (name: string) => join(dir, `c${index}-${name}.qcow2`);
      qemuImgCompare(image('i4'), join(dir, `c${index}-expected.raw`), ['qcow2', 'raw'], `${dir} cell ${index}`);
      for (const layer of LAYERS) assertCheckClean(image(layer), `${dir} cell ${index} ${layer}`);
    }
  }
});
