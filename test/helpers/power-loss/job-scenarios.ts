/*
 * Recorded block jobs for the power-loss tests, on a small chain
 * base <- mid <- top (relative backing names, so replays in another folder
 * find each other): block-stream into the top, an intermediate commit of the
 * middle layer into the base, and an active commit of the top into the base
 * with a guest writing through an export of the top until job-complete. The
 * files a job writes are logged; the top of the chain must read as before
 * the job (plus the guest's flushed writes) at every replay point.
 */
import { join } from 'node:path';
import { ModelledDisk } from '../disk-model.js';
import { createQcow2, qemuIo, SeededRandom } from '../qemu-tools.js';
import { GuestModel } from './guest-model.js';
import { flushWitness, type PowerLossScenario } from './power-loss-checker.js';
import { keepOriginal, loggedFile, RecordingDaemon } from './recording.js';
import { DISK_SIZE, writeSessions } from './write-scenarios.js';

/** base <- mid <- top, or base <- top without the middle layer. */
function makeSmallChain(dir: string, withMid = true): void {
  createQcow2(join(dir, 'base.qcow2'), DISK_SIZE);
  qemuIo(join(dir, 'base.qcow2'), ['write -P 0x11 0 3M'], ['-f', 'qcow2']);
  if (withMid) {
    createQcow2(join(dir, 'mid.qcow2'), undefined, { backing: { path: 'base.qcow2', format: 'qcow2' } });
    qemuIo(join(dir, 'mid.qcow2'), ['write -P 0x21 512k 2M', 'write -z 3M 256k', 'write -P 0x22 3584k 100k'], ['-f', 'qcow2']);
  }
  createQcow2(join(dir, 'top.qcow2'), undefined, { backing: { path: withMid ? 'mid.qcow2' : 'base.qcow2', format: 'qcow2' } });
  qemuIo(join(dir, 'top.qcow2'), ['write -P 0x31 1M 256k', 'write -P 0x32 2600k 8k'], ['-f', 'qcow2']);
}

/** The chain read through the top before the job: what every replay's top must read. */
async function chainBefore(dir: string): Promise<GuestModel> {
  return new GuestModel(await ModelledDisk.imageBytes(join(dir, 'top.qcow2')));
}

/** block-stream of mid into top (top's chain opened from its header), the header then naming base.qcow2. */
export async function recordStream(dir: string): Promise<PowerLossScenario> {
  makeSmallChain(dir);
  const model = await chainBefore(dir);
  const original = keepOriginal(dir, 'top.qcow2');
  const daemon = await RecordingDaemon.start(dir);
  try {
    await daemon.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: loggedFile(dir, 'top.qcow2', 'top.log') } as never);
    await daemon.qmp.execute('block-stream', { 'job-id': 's', device: 'top', base: join(dir, 'base.qcow2'), 'backing-file': 'base.qcow2' });
    await daemon.waitForJob('s');
    await daemon.quit();
  } finally {
    await daemon.kill();
  }
  return {
    name: 'block-stream', dir, logs: [join(dir, 'top.log')],
    files: [{ name: 'top.qcow2', original, log: 0 }, ...['mid.qcow2', 'base.qcow2'].map((name) => ({ name, original: join(dir, name) }))],
    checked: [{ image: 'top.qcow2' }],
    views: [{ image: 'top.qcow2', model }],
  };
}

/** The chain as explicit nodes, with the base (and the top) over logged files; the base writable from the start. */
async function addLoggedChain(daemon: RecordingDaemon, dir: string, layers: ('mid' | 'top')[]): Promise<void> {
  await daemon.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'base', 'read-only': false, file: loggedFile(dir, 'base.qcow2', 'base.log') } as never);
  let below = 'base';
  for (const layer of layers) {
    const file = layer === 'top' ? loggedFile(dir, 'top.qcow2', 'top.log') : { driver: 'file', filename: join(dir, `${layer}.qcow2`) };
    await daemon.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': layer, file, backing: below } as never);
    below = layer;
  }
}

/** block-commit of mid into base; top's header then names base.qcow2. The base and the top are logged. */
export async function recordIntermediateCommit(dir: string): Promise<PowerLossScenario> {
  makeSmallChain(dir);
  const model = await chainBefore(dir);
  const originals = { base: keepOriginal(dir, 'base.qcow2'), top: keepOriginal(dir, 'top.qcow2') };
  const daemon = await RecordingDaemon.start(dir);
  try {
    await addLoggedChain(daemon, dir, ['mid', 'top']);
    await daemon.qmp.execute('block-commit', { 'job-id': 'c', device: 'top', 'top-node': 'mid', 'base-node': 'base', 'backing-file': 'base.qcow2' });
    await daemon.waitForJob('c');
    await daemon.quit();
  } finally {
    await daemon.kill();
  }
  return {
    name: 'intermediate block-commit', dir, logs: [join(dir, 'base.log'), join(dir, 'top.log')],
    files: [{ name: 'base.qcow2', original: originals.base, log: 0 }, { name: 'mid.qcow2', original: join(dir, 'mid.qcow2') }, { name: 'top.qcow2', original: originals.top, log: 1 }],
    checked: [{ image: 'base.qcow2' }, { image: 'top.qcow2' }],
    views: [{ image: 'top.qcow2', model }],
  };
}

/**
 * Active block-commit of top into base (a chain of two: base <- top), a guest writing through an
 * export of the top once the job is ready, then job-complete. From the job's end the base alone
 * holds what the top showed.
 */
export async function recordActiveCommit(dir: string, seed: number): Promise<PowerLossScenario> {
  makeSmallChain(dir, false);
  const model = await chainBefore(dir);
  const originals = { base: keepOriginal(dir, 'base.qcow2'), top: keepOriginal(dir, 'top.qcow2') };
  const daemon = await RecordingDaemon.start(dir);
  try {
    await addLoggedChain(daemon, dir, ['top']);
    const url = await daemon.exportNode('top');
    const ready = daemon.qmp.waitForEvent('BLOCK_JOB_READY', (event) => event.data?.device === 'c');
    await daemon.qmp.execute('block-commit', { 'job-id': 'c', device: 'top' });
    await ready;
    await writeSessions(url, new SeededRandom(seed), 3, model, { path: join(dir, 'top.log'), index: 1 });
    await daemon.qmp.execute('job-complete', { id: 'c' });
    await daemon.waitForJob('c');
    const completed = await flushWitness(join(dir, 'base.log'), 0);
    await daemon.quit();
    return {
      name: 'active block-commit', dir, logs: [join(dir, 'base.log'), join(dir, 'top.log')],
      files: [{ name: 'base.qcow2', original: originals.base, log: 0 }, { name: 'top.qcow2', original: originals.top, log: 1 }],
      checked: [{ image: 'base.qcow2' }, { image: 'top.qcow2' }],
      views: [{ image: 'top.qcow2', model }, { image: 'base.qcow2', model: new GuestModel(model.contents()), from: completed }],
    };
  } finally {
    await daemon.kill();
  }
}
