/*
 * The file syscalls Node's fs lacks (SEEK_DATA/SEEK_HOLE, fallocate, OFD byte-range locks,
 * sync_file_range, copy_file_range, batched pwrite, a read of the page cache that never waits for the disk),
 * from blockd's native addon (native/, built at npm install) or, when it cannot be loaded,
 * from a pure-JS fallback: everything is data, no fallocate, no locking (so nodes that
 * want image locks refuse to open: see drivers/file.ts).
 */
import { existsSync, fstat } from 'node:fs';
import { createRequire } from 'node:module';
import { constants } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

export const FALLOC_FL_KEEP_SIZE = 0x01, FALLOC_FL_PUNCH_HOLE = 0x02, FALLOC_FL_ZERO_RANGE = 0x10;

export interface NativeFileOps {
  readonly native: boolean;                 // true when the addon loaded
  /** lseek(fd, offset, SEEK_DATA): the next data offset >= offset, or null when there is no data after offset (ENXIO). */
  seekData(fd: number, offset: number): Promise<number | null>;
  /** lseek(fd, offset, SEEK_HOLE): the next hole offset >= offset (EOF counts as a hole); null on ENXIO. */
  seekHole(fd: number, offset: number): Promise<number | null>;
  /** fallocate(fd, mode, offset, length). Rejects with an Error whose .code is the errno name (EOPNOTSUPP, EINVAL, ...) and .errno the number. */
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<void>;
  /** Non-blocking OFD lock change on bytes [start, start+length): fcntl(F_OFD_SETLK) with F_RDLCK ('shared') or F_UNLCK ('unlock'). Rejects with code EAGAIN/EACCES when it cannot be taken. */
  ofdLock(fd: number, start: number, length: number, kind: 'shared' | 'unlock'): Promise<void>;
  /** fcntl(F_OFD_GETLK) asking about an exclusive (F_WRLCK) lock of [start, start+length): true when ANOTHER open file description holds a lock there. */
  ofdTestConflict(fd: number, start: number, length: number): Promise<boolean>;
  /** sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE): starts writing the range's dirty pages back (length 0: to the end). */
  startWriteback(fd: number, offset: number, length: number): Promise<void>;
  /**
   * copy_file_range(2): the kernel copies up to `length` bytes between two files (sharing extents
   * where the filesystem can) and resolves to the bytes copied, which may be fewer (0 past the
   * source's end). Rejects with .code EXDEV, EOPNOTSUPP, ... when it cannot, and always without the addon.
   */
  copyFileRange(fdIn: number, offsetIn: number, fdOut: number, offsetOut: number, length: number): Promise<number>;
  /** Runs n pwrites one after the other on one pool thread; results[i] becomes the bytes written or -errno. Absent without the addon. */
  writeBatch?(fds: Int32Array, offsets: Float64Array, buffers: Buffer[], results: Float64Array): Promise<void>;
  /**
   * preadv2(RWF_NOWAIT) on the calling thread: the bytes the page cache holds from `offset`
   * (fewer than asked when only a first part is cached, 0 at the end of the file), or -errno
   * (-EAGAIN: not cached). Absent without the addon.
   */
  readCached?(fd: number, buffer: Buffer, offset: number): number;
  /**
   * lseek(SEEK_DATA, or SEEK_HOLE when `hole`) on the calling thread, as seekData/seekHole answer
   * (null on ENXIO; other errors throw as the async ones reject). Absent without the addon.
   */
  seekNow?(fd: number, offset: number, hole: boolean): number | null;
}

/** The addon's exports (native/blockd_native.c); they throw a TypeError on bad arguments. */
interface Addon {
  seekData(fd: number, offset: number): Promise<number | null>;
  seekHole(fd: number, offset: number): Promise<number | null>;
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<void>;
  ofdLock(fd: number, start: number, length: number, shared: 0 | 1): Promise<void>;
  ofdTestConflict(fd: number, start: number, length: number): Promise<boolean>;
  writeBatch(fds: Int32Array, offsets: Float64Array, buffers: Buffer[], results: Float64Array): Promise<void>;
  startWriteback(fd: number, offset: number, length: number): Promise<void>;
  copyFileRange?(fdIn: number, offsetIn: number, fdOut: number, offsetOut: number, length: number): Promise<number>;
  readCached(fd: number, buffer: Buffer, offset: number): number;
  seekNow?(fd: number, offset: number, hole: 0 | 1): number;
}

const fstatAsync = promisify(fstat);

function notSupported(syscall: string): never {
  throw Object.assign(new Error(`${syscall}: Operation not supported`), { code: 'EOPNOTSUPP', errno: constants.errno.EOPNOTSUPP });
}

/** Everything reads as data and nothing is locked, as QEMU behaves with locking=off. */
export function fallbackFileOps(): NativeFileOps {
  const size = async (fd: number): Promise<number> => (await fstatAsync(fd)).size;
  return {
    native: false,
    seekData: async (fd, offset) => (offset < await size(fd) ? offset : null),
    seekHole: async (fd, offset) => {
      const end = await size(fd);
      return offset < end ? end : null;
    },
    // Callers take EOPNOTSUPP as "write zeros / skip the discard", as they do on filesystems without fallocate.
    fallocate: async () => notSupported('fallocate'),
    ofdLock: async () => {},
    ofdTestConflict: async () => false,
    startWriteback: async () => {}, // only a hint: the flush still does the work
    copyFileRange: async () => notSupported('copy_file_range'),
  };
}

/** The directory holding package.json, above this module both in src/ (tsx) and in dist/src/. */
function repoRoot(dir: string): string | null {
  if (existsSync(join(dir, 'package.json'))) return dir;
  const parent = dirname(dir);
  return parent === dir ? null : repoRoot(parent);
}

/** The addon, or why it could not be loaded (not built: install scripts skipped, no compiler). */
function loadAddon(): { addon: Addon } | { missing: string } {
  const root = repoRoot(dirname(fileURLToPath(import.meta.url)));
  if (root === null) return { missing: 'no package root above the module' };
  const path = join(root, 'native/build/Release/blockd_native.node');
  if (!existsSync(path)) return { missing: `${path} is not built (npm ci needs python3, make and a C compiler, and must run install scripts)` };
  try {
    return { addon: createRequire(import.meta.url)(path) as Addon };
  } catch (error) {
    return { missing: `${path} does not load: ${(error as Error).message}` };
  }
}

/** seekNow's number as seekData/seekHole resolve: the offset, null for ENXIO, else an Error shaped as fs's. */
function seekResult(result: number): number | null {
  if (result >= 0) return result;
  if (-result === constants.errno.ENXIO) return null;
  const code = Object.entries(constants.errno).find(([, value]) => value === -result)?.[0] ?? `E${-result}`;
  throw Object.assign(new Error(`${code}: lseek failed`), { code, errno: -result, syscall: 'lseek' });
}

function addonFileOps(addon: Addon): NativeFileOps {
  // async wrappers turn the addon's synchronous argument errors into rejections too.
  return {
    native: true,
    seekData: async (fd, offset) => addon.seekData(fd, offset),
    seekHole: async (fd, offset) => addon.seekHole(fd, offset),
    fallocate: async (fd, mode, offset, length) => addon.fallocate(fd, mode, offset, length),
    ofdLock: async (fd, start, length, kind) => addon.ofdLock(fd, start, length, kind === 'shared' ? 1 : 0),
    ofdTestConflict: async (fd, start, length) => addon.ofdTestConflict(fd, start, length),
    startWriteback: async (fd, offset, length) => (typeof addon.startWriteback === 'function' ? addon.startWriteback(fd, offset, length) : undefined),
    // An addon built before it lacks it: callers then copy by reading and writing, as on EXDEV.
    copyFileRange: async (fdIn, offsetIn, fdOut, offsetOut, length) => (typeof addon.copyFileRange === 'function'
      ? addon.copyFileRange(fdIn, offsetIn, fdOut, offsetOut, length)
      : notSupported('copy_file_range')),
    // An addon built before batching lacks it: requests then go one by one through fs.
    writeBatch: typeof addon.writeBatch === 'function'
      ? async (fds, offsets, buffers, results) => addon.writeBatch(fds, offsets, buffers, results)
      : undefined,
    readCached: typeof addon.readCached === 'function' ? (fd, buffer, offset) => addon.readCached(fd, buffer, offset) : undefined,
    seekNow: typeof addon.seekNow === 'function' ? (fd, offset, hole) => seekResult(addon.seekNow!(fd, offset, hole ? 1 : 0)) : undefined,
  };
}

const loaded = loadAddon();

export const nativeFileOps: NativeFileOps = 'addon' in loaded ? addonFileOps(loaded.addon) : fallbackFileOps();

/** Why the fallback serves (undefined when the addon loaded): said once at start-up and in every refusal to lock. */
export const nativeAddonMissing: string | undefined = 'missing' in loaded ? loaded.missing : undefined;
