/*
 * The numbers of the NBD protocol (fixed newstyle handshake, simple and
 * structured replies), shared by blockd's NBD server and its nbd client driver.
 * Everything on the wire is big-endian.
 */

export const NBD_MAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Longest export name, description, meta context name or query (QEMU's limit). */
export const MAX_STRING = 4096;
/** Largest READ/WRITE/CACHE payload QEMU serves and asks for. */
export const MAX_PAYLOAD = 32 << 20;
/** Option payloads beyond this end the connection (QEMU's limit). */
export const MAX_OPTION_LENGTH = 32 << 20;
/** Requests a server handles at once per connection (QEMU: 16). */
export const MAX_REQUESTS_IN_FLIGHT = 16;
/** Non-data structured chunks QEMU's client accepts. */
export const MAX_CHUNK_PAYLOAD = 1000;

export const HandshakeFlag = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const;
export const ClientFlag = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const;

export const Option = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
} as const;

/** How QEMU names options in its messages. */
export const OPTION_NAMES: Record<number, string> = {
  1: 'export name',
  2: 'abort',
  3: 'list',
  5: 'starttls',
  6: 'info',
  7: 'go',
  8: 'structured reply',
  9: 'list meta context',
  10: 'set meta context',
};

const ERROR_BIT = 0x80000000;
export const OptionReply = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: ERROR_BIT + 1,
  ERR_POLICY: ERROR_BIT + 2,
  ERR_INVALID: ERROR_BIT + 3,
  ERR_PLATFORM: ERROR_BIT + 4,
  ERR_TLS_REQD: ERROR_BIT + 5,
  ERR_UNKNOWN: ERROR_BIT + 6,
  ERR_SHUTDOWN: ERROR_BIT + 7,
  ERR_BLOCK_SIZE_REQD: ERROR_BIT + 8,
  ERR_TOO_BIG: ERROR_BIT + 9,
} as const;

/** How QEMU names option reply types in its messages. */
export const OPTION_REPLY_NAMES: Record<number, string> = {
  [OptionReply.ACK]: 'ack',
  [OptionReply.SERVER]: 'server',
  [OptionReply.INFO]: 'info',
  [OptionReply.META_CONTEXT]: 'meta context',
  [OptionReply.ERR_UNSUP]: 'unsupported',
  [OptionReply.ERR_POLICY]: 'denied by policy',
  [OptionReply.ERR_INVALID]: 'invalid',
  [OptionReply.ERR_PLATFORM]: 'platform lacks support',
  [OptionReply.ERR_TLS_REQD]: 'TLS required',
  [OptionReply.ERR_UNKNOWN]: 'export unknown',
  [OptionReply.ERR_SHUTDOWN]: 'server shutting down',
  [OptionReply.ERR_BLOCK_SIZE_REQD]: 'block size required',
};

export function isOptionError(type: number): boolean {
  return (type & ERROR_BIT) !== 0;
}

export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const TransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const Command = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

/** How QEMU names commands in its messages. */
export const COMMAND_NAMES: Record<number, string> = {
  0: 'read',
  1: 'write',
  2: 'disconnect',
  3: 'flush',
  4: 'trim',
  5: 'cache',
  6: 'write zeroes',
  7: 'block status',
};

export const CommandFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
} as const;

export const ChunkType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
} as const;

/** How QEMU names structured reply chunk types in its messages. */
export function chunkTypeName(type: number): string {
  const names: Record<number, string> = { 0: 'none', 1: 'data', 2: 'hole', 5: 'block status', 32769: 'generic error', 32770: 'error at offset' };
  return names[type] ?? ((type & (1 << 15)) !== 0 ? '<unknown error>' : '<unknown>');
}

export const CHUNK_DONE = 1;

export function isErrorChunk(type: number): boolean {
  return (type & (1 << 15)) !== 0;
}

/** base:allocation flags. */
export const AllocationFlag = { HOLE: 1, ZERO: 2 } as const;

export const CONTEXT_BASE_ALLOCATION = 'base:allocation';
export const CONTEXT_ALLOCATION_DEPTH = 'qemu:allocation-depth';
export const CONTEXT_DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';
/** qemu:dirty-bitmap:NAME's one flag: the range is dirty in the bitmap. */
export const DIRTY_BITMAP_STATE_DIRTY = 1;

/** NBD error numbers (Linux errno values, fixed by the protocol). */
export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** The NBD error for an errno name, as QEMU's server maps them. */
export function nbdErrorFor(code: string): number {
  switch (code) {
    case 'EPERM':
    case 'EROFS':
      return NbdErrno.EPERM;
    case 'EIO':
      return NbdErrno.EIO;
    case 'ENOMEM':
      return NbdErrno.ENOMEM;
    case 'EDQUOT':
    case 'EFBIG':
    case 'ENOSPC':
      return NbdErrno.ENOSPC;
    case 'EOVERFLOW':
      return NbdErrno.EOVERFLOW;
    case 'ENOTSUP':
    case 'EOPNOTSUPP':
      return NbdErrno.ENOTSUP;
    case 'ESHUTDOWN':
      return NbdErrno.ESHUTDOWN;
    default:
      return NbdErrno.EINVAL;
  }
}

/** The errno name for an NBD error from a server; unknown values mean EINVAL (spec). */
export function errnoForNbdError(value: number): string {
  for (const [name, number] of Object.entries(NbdErrno)) if (number === value) return name;
  return 'EINVAL';
}
