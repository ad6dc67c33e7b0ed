/*
 * Power-loss tests of guest writes: a guest (qemu-io over NBD) writes through
 * blockd into qcow2 images whose files are logged by blklogwrites, and the
 * checker replays the logs at every flush and at random moments between
 * flushes with writes dropped: no replay may be corrupt, and every write the
 * guest saw flushed must read back. Scenarios: allocating writes (partial
 * clusters over a backing file, so a lost copy shows), an external snapshot
 * taken under the writing guest, and an image made by blockdev-create then
 * written; compressed writes (in process). The checker's figures go to the test's diagnostics.
 */
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import { makeTempDir } from '../helpers/paths.js';
import { checkPowerLoss, describeReport, type PowerLossScenario } from '../helpers/power-loss/power-loss-checker.js';
import { recordAllocatingWrites, recordCompressedWrites, recordCreatedImage, recordExternalSnapshot } from '../helpers/power-loss/write-scenarios.js';

async function assertNoLoss(t: TestContext, scenario: PowerLossScenario, seed: number): Promise<void> {
  const report = await checkPowerLoss(scenario, { seed, randomPerEpoch: 3, singleDrops: true });
  t.diagnostic(describeReport(report));
  assert.deepEqual(report.failures, [], describeReport(report));
  assert.ok(report.points > 10, `only ${report.points} replay points`);
}

test('qcow2 allocating writes survive a power loss at every flush and between flushes', async (t) => {
  const seed = 1101;
  const temp = makeTempDir();
  try {
    await assertNoLoss(t, await recordAllocatingWrites(temp.dir, seed, 8), seed);
  } finally {
    temp.cleanup();
  }
});

test('an external snapshot taken under a writing guest survives a power loss (base and overlay logs merged)', async (t) => {
  const seed = 1102;
  const temp = makeTempDir();
  try {
    await assertNoLoss(t, await recordExternalSnapshot(temp.dir, seed), seed);
  } finally {
    temp.cleanup();
  }
});

test('an image made by blockdev-create is never a corrupt qcow2 and, once the job is done, holds what the guest flushed', async (t) => {
  const seed = 1103;
  const temp = makeTempDir();
  try {
    await assertNoLoss(t, await recordCreatedImage(temp.dir, seed), seed);
  } finally {
    temp.cleanup();
  }
});

test('compressed writes packed into shared host clusters survive a power loss at every flush and between flushes', async (t) => {
  const seed = 1104;
  const temp = makeTempDir();
  try {
    await assertNoLoss(t, await recordCompressedWrites(temp.dir, seed, 6), seed);
  } finally {
    temp.cleanup();
  }
});
