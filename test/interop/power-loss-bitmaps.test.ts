/*
 * Power-loss test of crash-consistent persistent bitmaps (issue 12, item 4): a guest writes
 * through blockd into a qcow2 image with persistent bitmaps (added over QMP just before, two
 * enabled, one disabled), its file logged by blklogwrites; the checker replays the logs at
 * every flush and at random moments between flushes with writes dropped, and at each replay
 * from the moment block-dirty-bitmap-add returned, blockd opens the image: every enabled
 * bitmap must load consistent and be dirty at every sector that differs from what the disk
 * read before the writes (besides no corruption and no flushed write lost); the same for
 * bitmaps qemu-img put in the image before blockd opened it, at every replay. The probe at
 * the end of the logs of a run whose bitmaps qemu-img added (a clean close stored them) must
 * pass on any blockd: that proves the probe reads the bits it judges.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { makeTempDir } from '../helpers/paths.js';
import { recordBitmapWrites } from '../helpers/power-loss/bitmap-scenarios.js';
import { checkPowerLoss, describeReport } from '../helpers/power-loss/power-loss-checker.js';
import { BitmapReader } from '../helpers/reloaded-bitmaps.js';

/** One daemon opens every image again after its crash (a blockdev-add each time). */
const reader = BitmapReader.forTestFile();

test('after a clean close, the bitmaps blockd stored cover every sector the guest changed (the probe reads real bits)', async (t) => {
  const seed = 1401;
  const temp = makeTempDir();
  try {
    const { scenario, probed } = await recordBitmapWrites(temp.dir, seed, 3, reader(), true);
    const report = await checkPowerLoss(scenario, { seed, flushPoints: false, epochs: [] });
    t.diagnostic(`${describeReport(report)}; most changed sectors ${probed.mostChangedSectors}`);
    assert.deepEqual(report.failures, [], describeReport(report));
    assert.deepEqual([report.points, probed.states], [1, 1], 'only the end of the logs is replayed');
    assert.ok(probed.mostChangedSectors > 0, 'the guest changed sectors the bitmaps must cover');
  } finally {
    temp.cleanup();
  }
});

const CASES = [
  { seed: 1402, preexisting: false, name: 'persistent bitmaps survive a power loss at every flush and between flushes, covering every sector that changed' },
  { seed: 1403, preexisting: true, name: 'bitmaps the image already had (added by qemu-img) survive a power loss at any moment after blockd opened it' },
];

for (const { seed, preexisting, name } of CASES) {
  test(name, async (t) => {
    const temp = makeTempDir();
    try {
      const { scenario, probed } = await recordBitmapWrites(temp.dir, seed, 4, reader(), preexisting);
      const report = await checkPowerLoss(scenario, { seed, randomPerEpoch: 2, singleDrops: true });
      t.diagnostic(`${describeReport(report)}; bitmaps probed in ${probed.states} states, most changed sectors ${probed.mostChangedSectors}`);
      assert.deepEqual(report.failures, [], describeReport(report));
      assert.ok(probed.states > 10, `bitmaps probed in only ${probed.states} states`);
    } finally {
      temp.cleanup();
    }
  });
}
