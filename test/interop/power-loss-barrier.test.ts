/*
 * The power-loss checker finds a missing flush barrier. A real run of qcow2
 * allocating writes is recorded; in its log, the flush between refcount
 * updates and the L2 table update that relies on them is turned into a plain
 * mark, as if blockd had not issued it. Replayed at random moments around
 * that place, the intact log shows no problem and the edited one shows a
 * replay that qemu-img check calls corrupt or that lost flushed data.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { parseWriteLog } from '../../src/blockdev/drivers/blklogwrites/log-format.js';
import { makeTempDir } from '../helpers/paths.js';
import { barriersBeforeL2Updates, metadataClusters, withoutFlush } from '../helpers/power-loss/barrier-removal.js';
import { LogTimeline } from '../helpers/power-loss/crash-states.js';
import { checkPowerLoss, describeReport } from '../helpers/power-loss/power-loss-checker.js';
import { recordAllocatingWrites } from '../helpers/power-loss/write-scenarios.js';

test('without the flush between refcount and L2 updates, a power loss corrupts the image', async (t) => {
  const seed = 1201;
  const temp = makeTempDir();
  try {
    const scenario = await recordAllocatingWrites(temp.dir, seed, 4);
    const log = parseWriteLog(await readFile(scenario.logs[0]!));
    const barriers = barriersBeforeL2Updates(log, metadataClusters(join(temp.dir, 'disk.qcow2')));
    assert.ok(barriers.length > 0, 'the run has a flush between refcount updates and an L2 table update');
    const removed = barriers[0]!;
    // The epoch the flush opened: after the edit, everything since the flush before it is one span, which the
    // checker replays with each write left out alone, and at random moments with random writes left out.
    const options = { seed, singleDrops: true, randomPerEpoch: 20, epochs: [new LogTimeline([log]).epochOf(0, removed)], flushPoints: false };

    const intact = await checkPowerLoss(scenario, options);
    t.diagnostic(`intact log: ${describeReport(intact)}`);
    assert.deepEqual(intact.failures, [], describeReport(intact));

    const broken = await checkPowerLoss({ ...scenario, name: `without flush entry ${removed}` }, { ...options, parsedLogs: [withoutFlush(log, removed)] });
    t.diagnostic(`edited log: ${describeReport(broken)}`);
    for (const failure of broken.failures.slice(0, 2)) t.diagnostic(failure);
    assert.ok(broken.corrupt + broken.lost > 0, `no replay shows the missing barrier: ${describeReport(broken)}`);
  } finally {
    temp.cleanup();
  }
});
