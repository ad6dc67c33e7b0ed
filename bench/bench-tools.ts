/*
 * What the NBD benches share: their sizes (`--quick` for a short run, `--rounds=N`), running a client tool
 * (throwing with its stderr on failure), timing it, and a file of random bytes to write into
 * exports.
 */
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs';

export const QUICK = process.argv.includes('--quick');
export const SIZE = QUICK ? 256 << 20 : 1 << 30;
/** `--rounds=N` asks for more alternating rounds (a busy machine's spread needs them). */
const roundsOption = process.argv.find((arg) => arg.startsWith('--rounds='));
export const ROUNDS = roundsOption ? Math.max(1, Number.parseInt(roundsOption.slice('--rounds='.length), 10) || 1) : QUICK ? 2 : 3;
/** qemu-img bench has no random mode: both daemons get the same scattered stride (4 KiB x 7919). */
export const STRIDE = 4096 * 7919;
export const RANDOM_COUNT = QUICK ? 20_000 : 60_000;

export function run(command: string, args: string[]): string {
  const result = spawnSync(command, args, { encoding: 'utf8', maxBuffer: 1 << 26 });
  if (result.status !== 0) throw new Error(`${command} ${args.join(' ')}: ${result.stderr}`);
  return result.stdout;
}

/** Seconds `action` takes. */
export function timed(action: () => void): number {
  const start = process.hrtime.bigint();
  action();
  return Number(process.hrtime.bigint() - start) / 1e9;
}

/** A file of `size` random bytes (no zeroes to detect, nothing to compress). */
export function makeRandomFile(path: string, size: number): void {
  const fd = openSync(path, 'w');
  const chunk = Buffer.alloc(1 << 20);
  for (let done = 0; done < size; done += chunk.length) writeSync(fd, randomFillSync(chunk));
  closeSync(fd);
}

/** User and system CPU seconds a process has used so far, from /proc (clock ticks of 1/100 s). */
export function cpuSeconds(pid: number): { user: number; system: number } {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { user: Number(fields[11]) / 100, system: Number(fields[12]) / 100 };
}

/**
 * User CPU seconds a process has used so far. System time is left out: a writer through the
 * page cache pays for the kernel's writeback there, which varies far more from run to run
 * than the daemon's own work.
 */
export function userCpuSeconds(pid: number): number {
  return cpuSeconds(pid).user;
}

/** Runs `action`; returns its seconds and the user CPU seconds process `pid` used meanwhile. */
export function timedWithCpu(pid: number, action: () => void): { seconds: number; cpu: number } {
  const before = userCpuSeconds(pid);
  const seconds = timed(action);
  return { seconds, cpu: userCpuSeconds(pid) - before };
}

/** The middle value (the mean of the two middle ones for an even count). */
export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = sorted.length >> 1;
  return sorted.length % 2 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

/** A number with `digits` decimals, right-aligned in `width` characters (the benches' tables). */
export function fixed(value: number, width: number, digits = 3): string {
  return value.toFixed(digits).padStart(width);
}
