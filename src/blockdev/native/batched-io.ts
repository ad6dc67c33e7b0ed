/*
 * File reads and writes with few thread hand-offs. Each hand-off wakes a pool
 * thread, and on a virtual machine a wake-up can cost more than the request:
 * a buffered write only copies into the page cache. So the writes issued in
 * one turn of the event loop go together (QEMU plugs its AIO queue for the
 * same reason), a few small ones per hand-off, while a large write still gets
 * a thread of its own so big transfers run in parallel. Reads may wait for
 * the disk: each keeps a thread of its own, so they reach the disk in
 * parallel. Without the native addon every write is its own fs call too.
 */
import { read, write } from 'node:fs';
import { constants } from 'node:os';
import { nativeFileOps } from './native-file-ops.js';

/** How many writes, and how many bytes, one hand-off carries at most. */
const WRITES_PER_HANDOFF = 4;
const BYTES_PER_HANDOFF = 256 * 1024;

interface QueuedWrite {
  fd: number;
  buffer: Buffer;
  offset: number;
  resolve(bytes: number): void;
  reject(error: Error): void;
}

const ERRNO_NAMES = new Map(Object.entries(constants.errno).map(([name, value]) => [value, name]));

/** An error shaped as Node's fs errors are: `code` is the errno name (errnoOf reads it). */
function errnoError(errno: number, syscall: string): Error {
  const code = ERRNO_NAMES.get(errno) ?? `E${errno}`;
  return Object.assign(new Error(`${code}: ${syscall} failed`), { code, errno, syscall });
}

let queued: QueuedWrite[] = [];

function submit(batch: QueuedWrite[]): void {
  const n = batch.length;
  const fds = new Int32Array(n);
  const offsets = new Float64Array(n);
  const results = new Float64Array(n);
  batch.forEach((request, i) => {
    fds[i] = request.fd;
    offsets[i] = request.offset;
  });
  nativeFileOps.writeBatch!(fds, offsets, batch.map((request) => request.buffer), results).then(() => {
    batch.forEach((request, i) => {
      const result = results[i]!;
      if (result < 0) request.reject(errnoError(-result, 'pwrite'));
      else request.resolve(result);
    });
  }, (error: unknown) => batch.forEach((request) => request.reject(error instanceof Error ? error : errnoError(constants.errno.EIO, 'pwrite'))));
}

/** Sends the writes this turn of the event loop queued, cut into hand-offs. */
function flush(): void {
  const requests = queued;
  queued = [];
  let batch: QueuedWrite[] = [];
  let bytes = 0;
  for (const request of requests) {
    if (batch.length && (batch.length === WRITES_PER_HANDOFF || bytes + request.buffer.length > BYTES_PER_HANDOFF)) {
      submit(batch);
      batch = [];
      bytes = 0;
    }
    batch.push(request);
    bytes += request.buffer.length;
  }
  if (batch.length) submit(batch);
}

function queueWrite(fd: number, buffer: Buffer, offset: number): Promise<number> {
  return new Promise((resolve, reject) => {
    if (!queued.length) setImmediate(flush);
    queued.push({ fd, buffer, offset, resolve, reject });
  });
}

function fsWrite(fd: number, buffer: Buffer, offset: number): Promise<number> {
  return new Promise((resolve, reject) => write(fd, buffer, 0, buffer.length, offset, (error, bytes) => (error ? reject(error) : resolve(bytes))));
}

function fsRead(fd: number, buffer: Buffer, offset: number): Promise<number> {
  return new Promise((resolve, reject) => read(fd, buffer, 0, buffer.length, offset, (error, bytes) => (error ? reject(error) : resolve(bytes))));
}

const writeSome = nativeFileOps.writeBatch ? queueWrite : fsWrite;

/** Reads into all of `buffer` from `offset` of `fd`; resolves with the bytes read, fewer only at the end of the file. */
export async function preadFull(fd: number, buffer: Buffer, offset: number): Promise<number> {
  let done = 0;
  while (done < buffer.length) {
    const bytes = await fsRead(fd, buffer.subarray(done), offset + done);
    if (bytes === 0) break;
    done += bytes;
  }
  return done;
}

/** Writes all of `buffer` at `offset` of `fd`. */
export async function pwriteFull(fd: number, buffer: Buffer, offset: number): Promise<void> {
  let done = 0;
  while (done < buffer.length) {
    const bytes = await writeSome(fd, buffer.subarray(done), offset + done);
    if (bytes === 0) throw errnoError(constants.errno.EIO, 'pwrite');
    done += bytes;
  }
}
