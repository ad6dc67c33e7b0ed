/*
 * Runs bin/blockd as a real process for end-to-end tests: waits for the
 * "blockd ready" log line (or exit), collects stderr, and stops it. Readiness
 * and addresses come from info-level log lines, so tests that wait for them
 * must not set --log-level above info.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { QmpClient } from '../../src/qmp/client.js';
import { BLOCKD_BIN } from './paths.js';

export interface BlockdProcess {
  child: ChildProcess;
  stderr: () => string;
  stdout: () => string;
  /** Addresses from the "QMP monitor listening" log lines, in order. */
  addresses: string[];
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /**
   * Sends `signal` and waits for the exit. With `killAfterMs`, a daemon still running then (stuck in a
   * command: quit waits for commands) is killed, so the test fails on its exit signal instead of hanging.
   */
  stop(signal?: NodeJS.Signals, killAfterMs?: number): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

export interface StartOptions {
  cwd?: string;
  env?: Record<string, string>;
  /** Resolve as soon as the process starts, without waiting for readiness. */
  noWait?: boolean;
  stdin?: 'pipe' | 'ignore';
  /** Another launcher than the repository's bin/blockd (a copy of the package elsewhere). */
  bin?: string;
}

export function runBlockd(args: string[], options: StartOptions = {}): Promise<BlockdProcess> {
  const child = spawn(process.execPath, [options.bin ?? BLOCKD_BIN, ...args], {
    cwd: options.cwd,
    env: { ...process.env, BLOCKD_LOG_LEVEL: 'info', ...options.env },
    stdio: [options.stdin ?? 'ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  let stdout = '';
  const addresses: string[] = [];
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('exit', (code, signal) => resolve({ code, signal })));
  const proc: BlockdProcess = {
    child,
    stderr: () => stderr,
    stdout: () => stdout,
    addresses,
    exited,
    async stop(signal = 'SIGTERM', killAfterMs?: number) {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      const stuck = killAfterMs === undefined ? undefined : setTimeout(() => child.kill('SIGKILL'), killAfterMs);
      try {
        return await exited;
      } finally {
        clearTimeout(stuck);
      }
    },
  };
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  return new Promise((resolve, reject) => {
    if (options.noWait) resolve(proc);
    child.stderr!.on('data', (chunk: Buffer) => {
      stderr += chunk.toString();
      for (const line of chunk.toString().split('\n')) {
        if (!line.startsWith('{')) continue;
        try {
          const record = JSON.parse(line) as { msg?: string; address?: string };
          if (record.msg === 'QMP monitor listening' && record.address) addresses.push(record.address);
          if (record.msg === 'blockd ready') resolve(proc);
        } catch {
          // not a log line
        }
      }
    });
    void exited.then(({ code }) => reject(new Error(`blockd exited (${code}) before it was ready:\n${stderr}`)));
    if (!options.noWait) {
      const timer = setTimeout(() => reject(new Error(`blockd not ready after 20 s:\n${stderr}`)), 20_000);
      timer.unref();
    }
  });
}

/** blockd serving NBD on `<dir>/nbd.sock`, with a QMP client connected on `<dir>/qmp.sock` (the interop tests under writes). */
export interface BlockdWithNbd {
  blockd: BlockdProcess;
  qmp: QmpClient;
  /** Closes the client, then stops the daemon. */
  stop(): Promise<void>;
}

export async function runBlockdWithNbd(dir: string): Promise<BlockdWithNbd> {
  const qmpSocket = join(dir, 'qmp.sock');
  const blockd = await runBlockd(['--nbd-server', `addr.type=unix,addr.path=${join(dir, 'nbd.sock')}`, '--qmp', `unix:${qmpSocket}`]);
  const qmp = await QmpClient.connect(`unix:${qmpSocket}`);
  return {
    blockd,
    qmp,
    async stop() {
      await qmp.close();
      await blockd.stop();
    },
  };
}
