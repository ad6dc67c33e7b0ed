/*
 * A job's end (prepare, commit or abort, clean, its events, its release) is one
 * section of the daemon's lock, as in QEMU it is one main-loop step: a command
 * sent while any phase of it is under way (held open here by the test) runs
 * only after the job's last event. And the phases that cannot fail do not: a
 * commit, abort, clean or release that throws is logged, the job still sends
 * its events and ends, and no promise rejection goes unhandled.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { pino } from 'pino';
import type { CommandContext } from '../../src/command-table.js';
import { EventBus } from '../../src/event-bus.js';
import { registerJobCommands } from '../../src/jobs/commands.js';
import { JobRegistry } from '../../src/jobs/job-registry.js';
import type { Job, JobKind } from '../../src/jobs/job.js';
import { MainLoopLock } from '../../src/main-loop-lock.js';
import { CommandRegistry } from '../../src/qmp/command-registry.js';

type Phase = 'prepare' | 'commit' | 'abort' | 'clean' | 'release';

/** Every microtask queued so far has run: whatever a command could do without I/O, it has done. */
const turn = () => new Promise((resolve) => setImmediate(resolve));

let unhandled = 0;
const countUnhandled = () => void unhandled++;
before(() => process.on('unhandledRejection', countUnhandled));
after(() => {
  process.off('unhandledRejection', countUnhandled);
  assert.equal(unhandled, 0, 'no promise rejection went unhandled');
});

/** A daemon's worth of jobs: the lock, the job commands, and a record of events, phases and replies in order. */
function daemonParts() {
  const steps: string[] = [];
  const errors: { msg: string; step?: string }[] = [];
  const bus = new EventBus();
  bus.subscribe(({ event, data }) => {
    const record = data as Record<string, unknown>;
    steps.push(event === 'JOB_STATUS_CHANGE' ? String(record.status) : `${event}${record.error ? ` (${String(record.error)})` : ''}`);
  });
  const lock = new MainLoopLock();
  const log = pino({ level: 'error' }, { write: (line: string) => void errors.push(JSON.parse(line) as { msg: string }) });
  const jobs = new JobRegistry(bus, { lock, log });
  const registry = new CommandRegistry();
  registerJobCommands(registry, jobs);
  const context = { commandLog: () => log } as unknown as CommandContext;
  /** Sends a command, run as the daemon runs it (a section of the lock); its reply joins the record when it comes. */
  const command = (name: string, args: Record<string, string> = {}) => lock.run(() => registry.call(name, args, context)).then(
    (reply) => void steps.push(`${name}: ${JSON.stringify(reply)}`),
    (error: Error & { desc?: string }) => void steps.push(`${name}: ${error.desc ?? error.message}`),
  );
  return { steps, errors, jobs, command };
}

/** A stream-like job whose end phases note themselves; one may be held open, some may throw. */
function phasedKind(steps: string[], options: { fail?: boolean; hold?: Phase; broken?: Phase[] }) {
  let reached!: () => void;
  const holding = new Promise<void>((resolve) => (reached = resolve));
  let letGo!: () => void;
  const released = new Promise<void>((resolve) => (letGo = resolve));
  const phase = (name: Phase) => async () => {
    steps.push(name);
    if (options.broken?.includes(name)) throw new Error(`${name} broke`);
    if (options.hold === name) {
      reached();
      await released;
      steps.push(`${name} ends`);
    }
  };
  const kind: JobKind = {
    type: 'stream',
    blockJob: true,
    async run(job: Job) {
      job.totalProgress = 1;
      job.startupReached();
      await turn();
      if (options.fail) throw new Error('Input/output error');
      job.currentProgress = 1;
    },
    prepare: phase('prepare'), commit: phase('commit'), abort: phase('abort'), clean: phase('clean'), release: phase('release'),
  };
  return { kind, holding, letGo };
}

const SUCCESS = ['created', 'running', 'waiting', 'pending', 'prepare', 'commit', 'clean', 'BLOCK_JOB_COMPLETED', 'concluded', 'null', 'release'];
const FAILURE = ['created', 'running', 'aborting', 'abort', 'clean', 'BLOCK_JOB_COMPLETED (Input/output error)', 'concluded', 'null', 'release'];

for (const { hold, fail } of [
  { hold: 'prepare', fail: false }, { hold: 'commit', fail: false }, { hold: 'clean', fail: false },
  { hold: 'abort', fail: true }, { hold: 'clean', fail: true }, { hold: 'release', fail: false },
] as const) {
  test(`commands sent during ${hold} (${fail ? 'failed' : 'successful'} job) run after the job's last event`, async () => {
    const { steps, jobs, command } = daemonParts();
    const { kind, holding, letGo } = phasedKind(steps, { hold, fail });
    jobs.start(kind, { id: 's', autoFinalize: true, autoDismiss: true });
    await holding;
    const commands = [command('job-cancel', { id: 's' }), command('job-dismiss', { id: 's' }), command('query-jobs')];
    await turn();
    letGo();
    await Promise.all(commands);
    const events = [...(fail ? FAILURE : SUCCESS)];
    events.splice(events.indexOf(hold) + 1, 0, `${hold} ends`);
    assert.deepEqual(steps, [...events, 'job-cancel: Job not found', 'job-dismiss: Job not found', 'query-jobs: []']);
  });
}

test('a job that waits for finalize: job-cancel sent while job-finalize prepares meets it concluded', async () => {
  const { steps, jobs, command } = daemonParts();
  const { kind, holding, letGo } = phasedKind(steps, { hold: 'prepare' });
  const job = jobs.start(kind, { id: 's', autoFinalize: false, autoDismiss: false });
  while (job.status !== 'pending') await turn();
  const finalize = command('job-finalize', { id: 's' });
  await holding;
  const cancel = command('job-cancel', { id: 's' });
  await turn();
  letGo();
  await Promise.all([finalize, cancel]);
  assert.deepEqual(steps, [
    'created', 'running', 'waiting', 'pending', 'BLOCK_JOB_PENDING', 'prepare', 'prepare ends', 'commit', 'clean', 'BLOCK_JOB_COMPLETED', 'concluded',
    'job-finalize: {}', "job-cancel: Job 's' in state 'concluded' cannot accept command verb 'cancel'",
  ]);
});

test('commit, abort, clean and release that throw are logged; the job still ends, with its events', async () => {
  for (const { fail, broken, events } of [
    { fail: false, broken: ['commit', 'clean', 'release'] as Phase[], events: SUCCESS },
    { fail: true, broken: ['abort', 'clean', 'release'] as Phase[], events: FAILURE },
  ]) {
    const { steps, errors, jobs, command } = daemonParts();
    const { kind } = phasedKind(steps, { fail, broken });
    const job = jobs.start(kind, { id: 's', autoFinalize: true, autoDismiss: true });
    await job.concluded();
    await command('query-jobs');
    assert.deepEqual(steps, [...events, 'query-jobs: []']);
    assert.deepEqual(errors.map((error) => error.step), broken, 'each failure logged at error level');
  }
});

test('a release that throws on job-dismiss is logged; the command succeeds and the next one runs', async () => {
  const { steps, errors, jobs, command } = daemonParts();
  const { kind } = phasedKind(steps, { broken: ['release'] });
  const job = jobs.start(kind, { id: 's', autoFinalize: true, autoDismiss: false });
  await job.concluded();
  await command('job-dismiss', { id: 's' });
  await command('query-jobs');
  assert.deepEqual(steps.slice(-4), ['null', 'release', 'job-dismiss: {}', 'query-jobs: []']);
  assert.deepEqual(errors.map((error) => error.msg), ["job 's': release failed; the job goes on"]);
});
