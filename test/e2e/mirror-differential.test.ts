/*
 * blockdev-mirror against qemu-storage-daemon: both daemons get the same
 * images (pattern chains written by qemu-io) and the same QMP script, and
 * must answer alike: replies, every event in order (JOB_STATUS_CHANGE,
 * BLOCK_JOB_*), query-block-jobs / query-jobs where the job stands still,
 * the graph (query-named-block-nodes) and the exports. Each scenario has a
 * fresh pair of daemons:
 *   - refusals: every check of the command, in pairs that pin QEMU's order;
 *   - completion: sync full / top / none and write-blocking to READY, then
 *     job-complete or block-job-complete, with an NBD export that follows the
 *     pivot; auto-finalize and auto-dismiss off;
 *   - cancel and pause: before and after READY, soft, forced, while paused,
 *     pause and resume under a speed limit;
 *   - error policies: blkdebug on the source's reads and the target's writes;
 *   - replaces: a filter above the source, the node below it replaced;
 *   - op blockers: what a running mirror refuses to other commands.
 * Speed limits, READY and the job's pause states make each sequence
 * deterministic; an injected error hits the mirror's last copy, so what was
 * copied when it fails does not depend on timing. After the scripts the
 * images are checked: targets read as their sources did (qemu-img compare),
 * blockd's and qemu-storage-daemon's copies are the same, qemu-img check is
 * clean.
 */
import { join } from 'node:path';
import { test } from 'node:test';
import { assertReadsAs, compareWithQsd } from '../helpers/differential-scenario.js';
import { addChain, addFailing, addImage, addRaw, compareExport, exportNode, nbdServer, prepareErrorCopies, qemuIoExport } from '../helpers/job-steps.js';
import { makePatternChain } from '../helpers/pattern-chains.js';
import { assertCheckClean, createQcow2, MiB, qemuIo } from '../helpers/qemu-tools.js';
import { progressAfterResume, untilBlockJob, untilBlockJobIdle, untilJob, type TranscriptStep } from '../helpers/qmp-transcript.js';

// ---- the script's pieces ---------------------------------------------------------------------

const addThrottle = (name: string, child: string): TranscriptStep => ({ execute: 'blockdev-add', arguments: { driver: 'throttle', 'node-name': name, 'throttle-group': 'tg', file: child } });
const throttleGroup: TranscriptStep = { execute: 'object-add', arguments: { 'qom-type': 'throttle-group', id: 'tg' } };

const mirror = (args: object): TranscriptStep => ({ execute: 'blockdev-mirror', arguments: args });
const graph: TranscriptStep = { execute: 'query-named-block-nodes', arguments: { flat: true } };
const ready = (device: string): TranscriptStep => ({ awaitEvent: { event: 'BLOCK_JOB_READY', data: { device } } });
/**
 * A mirror at speed 1 has copied its first round (buf-size, 16 MiB) and waits under its limit.
 * Idle alone is not enough: the job sleeps while the round's last copies are still in flight.
 */
const firstRoundCopied = (device: string): TranscriptStep => untilBlockJob(device, (job) => !job.busy && job.offset === 16 * MiB);
/** A READY mirror has copied what was written meanwhile and waits for more. */
const caughtUp = (device: string, bytes: number): TranscriptStep => untilBlockJob(device, (job) => !job.busy && job.offset === bytes);

// ---- the scenarios ---------------------------------------------------------------------------

test('blockdev-mirror refuses what qemu-storage-daemon refuses, in its order and words', async () => {
  await compareWithQsd({
    prepare(dir) {
      for (const chain of ['a', 'b', 'c']) makePatternChain(dir, chain);
      for (const name of ['tgt', 'tgt2']) createQcow2(join(dir, `${name}.qcow2`), 64 * MiB);
      createQcow2(join(dir, 'small.qcow2'), 32 * MiB);
    },
    steps: [
      ...addChain('a'), ...addChain('b'), ...addChain('c'),
      addImage('tgt'), addImage('tgt2'), addImage('small'),
      // Each command breaks two rules (or one, last): the first checked speaks.
      mirror({ 'job-id': 'm', device: 'nosuch', target: 'nosuch', sync: 'full' }),
      mirror({ 'job-id': 'm', device: 'a-mid', target: 'nosuch', sync: 'full' }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'nosuch', sync: 'full', granularity: 100 }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'tgt', sync: 'full', granularity: 100 }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'a-mid', sync: 'full', granularity: 3 * MiB }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'tgt', sync: 'full', granularity: 128 * MiB }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'a-mid', sync: 'full', replaces: 'nosuch' }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'tgt', sync: 'incremental', replaces: 'nosuch' }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'tgt', sync: 'bitmap', replaces: 'a-mid' }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'tgt', sync: 'incremental', replaces: 'b-top' }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'tgt', sync: 'incremental', 'buf-size': -1 }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'tgt', sync: 'bitmap' }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'a-top', sync: 'full', 'buf-size': -1 }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'a-top', sync: 'full', 'filter-node-name': '1x' }),
      mirror({ 'job-id': '1x', device: 'a-top', target: 'tgt', sync: 'full', 'filter-node-name': '1x' }),
      mirror({ 'job-id': '1x', device: 'a-top', target: 'tgt', sync: 'full', 'filter-node-name': 'tgt' }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'a-mid', sync: 'full', 'filter-node-name': 'tgt' }),
      // targets that are backing files of another node
      mirror({ 'job-id': 'm', device: 'a-top', target: 'a-mid', sync: 'full' }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'b-mid', sync: 'full' }),
      // the job exists (created, null) when its id, speed and the target's permissions are checked
      mirror({ 'job-id': '1x', device: 'a-top', target: 'tgt', sync: 'full', speed: -1 }),
      mirror({ device: 'a-top', target: 'tgt', sync: 'full' }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'small-file', sync: 'full', speed: -1 }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'small-file', sync: 'full' }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'tgt-file', sync: 'full' }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'tgt', sync: 'full', replaces: 'a-mid' }),
      mirror({ 'job-id': 'm', device: 'a-top', target: 'tgt', sync: 'full', replaces: 'b-top' }),
      // another size: the job starts, then fails
      mirror({ 'job-id': 'm', device: 'a-top', target: 'small', sync: 'full' }),
      untilJob('m', 'null'),
      graph,
      // a target in use by another mirror; a source that is one's now
      mirror({ 'job-id': 'm', device: 'a-top', target: 'tgt', sync: 'full', speed: 1 }),
      firstRoundCopied('m'),
      mirror({ 'job-id': 'm', device: 'b-top', target: 'tgt', sync: 'full' }),
      mirror({ 'job-id': 'm2', device: 'b-top', target: 'tgt', sync: 'full' }),
      mirror({ 'job-id': 'm2', device: 'a-top', target: 'tgt2', sync: 'full' }),
      mirror({ 'job-id': 'm2', device: 'b-top', target: 'a-top', sync: 'full' }),
      // targets and sources held by a stream (its filter named, so a root node the stream holds) and a commit
      { execute: 'block-stream', arguments: { 'job-id': 's', device: 'b-top', 'base-node': 'b-base', speed: 1, 'filter-node-name': 'sf' } },
      { execute: 'block-commit', arguments: { 'job-id': 'c', device: 'c-top', 'top-node': 'c-mid', 'base-node': 'c-base', speed: 1 } },
      untilBlockJobIdle('s'),
      untilBlockJobIdle('c'),
      mirror({ 'job-id': 'm2', device: 'sf', target: 'tgt2', sync: 'full', granularity: 3 * MiB }),
      mirror({ 'job-id': 'm2', device: 'sf', target: 'tgt2', sync: 'full' }),
      mirror({ 'job-id': 'm2', device: 'tgt2', target: 'b-top', sync: 'full' }),
      mirror({ 'job-id': 'm2', device: 'tgt2', target: 'b-mid', sync: 'full' }),
      mirror({ 'job-id': 'm2', device: 'tgt2', target: 'c-base', sync: 'full' }),
      mirror({ 'job-id': 'm2', device: 'tgt2', target: 'c-mid', sync: 'full' }),
      mirror({ 'job-id': 'm2', device: 'tgt2', target: 'c-top', sync: 'full' }),
      mirror({ 'job-id': 'm2', device: 'c-top', target: 'tgt2', sync: 'full' }),
      mirror({ 'job-id': 'm2', device: 'b-top', target: 'tgt2', sync: 'full' }),
      graph,
      { execute: 'job-cancel', arguments: { id: 'm' } },
      { execute: 'job-cancel', arguments: { id: 's' } },
      { execute: 'job-cancel', arguments: { id: 'c' } },
      untilJob('m', 'null'),
      untilJob('s', 'null'),
      untilJob('c', 'null'),
      graph,
      // filters: a throttle above the source, one above a node of the source's chain
      throttleGroup,
      addThrottle('thr-a', 'a-top'),
      addThrottle('thr-b', 'b-mid'),
      mirror({ 'job-id': 'm', device: 'thr-a', target: 'a-top', sync: 'full' }),
      mirror({ 'job-id': 'm', device: 'b-top', target: 'thr-b', sync: 'full', 'buf-size': -1 }),
      mirror({ 'job-id': 'm', device: 'b-top', target: 'thr-b', sync: 'full', 'filter-node-name': 'tgt' }),
      mirror({ 'job-id': 'm', device: 'b-top', target: 'thr-b', sync: 'full', speed: -1 }),
      mirror({ 'job-id': 'm', device: 'b-top', target: 'thr-b', sync: 'full' }),
      mirror({ 'job-id': 'm', device: 'thr-a', target: 'tgt', sync: 'full', replaces: 'a-mid' }),
      mirror({ 'job-id': 'm', device: 'thr-a', target: 'small', sync: 'full', replaces: 'a-top', 'auto-dismiss': false }),
      untilJob('m', 'concluded'),
      { execute: 'query-jobs' },
      { execute: 'query-block-jobs' },
      { execute: 'job-dismiss', arguments: { id: 'm' } },
      graph,
    ],
    images(dir) {
      // Nothing was written to a source; the cancelled mirror's target is a consistent image.
      for (const chain of ['a', 'b', 'c']) assertReadsAs(dir, `${chain}-top.qcow2`, `${chain}-expected.raw`);
      assertCheckClean(join(dir, 'tgt.qcow2'), 'tgt');
    },
  });
});

test('blockdev-mirror completes as qemu-storage-daemon does: sync full, top and none, write-blocking, the pivot, finalize and dismiss', async () => {
  const chains = ['a', 'b', 'c', 'd', 'e'];
  await compareWithQsd({
    prepare(dir) {
      for (const chain of chains) makePatternChain(dir, chain);
      for (const name of ['ta', 'td', 'te']) createQcow2(join(dir, `${name}.qcow2`), 64 * MiB);
      // sync=top and none: the target's backing is the source's
      createQcow2(join(dir, 'tb.qcow2'), undefined, { backing: { path: 'b-mid.qcow2', format: 'qcow2' } });
      createQcow2(join(dir, 'tc.qcow2'), undefined, { backing: { path: 'c-mid.qcow2', format: 'qcow2' } });
    },
    steps: [
      ...chains.flatMap(addChain),
      addImage('ta'), addImage('tb', { backing: 'b-mid' }), addImage('tc', { backing: 'c-mid' }), addImage('td'), addImage('te'),
      nbdServer,
      exportNode('ea', 'a-top'), exportNode('eb', 'b-top'), exportNode('ec', 'c-top'), exportNode('ee', 'e-top'),
      // sync=full, job-complete: the export follows to the target
      mirror({ 'job-id': 'm1', device: 'a-top', target: 'ta', sync: 'full' }),
      ready('m1'),
      { execute: 'query-block-jobs' },
      { execute: 'query-jobs' },
      graph,
      { execute: 'job-complete', arguments: { id: 'm1' } },
      untilJob('m1', 'null'),
      { execute: 'query-block-exports' },
      compareExport('ea', 'a-expected.raw'),
      graph,
      // sync=top onto a target with the same backing, block-job-complete
      mirror({ 'job-id': 'm2', device: 'b-top', target: 'tb', sync: 'top' }),
      ready('m2'),
      { execute: 'query-block-jobs' },
      { execute: 'block-job-complete', arguments: { device: 'm2' } },
      untilJob('m2', 'null'),
      { execute: 'query-block-exports' },
      compareExport('eb', 'b-expected.raw'),
      // sync=none: READY at once (before the reply); only what is written meanwhile is copied
      mirror({ 'job-id': 'm3', device: 'c-top', target: 'tc', sync: 'none' }),
      ready('m3'),
      qemuIoExport('ec', ['write -P 0x55 1M 64k']),
      caughtUp('m3', 64 * 1024),
      { execute: 'query-block-jobs' },
      { execute: 'block-job-complete', arguments: { device: 'm3' } },
      untilJob('m3', 'null'),
      { execute: 'query-block-exports' },
      qemuIoExport('ec', ['read -P 0x55 1M 64k', 'read -P 0x21 4M 64k', 'read -P 0x11 0 64k']),
      // write-blocking: a write through the export reaches the target before it completes (the bitmap does not record)
      mirror({ 'job-id': 'm5', device: 'e-top', target: 'te', sync: 'full', 'copy-mode': 'write-blocking' }),
      ready('m5'),
      qemuIoExport('ee', ['write -P 0x66 2M 64k', 'write -z 40M 1M']),
      { execute: 'query-block-jobs' },
      graph,
      { execute: 'job-complete', arguments: { id: 'm5' } },
      untilJob('m5', 'null'),
      { execute: 'query-block-exports' },
      qemuIoExport('ee', ['read -P 0x66 2M 64k', 'read -P 0 40M 1M', 'read -P 0x11 0 1M']),
      // auto-finalize and auto-dismiss off; complete before READY is refused; pending, the job is drained
      mirror({ 'job-id': 'm4', device: 'd-top', target: 'td', sync: 'full', speed: 1, 'auto-finalize': false, 'auto-dismiss': false }),
      firstRoundCopied('m4'),
      { execute: 'job-complete', arguments: { id: 'm4' } },
      { execute: 'block-job-complete', arguments: { device: 'm4' } },
      { execute: 'block-job-set-speed', arguments: { device: 'm4', speed: 0 } },
      ready('m4'),
      { execute: 'job-complete', arguments: { id: 'm4' } },
      { awaitEvent: { event: 'BLOCK_JOB_PENDING', data: { id: 'm4' } } },
      { execute: 'query-jobs' },
      { execute: 'query-block-jobs' },
      graph,
      { execute: 'job-finalize', arguments: { id: 'm4' } },
      { execute: 'query-jobs' },
      graph,
      { execute: 'job-dismiss', arguments: { id: 'm4' } },
      graph,
    ],
    images(dir) {
      assertReadsAs(dir, 'ta.qcow2', 'a-expected.raw');
      assertReadsAs(dir, 'tb.qcow2', 'b-expected.raw');
      assertReadsAs(dir, 'td.qcow2', 'd-expected.raw');
      // sync=none: the write, over the target's own backing (the top's data was never copied)
      qemuIo(join(dir, 'tc.qcow2'), ['read -P 0x55 1M 64k', 'read -P 0x21 4M 64k', 'read -P 0x21 6M 1M'], ['-f', 'qcow2']);
      // write-blocking: the source and the target both got the writes
      for (const image of ['e-top', 'te']) qemuIo(join(dir, `${image}.qcow2`), ['read -P 0x66 2M 64k', 'read -P 0 40M 1M', 'read -P 0x31 6M 1M'], ['-f', 'qcow2']);
      for (const image of ['tc', 'te', 'e-top']) assertCheckClean(join(dir, `${image}.qcow2`), image);
      for (const chain of ['a', 'b', 'd']) assertReadsAs(dir, `${chain}-top.qcow2`, `${chain}-expected.raw`);
      qemuIo(join(dir, 'c-top.qcow2'), ['read -P 0x55 1M 64k', 'read -P 0x31 6M 1M'], ['-f', 'qcow2']);
    },
    alike: ['ta.qcow2', 'tb.qcow2', 'tc.qcow2', 'td.qcow2', 'te.qcow2', 'c-top.qcow2', 'e-top.qcow2'],
  });
});

const m2Progress = progressAfterResume('m2');

test('blockdev-mirror cancels and pauses as qemu-storage-daemon does, before and after READY', async () => {
  // One source for every job (none pivots but the last), a target each: t1 for m1, ...
  const targets = ['t1', 't2', 't3', 't4', 't5', 't6', 't7'];
  await compareWithQsd({
    prepare(dir) {
      makePatternChain(dir, 'a');
      for (const target of targets) createQcow2(join(dir, `${target}.qcow2`), 64 * MiB);
    },
    steps: [
      ...addChain('a'),
      ...targets.map((target) => addImage(target)),
      // before READY every cancel is forced
      mirror({ 'job-id': 'm1', device: 'a-top', target: 't1', sync: 'full', speed: 1 }),
      firstRoundCopied('m1'),
      { execute: 'query-block-jobs' },
      { execute: 'block-job-cancel', arguments: { device: 'm1' } },
      untilJob('m1', 'null'),
      graph,
      // paused and resumed under a speed limit, which changes meanwhile
      mirror({ 'job-id': 'm2', device: 'a-top', target: 't2', sync: 'full', speed: 1 }),
      firstRoundCopied('m2'),
      { execute: 'block-job-pause', arguments: { device: 'm2' } },
      { execute: 'query-block-jobs' },
      { execute: 'block-job-pause', arguments: { device: 'm2' } },
      { execute: 'block-job-cancel', arguments: { device: 'm2' } },
      m2Progress.mark,
      { execute: 'block-job-set-speed', arguments: { device: 'm2', speed: 2 * MiB } },
      { execute: 'block-job-resume', arguments: { device: 'm2' } },
      m2Progress.moved,
      { execute: 'block-job-resume', arguments: { device: 'm2' } },
      { execute: 'block-job-set-speed', arguments: { device: 'm2', speed: -1 } },
      { execute: 'block-job-set-speed', arguments: { device: 'm2', speed: 0 } },
      ready('m2'),
      // a soft cancel of a READY job completes it without the pivot
      { execute: 'block-job-cancel', arguments: { device: 'm2' } },
      untilJob('m2', 'null'),
      graph,
      // job-cancel of a READY job cancels it
      mirror({ 'job-id': 'm3', device: 'a-top', target: 't3', sync: 'full' }),
      ready('m3'),
      { execute: 'job-cancel', arguments: { id: 'm3' } },
      untilJob('m3', 'null'),
      // and so does a forced block-job-cancel
      mirror({ 'job-id': 'm4', device: 'a-top', target: 't4', sync: 'full' }),
      ready('m4'),
      { execute: 'block-job-cancel', arguments: { device: 'm4', force: true } },
      untilJob('m4', 'null'),
      // paused while READY (standby): a soft cancel is refused, job-cancel is not
      mirror({ 'job-id': 'm5', device: 'a-top', target: 't5', sync: 'full' }),
      ready('m5'),
      { execute: 'job-pause', arguments: { id: 'm5' } },
      { execute: 'query-block-jobs' },
      { execute: 'block-job-cancel', arguments: { device: 'm5' } },
      { execute: 'job-cancel', arguments: { id: 'm5' } },
      untilJob('m5', 'null'),
      // paused before READY: a forced block-job-cancel ends it
      mirror({ 'job-id': 'm6', device: 'a-top', target: 't6', sync: 'full', speed: 1 }),
      firstRoundCopied('m6'),
      { execute: 'job-pause', arguments: { id: 'm6' } },
      { execute: 'block-job-cancel', arguments: { device: 'm6', force: true } },
      untilJob('m6', 'null'),
      // completed while paused in READY: the pivot comes after the resume
      mirror({ 'job-id': 'm7', device: 'a-top', target: 't7', sync: 'full', 'auto-dismiss': false }),
      ready('m7'),
      { execute: 'block-job-pause', arguments: { device: 'm7' } },
      { execute: 'job-complete', arguments: { id: 'm7' } },
      { execute: 'query-block-jobs' },
      { execute: 'block-job-resume', arguments: { device: 'm7' } },
      untilJob('m7', 'concluded'),
      { execute: 'query-jobs' },
      { execute: 'job-dismiss', arguments: { id: 'm7' } },
      graph,
    ],
    images(dir) {
      // Soft-cancelled, cancelled after READY, and completed: copies of the source, which is unchanged.
      for (const target of ['t2', 't3', 't4', 't5', 't7']) assertReadsAs(dir, `${target}.qcow2`, 'a-expected.raw');
      assertReadsAs(dir, 'a-top.qcow2', 'a-expected.raw');
      for (const target of ['t1', 't6']) assertCheckClean(join(dir, `${target}.qcow2`), target);
    },
    alike: ['t1.qcow2', 't6.qcow2'],
  });
});

/** One mirror per case: a raw copy of chain a's contents onto a blank raw target, the source's reads or the target's writes failing once. */
interface ErrorCase {
  id: string;
  failing: 'source' | 'target';
  errno: number;
  policies: object;
  /** After the command. */
  steps(id: string): TranscriptStep[];
  /** Whether the target ends as a copy of the source (else the job failed on its last copy). */
  copied: boolean;
}

const completeOnceReady = (id: string): TranscriptStep[] => [ready(id), { execute: 'job-complete', arguments: { id } }, untilJob(id, 'null')];
const ERROR_CASES: ErrorCase[] = [
  // report (the default): the job fails with the error
  { id: 'r1', failing: 'source', errno: 5, policies: {}, steps: (id) => [untilJob(id, 'null')], copied: false },
  // ignore: the range is copied again later; the other side's policy is not asked
  { id: 'r2', failing: 'source', errno: 5, policies: { 'on-source-error': 'ignore', 'on-target-error': 'stop' }, steps: completeOnceReady, copied: true },
  // stop: paused with its offset standing still (a soft cancel is refused), the range copied after the resume
  {
    id: 'r3', failing: 'source', errno: 5, policies: { 'on-source-error': 'stop' }, copied: true,
    steps: (id) => [untilJob(id, 'paused'), { execute: 'query-block-jobs' }, { execute: 'block-job-cancel', arguments: { device: id } }, { execute: 'block-job-resume', arguments: { device: id } }, ...completeOnceReady(id)],
  },
  // enospc: an error other than ENOSPC is reported
  { id: 'r4', failing: 'source', errno: 5, policies: { 'on-source-error': 'enospc' }, steps: (id) => [untilJob(id, 'null')], copied: false },
  { id: 'w1', failing: 'target', errno: 5, policies: {}, steps: (id) => [untilJob(id, 'null')], copied: false },
  { id: 'w2', failing: 'target', errno: 5, policies: { 'on-target-error': 'ignore', 'on-source-error': 'stop' }, steps: completeOnceReady, copied: true },
  {
    id: 'w3', failing: 'target', errno: 5, policies: { 'on-target-error': 'stop' }, copied: true,
    steps: (id) => [untilJob(id, 'paused'), { execute: 'job-resume', arguments: { id } }, ready(id), { execute: 'block-job-cancel', arguments: { device: id } }, untilJob(id, 'null')],
  },
  // enospc: ENOSPC stops the job (io-status nospace)
  {
    id: 'w4', failing: 'target', errno: 28, policies: { 'on-target-error': 'enospc' }, copied: true,
    steps: (id) => [untilJob(id, 'paused'), { execute: 'query-block-jobs' }, { execute: 'job-resume', arguments: { id } }, ...completeOnceReady(id)],
  },
  { id: 'w5', failing: 'target', errno: 5, policies: { 'on-target-error': 'enospc' }, steps: (id) => [untilJob(id, 'null')], copied: false },
];

test('blockdev-mirror meets I/O errors as qemu-storage-daemon does: on-source-error and on-target-error', async () => {
  await compareWithQsd({
    prepare(dir) {
      makePatternChain(dir, 'a');
      prepareErrorCopies(dir, ERROR_CASES.map(({ id }) => id));
    },
    steps: ERROR_CASES.flatMap(({ id, failing, errno, policies, steps }) => [
      failing === 'source' ? addFailing(`${id}-src`, 'read_aio', errno) : addRaw(`${id}-src`),
      failing === 'target' ? addFailing(`${id}-tgt`, 'write_aio', errno) : addRaw(`${id}-tgt`),
      mirror({ 'job-id': id, device: `${id}-src`, target: `${id}-tgt`, sync: 'full', ...policies }),
      ...steps(id),
    ]),
    images(dir) {
      for (const { id, copied } of ERROR_CASES) if (copied) assertReadsAs(dir, `${id}-tgt.raw`, 'a-expected.raw');
    },
    alike: ERROR_CASES.map(({ id }) => `${id}-tgt.raw`),
  });
});

test('blockdev-mirror replaces as qemu-storage-daemon does: a filter above the source stays over the target', async () => {
  const chains = ['a', 'b', 'c'];
  await compareWithQsd({
    prepare(dir) {
      for (const chain of chains) {
        makePatternChain(dir, chain);
        createQcow2(join(dir, `t${chain}.qcow2`), 64 * MiB);
      }
      createQcow2(join(dir, 'small.qcow2'), 32 * MiB);
    },
    steps: [
      ...chains.flatMap((chain) => [...addChain(chain), addImage(`t${chain}`)]),
      addImage('small'),
      throttleGroup,
      ...chains.map((chain) => addThrottle(`thr-${chain}`, `${chain}-top`)),
      nbdServer,
      ...chains.map((chain) => exportNode(`e${chain}`, `thr-${chain}`)),
      // Refused: a node not below the device, through filters. (A replaced node of another size than the
      // device's cannot be reached from QMP: the filters it is looked for through keep their child's size,
      // and a raw node with a size is no filter, as here.)
      { execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'window', size: 32 * MiB, file: 'small' } },
      mirror({ 'job-id': 'm', device: 'thr-a', target: 'ta', sync: 'full', replaces: 'b-top' }),
      mirror({ 'job-id': 'm', device: 'thr-a', target: 'ta', sync: 'full', replaces: 'thr-b' }),
      mirror({ 'job-id': 'm', device: 'window', target: 'tb', sync: 'full', replaces: 'small' }),
      mirror({ 'job-id': 'm', device: 'window', target: 'tb', sync: 'full', replaces: 'window' }),
      untilJob('m', 'null'),
      // the node below the filter is replaced: the filter stays, over the target
      mirror({ 'job-id': 'm1', device: 'thr-a', target: 'ta', sync: 'full', replaces: 'a-top' }),
      ready('m1'),
      graph,
      { execute: 'job-complete', arguments: { id: 'm1' } },
      untilJob('m1', 'null'),
      // the device itself, named or not: the export follows to the target, without the filter
      mirror({ 'job-id': 'm2', device: 'thr-b', target: 'tb', sync: 'full', replaces: 'thr-b' }),
      ready('m2'),
      { execute: 'job-complete', arguments: { id: 'm2' } },
      untilJob('m2', 'null'),
      mirror({ 'job-id': 'm3', device: 'thr-c', target: 'tc', sync: 'top' }),
      ready('m3'),
      { execute: 'job-complete', arguments: { id: 'm3' } },
      untilJob('m3', 'null'),
      { execute: 'query-block-exports' },
      graph,
      compareExport('ea', 'a-expected.raw'),
      compareExport('eb', 'b-expected.raw'),
      // sync=top onto a target without backing: the top's data only
      qemuIoExport('ec', ['read -P 0x31 6M 1M', 'read -P 0 0 6M']),
    ],
    images(dir) {
      assertReadsAs(dir, 'ta.qcow2', 'a-expected.raw');
      assertReadsAs(dir, 'tb.qcow2', 'b-expected.raw');
      assertCheckClean(join(dir, 'tc.qcow2'), 'tc');
    },
    alike: ['tc.qcow2'],
  });
});

test('a running blockdev-mirror refuses other operations on its nodes as qemu-storage-daemon does', async () => {
  await compareWithQsd({
    prepare(dir) {
      makePatternChain(dir, 'a');
      for (const name of ['ta', 'other']) createQcow2(join(dir, `${name}.qcow2`), 64 * MiB);
    },
    steps: [
      ...addChain('a'), addImage('ta'), addImage('other'),
      // READY: the drains of the refused snapshots show as standby, then ready again
      mirror({ 'job-id': 'm', device: 'a-top', target: 'ta', sync: 'full', 'filter-node-name': 'mf' }),
      ready('m'),
      graph,
      mirror({ 'job-id': 'm2', device: 'mf', target: 'other', sync: 'full', granularity: 3 * MiB }),
      mirror({ 'job-id': 'm2', device: 'mf', target: 'other', sync: 'full' }),
      mirror({ 'job-id': 'm2', device: 'other', target: 'ta', sync: 'full' }),
      mirror({ 'job-id': 'm2', device: 'other', target: 'mf', sync: 'full' }),
      mirror({ 'job-id': 'm2', device: 'other', target: 'a-top', sync: 'full' }),
      { execute: 'block-stream', arguments: { 'job-id': 's', device: 'a-top' } },
      { execute: 'block-stream', arguments: { 'job-id': 's', device: 'mf' } },
      { execute: 'block-stream', arguments: { 'job-id': 's', device: 'ta' } },
      { execute: 'block-commit', arguments: { 'job-id': 'c', device: 'mf' } },
      { execute: 'block-commit', arguments: { 'job-id': 'c', device: 'mf', 'top-node': 'a-mid' } },
      { execute: 'block-commit', arguments: { 'job-id': 'c', device: 'ta' } },
      { execute: 'blockdev-del', arguments: { 'node-name': 'a-top' } },
      { execute: 'blockdev-del', arguments: { 'node-name': 'ta' } },
      { execute: 'blockdev-del', arguments: { 'node-name': 'mf' } },
      { execute: 'block_resize', arguments: { 'node-name': 'a-top', size: 128 * MiB } },
      { execute: 'block_resize', arguments: { 'node-name': 'ta', size: 128 * MiB } },
      { execute: 'block_resize', arguments: { 'node-name': 'mf', size: 128 * MiB } },
      { execute: 'blockdev-snapshot-sync', arguments: { 'node-name': 'a-top', 'snapshot-file': '$DIR/snap.qcow2', 'snapshot-node-name': 'snap' } },
      { execute: 'blockdev-snapshot-sync', arguments: { 'node-name': 'ta', 'snapshot-file': '$DIR/snap.qcow2', 'snapshot-node-name': 'snap' } },
      { execute: 'job-cancel', arguments: { id: 'm' } },
      untilJob('m', 'null'),
      graph,
      // once it has gone, the same commands work
      { execute: 'block-stream', arguments: { 'job-id': 's', device: 'a-top' } },
      untilJob('s', 'null'),
      { execute: 'blockdev-del', arguments: { 'node-name': 'ta' } },
      graph,
    ],
    images(dir) {
      assertReadsAs(dir, 'a-top.qcow2', 'a-expected.raw');
      assertReadsAs(dir, 'ta.qcow2', 'a-expected.raw');
    },
  });
});
