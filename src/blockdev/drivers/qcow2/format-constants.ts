/*
 * qcow2 on-disk constants: magics, feature bits, entry masks and the limits QEMU 7.2
 * enforces, plus the error type and the bigint-to-number rule the codecs share.
 * 64-bit masks are bigint because JS bitwise operators only see 32 bits of a number.
 */

/** "QFI\xfb" at offset 0 of every qcow2 image. */
export const QCOW2_MAGIC = 0x514649fb;

export const QCOW2_V2_HEADER_LENGTH = 72;
/** The smallest v3 header (up to and including header_length). */
export const QCOW2_V3_MIN_HEADER_LENGTH = 104;
/** What QEMU 7.2 writes: the v3 fields plus compression_type and 7 bytes of padding. */
export const QCOW2_V3_HEADER_LENGTH = 112;
/** Offset of the one-byte compression_type, present when header_length exceeds it. */
export const COMPRESSION_TYPE_OFFSET = 104;

export const HeaderExtensionMagic = {
  END: 0x00000000,
  BACKING_FORMAT: 0xe2792aca,
  FEATURE_NAME_TABLE: 0x6803f857,
  BITMAPS: 0x23852875,
  FULL_DISK_ENCRYPTION: 0x0537be77,
  EXTERNAL_DATA_FILE: 0x44415441,
} as const;

/** Extension head: u32 type, u32 data length; data is padded to 8 bytes. */
export const EXTENSION_HEAD_SIZE = 8;
export const EXTENSION_ALIGNMENT = 8;
export const FEATURE_NAME_ENTRY_SIZE = 48;
export const FEATURE_NAME_MAX_LENGTH = 46;
export const BITMAPS_EXTENSION_SIZE = 24;
export const FULL_DISK_ENCRYPTION_EXTENSION_SIZE = 16;

/** Feature-name table "type" byte. */
export const FeatureType = {
  INCOMPATIBLE: 0,
  COMPATIBLE: 1,
  AUTOCLEAR: 2,
} as const;

export const IncompatibleFeature = {
  DIRTY: 1n << 0n,
  CORRUPT: 1n << 1n,
  EXTERNAL_DATA_FILE: 1n << 2n,
  COMPRESSION_TYPE: 1n << 3n,
  EXTENDED_L2: 1n << 4n,
} as const;
export const KNOWN_INCOMPATIBLE_FEATURES = 0x1fn;

export const CompatibleFeature = {
  LAZY_REFCOUNTS: 1n << 0n,
} as const;
export const KNOWN_COMPATIBLE_FEATURES = 0x1n;

export const AutoclearFeature = {
  BITMAPS: 1n << 0n,
  RAW_EXTERNAL_DATA: 1n << 1n,
  /** blockd's own: its write-intent bitmap is valid (write-intent.ts); a writer that does not know it clears it. */
  BLOCKD_WRITE_INTENT: 1n << 40n,
} as const;
export const KNOWN_AUTOCLEAR_FEATURES = 0x3n | AutoclearFeature.BLOCKD_WRITE_INTENT;

export interface FeatureName {
  type: number;
  bit: number;
  name: string;
}

/** The feature-name table QEMU 7.2 writes (v3, clusters > 4 KiB), in its order. */
export const QEMU_FEATURE_NAME_TABLE: readonly FeatureName[] = [
  { type: FeatureType.INCOMPATIBLE, bit: 0, name: 'dirty bit' },
  { type: FeatureType.INCOMPATIBLE, bit: 1, name: 'corrupt bit' },
  { type: FeatureType.INCOMPATIBLE, bit: 2, name: 'external data file' },
  { type: FeatureType.INCOMPATIBLE, bit: 3, name: 'compression type' },
  { type: FeatureType.INCOMPATIBLE, bit: 4, name: 'extended L2 entries' },
  { type: FeatureType.COMPATIBLE, bit: 0, name: 'lazy refcounts' },
  { type: FeatureType.AUTOCLEAR, bit: 0, name: 'bitmaps' },
  { type: FeatureType.AUTOCLEAR, bit: 1, name: 'raw external data' },
];
/** QEMU omits the table up to this cluster size, to leave room for a backing file name. */
export const FEATURE_TABLE_OMITTED_UP_TO_CLUSTER_SIZE = 4096;

export const CompressionType = {
  ZLIB: 0,
  ZSTD: 1,
} as const;

export const CryptMethod = {
  NONE: 0,
  AES: 1,
  LUKS: 2,
} as const;

// Table entries (sections 4 and 6 of the reference).
export const L1_ENTRY_SIZE = 8;
export const L1E_OFFSET_MASK = 0x00fffffffffffe00n;
export const L1E_RESERVED_MASK = 0x7f000000000001ffn;

export const L2_ENTRY_SIZE = 8;
export const EXTENDED_L2_ENTRY_SIZE = 16;
export const L2E_OFFSET_MASK = 0x00fffffffffffe00n;
export const L2E_STANDARD_RESERVED_MASK = 0x3f000000000001fen;

/** Bit 63 of L1 and L2 entries: the referenced cluster has refcount exactly 1. */
export const OFLAG_COPIED = 1n << 63n;
/** Bit 62 of an L2 entry: the rest is a compressed cluster descriptor. */
export const OFLAG_COMPRESSED = 1n << 62n;
/** Bit 0 of a standard L2 entry (v3, not extended L2): the cluster reads as zeros. */
export const OFLAG_ZERO = 1n;

export const SUBCLUSTERS_PER_CLUSTER = 32;
/** Compressed descriptors count 512-byte sectors whatever the cluster size. */
export const COMPRESSED_SECTOR_SIZE = 512;

export const REFCOUNT_TABLE_ENTRY_SIZE = 8;
export const REFT_OFFSET_MASK = 0xfffffffffffffe00n;
export const REFT_RESERVED_MASK = 0x1ffn;

// QEMU 7.2 limits (section 14).
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** Extended L2 needs subclusters of at least 512 bytes: cluster_bits >= 14. */
export const MIN_SUBCLUSTER_SIZE = 1 << MIN_CLUSTER_BITS;
export const MAX_REFCOUNT_ORDER = 6;
export const MAX_L1_TABLE_BYTES = 32 * 1024 * 1024;
export const MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
/** sizeof(QCowSnapshotHeader): QEMU bounds nb_snapshots with it on open. */
export const SNAPSHOT_HEADER_SIZE = 40;
export const MAX_BACKING_FILE_NAME_LENGTH = 1023;
/** QEMU keeps the format name in a 16-byte C string, so 15 bytes at most. */
export const BACKING_FORMAT_BUFFER_SIZE = 16;
/** PATH_MAX-sized buffer QEMU copies the backing name into. */
export const BACKING_FILE_BUFFER_SIZE = 4096;
export const MAX_BITMAPS = 65535;
export const MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS;
/** Highest host offset a standard entry can express (bits 9-55). */
export const MAX_CLUSTER_OFFSET = (1n << 56n) - 1n;
export const INT32_MAX = 0x7fffffff;
export const INT64_MAX = (1n << 63n) - 1n;

/** A malformed or unsupported image; the message is QEMU's text where QEMU has one. */
export class Qcow2FormatError extends Error {
  override name = 'Qcow2FormatError';
}

const MAX_SAFE_BIGINT = BigInt(Number.MAX_SAFE_INTEGER);

/**
 * Converts an on-disk value to a number, refusing what a double cannot hold exactly
 * (offsets and sizes >= 2^53), so that no offset is silently rounded.
 */
export function toSafeNumber(value: bigint, what: string): number {
  if (value < 0n || value > MAX_SAFE_BIGINT) {
    throw new Qcow2FormatError(`${what} 0x${value.toString(16)} is too large (2^53 or more is not supported)`);
  }
  return Number(value);
}
