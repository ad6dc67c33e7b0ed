/*
 * blockdev-mirror is crash-safe (issue 13, acceptance "Crash test"): blockd is killed with
 * SIGKILL while three NBD connections keep writes in flight into the source (random ranges,
 * some unaligned, write-zeroes, FUA, flushes), at a random acknowledgement while the initial
 * copy runs, while READY, right after job-complete was sent (the pivot may be under way) or
 * after BLOCK_JOB_COMPLETED, or as that event arrives (before a guest flush can hide a
 * target the job did not flush), for sync full, top and none in both copy modes. After each kill qemu-img check finds no corruption (leaks allowed), and a fresh
 * blockd opens the images again and reads them over NBD (QEMU reading the files must agree):
 * - the source reads as the acknowledged writes: each byte holds what the last write there
 *   that a flush or FUA made durable left, or what a later write left (acknowledged or in
 *   flight), and where no durable write reached, maybe still what it held before; bytes no
 *   write touched hold what they held before;
 * - once BLOCK_JOB_COMPLETED was seen, the target does the same, every write acknowledged
 *   before job-complete counting as durable there (the job flushed the target before the
 *   pivot).
 * A failure names its seed and round; BLOCKD_MODEL_SEED=N runs seed N too.
 */
import assert from 'node:assert/strict';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test, type TestContext } from 'node:test';
import type { MirrorCopyMode } from '../../src/generated/qapi-types.js';
import { QmpClient } from '../../src/qmp/client.js';
import { assertReadsAsAckedWrites } from '../helpers/acked-write-model.js';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { mirrorChainTemplate, mirrorNodes, WRITE_REGIONS, type MirrorSync } from '../helpers/mirror-images.js';
import { AckedWriter, type AckedWrite } from '../helpers/nbd-acked-writes.js';
import { makeTempDir } from '../helpers/paths.js';
import { MiB, qemuImgCheck, qemuImgCompare, runQemuImg, SeededRandom, testSeeds } from '../helpers/qemu-tools.js';

/** When the kill comes: at a random acknowledgement of a phase, or (`pivoted`) as BLOCK_JOB_COMPLETED arrives. */
type KillMoment = 'copying' | 'ready' | 'completing' | 'pivoted' | 'writing-after-pivot';
const MOMENTS: KillMoment[] = ['copying', 'ready', 'completing', 'pivoted', 'writing-after-pivot'];
const MODES: MirrorCopyMode[] = ['background', 'write-blocking'];
const SYNCS: MirrorSync[] = ['full', 'top', 'none'];

const root = makeTempDir('blockd-mirror-crash-');
let copyImages: ReturnType<typeof mirrorChainTemplate>;
/** The blockd that opens the images again after each crash. */
let reader: { blockd: BlockdProcess; qmp: QmpClient; socket: string; opened: number } | undefined;

before(async () => {
  copyImages = mirrorChainTemplate(join(root.dir, 'template'));
  const socket = join(root.dir, 'reader-nbd.sock');
  const blockd = await runBlockd(['--nbd-server', `addr.type=unix,addr.path=${socket}`, '--qmp', `unix:${join(root.dir, 'reader-qmp.sock')}`]);
  reader = { blockd, qmp: await QmpClient.connect(`unix:${join(root.dir, 'reader-qmp.sock')}`), socket, opened: 0 };
});

after(async () => {
  await reader?.qmp.close();
  await reader?.blockd.stop();
  root.cleanup();
});

/** What blockd reads in `image` (with the chain its header names) when it opens it again, as a raw file next to it; QEMU must read the same. */
async function readAfterCrash(image: string, context: string): Promise<Buffer> {
  const { qmp, socket } = reader!;
  const node = `reopened${reader!.opened++}`;
  await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': node, 'read-only': true, file: { driver: 'file', filename: image } } as never);
  try {
    await qmp.execute('block-export-add', { type: 'nbd', id: node, 'node-name': node });
    const raw = `${image}.reopened.raw`;
    runQemuImg('convert', '-f', 'raw', '-O', 'raw', `nbd+unix:///${node}?socket=${socket}`, raw);
    const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (event) => (event.data as { id: string }).id === node);
    await qmp.execute('block-export-del', { id: node });
    await deleted;
    qemuImgCompare(raw, image, ['raw', 'qcow2'], `${context}: QEMU reads ${image} as blockd does`);
    return readFileSync(raw);
  } finally {
    await qmp.execute('blockdev-del', { 'node-name': node });
  }
}

function assertNotCorrupt(image: string, context: string): number {
  const check = qemuImgCheck(image);
  assert.ok(check.corruptions === 0 && check.checkErrors === 0 && (check.status === 0 || check.status === 3), `${context}: qemu-img check ${image}: ${check.output}`);
  return check.leaks;
}

interface Round {
  seed: number;
  round: number;
  moment: KillMoment;
  mode: MirrorCopyMode;
  sync: MirrorSync;
}

async function crashRound(t: TestContext, { seed, round, moment, mode, sync }: Round): Promise<void> {
  const random = new SeededRandom(seed * 1000 + round);
  const context = `seed ${seed}, round ${round} (sync=${sync}, ${mode}, killed ${moment})`;
  const dir = join(root.dir, `round${seed}-${round}`);
  const path = (name: string) => join(dir, name);
  const { target, targetInitial: targetInitialRaw } = copyImages(dir, sync);
  const sourceInitial = readFileSync(path('m-expected.raw'));
  const targetInitial = sync === 'none' ? readFileSync(targetInitialRaw) : sourceInitial;

  const blockd = await runBlockd([
    ...mirrorNodes(dir, target, sync).flatMap((node) => ['--blockdev', JSON.stringify(node)]),
    '--nbd-server', `addr.type=unix,addr.path=${path('nbd.sock')}`,
    '--export', 'type=nbd,id=guest,node-name=src,name=guest,writable=on',
    '--qmp', `unix:${path('qmp.sock')}`,
  ]);
  const qmp = await QmpClient.connect(`unix:${path('qmp.sock')}`);
  let writer: AckedWriter | undefined;
  let killAt = Infinity;
  let completeSentAt = Infinity;
  let completedSeen = false;
  let pivoted = false;
  const kill = () => {
    pivoted = completedSeen;
    killAt = -1;
    writer?.stop();
    blockd.child.kill('SIGKILL');
  };
  try {
    const ready = qmp.waitForEvent('BLOCK_JOB_READY');
    ready.catch(() => {});
    const completed = qmp.waitForEvent('BLOCK_JOB_COMPLETED', () => true, 60_000);
    completed.then(() => {
      completedSeen = true;
      if (moment === 'pivoted') kill();
    }, () => {});
    const slow = moment === 'copying';
    await qmp.execute('blockdev-mirror', { 'job-id': 'm', device: 'src', target: 'tgt', sync, 'copy-mode': mode, ...(slow ? { speed: 64 * 1024, 'buf-size': 1 * MiB } : {}) });
    // A background mirror converges once the guest lets it: the guest starts once READY.
    if (!slow && mode === 'background') await ready;
    writer = await AckedWriter.start({
      socket: path('nbd.sock'), exportName: 'guest', regions: WRITE_REGIONS, random, exclusive: true,
      onAck: (acked) => {
        if (acked === killAt) kill();
      },
    });
    const killAfter = (acks: number) => {
      killAt = writer!.acked.length + acks;
    };
    if (moment === 'copying') killAfter(1 + random.int(150));
    else {
      await ready;
      if (moment === 'ready') killAfter(1 + random.int(150));
      else {
        await writer.acknowledged(writer.acked.length + 1 + random.int(60));
        const acksAfterComplete = random.int(40);
        completeSentAt = writer.now();
        const complete = qmp.execute('job-complete', { id: 'm' }).catch(() => {});
        if (moment === 'completing') {
          if (acksAfterComplete === 0) kill();
          else killAfter(acksAfterComplete);
        } else {
          await complete;
          await completed; // `pivoted`: killed as it arrived
          if (moment === 'writing-after-pivot') killAfter(1 + random.int(100));
        }
      }
    }
    await writer.finished();
  } finally {
    if (killAt !== -1) kill(); // an assertion failed before the kill: the daemon goes all the same
    await qmp.close().catch(() => {});
  }
  const exit = await blockd.exited;
  assert.equal(exit.signal, 'SIGKILL', `${context}: blockd exited ${exit.code} before the kill: ${blockd.stderr()}`);

  const leaks = ['m-base', 'm-mid', 'm-top', 'm-target'].map((image) => assertNotCorrupt(path(`${image}.qcow2`), context));
  const sent = writer!.sent;
  const source = await readAfterCrash(path('m-top.qcow2'), context);
  const durableOnSource = (write: AckedWrite) => write.durableAt > 0 && write.durableAt < completeSentAt;
  assertReadsAsAckedWrites(source, sourceInitial, sent, durableOnSource, `${context}: the source`);
  if (pivoted) {
    const copied = await readAfterCrash(target, context);
    const durableOnTarget = (write: AckedWrite) => write.durableAt > 0 || (write.ackedAt > 0 && write.ackedAt < completeSentAt);
    assertReadsAsAckedWrites(copied, targetInitial, sent, durableOnTarget, `${context}: the target after the pivot`);
  }
  rmSync(dir, { recursive: true }); // a failed round stays until the end of the file, for a look
  t.diagnostic(`${context}: ${writer!.acked.length} writes acknowledged (${writer!.acked.filter((write) => write.durable).length} durable), ` +
    `${sent.length - writer!.acked.length} in flight, pivot ${pivoted ? 'completed' : 'not seen'}, leaked clusters ${leaks.join('/')}`);
}

test('a SIGKILL at any moment of a mirror under writes leaves the source reading as the acknowledged writes, and the target once pivoted', async (t) => {
  for (const seed of testSeeds([1401])) {
    let round = 0;
    for (const mode of MODES) {
      for (const moment of MOMENTS) {
        await crashRound(t, { seed, round, moment, mode, sync: SYNCS[round % SYNCS.length]! });
        round++;
      }
    }
  }
});
