/*
 * Creating an image file, as QEMU's file protocol creates one: open it without
 * truncating (created if missing), take the image locks a creator takes (write and
 * resize used, resize not shared), check that no other user conflicts (a node of
 * this daemon, a qemu-storage-daemon, a qemu-io), and only then empty it and give it
 * its size. So a file someone else holds is refused before its first byte changes.
 * Every path that creates an image (blockdev-create, blockdev-snapshot-sync,
 * blockd-img create) comes through here. Without the native addon there are no
 * locks to take or see (the daemon says so at startup); the file is created unlocked,
 * as QEMU creates one on a filesystem without OFD locks.
 */
import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { genericError } from '../errors.js';
import type { PreallocMode } from '../generated/qapi-types.js';
import { changeImageLocks } from './image-locks.js';
import { describeErrno, errnoOf } from './io-error.js';
import { pwriteFull } from './native/batched-io.js';
import { nativeFileOps } from './native/native-file-ops.js';
import { PERM_ALL, PERM_RESIZE, PERM_WRITE } from './permissions.js';

export interface NewImageFile {
  size: number;
  preallocation?: PreallocMode;
  /** Runs once the locks are held, before the first change: a create job's startup point (QEMU's job first yields there). */
  locked?: () => void;
}

/** What a creator holds: it writes and resizes; others may do anything but resize it meanwhile (QEMU promises the size asked for). */
const CREATOR = { perm: PERM_WRITE | PERM_RESIZE, shared: PERM_ALL & ~PERM_RESIZE };
const ZERO_CHUNK = 1 << 20;

/**
 * Creates (or empties) the file at `path` with `size` bytes, preallocated as asked. Returns
 * it open and still locked, for the caller to write a format's metadata; closing the
 * handle drops the locks. Every failure is a QmpError with QEMU's text.
 */
export async function createImageFile(path: string, { size, preallocation = 'off', locked }: NewImageFile): Promise<FileHandle> {
  let handle: FileHandle;
  try {
    handle = await open(path, constants.O_RDWR | constants.O_CREAT, 0o644);
  } catch (error) {
    throw genericError(`Could not create '${path}': ${describeErrno(errnoOf(error))}`);
  }
  try {
    await changeImageLocks(handle.fd, new Set(), CREATOR, path);
    locked?.();
    await resize(handle, 0, 'off');
    await resize(handle, size, preallocation);
    return handle;
  } catch (error) {
    await handle.close();
    throw error;
  }
}

/** Fails with `what` and an errno's text. */
function failure(what: string, error: unknown): Error {
  return genericError(`${what}: ${describeErrno(errnoOf(error))}`);
}

/**
 * ftruncate, refusing lengths it could not be given: QEMU passes the size on as a signed
 * 64-bit offset, negative from 2^63 on (EINVAL); blockd's offsets are JavaScript numbers,
 * exact only up to 2^53 - 1, so a larger file is too large for it (EFBIG, as ext4 says too).
 */
async function setLength(handle: FileHandle, length: number, what: string): Promise<void> {
  if (length < 0) throw failure(what, { code: 'EINVAL' });
  if (length > Number.MAX_SAFE_INTEGER) throw failure(what, { code: 'EFBIG' });
  await handle.truncate(length).catch((error: unknown) => {
    throw failure(what, error);
  });
}

/** QEMU's raw_regular_truncate for a new file; a failed preallocation restores the old length. */
async function resize(handle: FileHandle, size: number, preallocation: PreallocMode): Promise<void> {
  const current = (await handle.stat()).size;
  const length = size >= 2 ** 63 ? -1 : size;
  if (preallocation !== 'off' && length < current) throw genericError('Cannot use preallocation for shrinking files');
  if (preallocation === 'off') return setLength(handle, length, 'Could not resize file');
  if (preallocation === 'metadata') throw genericError('Unsupported preallocation mode: metadata');
  try {
    if (preallocation === 'falloc') await preallocate(handle, current, length);
    else await writeZeros(handle, current, length);
  } catch (error) {
    await handle.truncate(current).catch(() => {});
    throw error;
  }
}

async function preallocate(handle: FileHandle, current: number, length: number): Promise<void> {
  if (length === current) return;
  const what = 'Could not preallocate new data';
  if (length > Number.MAX_SAFE_INTEGER) throw failure(what, { code: 'EFBIG' });
  await nativeFileOps.fallocate(handle.fd, 0, current, length - current).catch((error: unknown) => {
    throw failure(what, error);
  });
}

/** preallocation=full: the final length first (so a size the filesystem refuses fails at once), then zeros written up to it. */
async function writeZeros(handle: FileHandle, current: number, length: number): Promise<void> {
  await setLength(handle, length, 'Could not resize file');
  const zeros = Buffer.alloc(Math.min(ZERO_CHUNK, length - current));
  for (let offset = current; offset < length; offset += zeros.length) {
    await pwriteFull(handle.fd, zeros.subarray(0, Math.min(zeros.length, length - offset)), offset).catch((error: unknown) => {
      throw failure('Could not write zeros for preallocation', error);
    });
  }
  await handle.sync().catch((error: unknown) => {
    throw failure('Could not flush file to disk', error);
  });
}
