/*
 * Backups are crash-safe (issue 14, acceptance "Crash test"): blockd is killed with SIGKILL
 * at a random acknowledgement while three NBD connections keep writes in flight into the
 * source (random ranges, some unaligned, write-zeroes, FUA, flushes) and a backup runs:
 * full, top, incremental with a persistent bitmap (each bitmap-mode), none into an overlay
 * backed by the source, and the copy-before-write filter alone, as pull backups insert it.
 * After each kill qemu-img check finds no corruption on any image (leaks allowed), and a
 * fresh blockd opens the source again:
 * - it reads as the acknowledged writes (each byte what the last durable write there left, or
 *   what a later write left; bytes no write touched as before);
 * - the persistent bitmap, added before the first write, is consistent and covers every
 *   acknowledged write, also those made while a backup owned it (its successor recorded them).
 * A failure names its seed and round; BLOCKD_MODEL_SEED=N runs seed N too.
 */
import assert from 'node:assert/strict';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { QmpClient } from '../../src/qmp/client.js';
import { assertReadsAsAckedWrites } from '../helpers/acked-write-model.js';
import { runBlockd } from '../helpers/blockd-process.js';
import { mirrorChainTemplate, qcow2Node, WRITE_REGIONS } from '../helpers/mirror-images.js';
import { AckedWriter } from '../helpers/nbd-acked-writes.js';
import { makeTempDir } from '../helpers/paths.js';
import { createQcow2, MiB, qemuImgCheck, SeededRandom, testSeeds } from '../helpers/qemu-tools.js';
import { BitmapReader, firstUncovered } from '../helpers/reloaded-bitmaps.js';

type Kind = 'full' | 'top' | 'incremental' | 'incremental-always' | 'incremental-never' | 'none' | 'cbw';
const KINDS: Kind[] = ['full', 'top', 'incremental', 'incremental-always', 'incremental-never', 'none', 'cbw'];

const root = makeTempDir('blockd-backup-crash-');
let copyImages: ReturnType<typeof mirrorChainTemplate> | undefined;
const reader = BitmapReader.forTestFile();

function assertNotCorrupt(image: string, context: string): number {
  const check = qemuImgCheck(image);
  assert.ok(check.corruptions === 0 && check.checkErrors === 0 && (check.status === 0 || check.status === 3), `${context}: qemu-img check ${image}: ${check.output}`);
  return check.leaks;
}

/** What `kind` asks of QMP once the nodes exist: the backup, or the filter a pull backup inserts. */
async function startBackup(qmp: QmpClient, kind: Kind): Promise<void> {
  const slow = { speed: 128 * 1024 };
  switch (kind) {
    case 'full':
    case 'top':
      await qmp.executeRaw('blockdev-backup', { 'job-id': 'b', device: 'src', target: 'tgt', sync: kind, ...slow });
      return;
    case 'incremental':
    case 'incremental-always':
    case 'incremental-never': {
      const mode = kind === 'incremental' ? 'on-success' : kind.slice('incremental-'.length);
      await qmp.executeRaw('blockdev-backup', { 'job-id': 'b', device: 'src', target: 'tgt', sync: 'bitmap', bitmap: 'chk', 'bitmap-mode': mode, ...slow });
      return;
    }
    case 'none':
      await qmp.executeRaw('blockdev-backup', { 'job-id': 'b', device: 'src', target: 'tgt', sync: 'none' });
      return;
    case 'cbw':
      await qmp.executeRaw('blockdev-add', { driver: 'copy-before-write', 'node-name': 'cbw', file: 'src', target: 'tgt' });
  }
}

async function crashRound(t: TestContext, seed: number, round: number, kind: Kind): Promise<void> {
  const random = new SeededRandom(seed * 1000 + round);
  const context = `seed ${seed}, round ${round} (${kind})`;
  const dir = join(root.dir, `round${seed}-${round}`);
  const path = (name: string) => join(dir, name);
  copyImages ??= mirrorChainTemplate(join(root.dir, 'template'));
  copyImages(dir, 'full');
  const initial = readFileSync(path('m-expected.raw'));
  // The target: new, or (none, cbw) an overlay backed by the source, as fleecing makes it.
  const overlay = kind === 'none' || kind === 'cbw';
  const target = createQcow2(path('target.qcow2'), overlay ? undefined : 64 * MiB, overlay ? { backing: { path: 'm-top.qcow2', format: 'qcow2' } } : {});
  const nodes = [
    qcow2Node('base', path('m-base.qcow2')), qcow2Node('mid', path('m-mid.qcow2'), 'base'), qcow2Node('src', path('m-top.qcow2'), 'mid'),
    qcow2Node('tgt', target, overlay ? 'src' : kind === 'top' ? 'mid' : undefined),
  ];
  const blockd = await runBlockd([
    ...nodes.flatMap((node) => ['--blockdev', JSON.stringify(node)]),
    '--nbd-server', `addr.type=unix,addr.path=${path('nbd.sock')}`,
    '--qmp', `unix:${path('qmp.sock')}`,
  ]);
  const qmp = await QmpClient.connect(`unix:${path('qmp.sock')}`);
  let writer: AckedWriter | undefined;
  let killed = false;
  const kill = () => {
    killed = true;
    writer?.stop();
    blockd.child.kill('SIGKILL');
  };
  try {
    await qmp.execute('block-dirty-bitmap-add', { node: 'src', name: 'chk', persistent: true });
    // The guest's export is there before a backup job (which puts its filter under it); a pull
    // backup's filter, added alone, is what the guest then writes through.
    if (kind === 'cbw') await startBackup(qmp, kind);
    await qmp.execute('block-export-add', { type: 'nbd', id: 'guest', name: 'guest', 'node-name': kind === 'cbw' ? 'cbw' : 'src', writable: true });
    if (kind !== 'cbw') await startBackup(qmp, kind);
    const killAt = 1 + random.int(150);
    writer = await AckedWriter.start({
      socket: path('nbd.sock'), exportName: 'guest', regions: WRITE_REGIONS, random, exclusive: true,
      onAck: (acked) => {
        if (acked === killAt) kill();
      },
    });
    await writer.finished();
  } finally {
    if (!killed) kill(); // an assertion failed before the kill: the daemon goes all the same
    await qmp.close().catch(() => {});
  }
  const exit = await blockd.exited;
  assert.equal(exit.signal, 'SIGKILL', `${context}: blockd exited ${exit.code} before the kill: ${blockd.stderr()}`);
  const leaks = ['m-base', 'm-mid', 'm-top', 'target'].map((image) => assertNotCorrupt(path(`${image}.qcow2`), context));

  const reloaded = await reader().open(path('m-top.qcow2'));
  try {
    const pieces = Array.from({ length: initial.length / (8 * MiB) }, (_, index) => ({ offset: index * 8 * MiB, length: 8 * MiB }));
    const source = Buffer.concat(await reloaded.read(pieces));
    assertReadsAsAckedWrites(source, initial, writer!.sent, (write) => write.durableAt > 0, `${context}: the source`);
    const chk = reloaded.bitmap('chk');
    assert.ok(chk && !chk.inconsistent, `${context}: the persistent bitmap reloaded consistent: ${JSON.stringify(reloaded.bitmaps)}`);
    const dirty = reloaded.dirtyExtents('chk');
    for (const write of writer!.acked) {
      const missing = firstUncovered(write, dirty);
      assert.equal(missing, undefined, `${context}: the bitmap misses ${JSON.stringify(missing)} of the acknowledged write ${write.offset}+${write.length}`);
    }
  } finally {
    await reloaded.close();
  }
  rmSync(dir, { recursive: true }); // a failed round stays until the end of the file, for a look
  t.diagnostic(`${context}: ${writer!.acked.length} writes acknowledged (${writer!.acked.filter((write) => write.durable).length} durable), `
    + `${writer!.sent.length - writer!.acked.length} in flight, leaked clusters ${leaks.join('/')}`);
}

test('a SIGKILL during any kind of backup under writes leaves the source as the acknowledged writes and its persistent bitmap covering them', async (t) => {
  try {
    for (const seed of testSeeds([1402])) {
      for (const [round, kind] of KINDS.entries()) await crashRound(t, seed, round, kind);
    }
  } finally {
    root.cleanup();
  }
});
