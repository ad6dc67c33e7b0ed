/*
 * File reads and writes with few thread hand-offs. Each hand-off wakes a pool
 * thread, and on a virtual machine a wake-up can cost more than the request:
 * a buffered write only copies into the page cache. And buffered writes to
 * one file run one at a time in the kernel anyway (the inode lock), so more
 * threads writing one file only spin on that lock. So each file has one
 * batch of writes at a time in a pool thread: the writes issued meanwhile
 * queue up and go together as the next batch (QEMU plugs its AIO queue for
 * the same reason). Reads may wait for the disk: each keeps a thread of its
 * own, so they reach the disk in parallel; but a small read the page cache
 * holds is copied at once on the calling thread (preadv2 with RWF_NOWAIT),
 * which costs less than the hand-off (it was most of what a sparse mirror
 * spent on the main thread). Without the native addon every read and write
 * is its own fs call.
 */
import { read, write } from 'node:fs';
import { constants } from 'node:os';
import { nativeFileOps } from './native-file-ops.js';

/** The most one batch carries: enough to amortise a hand-off, little enough to keep results flowing. */
const WRITES_PER_BATCH = 16;
const BYTES_PER_BATCH = 16 << 20;

interface QueuedWrite {
  buffer: Buffer;
  offset: number;
  resolve(bytes: number): void;
  reject(error: Error): void;
}

/** One file's writes: those waiting, and whether a batch of them is in a pool thread now. */
interface WriteQueue {
  waiting: QueuedWrite[];
  busy: boolean;
}

const ERRNO_NAMES = new Map(Object.entries(constants.errno).map(([name, value]) => [value, name]));

/** An error shaped as Node's fs errors are: `code` is the errno name (errnoOf reads it). */
function errnoError(errno: number, syscall: string): Error {
  const code = ERRNO_NAMES.get(errno) ?? `E${errno}`;
  return Object.assign(new Error(`${code}: ${syscall} failed`), { code, errno, syscall });
}

const queues = new Map<number, WriteQueue>();

/** Takes the next batch off `queue` (in issue order) and sends it to a pool thread. */
function sendBatch(fd: number, queue: WriteQueue): void {
  let count = 0;
  let bytes = 0;
  while (count < queue.waiting.length && count < WRITES_PER_BATCH && (count === 0 || bytes + queue.waiting[count]!.buffer.length <= BYTES_PER_BATCH)) {
    bytes += queue.waiting[count]!.buffer.length;
    count++;
  }
  const batch = queue.waiting.splice(0, count);
  const fds = new Int32Array(count).fill(fd);
  const offsets = Float64Array.from(batch, (request) => request.offset);
  const results = new Float64Array(count);
  queue.busy = true;
  const settle = (each: (request: QueuedWrite, i: number) => void) => {
    queue.busy = false;
    if (queue.waiting.length) sendBatch(fd, queue); // keep the file's writer busy before answering
    else queues.delete(fd);
    batch.forEach(each);
  };
  nativeFileOps.writeBatch!(fds, offsets, batch.map((request) => request.buffer), results).then(
    () => settle((request, i) => {
      const result = results[i]!;
      if (result < 0) request.reject(errnoError(-result, 'pwrite'));
      else request.resolve(result);
    }),
    (error: unknown) => settle((request) => request.reject(error instanceof Error ? error : errnoError(constants.errno.EIO, 'pwrite'))),
  );
}

function queueWrite(fd: number, buffer: Buffer, offset: number): Promise<number> {
  return new Promise((resolve, reject) => {
    let queue = queues.get(fd);
    if (!queue) {
      queue = { waiting: [], busy: false };
      queues.set(fd, queue);
      // The writes issued in this turn of the event loop join the first batch.
      const first = queue;
      setImmediate(() => {
        if (!first.busy && first.waiting.length) sendBatch(fd, first);
      });
    }
    queue.waiting.push({ buffer, offset, resolve, reject });
  });
}

function fsWrite(fd: number, buffer: Buffer, offset: number): Promise<number> {
  return new Promise((resolve, reject) => write(fd, buffer, 0, buffer.length, offset, (error, bytes) => (error ? reject(error) : resolve(bytes))));
}

function fsRead(fd: number, buffer: Buffer, offset: number): Promise<number> {
  return new Promise((resolve, reject) => read(fd, buffer, 0, buffer.length, offset, (error, bytes) => (error ? reject(error) : resolve(bytes))));
}

const writeSome = nativeFileOps.writeBatch ? queueWrite : fsWrite;

/** Reads up to this size may be served from the page cache on the calling thread (a larger copy would hold the event loop). */
const CACHED_READ_MAX = 256 << 10;
const readCached = nativeFileOps.readCached;
/** Descriptors whose file system cannot read without waiting (RWF_NOWAIT: EOPNOTSUPP): not asked again. */
const noCachedReads = new Set<number>();

/** Reads into all of `buffer` from `offset` of `fd`; resolves with the bytes read, fewer only at the end of the file. */
export async function preadFull(fd: number, buffer: Buffer, offset: number): Promise<number> {
  let done = 0;
  if (readCached && buffer.length <= CACHED_READ_MAX && !noCachedReads.has(fd)) {
    const bytes = readCached(fd, buffer, offset);
    if (bytes === -constants.errno.EOPNOTSUPP) noCachedReads.add(fd);
    // Not cached (or any error: the fs read below meets it again and reports it): read as usual.
    if (bytes === 0) return 0;
    if (bytes > 0) done = bytes;
  }
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
