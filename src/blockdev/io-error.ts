/*
 * The error of the I/O path: an errno name and a message. NBD turns the code
 * into its error numbers, jobs into BLOCK_JOB_ERROR, commands into
 * GenericError with the message. Errors from node's fs keep their code.
 */

export type ErrnoName = 'EIO' | 'EPERM' | 'EINVAL' | 'ENOSPC' | 'ENOTSUP' | 'ENOMEDIUM' | 'EBUSY' | 'EROFS' | 'EFBIG' | 'ENOENT' | 'EAGAIN' | 'EACCES';

/** What a node answers when its driver cannot change its size (QEMU's words). */
export const RESIZE_UNSUPPORTED = 'Image format driver does not support resize';

const DESCRIPTIONS: Record<string, string> = {
  EIO: 'Input/output error',
  EPERM: 'Operation not permitted',
  EINVAL: 'Invalid argument',
  ENOSPC: 'No space left on device',
  ENOTSUP: 'Operation not supported',
  EOPNOTSUPP: 'Operation not supported',
  ENOMEDIUM: 'No medium found',
  EBUSY: 'Device or resource busy',
  EROFS: 'Read-only file system',
  EFBIG: 'File too large',
  ENOENT: 'No such file or directory',
  EAGAIN: 'Resource temporarily unavailable',
  EACCES: 'Permission denied',
  EISDIR: 'Is a directory',
  ENOTDIR: 'Not a directory',
  // A backing name that grows at every level ('./a' naming './a') ends here, as in QEMU.
  ENAMETOOLONG: 'File name too long',
  ELOOP: 'Too many levels of symbolic links',
  EMFILE: 'Too many open files',
  EEXIST: 'File exists',
  EBADF: 'Bad file descriptor',
  ENXIO: 'No such device or address',
  ENODEV: 'No such device',
  ECONNREFUSED: 'Connection refused',
  ECONNRESET: 'Connection reset by peer',
  ETIMEDOUT: 'Connection timed out',
  EHOSTUNREACH: 'No route to host',
  ENETUNREACH: 'Network is unreachable',
  EADDRNOTAVAIL: 'Cannot assign requested address',
  EPIPE: 'Broken pipe',
  ENOTSOCK: 'Socket operation on non-socket',
  ESHUTDOWN: 'Cannot send after transport endpoint shutdown',
  EOVERFLOW: 'Value too large for defined data type',
  ENOMEM: 'Cannot allocate memory',
};

export class IoError extends Error {
  constructor(readonly code: string, message?: string) {
    super(message ?? describeErrno(code));
    this.name = 'IoError';
  }
}

/** strerror() for an errno name. */
export function describeErrno(code: string): string {
  return DESCRIPTIONS[code] ?? code;
}

/** The errno name of any error (Node fs errors carry one; anything else is EIO). */
export function errnoOf(error: unknown): string {
  const code = (error as { code?: unknown })?.code;
  return typeof code === 'string' && code.startsWith('E') ? code : 'EIO';
}
