/*
 * Power-loss test of internal snapshots: a guest writes through blockd into disk.qcow2 (its
 * file logged by blklogwrites) while snapshots are taken and one is deleted. The checker
 * replays the log at every flush and at random moments between flushes with writes not yet
 * durable dropped: qemu-img check finds no corruption, the disk reads as the guest's
 * flushed writes allow, and every snapshot the image lists reads exactly as the disk did
 * when it was taken.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { makeTempDir } from '../helpers/paths.js';
import { checkPowerLoss, describeReport } from '../helpers/power-loss/power-loss-checker.js';
import { recordInternalSnapshots } from '../helpers/power-loss/snapshot-scenarios.js';

test('internal snapshots taken and deleted under a writing guest survive a power loss at every flush and between flushes', async (t) => {
  const seed = 1801;
  const temp = makeTempDir();
  try {
    const scenario = await recordInternalSnapshots(temp.dir, seed);
    const report = await checkPowerLoss(scenario, { seed, randomPerEpoch: 2, singleDrops: true });
    t.diagnostic(describeReport(report));
    assert.deepEqual(report.failures, [], describeReport(report));
    assert.ok(report.points > 10, `only ${report.points} replay points`);
  } finally {
    temp.cleanup();
  }
});
