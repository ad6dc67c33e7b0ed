/*
 * block-stream, blockd against qemu-storage-daemon in the same run: a 1 GiB
 * base (dense: all data; sparse: 10 % of it in scattered 64 KiB clusters)
 * under an empty qcow2 overlay, streamed whole into the overlay. The time
 * from the command to BLOCK_JOB_COMPLETED is compared (job-timing.ts); the
 * sparse case shows whether time follows the allocated data.
 * Run: node dist/bench/stream.js [--quick]
 */
import { join } from 'node:path';
import { QmpClient } from '../src/qmp/client.js';
import { compareDaemons, copySeconds, makeLayer, SIZE, type JobCase, type JobTiming } from './job-timing.js';

async function streamTiming(socket: string, dir: string): Promise<JobTiming> {
  const qmp = await QmpClient.connect(`unix:${socket}`);
  await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: join(dir, 'top.qcow2') } });
  const start = process.hrtime.bigint();
  const done = qmp.waitForEvent('BLOCK_JOB_COMPLETED', () => true);
  await qmp.execute('block-stream', { 'job-id': 's', device: 'top' });
  const event = await done;
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  if ((event.data as { error?: string }).error) throw new Error(`stream failed: ${(event.data as { error: string }).error}`);
  const copy = copySeconds(qmp);
  await qmp.execute('blockdev-del', { 'node-name': 'top' });
  await qmp.close();
  return { total: seconds, copy };
}

const streamCase = (fill: 'dense' | 'sparse'): JobCase => ({
  job: 'stream',
  fill,
  prepare: (dir) => {
    makeLayer(dir, 'base.qcow2', fill);
    makeLayer(dir, 'top.qcow2', 'empty', 'base.qcow2');
  },
  measure: streamTiming,
});

await compareDaemons(`block-stream of a ${SIZE >> 20} MiB chain`, [streamCase('dense'), streamCase('sparse')]);
