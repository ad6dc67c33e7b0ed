/*
 * What the qcow2 interop tests share: running qemu-img and qemu-io (also as another process
 * holding an image), comparing what blockd reads with what QEMU reads, raw file access, and a
 * seeded random generator so a failure names its seed.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { closeSync, openSync, readFileSync, readSync, writeSync } from 'node:fs';
import type { ChildEdge } from '../../src/blockdev/child-edge.js';
import type { MapEntry } from '../../src/tools/img-map.js';
import { waitUntil } from './wait-until.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;

export interface ToolResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

export function runTool(command: string, args: string[]): ToolResult {
  const { status, stdout, stderr, error } = spawnSync(command, args, { encoding: 'utf8', maxBuffer: 256 * MiB });
  if (error) throw error;
  return { status, stdout, stderr };
}

/** Runs qemu-img and requires exit status 0; returns its stdout. */
export function runQemuImg(...args: string[]): string {
  const result = runTool('qemu-img', args);
  assert.equal(result.status, 0, `qemu-img ${args.join(' ')} failed: ${result.stderr}${result.stdout}`);
  return result.stdout;
}

function qemuIoArgs(path: string, commands: string[], flags: string[]): string[] {
  return [...flags, ...commands.flatMap((command) => ['-c', command]), path];
}

function requireQemuIoSuccess(args: string[], result: ToolResult): string {
  const failed = result.status !== 0 || /Pattern verification failed|error/i.test(result.stdout + result.stderr);
  assert.ok(!failed, `qemu-io ${args.join(' ')} failed (${result.status}): ${result.stderr}${result.stdout}`);
  return result.stdout;
}

/** Runs qemu-io commands on one image and requires them all to succeed (a failed read -P exits 1). */
export function qemuIo(path: string, commands: string[], flags: string[] = []): string {
  const args = qemuIoArgs(path, commands, flags);
  return requireQemuIoSuccess(args, runTool('qemu-io', args));
}

/** qemu-io as qemuIo runs it, without blocking the test's event loop: several clients can work at once. */
export function qemuIoInBackground(path: string, commands: string[], flags: string[] = []): Promise<string> {
  const args = qemuIoArgs(path, commands, flags);
  const child = spawn('qemu-io', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (status) => {
      try {
        resolve(requireQemuIoSuccess(args, { status, stdout, stderr }));
      } catch (error) {
        reject(error);
      }
    });
  });
}

/** Another process using an image: qemu-io holding it open read-write (its image locks taken) until released. */
export interface HeldImage {
  release(): Promise<void>;
}

/**
 * Opens `path` in a qemu-io that sleeps; resolves once qemu-img sees its locks (a plain `qemu-img
 * info` is refused). The probe holds the image for a moment too: a qemu-io that met it starts again.
 */
export async function holdImage(path: string, format = 'qcow2'): Promise<HeldImage> {
  for (let attempt = 1; ; attempt++) {
    const child = spawn('qemu-io', ['-f', format, '-c', 'sleep 3600000', path], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    const release = async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      await exited;
    };
    try {
      await waitUntil(() => {
        if (child.exitCode !== null) throw new Error(`qemu-io could not hold ${path}: ${stderr}`);
        return /Failed to get shared "write" lock/.test(runTool('qemu-img', ['info', '-f', format, path]).stderr);
      }, `qemu-io holds ${path}`);
      return { release };
    } catch (error) {
      await release();
      if (attempt >= 10 || !/Failed to get "write" lock/.test(stderr)) throw error;
    }
  }
}

export interface PatternRange {
  offset: number;
  length: number;
  pattern: number;
}

/** Verifies in qemu-io that each range reads back as its pattern byte (many ranges per process). */
export function qemuIoReadPatterns(path: string, ranges: PatternRange[], context = ''): void {
  for (let i = 0; i < ranges.length; i += 200) {
    const commands = ranges.slice(i, i + 200).map((r) => `read -q -P 0x${r.pattern.toString(16)} ${r.offset} ${r.length}`);
    const result = runTool('qemu-io', ['-f', 'qcow2', ...commands.flatMap((command) => ['-c', command]), path]);
    assert.ok(result.status === 0 && !/Pattern verification failed/.test(result.stdout),
      `${context}: qemu-io read -P mismatch in ${path}: ${result.stdout}${result.stderr}`);
  }
}

export interface Qcow2CreateOptions {
  clusterSize?: number;
  refcountBits?: number;
  compat?: '0.10' | '1.1';
  backing?: { path: string; format: string };
  extra?: string[];
}

export function createQcow2(path: string, size: number | undefined, options: Qcow2CreateOptions = {}): string {
  const opts: string[] = [];
  if (options.clusterSize) opts.push(`cluster_size=${options.clusterSize}`);
  if (options.refcountBits) opts.push(`refcount_bits=${options.refcountBits}`);
  if (options.compat) opts.push(`compat=${options.compat}`);
  opts.push(...(options.extra ?? []));
  runQemuImg('create', '-q', '-f', 'qcow2', ...(opts.length ? ['-o', opts.join(',')] : []),
    ...(options.backing ? ['-b', options.backing.path, '-F', options.backing.format] : []), path, ...(size === undefined ? [] : [String(size)]));
  return path;
}

export interface CheckReport {
  status: number | null;
  corruptions: number;
  leaks: number;
  checkErrors: number;
  output: string;
}

export function qemuImgCheck(path: string, format = 'qcow2'): CheckReport {
  const result = runTool('qemu-img', ['check', '-f', format, '--output=json', path]);
  let report: Record<string, number> = {};
  try {
    report = JSON.parse(result.stdout) as Record<string, number>;
  } catch {
    // no JSON: the check could not run; the status says so
  }
  return {
    status: result.status,
    corruptions: report.corruptions ?? 0,
    leaks: report.leaks ?? 0,
    checkErrors: report['check-errors'] ?? 0,
    output: `${result.stdout}${result.stderr}`,
  };
}

/** `qemu-img check` exits 0: no corruption, no leak. */
export function assertCheckClean(path: string, context = ''): void {
  const report = qemuImgCheck(path);
  assert.equal(report.status, 0, `${context}: qemu-img check ${path} exit ${report.status}: ${report.output}`);
}

export type MapExtent = Omit<MapEntry, 'filename'>;

export function qemuImgMap(path: string): MapExtent[] {
  return JSON.parse(runQemuImg('map', '--output=json', path)) as MapExtent[];
}

/** `qemu-img compare` of two images of the given formats: identical contents, or the test fails. */
export function qemuImgCompare(first: string, second: string, formats: [string, string], context = ''): void {
  const result = runTool('qemu-img', ['compare', '-f', formats[0], '-F', formats[1], first, second]);
  assert.equal(result.status, 0, `${context}: qemu-img compare ${first} ${second}: ${result.stdout}${result.stderr}`);
}

export function convertToRaw(image: string, raw: string): void {
  runQemuImg('convert', '-O', 'raw', image, raw);
}

/** Bytes of the file at `offset`; past the end of the file they read as zeros. */
export function readAt(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const buffer = Buffer.alloc(length);
    readSync(fd, buffer, 0, length, offset);
    return buffer;
  } finally {
    closeSync(fd);
  }
}

export function writeAt(path: string, offset: number, bytes: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

/** A big-endian 64-bit field of an image file (qcow2 header fields and table entries). */
export function readU64(path: string, offset: number): bigint {
  return readAt(path, offset, 8).readBigUInt64BE();
}

export function writeU64(path: string, offset: number, value: bigint): void {
  const bytes = Buffer.alloc(8);
  bytes.writeBigUInt64BE(value);
  writeAt(path, offset, bytes);
}

export function sha256File(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

const COMPARE_CHUNK = 4 * MiB;

/** Reads the whole disk through blockd in chunks and compares it with a raw file of the same length. */
export async function assertDiskMatchesRaw(disk: ChildEdge, rawPath: string, context = ''): Promise<void> {
  const raw = await open(rawPath, 'r');
  try {
    const rawLength = (await raw.stat()).size;
    assert.equal(disk.length(), rawLength, `${context}: blockd size ${disk.length()} vs raw ${rawLength}`);
    const ours = Buffer.alloc(COMPARE_CHUNK);
    const theirs = Buffer.alloc(COMPARE_CHUNK);
    for (let offset = 0; offset < rawLength; offset += COMPARE_CHUNK) {
      const length = Math.min(COMPARE_CHUNK, rawLength - offset);
      await disk.read(offset, ours.subarray(0, length));
      await raw.read(theirs, 0, length, offset);
      if (!ours.subarray(0, length).equals(theirs.subarray(0, length))) {
        const at = firstDifference(ours.subarray(0, length), theirs.subarray(0, length));
        assert.fail(`${context}: byte ${offset + at} differs: blockd 0x${ours[at]!.toString(16)}, QEMU 0x${theirs[at]!.toString(16)}`);
      }
    }
  } finally {
    await raw.close();
  }
}

export function firstDifference(a: Buffer, b: Buffer): number {
  for (let i = 0; i < Math.min(a.length, b.length); i++) if (a[i] !== b[i]) return i;
  return Math.min(a.length, b.length);
}

/** A small deterministic generator (mulberry32): the same seed replays the same run. */
export class SeededRandom {
  private state: number;

  constructor(readonly seed: number) {
    this.state = seed >>> 0;
  }

  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  /** An integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  chance(p: number): boolean {
    return this.next() < p;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }

  /** Bytes that depend on the generator and on their position, so misplaced data shows. */
  bytes(length: number): Buffer {
    const buffer = Buffer.alloc(length);
    const base = this.int(0x100000000);
    for (let i = 0; i + 4 <= length; i += 4) buffer.writeUInt32LE((base + Math.imul(i, 0x9e3779b1)) >>> 0, i);
    for (let i = length & ~3; i < length; i++) buffer[i] = ((base >>> ((i & 3) * 8)) ^ i) & 0xff;
    return buffer;
  }
}

/** The fixed seeds, plus BLOCKD_MODEL_SEED when set. */
export function testSeeds(fixed: number[]): number[] {
  const extra = process.env.BLOCKD_MODEL_SEED;
  if (extra === undefined || extra === '') return fixed;
  const seed = Number(extra);
  assert.ok(Number.isSafeInteger(seed), `BLOCKD_MODEL_SEED must be an integer, got ${extra}`);
  return [...fixed, seed];
}
