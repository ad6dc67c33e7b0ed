/*
 * Copy-on-read against client writes to the same clusters: the filter reads
 * data from the backing chain and writes it into the top image; a client write
 * acknowledged in between must never be overwritten with the older data. The
 * backing file reads through a throttle node, so every copy-up and every
 * partial-cluster write (whose copy-on-write reads the backing file) is slow and
 * the two overlap often. qemu-io clients (QEMU's NBD client, many requests in
 * flight) read and write through an NBD export, of a copy-on-read node and of a
 * node being streamed; the image must then hold exactly what a model of the
 * acknowledged writes says, and pass qemu-img check.
 */
import assert from 'node:assert/strict';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { QmpClient } from '../../src/qmp/client.js';
import { runBlockd } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { assertCheckClean, convertToRaw, createQcow2, KiB, MiB, qemuImgCompare, qemuIo, qemuIoInBackground, runQemuImg, SeededRandom, testSeeds } from '../helpers/qemu-tools.js';

const SIZE = 16 * MiB;
const CLUSTER = 64 * KiB;
const BATCHES = 8;
/** Backing reads (copy-ups and copy-on-write alike) at 4 MiB/s: a 64 KiB cluster takes ~16 ms. */
const BACKING_BPS_READ = 4 * MiB;

const temp = makeTempDir();
after(() => temp.cleanup());

/** base <- top, with a different pattern in each MiB of the base; returns what the top reads. */
async function makeChain(dir: string): Promise<Buffer> {
  createQcow2(join(dir, 'base.qcow2'), SIZE);
  qemuIo(join(dir, 'base.qcow2'), Array.from({ length: SIZE / MiB }, (_, i) => `write -P 0x${(0x10 + i).toString(16)} ${i * MiB} 1M`), ['-f', 'qcow2']);
  createQcow2(join(dir, 'top.qcow2'), undefined, { backing: { path: 'base.qcow2', format: 'qcow2' } });
  convertToRaw(join(dir, 'top.qcow2'), join(dir, 'initial.raw'));
  return readFile(join(dir, 'initial.raw'));
}

/** The blockd options for the chain: the base reads through a throttle node ('slow'). */
function chainOptions(dir: string): string[] {
  return [
    '--object', `throttle-group,id=tg,limits.bps-read=${BACKING_BPS_READ}`,
    '--blockdev', `driver=qcow2,node-name=base,file.driver=file,file.filename=${join(dir, 'base.qcow2')}`,
    '--blockdev', 'driver=throttle,node-name=slow,throttle-group=tg,file=base',
    '--blockdev', `driver=qcow2,node-name=top,file.driver=file,file.filename=${join(dir, 'top.qcow2')},backing=slow`,
    '--nbd-server', `addr.type=unix,addr.path=${join(dir, 'nbd.sock')}`,
    '--qmp', `unix:${join(dir, 'qmp.sock')}`,
  ];
}

/** The byte run of one value that starts at `offset` in the model, up to `length` bytes. */
function uniformRun(model: Buffer, offset: number, length: number): number {
  let end = offset + 1;
  while (end < offset + length && model[end] === model[offset]) end++;
  return end - offset;
}

/**
 * One batch of requests that are all in flight together: small writes inside clusters (never
 * two over the same bytes, so the model knows the outcome) and reads across them, most of
 * them on a few clusters of the batch. The model takes the writes; reads that no write of the
 * batch touches check what they get.
 */
function makeBatch(random: SeededRandom, model: Buffer): { writer: string[]; reader: string[] } {
  const hot = Array.from({ length: 8 }, () => random.int(SIZE / CLUSTER));
  const somewhere = () => (random.chance(0.8) ? random.pick(hot) : random.int(SIZE / CLUSTER)) * CLUSTER + random.int(CLUSTER / (4 * KiB)) * 4 * KiB;
  const writes: { offset: number; length: number }[] = [];
  const writer: string[] = [];
  const reader: string[] = [];
  for (let i = 0; i < 48; i++) {
    const offset = somewhere();
    if (random.chance(0.5)) {
      const length = Math.min((1 + random.int(4)) * 4 * KiB, CLUSTER - (offset % CLUSTER));
      if (writes.some((write) => offset < write.offset + write.length && write.offset < offset + length)) continue;
      writes.push({ offset, length });
      if (random.chance(0.15)) {
        writer.push(`aio_write -q -z ${offset} ${length}`);
        model.fill(0, offset, offset + length);
      } else {
        const pattern = 0x40 + random.int(0x30);
        writer.push(`aio_write -q -P 0x${pattern.toString(16)} ${offset} ${length}`);
        model.fill(pattern, offset, offset + length);
      }
    } else {
      const length = Math.min((1 + random.int(16)) * 4 * KiB, SIZE - offset);
      (random.chance(0.5) ? writer : reader).push(`aio_read -q ${offset} ${length}`);
    }
  }
  // Checked reads: only where no write of the batch lands, so what they must read is known.
  for (let i = 0; i < 12; i++) {
    const offset = somewhere();
    const length = uniformRun(model, offset, Math.min(128 * KiB, SIZE - offset));
    if (writes.some((write) => offset < write.offset + write.length && write.offset < offset + length)) continue;
    reader.push(`aio_read -q -P 0x${model[offset]!.toString(16)} ${offset} ${length}`);
  }
  writer.push('aio_flush');
  reader.push('aio_flush');
  return { writer, reader };
}

/** Two NBD clients at once, batch after batch: one writes and reads, the other reads. */
async function hammer(random: SeededRandom, uri: string, model: Buffer, beforeLastBatch?: () => Promise<void>): Promise<void> {
  for (let batch = 0; batch < BATCHES; batch++) {
    if (batch === BATCHES - 1) await beforeLastBatch?.();
    const { writer, reader } = makeBatch(random, model);
    await Promise.all([qemuIoInBackground(uri, writer, ['-f', 'raw']), qemuIoInBackground(uri, reader, ['-f', 'raw'])]);
  }
}

async function assertImageIs(dir: string, model: Buffer, context: string): Promise<void> {
  await writeFile(join(dir, 'model.raw'), model);
  qemuImgCompare(join(dir, 'model.raw'), join(dir, 'top.qcow2'), ['raw', 'qcow2'], context);
  assertCheckClean(join(dir, 'top.qcow2'), context);
}

for (const seed of testSeeds([11, 12])) {
  test(`copy-on-read node exported over NBD: reads copy up, client writes are never lost (seed ${seed})`, async () => {
    const dir = join(temp.dir, `cor-${seed}`);
    await mkdir(dir);
    const model = await makeChain(dir);
    const blockd = await runBlockd([
      ...chainOptions(dir),
      '--blockdev', 'driver=copy-on-read,node-name=cor,file=top',
      '--export', 'type=nbd,id=e0,node-name=cor,name=cor,writable=on',
    ]);
    try {
      await hammer(new SeededRandom(seed), `nbd+unix:///cor?socket=${join(dir, 'nbd.sock')}`, model);
    } finally {
      await blockd.stop();
    }
    await assertImageIs(dir, model, `copy-on-read, seed ${seed}`);
  });

  test(`block-stream with a client reading and writing through the export: no write is lost (seed ${seed})`, async () => {
    const dir = join(temp.dir, `stream-${seed}`);
    await mkdir(dir);
    const model = await makeChain(dir);
    const blockd = await runBlockd([...chainOptions(dir), '--export', 'type=nbd,id=e0,node-name=top,name=top,writable=on']);
    let statusDuringIo: string | undefined;
    try {
      const qmp = await QmpClient.connect(`unix:${join(dir, 'qmp.sock')}`);
      // Slow enough that the job still runs when the clients are done.
      await qmp.execute('block-stream', { 'job-id': 's', device: 'top', speed: 256 * KiB });
      await hammer(new SeededRandom(seed), `nbd+unix:///top?socket=${join(dir, 'nbd.sock')}`, model, async () => {
        statusDuringIo = ((await qmp.execute('query-jobs')) as { status: string }[])[0]?.status;
      });
      const completed = qmp.waitForEvent('BLOCK_JOB_COMPLETED', undefined, 120_000);
      await qmp.execute('block-job-set-speed', { device: 's', speed: 0 });
      assert.equal((await completed).data?.error, undefined, 'the stream succeeded');
      await qmp.close();
    } finally {
      await blockd.stop();
    }
    assert.equal(statusDuringIo, 'running', 'the clients worked while the job ran');
    await assertImageIs(dir, model, `stream, seed ${seed}`);
    const info = JSON.parse(runQemuImg('info', '--output=json', join(dir, 'top.qcow2'))) as { 'backing-filename'?: string };
    assert.equal(info['backing-filename'], undefined, 'the whole chain was streamed');
  });
}
