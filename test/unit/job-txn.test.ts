/*
 * QEMU's job transaction (job.c job_completed_txn_success / _abort, job_do_finalize): jobs of
 * one JobTxn wait for each other, finalize together newest first, and a failure, a cancel or a
 * failing prepare of one aborts every one. Stepping jobs as in job-state-machine.test.ts, with
 * each event tagged by its job.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { EventBus } from '../../src/event-bus.js';
import { JobRegistry } from '../../src/jobs/job-registry.js';
import { JobTxn } from '../../src/jobs/job-txn.js';
import type { Job, JobKind } from '../../src/jobs/job.js';
import { MainLoopLock } from '../../src/main-loop-lock.js';

interface Control {
  finish: boolean;
  fail?: string;
  failPrepare?: string;
  log: string[];
}

function steppingKind(name: string, control: Control): JobKind {
  return {
    type: 'backup',
    blockJob: true,
    async run(job: Job) {
      job.startupReached();
      while (!control.finish) {
        await new Promise((resolve) => setImmediate(resolve));
        await job.pausePoint();
        if (control.fail) throw new Error(control.fail);
      }
    },
    async prepare() {
      control.log.push(`${name} prepare`);
      if (control.failPrepare) throw new Error(control.failPrepare);
    },
    async commit() {
      control.log.push(`${name} commit`);
    },
    async abort() {
      control.log.push(`${name} abort`);
    },
  };
}

function harness() {
  const bus = new EventBus();
  const events: string[] = [];
  bus.subscribe(({ event, data }) => {
    const record = data as Record<string, unknown>;
    const id = String(record.id ?? record.device);
    events.push(event === 'JOB_STATUS_CHANGE' ? `${id} ${String(record.status)}` : `${id} ${event}${record.error ? ` (${String(record.error)})` : ''}`);
  });
  return { jobs: new JobRegistry(bus, { lock: new MainLoopLock() }), events };
}

/** Two jobs in one transaction, started as a transaction's commit starts them. */
function twoGrouped(jobs: JobRegistry, first: Control, second: Control, autoFinalize = true): [Job, Job] {
  const txn = new JobTxn();
  const a = jobs.create(steppingKind('a', first), { id: 'a', autoFinalize, autoDismiss: true, txn });
  const b = jobs.create(steppingKind('b', second), { id: 'b', autoFinalize: true, autoDismiss: true, txn });
  for (const job of [a, b]) job.announce();
  for (const job of [a, b]) job.begin();
  return [a, b];
}

const tick = (count = 5) => (async () => {
  for (let i = 0; i < count; i++) await new Promise((resolve) => setImmediate(resolve));
})();

test('a job done waits for its peer; then both go pending and finalize together, newest first, every prepare before any commit', async () => {
  const { jobs, events } = harness();
  const log: string[] = [];
  const first = { finish: false, log };
  const second = { finish: false, log };
  const [a, b] = twoGrouped(jobs, first, second);
  first.finish = true;
  await tick(10);
  assert.equal(a.status, 'waiting');
  assert.equal(b.status, 'running');
  second.finish = true;
  await a.concluded();
  await b.concluded();
  assert.deepEqual(log, ['b prepare', 'a prepare', 'b commit', 'a commit']);
  assert.deepEqual(events.slice(4), [
    'a waiting', 'b waiting', 'b pending', 'a pending',
    'b BLOCK_JOB_COMPLETED', 'b concluded', 'b null', 'a BLOCK_JOB_COMPLETED', 'a concluded', 'a null',
  ]);
});

test('one job fails: the other is cancelled, the failing one reports its error, the peer CANCELLED (newest first)', async () => {
  const { jobs, events } = harness();
  const log: string[] = [];
  const first = { finish: false, log };
  const second: Control = { finish: false, log };
  twoGrouped(jobs, first, second);
  await tick();
  second.fail = 'Input/output error';
  await tick(20);
  assert.deepEqual(log, ['b abort', 'a abort']);
  assert.deepEqual(events.slice(4), [
    'b aborting', 'b BLOCK_JOB_COMPLETED (Input/output error)', 'b concluded', 'b null',
    'a aborting', 'a BLOCK_JOB_CANCELLED', 'a concluded', 'a null',
  ]);
});

test('cancelling a job that waits for its peer cancels both', async () => {
  const { jobs, events } = harness();
  const log: string[] = [];
  const first = { finish: true, log };
  const second = { finish: false, log };
  const [a, b] = twoGrouped(jobs, first, second);
  await tick(10);
  assert.equal(a.status, 'waiting');
  await a.cancel(true);
  await tick(10);
  assert.equal(b.status, 'null');
  assert.deepEqual(log, ['b abort', 'a abort']);
  assert.ok(events.includes('a BLOCK_JOB_CANCELLED') && events.includes('b BLOCK_JOB_CANCELLED'));
});

test('a prepare that fails aborts the whole transaction; one manual peer holds both in pending until a finalize of either', async () => {
  const { jobs, events } = harness();
  const log: string[] = [];
  const first: Control = { finish: true, log, failPrepare: 'graph change refused' };
  const second = { finish: true, log };
  const [a, b] = twoGrouped(jobs, first, second, false);
  await tick(10);
  assert.deepEqual([a.status, b.status], ['pending', 'pending']);
  assert.ok(events.includes('a BLOCK_JOB_PENDING') && !events.includes('b BLOCK_JOB_PENDING'));
  await b.finalize();
  assert.deepEqual(log, ['b prepare', 'a prepare', 'b abort', 'a abort']);
  assert.ok(events.includes('a BLOCK_JOB_COMPLETED (graph change refused)'));
});

test('a job created but never started (a transaction rolled back): aborting, concluded, null, no BLOCK_JOB event, and its peer too', async () => {
  const { jobs, events } = harness();
  const log: string[] = [];
  const txn = new JobTxn();
  const a = jobs.create(steppingKind('a', { finish: false, log }), { id: 'a', autoFinalize: true, autoDismiss: true, txn });
  a.announce();
  const b = jobs.create(steppingKind('b', { finish: false, log }), { id: 'b', autoFinalize: true, autoDismiss: true, txn });
  b.announce();
  await b.cancelUnstarted();
  assert.deepEqual(events, ['a created', 'b created', 'b aborting', 'b concluded', 'b null', 'a aborting', 'a concluded', 'a null']);
  assert.deepEqual(log, ['b abort', 'a abort']);
  await a.cancelUnstarted();
  assert.deepEqual(jobs.queryJobs(), []);
});
