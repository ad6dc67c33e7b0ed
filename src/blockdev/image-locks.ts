/*
 * QEMU's image locks: OFD byte-range locks on an image file through which every user of
 * it (a blockd node, an image being created, QEMU, qemu-img, qemu-io) says which
 * permissions it uses (byte 100+i) and which it does not share (byte 200+i). All are
 * shared (read) locks, so users coexist until one needs what another will not share. A
 * user first locks its bytes, then tests for the others': two users starting at once
 * then both see each other and both fail, never both succeed. OFD locks belong to one
 * open file description: a second descriptor of this very process is another user.
 */
import { genericError } from '../errors.js';
import { describeErrno, errnoOf } from './io-error.js';
import { nativeFileOps } from './native/native-file-ops.js';
import { permissionNames, type PermissionPair } from './permissions.js';

const LOCK_USED_BASE = 100;
const LOCK_UNSHARED_BASE = 200;
const PERM_BITS = 4;

/** The lock bytes a set of permissions occupies. */
function lockBytes(needs: PermissionPair): Set<number> {
  const bytes = new Set<number>();
  for (let bit = 0; bit < PERM_BITS; bit++) {
    if (needs.perm & (1 << bit)) bytes.add(LOCK_USED_BASE + bit);
    if (!(needs.shared & (1 << bit))) bytes.add(LOCK_UNSHARED_BASE + bit);
  }
  return bytes;
}

/** Takes `bytes` as shared locks on `fd` (QEMU's text when one cannot be taken). */
export async function takeLockBytes(fd: number, bytes: Iterable<number>): Promise<void> {
  for (const byte of bytes) {
    await nativeFileOps.ofdLock(fd, byte, 1, 'shared').catch((error: unknown) => {
      throw genericError(`Failed to lock byte ${byte}: ${describeErrno(errnoOf(error))}`);
    });
  }
}

async function releaseLockBytes(fd: number, bytes: Iterable<number>): Promise<void> {
  for (const byte of bytes) await nativeFileOps.ofdLock(fd, byte, 1, 'unlock').catch(() => {});
}

/** Refuses when another user holds a byte that conflicts with `needs`: one that does not share what we use, or uses what we do not share. */
async function checkOtherUsers(fd: number, needs: PermissionPair, filename: string): Promise<void> {
  const refuse = (text: string) => genericError(text).withHint(`Is another process using the image [${filename}]?`);
  for (let bit = 0; bit < PERM_BITS; bit++) {
    if (needs.perm & (1 << bit) && (await nativeFileOps.ofdTestConflict(fd, LOCK_UNSHARED_BASE + bit, 1))) {
      throw refuse(`Failed to get "${permissionNames(1 << bit)[0]}" lock`);
    }
  }
  for (let bit = 0; bit < PERM_BITS; bit++) {
    if (!(needs.shared & (1 << bit)) && (await nativeFileOps.ofdTestConflict(fd, LOCK_USED_BASE + bit, 1))) {
      throw refuse(`Failed to get shared "${permissionNames(1 << bit)[0]}" lock`);
    }
  }
}

/**
 * Moves `fd`'s lock bytes from `held` to those `needs` occupies and returns them. When
 * another user conflicts, throws QEMU's text and leaves `held` as it was.
 */
export async function changeImageLocks(fd: number, held: ReadonlySet<number>, needs: PermissionPair, filename: string): Promise<Set<number>> {
  const wanted = lockBytes(needs);
  const added = [...wanted].filter((byte) => !held.has(byte));
  try {
    await takeLockBytes(fd, added);
    await checkOtherUsers(fd, needs, filename);
  } catch (error) {
    await releaseLockBytes(fd, added);
    throw error;
  }
  await releaseLockBytes(fd, [...held].filter((byte) => !wanted.has(byte)));
  return wanted;
}
