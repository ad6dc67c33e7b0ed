/*
 * Power-loss tests of block jobs: block-stream, an intermediate and an
 * active block-commit run in blockd with the files they write logged by
 * blklogwrites, and the checker replays the logs (merged across files through
 * their flush-seq marks: a commit writes the base, then the overlay's header)
 * at every flush and at random moments between flushes with writes dropped.
 * At every replay no image may be corrupt and the top of the chain must read
 * as before the job (plus what a guest flushed during the active commit);
 * once an active commit is done, the base alone must. Figures go to the
 * test's diagnostics.
 */
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import { makeTempDir } from '../helpers/paths.js';
import { recordActiveCommit, recordIntermediateCommit, recordStream } from '../helpers/power-loss/job-scenarios.js';
import { checkPowerLoss, describeReport, type PowerLossScenario } from '../helpers/power-loss/power-loss-checker.js';

/** Each write not yet durable dropped alone where the jobs' spans are short; random subsets where a guest makes them long. */
async function checkJob(t: TestContext, record: (dir: string) => Promise<PowerLossScenario>, seed: number, singleDrops = true): Promise<void> {
  const temp = makeTempDir();
  try {
    const report = await checkPowerLoss(await record(temp.dir), { seed, randomPerEpoch: 4, singleDrops });
    t.diagnostic(describeReport(report));
    assert.deepEqual(report.failures, [], describeReport(report));
    assert.ok(report.points > 10, `only ${report.points} replay points`);
  } finally {
    temp.cleanup();
  }
}

test('block-stream survives a power loss at every flush and between flushes', (t) => checkJob(t, recordStream, 1301));

test('an intermediate block-commit survives a power loss: base and overlay logs cut at one moment', (t) => checkJob(t, recordIntermediateCommit, 1302));

test('an active block-commit with a writing guest survives a power loss, and the base alone holds the top once done', (t) =>
  checkJob(t, (dir) => recordActiveCommit(dir, 1303), 1303, false));
