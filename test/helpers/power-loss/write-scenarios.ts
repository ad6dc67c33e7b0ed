/*
 * Recorded runs of guest writes for the power-loss tests: a qcow2 overlay over
 * a backing file full of data (so a partial write's copy from below shows if
 * it is lost), written by qemu-io over NBD through blockd in sessions that each
 * end with a flush, its file logged by blklogwrites; the same under an external
 * snapshot, into an image blockdev-create has just made, and compressed writes
 * made in process (what backup and convert with `compress` write).
 */
import { join } from 'node:path';
import { openImage } from '../../../src/blockdev/image-session.js';
import { compressible, incompressible } from '../compressible-data.js';
import { ModelledDisk } from '../disk-model.js';
import { createQcow2, KiB, MiB, qemuIo, SeededRandom } from '../qemu-tools.js';
import { GuestModel } from './guest-model.js';
import { flushWitness, type PowerLossScenario } from './power-loss-checker.js';
import { guestSession, keepOriginal, loggedFile, randomWrites, RecordingDaemon } from './recording.js';

export const DISK_SIZE = 4 * MiB;

/** base.qcow2 (all data) <- disk.qcow2 (a few clusters of its own, so its L2 table exists). */
export function makeOverlayOnData(dir: string): void {
  createQcow2(join(dir, 'base.qcow2'), DISK_SIZE);
  qemuIo(join(dir, 'base.qcow2'), ['write -P 0x11 0 4M'], ['-f', 'qcow2']);
  createQcow2(join(dir, 'disk.qcow2'), undefined, { backing: { path: 'base.qcow2', format: 'qcow2' } });
  qemuIo(join(dir, 'disk.qcow2'), ['write -P 0x22 1M 192k'], ['-f', 'qcow2']);
}

/** Guest sessions of random writes (every other one with its writes in flight together), each ending with a flush. */
export async function writeSessions(url: string, random: SeededRandom, sessions: number, model: GuestModel, log: { path: string; index: number }): Promise<void> {
  for (let session = 0; session < sessions; session++) {
    await guestSession(url, randomWrites(random, DISK_SIZE, 2 + random.int(5)), session % 2 === 1, model, log);
  }
}

/** Records `sessions` sessions of allocating writes into disk.qcow2 (in `dir`); blockd has quit when it returns. */
export async function recordAllocatingWrites(dir: string, seed: number, sessions: number): Promise<PowerLossScenario> {
  makeOverlayOnData(dir);
  const model = new GuestModel(await ModelledDisk.imageBytes(join(dir, 'disk.qcow2')));
  const original = keepOriginal(dir, 'disk.qcow2');
  const daemon = await RecordingDaemon.start(dir);
  try {
    await daemon.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'disk', file: loggedFile(dir, 'disk.qcow2', 'disk.log') } as never);
    const url = await daemon.exportNode('disk');
    await writeSessions(url, new SeededRandom(seed), sessions, model, { path: join(dir, 'disk.log'), index: 0 });
    await daemon.quit();
  } finally {
    await daemon.kill();
  }
  return {
    name: 'allocating writes', dir, logs: [join(dir, 'disk.log')],
    files: [{ name: 'disk.qcow2', original, log: 0 }, { name: 'base.qcow2', original: join(dir, 'base.qcow2') }],
    checked: [{ image: 'disk.qcow2' }],
    views: [{ image: 'disk.qcow2', model }],
  };
}

/**
 * Records writes into base.qcow2, then an external snapshot taken under the guest: overlay.qcow2 is
 * made by blockdev-create on a logged file node (naming base.qcow2 as its backing file), added, and
 * put over the base with blockdev-snapshot; the guest goes on writing through the same export.
 */
export async function recordExternalSnapshot(dir: string, seed: number): Promise<PowerLossScenario> {
  createQcow2(join(dir, 'base.qcow2'), DISK_SIZE);
  qemuIo(join(dir, 'base.qcow2'), ['write -P 0x11 0 2M'], ['-f', 'qcow2']);
  const baseModel = new GuestModel(await ModelledDisk.imageBytes(join(dir, 'base.qcow2')));
  const baseOriginal = keepOriginal(dir, 'base.qcow2');
  const random = new SeededRandom(seed);
  const daemon = await RecordingDaemon.start(dir);
  try {
    await daemon.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'base', file: loggedFile(dir, 'base.qcow2', 'base.log') } as never);
    const url = await daemon.exportNode('base');
    await writeSessions(url, random, 2, baseModel, { path: join(dir, 'base.log'), index: 0 });
    await daemon.create('create-file', { driver: 'file', filename: join(dir, 'overlay.qcow2'), size: 0 });
    const overlayOriginal = keepOriginal(dir, 'overlay.qcow2');
    await daemon.qmp.execute('blockdev-add', { 'node-name': 'overlay-file', ...loggedFile(dir, 'overlay.qcow2', 'overlay.log') } as never);
    await daemon.create('create-overlay', { driver: 'qcow2', file: 'overlay-file', size: DISK_SIZE, 'backing-file': 'base.qcow2', 'backing-fmt': 'qcow2' });
    const created = await flushWitness(join(dir, 'overlay.log'), 1);
    await daemon.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'overlay', file: 'overlay-file', backing: null } as never);
    await daemon.qmp.execute('blockdev-snapshot', { node: 'base', overlay: 'overlay' });
    const overlayModel = new GuestModel(baseModel.contents());
    await writeSessions(url, random, 3, overlayModel, { path: join(dir, 'overlay.log'), index: 1 });
    await daemon.quit();
    return {
      name: 'external snapshot', dir, logs: [join(dir, 'base.log'), join(dir, 'overlay.log')],
      files: [{ name: 'base.qcow2', original: baseOriginal, log: 0 }, { name: 'overlay.qcow2', original: overlayOriginal, log: 1 }],
      checked: [{ image: 'base.qcow2' }, { image: 'overlay.qcow2', from: created }],
      views: [{ image: 'base.qcow2', model: baseModel }, { image: 'overlay.qcow2', model: overlayModel, from: created }],
    };
  } finally {
    await daemon.kill();
  }
}

/** Records blockdev-create making new.qcow2 on a logged file node, then a guest writing into the new image. */
export async function recordCreatedImage(dir: string, seed: number): Promise<PowerLossScenario> {
  const daemon = await RecordingDaemon.start(dir);
  try {
    await daemon.create('create-file', { driver: 'file', filename: join(dir, 'new.qcow2'), size: 0 });
    const original = keepOriginal(dir, 'new.qcow2');
    await daemon.qmp.execute('blockdev-add', { 'node-name': 'new-file', ...loggedFile(dir, 'new.qcow2', 'new.log') } as never);
    await daemon.create('create-image', { driver: 'qcow2', file: 'new-file', size: DISK_SIZE, 'cluster-size': 65536 });
    const created = await flushWitness(join(dir, 'new.log'), 0);
    await daemon.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'new', file: 'new-file' } as never);
    const model = new GuestModel(Buffer.alloc(DISK_SIZE));
    await writeSessions(await daemon.exportNode('new'), new SeededRandom(seed), 3, model, { path: join(dir, 'new.log'), index: 0 });
    await daemon.quit();
    return {
      name: 'blockdev-create', dir, logs: [join(dir, 'new.log')],
      files: [{ name: 'new.qcow2', original, log: 0 }],
      checked: [{ image: 'new.qcow2', from: created }],
      views: [{ image: 'new.qcow2', model, from: created }],
    };
  } finally {
    await daemon.kill();
  }
}

/**
 * Records `sessions` sessions of compressed writes into disk.qcow2 over its data-filled base, made through the
 * driver in process (no QMP command writes compressed yet): whole clusters, a few in flight together, every cluster
 * written once (compression never overwrites), a quarter of them data that does not shrink (written plainly); a
 * flush runs while they are in flight, and each session ends with one. Several compressed clusters share a host cluster, so a refcount or an L2 entry that
 * reaches the disk before the data it counts shows.
 */
export async function recordCompressedWrites(dir: string, seed: number, sessions: number): Promise<PowerLossScenario> {
  makeOverlayOnData(dir);
  const cs = 64 * KiB;
  const image = join(dir, 'disk.qcow2');
  const log = join(dir, 'disk.log');
  const model = new GuestModel(await ModelledDisk.imageBytes(image));
  const original = keepOriginal(dir, 'disk.qcow2');
  const random = new SeededRandom(seed);
  // The clusters makeOverlayOnData left unallocated (1 MiB + 192 KiB is written), in random order.
  const free = Array.from({ length: DISK_SIZE / cs }, (_, i) => i).filter((cluster) => cluster < 16 || cluster >= 19);
  for (let i = free.length - 1; i > 0; i--) {
    const j = random.int(i + 1);
    [free[i], free[j]] = [free[j]!, free[i]!];
  }
  const session = await openImage(image, { writable: true, formatOptions: { file: loggedFile(dir, 'disk.qcow2', 'disk.log') } });
  try {
    for (let s = 0; s < sessions; s++) {
      const writes = free.splice(0, 3 + random.int(4)).map((cluster) => ({
        offset: cluster * cs,
        data: random.chance(0.25) ? incompressible(random, cs) : compressible(random, cs),
      }));
      const written = writes.map(({ offset, data }) => session.disk.write(offset, data, { compress: true }));
      // A flush while the others are in flight: it must not make an entry durable before the data it points to.
      await Promise.race(written);
      await Promise.all([session.disk.flush(), ...written]);
      for (const { offset, data } of writes) model.write(offset, data);
      await session.disk.flush();
      model.flush(await flushWitness(log, 0));
    }
  } finally {
    await session.close();
  }
  return {
    name: 'compressed writes', dir, logs: [log],
    files: [{ name: 'disk.qcow2', original, log: 0 }, { name: 'base.qcow2', original: join(dir, 'base.qcow2') }],
    checked: [{ image: 'disk.qcow2' }],
    views: [{ image: 'disk.qcow2', model }],
  };
}
