/*
 * Internal snapshots under a writing guest, for the power-loss tests: the guest writes
 * through an export of disk.qcow2 (its file logged), blockdev-snapshot-internal-sync takes
 * s1, more writes, s2, blockdev-snapshot-delete-internal-sync drops s1, more writes. Each
 * snapshot's model is the disk as the guest had written it when the snapshot was taken.
 * The probe: in every replayed state, each snapshot `qemu-img snapshot -l` lists reads
 * exactly as its model (a snapshot is there whole or not at all).
 */
import { copyFile, readFile, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { ModelledDisk } from '../disk-model.js';
import { createQcow2, firstDifference, qemuIo, runTool, SeededRandom } from '../qemu-tools.js';
import { GuestModel } from './guest-model.js';
import type { PowerLossScenario, StateProbe } from './power-loss-checker.js';
import { keepOriginal, loggedFile, RecordingDaemon } from './recording.js';
import { DISK_SIZE, writeSessions } from './write-scenarios.js';

/**
 * A crash between a snapshot's refcount increments and the COPIED flags it clears (QEMU's order) leaves
 * COPIED set on clusters counted twice, which qemu-img check calls corruption: harmless while no listed
 * snapshot uses them, which the probe proves by writing the whole disk and reading every snapshot again.
 */
export const COPIED_FLAG_WINDOW = /^ERROR OFLAG_COPIED (data|L2) cluster: (l2_entry|l1_index)=.* refcount=\d+$/;

/**
 * Every snapshot the replayed image lists must read as the disk did when it was taken, before and
 * after a guest overwrites the whole disk (a cluster a snapshot shares but the image would write in
 * place would show there).
 */
function snapshotsReadAsTaken(models: Map<string, Buffer>): StateProbe {
  return {
    name: 'internal snapshots',
    async check(dir) {
      const image = join(dir, 'disk.qcow2');
      const problems = await compareSnapshots(image, models, 'as replayed');
      // On a copy: the checker compares the replayed files with the run's afterwards.
      const copy = join(dir, 'overwritten.qcow2');
      await copyFile(image, copy);
      try {
        const write = runTool('qemu-io', ['-f', 'qcow2', '-c', `write -q -P 0xee 0 ${DISK_SIZE}`, copy]);
        if (write.status !== 0) return [...problems, `the disk cannot be written: ${write.stderr.trim()}`];
        return [...problems, ...(await compareSnapshots(copy, models, 'after the disk was overwritten'))];
      } finally {
        await rm(copy);
      }
    },
  };
}

async function compareSnapshots(image: string, models: Map<string, Buffer>, when: string): Promise<string[]> {
  const dir = dirname(image);
  const info = runTool('qemu-img', ['info', '--output=json', image]);
  if (info.status !== 0) return [`qemu-img info: ${info.stderr.trim()}`];
  const listed = ((JSON.parse(info.stdout) as { snapshots?: { name: string }[] }).snapshots ?? []).map((sn) => sn.name);
  const problems: string[] = [];
  for (const name of listed) {
    const model = models.get(name);
    if (!model) {
      problems.push(`unknown snapshot ${name}`);
      continue;
    }
    const raw = join(dir, `snapshot-${name}.raw`);
    const convert = runTool('qemu-img', ['convert', '-l', `snapshot.name=${name}`, '-O', 'raw', image, raw]);
    if (convert.status !== 0) {
      problems.push(`snapshot ${name} does not read: ${convert.stderr.trim()}`);
      continue;
    }
    const bytes = await readFile(raw);
    await rm(raw);
    const at = firstDifference(bytes, model);
    if (at < bytes.length || bytes.length !== model.length) problems.push(`snapshot ${name} ${when} differs from the disk when it was taken at byte ${at}`);
  }
  return problems;
}

export async function recordInternalSnapshots(dir: string, seed: number): Promise<PowerLossScenario & { snapshotsProbed: string[] }> {
  createQcow2(join(dir, 'disk.qcow2'), DISK_SIZE);
  qemuIo(join(dir, 'disk.qcow2'), ['write -P 0x11 0 2M', 'write -c -P 0x12 3M 128k'], ['-f', 'qcow2']);
  const model = new GuestModel(await ModelledDisk.imageBytes(join(dir, 'disk.qcow2')));
  const original = keepOriginal(dir, 'disk.qcow2');
  const models = new Map<string, Buffer>();
  const random = new SeededRandom(seed);
  const log = { path: join(dir, 'disk.log'), index: 0 };
  const daemon = await RecordingDaemon.start(dir);
  try {
    await daemon.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'disk', file: loggedFile(dir, 'disk.qcow2', 'disk.log') } as never);
    const url = await daemon.exportNode('disk');
    await writeSessions(url, random, 2, model, log);
    const snapshot = async (name: string) => {
      models.set(name, model.contents());
      await daemon.qmp.execute('blockdev-snapshot-internal-sync', { device: 'disk', name });
    };
    await snapshot('s1');
    await writeSessions(url, random, 2, model, log);
    await snapshot('s2');
    await writeSessions(url, random, 1, model, log);
    await daemon.qmp.execute('blockdev-snapshot-delete-internal-sync', { device: 'disk', name: 's1' });
    await writeSessions(url, random, 2, model, log);
    await daemon.quit();
  } finally {
    await daemon.kill();
  }
  return {
    name: 'internal snapshots', dir, logs: [join(dir, 'disk.log')],
    files: [{ name: 'disk.qcow2', original, log: 0 }],
    checked: [{ image: 'disk.qcow2', tolerated: COPIED_FLAG_WINDOW }],
    views: [{ image: 'disk.qcow2', model }],
    probes: [snapshotsReadAsTaken(models)],
    snapshotsProbed: [...models.keys()],
  };
}
