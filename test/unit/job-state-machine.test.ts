/*
 * The Job class against QEMU's observed event sequences (reference jobs.md
 * 4.1): a block job kind whose run steps through pause points until the test
 * lets it finish or fail, driven by the same verbs the QMP commands use.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { EventBus } from '../../src/event-bus.js';
import { JobRegistry } from '../../src/jobs/job-registry.js';
import { TRANSITIONS, VERBS } from '../../src/jobs/job-state-table.js';
import type { Job, JobKind } from '../../src/jobs/job.js';
import { QmpError } from '../../src/errors.js';
import type { CommandContext } from '../../src/command-table.js';
import { CommandRegistry } from '../../src/qmp/command-registry.js';
import { MainLoopLock } from '../../src/main-loop-lock.js';

/** A block job that advances one step per tick until released, or fails when told to. */
function steppingKind(control: { finish: boolean; fail?: string }): JobKind {
  return {
    type: 'stream',
    blockJob: true,
    async run(job: Job) {
      job.totalProgress = 100;
      job.startupReached();
      while (!control.finish) {
        await new Promise((resolve) => setImmediate(resolve));
        await job.pausePoint();
        if (control.fail) throw new Error(control.fail);
        job.currentProgress = Math.min(99, job.currentProgress + 1);
      }
      job.currentProgress = 100;
    },
  };
}

function harness() {
  const bus = new EventBus();
  const events: string[] = [];
  bus.subscribe(({ event, data }) => {
    const record = data as Record<string, unknown>;
    events.push(event === 'JOB_STATUS_CHANGE' ? String(record.status) : `${event}${record.error ? ` (${String(record.error)})` : ''}`);
  });
  const lock = new MainLoopLock();
  return { jobs: new JobRegistry(bus, { lock }), events, lock };
}

const tick = (count = 5) => (async () => {
  for (let i = 0; i < count; i++) await new Promise((resolve) => setImmediate(resolve));
})();

test('the tables are QEMU 7.2 job.c tables', () => {
  assert.deepEqual(TRANSITIONS.running, ['paused', 'ready', 'waiting', 'aborting']);
  assert.deepEqual(TRANSITIONS.pending, ['aborting', 'concluded']);
  assert.deepEqual(VERBS.dismiss, ['concluded']);
  assert.deepEqual(VERBS.finalize, ['pending']);
  assert.ok(!VERBS.cancel.includes('concluded'));
});

test('a job that finishes: created, running, waiting, pending, COMPLETED, concluded, null', async () => {
  const { jobs, events } = harness();
  const control = { finish: false };
  const job = jobs.start(steppingKind(control), { id: 's', autoFinalize: true, autoDismiss: true });
  await tick();
  control.finish = true;
  await job.concluded();
  assert.deepEqual(events, ['created', 'running', 'waiting', 'pending', 'BLOCK_JOB_COMPLETED', 'concluded', 'null']);
  assert.deepEqual(jobs.queryJobs(), []);
});

test('a failing job: aborting, COMPLETED with the error, concluded, null', async () => {
  const { jobs, events } = harness();
  const control = { finish: false, fail: '' };
  const job = jobs.start(steppingKind(control), { id: 's', autoFinalize: true, autoDismiss: true });
  control.fail = 'Input/output error';
  await job.concluded();
  assert.deepEqual(events, ['created', 'running', 'aborting', 'BLOCK_JOB_COMPLETED (Input/output error)', 'concluded', 'null']);
});

test('pause, resume, cancel of a paused job, and the verb checks', async () => {
  const { jobs, events } = harness();
  const job = jobs.start(steppingKind({ finish: false }), { id: 's', autoFinalize: true, autoDismiss: false });
  job.userPause();
  assert.throws(() => job.userPause(), (error: QmpError) => error.desc === 'Job is already paused');
  await tick();
  assert.equal(job.status, 'paused');
  job.userResume();
  assert.throws(() => job.userResume(), (error: QmpError) => error.desc === "Can't resume a job that was not paused");
  await tick();
  job.userPause();
  await tick();
  assert.throws(() => job.complete(), (error: QmpError) => error.desc === "Job 's' in state 'paused' cannot accept command verb 'complete'");
  job.cancel(false);
  await job.concluded();
  assert.deepEqual(events, ['created', 'running', 'paused', 'running', 'paused', 'running', 'aborting', 'BLOCK_JOB_CANCELLED', 'concluded']);
  assert.equal(jobs.queryJobs()[0]!.error, 'Operation canceled');
  assert.throws(() => job.checkVerb('cancel'), (error: QmpError) => error.desc === "Job 's' in state 'concluded' cannot accept command verb 'cancel'");
  job.dismiss();
  assert.equal(events.at(-1), 'null');
});

test('auto-finalize off: PENDING waits for finalize; cancel in pending aborts without applying', async () => {
  const { jobs, events } = harness();
  let prepared = 0;
  const first = jobs.start({ ...steppingKind({ finish: true }), prepare: async () => void prepared++ }, { id: 'a', autoFinalize: false, autoDismiss: false });
  await tick();
  assert.equal(first.status, 'pending');
  assert.deepEqual(events, ['created', 'running', 'waiting', 'pending', 'BLOCK_JOB_PENDING']);
  await first.finalize();
  assert.equal(prepared, 1);
  assert.deepEqual(events.slice(5), ['BLOCK_JOB_COMPLETED', 'concluded']);
  first.dismiss();

  events.length = 0;
  const second = jobs.start({ ...steppingKind({ finish: true }), prepare: async () => void prepared++ }, { id: 'b', autoFinalize: false, autoDismiss: true });
  await tick();
  second.cancel(true);
  await second.concluded();
  await tick();
  assert.equal(prepared, 1, 'a cancelled pending job never prepares');
  assert.deepEqual(events, ['created', 'running', 'waiting', 'pending', 'BLOCK_JOB_PENDING', 'aborting', 'BLOCK_JOB_CANCELLED', 'concluded', 'null']);
});

test('ids: invalid and duplicate ones are refused as QEMU words it', () => {
  const { jobs } = harness();
  assert.throws(() => jobs.start(steppingKind({ finish: false }), { id: 'bad id!', autoFinalize: true, autoDismiss: true }), (error: QmpError) => error.desc === "Invalid job ID 'bad id!'");
  const job = jobs.start(steppingKind({ finish: false }), { id: 'x', autoFinalize: true, autoDismiss: true });
  assert.throws(() => jobs.start(steppingKind({ finish: false }), { id: 'x', autoFinalize: true, autoDismiss: true }), (error: QmpError) => error.desc === "Job ID 'x' already in use");
  assert.throws(() => jobs.findBlockJob('nosuch'), (error: QmpError) => error.errorClass === 'DeviceNotActive' && error.desc === "Block job 'nosuch' not found");
  job.cancel(true);
});

test('the next command runs only after a dismissed job has let go of its nodes', async () => {
  const { jobs, events, lock } = harness();
  const registry = new CommandRegistry();
  registry.register('query-jobs', () => jobs.queryJobs());
  let letGo!: () => void;
  const steps: string[] = [];
  const kind: JobKind = {
    ...steppingKind({ finish: true }),
    release: () => new Promise<void>((resolve) => {
      letGo = () => {
        steps.push('released');
        resolve();
      };
    }),
  };
  jobs.start(kind, { id: 's', autoFinalize: true, autoDismiss: true });
  await tick(20);
  assert.equal(events.at(-1), 'null');
  // A client that saw 'null' sends a command now; it must not meet the job's nodes still held.
  // As the daemon runs a command: a section of its lock.
  const command = lock.run(() => registry.call('query-jobs', {}, { commandLog: () => undefined } as unknown as CommandContext)).then(() => steps.push('command ran'));
  await tick(10);
  assert.deepEqual(steps, []);
  letGo();
  await command;
  assert.deepEqual(steps, ['released', 'command ran']);
});
