/*
 * The two daemons a differential test compares: qemu-storage-daemon and blockd, each with
 * its own directory (prepared alike by the test) and one QMP socket. Registers the
 * node:test before/after hooks that start and stop them.
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before } from 'node:test';
import { runBlockd, type BlockdProcess } from './blockd-process.js';
import { makeTempDir } from './paths.js';
import { startQsd, type QsdProcess } from './qsd-process.js';

export interface Peer {
  dir: string;
  socket: string;
}

export interface DifferentialPeers {
  qsd: Peer;
  blockd: Peer;
  /** Stops blockd early (e.g. to release image locks before qemu-img looks at its files). */
  stopBlockd(): Promise<unknown>;
  stopQsd(): Promise<unknown>;
  /** blockd's stderr so far, for failure messages. */
  blockdLog(): string;
}

export function differentialPeers(prepare: (dir: string) => void = () => {}): DifferentialPeers {
  const temp = makeTempDir();
  const qsdDir = join(temp.dir, 'qsd');
  const blockdDir = join(temp.dir, 'blockd');
  let qsd: QsdProcess | undefined;
  let blockd: BlockdProcess | undefined;
  before(async () => {
    for (const dir of [qsdDir, blockdDir]) {
      mkdirSync(dir, { recursive: true });
      prepare(dir);
    }
    qsd = await startQsd(qsdDir);
    blockd = await runBlockd(['--qmp', `unix:${join(blockdDir, 'blockd.sock')}`]);
  });
  after(async () => {
    await qsd?.stop();
    await blockd?.stop();
    temp.cleanup();
  });
  return {
    qsd: { dir: qsdDir, socket: join(qsdDir, 'qsd-qmp.sock') },
    blockd: { dir: blockdDir, socket: join(blockdDir, 'blockd.sock') },
    stopBlockd: async () => blockd?.stop(),
    stopQsd: async () => qsd?.stop(),
    blockdLog: () => blockd?.stderr() ?? '',
  };
}
