/*
 * What the power-loss scenarios share while they record: a blockd daemon with
 * a QMP socket and an NBD server, images whose file nodes write through a
 * blklogwrites filter, the guest (qemu-io over NBD) whose writes and flushes
 * a GuestModel follows, and copies of the files as they were before the logs
 * began.
 */
import { copyFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { QmpClient } from '../../../src/qmp/client.js';
import { runBlockd, type BlockdProcess } from '../blockd-process.js';
import { qemuIo, type SeededRandom } from '../qemu-tools.js';
import type { GuestModel } from './guest-model.js';
import { flushWitness } from './power-loss-checker.js';

/** A file node whose writes go into `log` (both in `dir`; the log starts empty): put it under a format node as its "file". */
export function loggedFile(dir: string, image: string, log: string): Record<string, unknown> {
  writeFileSync(join(dir, log), '');
  return { driver: 'blklogwrites', file: { driver: 'file', filename: join(dir, image) }, log: { driver: 'file', filename: join(dir, log) } };
}

/** Keeps the file as it is now (before the logs begin) under `<name>.orig`; returns that path. */
export function keepOriginal(dir: string, name: string): string {
  const original = join(dir, `${name}.orig`);
  copyFileSync(join(dir, name), original);
  return original;
}

export class RecordingDaemon {
  private constructor(readonly dir: string, private readonly blockd: BlockdProcess, readonly qmp: QmpClient) {}

  static async start(dir: string, args: string[] = []): Promise<RecordingDaemon> {
    const blockd = await runBlockd([...args, '--nbd-server', `addr.type=unix,addr.path=${join(dir, 'nbd.sock')}`, '--qmp', `unix:${join(dir, 'qmp.sock')}`]);
    return new RecordingDaemon(dir, blockd, await QmpClient.connect(`unix:${join(dir, 'qmp.sock')}`));
  }

  /** Exports a node for writing; returns the NBD URL qemu-io takes. */
  async exportNode(node: string): Promise<string> {
    await this.qmp.execute('block-export-add', { type: 'nbd', id: `export-${node}`, 'node-name': node, name: node, writable: true });
    return `nbd+unix:///${node}?socket=${join(this.dir, 'nbd.sock')}`;
  }

  async waitForJob(id: string): Promise<void> {
    await this.qmp.waitForEvent('JOB_STATUS_CHANGE', (event) => event.data?.id === id && event.data?.status === 'concluded');
  }

  /** Runs a blockdev-create job to its end and dismisses it (create jobs are not dismissed automatically). */
  async create(id: string, options: Record<string, unknown>): Promise<void> {
    await this.qmp.execute('blockdev-create', { 'job-id': id, options } as never);
    await this.waitForJob(id);
    await this.qmp.execute('job-dismiss', { id });
  }

  /** Quits: every node is flushed and closed, so each log is complete. */
  async quit(): Promise<void> {
    await this.qmp.execute('quit').catch(() => {});
    await this.blockd.exited;
    await this.qmp.close().catch(() => {});
  }

  async kill(): Promise<void> {
    await this.blockd.stop('SIGKILL');
    await this.qmp.close().catch(() => {});
  }
}

export interface GuestWrite {
  offset: number;
  length: number;
  /** The byte the write fills its range with; 0 for a write-zeroes. */
  pattern: number;
}

/** Random writes of whole sectors that do not overlap each other (so their order in flight does not matter). */
export function randomWrites(random: SeededRandom, diskSize: number, count: number): GuestWrite[] {
  const writes: GuestWrite[] = [];
  while (writes.length < count) {
    const length = random.pick([512, 4096, 12 * 1024, 64 * 1024, 100 * 1024, 192 * 1024]);
    const offset = random.int((diskSize - length) / 512 + 1) * 512;
    if (writes.some((other) => offset < other.offset + other.length && other.offset < offset + length)) continue;
    writes.push({ offset, length, pattern: random.chance(0.15) ? 0 : 1 + random.int(255) });
  }
  return writes;
}

/**
 * One guest session through qemu-io: the writes (in flight together when `parallel`), then
 * a flush; the model learns them, and the flush's witness once qemu-io has seen it acknowledged.
 */
export async function guestSession(url: string, writes: GuestWrite[], parallel: boolean, model: GuestModel, log: { path: string; index: number }): Promise<void> {
  const command = (write: GuestWrite) => (write.pattern === 0 ? 'write -z' : `${parallel ? 'aio_write' : 'write'} -P 0x${write.pattern.toString(16)}`);
  const commands = writes.map((write) => `${command(write)} ${write.offset} ${write.length}`);
  // Writeback: qemu-io's default (writethrough) would make every write FUA, leaving nothing for the flush to do.
  qemuIo(url, [...commands, ...(parallel ? ['aio_flush'] : []), 'flush'], ['-f', 'raw', '-t', 'writeback']);
  for (const write of writes) model.write(write.offset, Buffer.alloc(write.length, write.pattern));
  model.flush(await flushWitness(log.path, log.index));
}
