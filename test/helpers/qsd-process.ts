/*
 * Runs the real qemu-storage-daemon (Debian's qemu-system-common) as the
 * reference peer for differential tests and benchmarks.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';

export const QSD_BIN = 'qemu-storage-daemon';

export function qsdAvailable(): boolean {
  return spawnSync(QSD_BIN, ['--version']).status === 0;
}

export interface QsdProcess {
  child: ChildProcess;
  socket: string;
  /** What it printed on stderr so far (its error reports, e.g. a refused NBD client). */
  stderr(): string;
  stop(): Promise<void>;
}

/** Starts qemu-storage-daemon with one QMP monitor on dir/qsd-qmp.sock (plus any extra arguments). */
export async function startQsd(dir: string, extraArgs: string[] = []): Promise<QsdProcess> {
  const socket = join(dir, 'qsd-qmp.sock');
  const pidfile = join(dir, 'qsd.pid');
  const child = spawn(QSD_BIN, [
    '--chardev', `socket,id=qmp0,path=${socket},server=on,wait=off`, '--monitor', 'qmp0',
    ...extraArgs, '--pidfile', pidfile,
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const deadline = Date.now() + 10_000;
  while (!existsSync(pidfile)) {
    if (child.exitCode !== null) throw new Error(`qemu-storage-daemon failed: ${stderr}`);
    if (Date.now() > deadline) throw new Error('qemu-storage-daemon did not start');
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return {
    child,
    socket,
    stderr: () => stderr,
    stop: () => new Promise<void>((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) return resolve(); // already gone (a test may have killed it)
      child.once('exit', () => resolve());
      child.kill('SIGTERM');
    }),
  };
}
