/*
 * The lock that makes commands, job ends and the shutdown run one at a time:
 * sections in arrival order, and a holder waiting for a job lets that job's
 * section in (else a command waiting for a job to end would wait forever).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MainLoopLock } from '../../src/main-loop-lock.js';

/** Every microtask queued so far has run (what a section could do without I/O, it has done). */
const turn = () => new Promise((resolve) => setImmediate(resolve));

function gate(): { open: () => void; opened: Promise<void> } {
  let open!: () => void;
  const opened = new Promise<void>((resolve) => (open = resolve));
  return { open, opened };
}

test('sections run one at a time, in arrival order', async () => {
  const lock = new MainLoopLock();
  const steps: string[] = [];
  const first = gate();
  const a = lock.run(async () => {
    steps.push('a starts');
    await first.opened;
    steps.push('a ends');
  });
  const b = lock.run(async () => void steps.push('b'));
  const c = lock.run(async () => void steps.push('c'));
  await turn();
  assert.deepEqual(steps, ['a starts']);
  first.open();
  await Promise.all([a, b, c]);
  assert.deepEqual(steps, ['a starts', 'a ends', 'b', 'c']);
  assert.equal(lock.busy, false);
});

test("a holder waiting for an owner lets the owner's sections in, and only those", async () => {
  const lock = new MainLoopLock();
  const job = {};
  const steps: string[] = [];
  const jobEnded = gate();
  let jobSection: Promise<void> | undefined;
  const command = lock.run(async () => {
    steps.push('command starts');
    // The job's end is queued now, behind the command, as is another command.
    jobSection = lock.run(async () => {
      steps.push('job section');
      await turn();
      jobEnded.open();
      await turn();
      steps.push('job section ends');
    }, job);
    void lock.run(async () => void steps.push('other command'));
    await lock.lend(job, jobEnded.opened);
    steps.push('command ends');
  });
  await command;
  await jobSection;
  await turn();
  assert.deepEqual(steps, ['command starts', 'job section', 'job section ends', 'command ends', 'other command']);
});

test('lending outside any section changes nothing', async () => {
  const lock = new MainLoopLock();
  assert.equal(await lock.lend({}, Promise.resolve(7)), 7);
  assert.equal(lock.busy, false);
});
