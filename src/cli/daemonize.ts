/*
 * --daemonize without fork(): the parent re-runs blockd as a detached child
 * (stdio on /dev/null) and waits for it to report over an IPC channel that
 * startup finished (pid file written) or failed; then it exits 0, or prints
 * the child's error and exits 1, as qemu-storage-daemon's parent does. The
 * child then moves to "/" like a classic daemon.
 */
import { spawn } from 'node:child_process';

const CHILD_MARK = 'BLOCKD_DAEMONIZED_CHILD';

export function isDaemonChild(): boolean {
  return process.env[CHILD_MARK] === '1';
}

/** Parent side: waits for the child's report, then exits. */
export function runDetachedChild(): Promise<never> {
  return new Promise<never>(() => {
    const child = spawn(process.execPath, [...process.execArgv, ...process.argv.slice(1)], {
      detached: true,
      stdio: ['ignore', 'ignore', 'ignore', 'ipc'],
      env: { ...process.env, [CHILD_MARK]: '1' },
    });
    child.on('message', (message: { ok?: boolean; error?: string }) => {
      if (message.error) process.stderr.write(`${message.error}\n`);
      process.exit(message.ok ? 0 : 1);
    });
    child.on('exit', (code) => process.exit(code === 0 ? 0 : 1));
  });
}

/** Child side: reports the outcome of startup and detaches from the parent. */
export function reportStartup(result: { ok: true } | { error: string }): void {
  if (!process.send) return;
  process.send(result, () => {
    if ('ok' in result) {
      process.chdir('/');
      process.disconnect?.();
    }
  });
}
