/*
 * The images and the page-cache state of issue 16's independent benchmark, for job benches:
 * a file of random bytes (no zeroes anywhere) converted by `qemu-img convert` into a qcow2
 * with 64 KiB clusters, dense or with one 64 KiB cluster of random data in every 640 KiB
 * (90 % sparse). Before a step that writes the image's size, the page cache is brought to
 * the same state for each daemon by writing and deleting that much scratch data, and the
 * source is read into the cache. The limit of a job that flushes what it copies is the
 * disk's: a cached copy of the source flushed with fdatasync, measured in the same run.
 */
import { randomFillSync } from 'node:crypto';
import { closeSync, ftruncateSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { makeRandomFile, run, timed } from './bench-tools.js';

export type Fill = 'dense' | 'sparse';

const CLUSTER = 64 << 10;
/** The sparse image: one cluster of data in every SPARSE_STRIDE bytes. */
const SPARSE_STRIDE = 640 << 10;

/** Bytes of data a `fill` image of `size` bytes holds. */
export function allocatedBytes(fill: Fill, size: number): number {
  return fill === 'dense' ? size : Math.ceil(size / SPARSE_STRIDE) * CLUSTER;
}

/** A raw file of `size` bytes with one random cluster every SPARSE_STRIDE and holes between. */
function makeSparseRandomFile(path: string, size: number): void {
  const fd = openSync(path, 'w');
  const cluster = Buffer.alloc(CLUSTER);
  for (let offset = 0; offset < size; offset += SPARSE_STRIDE) writeSync(fd, randomFillSync(cluster), 0, CLUSTER, offset);
  ftruncateSync(fd, size);
  closeSync(fd);
}

/** `path`: a qcow2 (64 KiB clusters) of `size` random bytes, dense or 90 % sparse. */
export function makeRandomQcow2(path: string, size: number, fill: Fill): void {
  const raw = `${path}.raw`;
  if (fill === 'dense') makeRandomFile(raw, size);
  else makeSparseRandomFile(raw, size);
  try {
    run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${CLUSTER}`, raw, path]);
  } finally {
    rmSync(raw, { force: true });
  }
}

/** Reads `path` through the page cache (the job's source starts cached for each daemon alike). */
export function readIntoCache(path: string): void {
  const fd = openSync(path, 'r');
  const buffer = Buffer.alloc(4 << 20);
  while (readSync(fd, buffer) > 0);
  closeSync(fd);
}

/**
 * Writes `size` bytes of scratch data into `dir`, flushes it and deletes it: whatever the
 * run before left dirty is written back, and the cache holds the same amount of free room
 * for the next daemon.
 */
export function levelPageCache(dir: string, size: number): void {
  const scratch = join(dir, 'page-cache-scratch');
  makeRandomFile(scratch, size);
  run('sync', []);
  rmSync(scratch);
}

/** Seconds `dd` takes to copy `source` (read from the cache) into a new file in `dir` and fdatasync it. */
export function flushedCopySeconds(source: string, dir: string): number {
  const copy = join(dir, 'flushed-copy');
  readIntoCache(source);
  try {
    return timed(() => run('dd', [`if=${source}`, `of=${copy}`, 'bs=1M', 'conv=fdatasync', 'status=none']));
  } finally {
    rmSync(copy, { force: true });
  }
}
