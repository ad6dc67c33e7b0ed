/*
 * The pid file: written once startup has succeeded (its appearance is the
 * readiness signal, as with qemu-storage-daemon) and removed at clean exit.
 * Node has no lockf(), so a file naming a live blockd process counts as
 * locked, and one left by a dead or unrelated process is overwritten.
 */
import { readFileSync, unlinkSync, writeFileSync } from 'node:fs';
import { CliError } from './cli-error.js';

function isLiveBlockd(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0 || pid === process.pid) return false;
  try {
    process.kill(pid, 0);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'latin1').includes('blockd');
  } catch {
    return true; // alive but unreadable: assume it holds the file
  }
}

export function writePidFile(path: string): void {
  try {
    const existing = Number(readFileSync(path, 'latin1').trim());
    if (isLiveBlockd(existing)) throw new CliError('cannot create PID file: Cannot lock pid file: Resource temporarily unavailable');
  } catch (error) {
    if (error instanceof CliError) throw error;
  }
  try {
    writeFileSync(path, `${process.pid}\n`);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    const reason = code === 'ENOENT' ? 'No such file or directory' : code === 'EACCES' ? 'Permission denied' : (error as Error).message;
    throw new CliError(`cannot create PID file: Could not create '${path}': ${reason}`);
  }
}

export function removePidFile(path: string): void {
  try {
    if (Number(readFileSync(path, 'latin1').trim()) === process.pid) unlinkSync(path);
  } catch {
    // already gone
  }
}
