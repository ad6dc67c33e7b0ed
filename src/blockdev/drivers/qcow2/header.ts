/*
 * qcow2 header codec: parses cluster 0 (fixed fields, extensions, backing file name) with
 * the checks and error texts of QEMU 7.2's qcow2 open, and lays cluster 0 out again the
 * way QEMU's header update writes it. Pure: the caller reads and writes the bytes.
 */
import {
  AutoclearFeature, BACKING_FILE_BUFFER_SIZE, BACKING_FORMAT_BUFFER_SIZE, BITMAPS_EXTENSION_SIZE,
  COMPRESSION_TYPE_OFFSET, CompressionType, CryptMethod, EXTENSION_ALIGNMENT, EXTENSION_HEAD_SIZE,
  FEATURE_NAME_ENTRY_SIZE, FEATURE_NAME_MAX_LENGTH, FEATURE_TABLE_OMITTED_UP_TO_CLUSTER_SIZE,
  FULL_DISK_ENCRYPTION_EXTENSION_SIZE, FeatureType, HeaderExtensionMagic, INT32_MAX, INT64_MAX,
  IncompatibleFeature, KNOWN_INCOMPATIBLE_FEATURES, L1_ENTRY_SIZE, MAX_BACKING_FILE_NAME_LENGTH,
  MAX_BITMAP_DIRECTORY_SIZE, MAX_BITMAPS, MAX_CLUSTER_BITS, MAX_L1_TABLE_BYTES, MAX_REFCOUNT_ORDER,
  MAX_REFCOUNT_TABLE_BYTES, MAX_SNAPSHOTS, MIN_CLUSTER_BITS, MIN_SUBCLUSTER_SIZE, QCOW2_MAGIC,
  QCOW2_V2_HEADER_LENGTH, QCOW2_V3_HEADER_LENGTH, QCOW2_V3_MIN_HEADER_LENGTH, QEMU_FEATURE_NAME_TABLE,
  Qcow2FormatError, SNAPSHOT_HEADER_SIZE, SUBCLUSTERS_PER_CLUSTER, toSafeNumber,
  type FeatureName,
} from './format-constants.js';

export interface BitmapsExtension {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

export interface FullDiskEncryptionPointer {
  offset: number;
  length: number;
}

/** An extension blockd does not know: kept byte for byte and written back. */
export interface UnknownHeaderExtension {
  magic: number;
  data: Buffer;
}

export interface Qcow2Header {
  version: 2 | 3;
  clusterBits: number;
  /** Virtual size in bytes, as stored (QEMU itself only uses whole 512-byte sectors). */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  /** Feature words are bit masks, hence bigint; v2 images read as 0. */
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  compressionType: number;
  /** As found on disk; serializeHeader computes the value it writes (72, or 112 + unknown fields). */
  headerLength: number;
  /** As found on disk; serializeHeader places the name itself and computes both. */
  backingFileOffset: number;
  backingFileSize: number;
  /** Header bytes from offset 112 up to header_length, which this version does not understand. */
  unknownHeaderFields: Buffer;
  backingFile?: string;
  backingFormat?: string;
  /** Written back only while the external-data-file incompatible bit is set, as QEMU does. */
  externalDataFile?: string;
  /** Written back only when its offset is non-zero, as QEMU does. */
  fullDiskEncryption?: FullDiskEncryptionPointer;
  /** The image's feature-name table, for messages; QEMU writes its own fixed table instead. */
  featureNames: FeatureName[];
  /** Absent when the extension is missing or was ignored (see bitmapsExtensionIgnored). */
  bitmaps?: BitmapsExtension;
  /**
   * The bitmaps extension is present but autoclear bit 0 is clear: a program without
   * bitmap support wrote the image, so QEMU ignores the bitmaps and drops the extension
   * at the next header write (the bitmap clusters become leaks).
   */
  bitmapsExtensionIgnored: boolean;
  unknownExtensions: UnknownHeaderExtension[];
}

type RawFieldName =
  | 'magic' | 'version' | 'backingFileOffset' | 'backingFileSize' | 'clusterBits' | 'size'
  | 'cryptMethod' | 'l1Size' | 'l1TableOffset' | 'refcountTableOffset' | 'refcountTableClusters'
  | 'nbSnapshots' | 'snapshotsOffset' | 'incompatibleFeatures' | 'compatibleFeatures'
  | 'autoclearFeatures' | 'refcountOrder' | 'headerLength';
type RawFields = Record<RawFieldName, bigint>;

/** Offset and width of each fixed field (section 2.1); v3 adds the last five. */
const FIXED_FIELDS: readonly (readonly [RawFieldName, number, 4 | 8])[] = [
  ['magic', 0, 4], ['version', 4, 4], ['backingFileOffset', 8, 8], ['backingFileSize', 16, 4],
  ['clusterBits', 20, 4], ['size', 24, 8], ['cryptMethod', 32, 4], ['l1Size', 36, 4],
  ['l1TableOffset', 40, 8], ['refcountTableOffset', 48, 8], ['refcountTableClusters', 56, 4],
  ['nbSnapshots', 60, 4], ['snapshotsOffset', 64, 8],
  ['incompatibleFeatures', 72, 8], ['compatibleFeatures', 80, 8], ['autoclearFeatures', 88, 8],
  ['refcountOrder', 96, 4], ['headerLength', 100, 4],
];

function fixedFieldsOf(version: number) {
  return FIXED_FIELDS.filter(([, offset]) => version >= 3 || offset < QCOW2_V2_HEADER_LENGTH);
}

/** Reads past the end of the file return zeros, as they do for QEMU. */
function zeroExtended(bytes: Buffer, length: number): Buffer {
  const out = Buffer.alloc(length);
  bytes.copy(out, 0, 0, Math.min(bytes.length, length));
  return out;
}

function alignExtension(length: number): number {
  return Math.ceil(length / EXTENSION_ALIGNMENT) * EXTENSION_ALIGNMENT;
}

/** QEMU keeps names as C strings: anything after a NUL byte is not part of the name. */
function cString(bytes: Buffer): string {
  const end = bytes.indexOf(0);
  return bytes.subarray(0, end < 0 ? bytes.length : end).toString('utf8');
}

function fail(message: string): never {
  throw new Qcow2FormatError(message);
}

/**
 * Reads the header from `cluster0` (the start of the image file; it may be shorter or longer
 * than a cluster). Bytes at or past `fileSize` read as zeros, as QEMU's reads past EOF do.
 * Throws Qcow2FormatError with QEMU's text for every condition QEMU refuses on open, except
 * those that depend on open flags (corrupt bit on read-write opens, missing LUKS header).
 */
export function parseHeader(cluster0: Buffer, fileSize: number): Qcow2Header {
  const stored = cluster0.subarray(0, Math.max(0, Math.min(cluster0.length, fileSize)));
  const raw = readFixedFields(zeroExtended(stored, QCOW2_V3_HEADER_LENGTH));
  if (raw.magic !== BigInt(QCOW2_MAGIC)) fail('Image is not in qcow2 format');
  if (raw.version < 2n || raw.version > 3n) fail(`Unsupported qcow2 version ${raw.version}`);
  if (raw.clusterBits < MIN_CLUSTER_BITS || raw.clusterBits > MAX_CLUSTER_BITS) {
    fail(`Unsupported cluster size: 2^${raw.clusterBits}`);
  }
  const clusterBits = Number(raw.clusterBits);
  const clusterSize = 1 << clusterBits;
  const cluster = zeroExtended(stored, clusterSize);
  if (raw.version === 3n && raw.headerLength < QCOW2_V3_MIN_HEADER_LENGTH) fail('qcow2 header too short');
  if (raw.headerLength > clusterSize) fail('qcow2 header exceeds cluster size');
  if (raw.backingFileOffset > clusterSize) fail('Invalid backing file offset');

  const headerLength = Number(raw.headerLength);
  const extensionsEnd = raw.backingFileOffset !== 0n ? Number(raw.backingFileOffset) : clusterSize;
  const compressionType = headerLength > COMPRESSION_TYPE_OFFSET ? cluster[COMPRESSION_TYPE_OFFSET]! : 0;
  checkCompressionType(compressionType, raw.incompatibleFeatures);
  const extensionContext = { cluster, clusterSize, cryptMethod: raw.cryptMethod, autoclearFeatures: raw.autoclearFeatures };
  const unknownIncompatible = raw.incompatibleFeatures & ~KNOWN_INCOMPATIBLE_FEATURES;
  if (unknownIncompatible !== 0n) {
    // QEMU reads the table in a first pass before it knows the encryption method.
    const featureNames = readExtensionsUntilError({ ...extensionContext, cryptMethod: 0n }, headerLength, extensionsEnd);
    fail(unsupportedFeaturesMessage(featureNames, unknownIncompatible));
  }
  checkTablesAndGeometry(raw, clusterBits);

  const extensions = emptyExtensions();
  readExtensions(extensionContext, headerLength, extensionsEnd, extensions);
  const hasDataFile = (raw.incompatibleFeatures & IncompatibleFeature.EXTERNAL_DATA_FILE) !== 0n;
  if (!hasDataFile && (raw.autoclearFeatures & AutoclearFeature.RAW_EXTERNAL_DATA) !== 0n) {
    fail('data-file-raw requires a data file');
  }
  return {
    version: raw.version === 2n ? 2 : 3,
    clusterBits,
    size: toSafeNumber(raw.size, 'Image size'),
    cryptMethod: Number(raw.cryptMethod),
    l1Size: Number(raw.l1Size),
    l1TableOffset: toSafeNumber(raw.l1TableOffset, 'L1 table offset'),
    refcountTableOffset: toSafeNumber(raw.refcountTableOffset, 'Refcount table offset'),
    refcountTableClusters: Number(raw.refcountTableClusters),
    nbSnapshots: Number(raw.nbSnapshots),
    snapshotsOffset: toSafeNumber(raw.snapshotsOffset, 'Snapshot table offset'),
    incompatibleFeatures: raw.incompatibleFeatures,
    compatibleFeatures: raw.compatibleFeatures,
    autoclearFeatures: raw.autoclearFeatures,
    refcountOrder: Number(raw.refcountOrder),
    compressionType,
    headerLength,
    backingFileOffset: Number(raw.backingFileOffset),
    backingFileSize: Number(raw.backingFileSize),
    unknownHeaderFields: Buffer.from(cluster.subarray(QCOW2_V3_HEADER_LENGTH, Math.max(QCOW2_V3_HEADER_LENGTH, headerLength))),
    backingFile: readBackingFileName(cluster, raw),
    ...extensions,
  };
}

function readFixedFields(fixed: Buffer): RawFields {
  // v2 images imply the v3 defaults (section 2.1).
  const raw: RawFields = {
    magic: 0n, version: 0n, backingFileOffset: 0n, backingFileSize: 0n, clusterBits: 0n, size: 0n,
    cryptMethod: 0n, l1Size: 0n, l1TableOffset: 0n, refcountTableOffset: 0n, refcountTableClusters: 0n,
    nbSnapshots: 0n, snapshotsOffset: 0n, incompatibleFeatures: 0n, compatibleFeatures: 0n,
    autoclearFeatures: 0n, refcountOrder: 4n, headerLength: BigInt(QCOW2_V2_HEADER_LENGTH),
  };
  const version = fixed.readUInt32BE(4);
  for (const [name, offset, width] of fixedFieldsOf(version)) {
    raw[name] = width === 8 ? fixed.readBigUInt64BE(offset) : BigInt(fixed.readUInt32BE(offset));
  }
  return raw;
}

function checkCompressionType(compressionType: number, incompatibleFeatures: bigint): void {
  if (compressionType !== CompressionType.ZLIB && compressionType !== CompressionType.ZSTD) {
    fail(`qcow2: unknown compression type: ${compressionType}`);
  }
  const bitSet = (incompatibleFeatures & IncompatibleFeature.COMPRESSION_TYPE) !== 0n;
  if (compressionType === CompressionType.ZLIB && bitSet) {
    fail('qcow2: Compression type incompatible feature bit must not be set');
  }
  if (compressionType !== CompressionType.ZLIB && !bitSet) {
    fail('qcow2: Compression type incompatible feature bit must be set');
  }
}

function unsupportedFeaturesMessage(featureNames: FeatureName[], unknownBits: bigint): string {
  const parts: string[] = [];
  let unnamed = unknownBits;
  for (const feature of featureNames) {
    const bit = 1n << BigInt(feature.bit);
    if (feature.type === FeatureType.INCOMPATIBLE && feature.bit < 64 && (unnamed & bit) !== 0n) {
      parts.push(feature.name);
      unnamed &= ~bit;
    }
  }
  if (unnamed !== 0n) parts.push(`Unknown incompatible feature: ${unnamed.toString(16)}`);
  return `Unsupported qcow2 feature(s): ${parts.join(', ')}`;
}

/** The open-time checks QEMU runs on the fixed fields, in its order. */
function checkTablesAndGeometry(raw: RawFields, clusterBits: number): void {
  const clusterSize = 1 << clusterBits;
  const extendedL2 = (raw.incompatibleFeatures & IncompatibleFeature.EXTENDED_L2) !== 0n;
  const subclusterSize = extendedL2 ? clusterSize / SUBCLUSTERS_PER_CLUSTER : clusterSize;
  if (subclusterSize < MIN_SUBCLUSTER_SIZE) fail(`Unsupported subcluster size: ${subclusterSize}`);
  if (raw.refcountOrder > MAX_REFCOUNT_ORDER) {
    fail('Reference count entry width too large; may not exceed 64 bits');
  }
  if (raw.refcountTableClusters === 0n) fail('Image does not contain a reference count table');
  checkTable(raw.refcountTableOffset, raw.refcountTableClusters, clusterSize, MAX_REFCOUNT_TABLE_BYTES,
    'Reference count table', clusterSize);
  checkTable(raw.snapshotsOffset, raw.nbSnapshots, SNAPSHOT_HEADER_SIZE, SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
    'Snapshot table', clusterSize);
  checkTable(raw.l1TableOffset, raw.l1Size, L1_ENTRY_SIZE, MAX_L1_TABLE_BYTES, 'Active L1 table', clusterSize);
  const l2Bits = BigInt(clusterBits - (extendedL2 ? 4 : 3));
  const bytesPerL1Entry = 1n << (BigInt(clusterBits) + l2Bits);
  const l1EntriesNeeded = (raw.size + bytesPerL1Entry - 1n) / bytesPerL1Entry;
  if (l1EntriesNeeded > INT32_MAX) fail('Image is too big');
  if (raw.l1Size < l1EntriesNeeded) fail('L1 table is too small');
}

function checkTable(offset: bigint, entries: bigint, entryLength: number, maxBytes: number,
  tableName: string, clusterSize: number): void {
  if (entries > BigInt(Math.floor(maxBytes / entryLength))) fail(`${tableName} too large`);
  if (INT64_MAX - entries * BigInt(entryLength) < offset || offset % BigInt(clusterSize) !== 0n) {
    fail(`${tableName} offset invalid`);
  }
}

function readBackingFileName(cluster: Buffer, raw: RawFields): string | undefined {
  if (raw.backingFileOffset === 0n) return undefined;
  const offset = Number(raw.backingFileOffset);
  const room = Math.min(MAX_BACKING_FILE_NAME_LENGTH, cluster.length - offset);
  if (raw.backingFileSize > room || raw.backingFileSize >= BACKING_FILE_BUFFER_SIZE) {
    fail('Backing file name too long');
  }
  return cString(cluster.subarray(offset, offset + Number(raw.backingFileSize)));
}

type ParsedExtensions = Pick<Qcow2Header, 'backingFormat' | 'externalDataFile' | 'fullDiskEncryption' |
  'featureNames' | 'bitmaps' | 'bitmapsExtensionIgnored' | 'unknownExtensions'>;

interface ExtensionContext {
  cluster: Buffer;
  clusterSize: number;
  cryptMethod: bigint;
  autoclearFeatures: bigint;
}

function emptyExtensions(): ParsedExtensions {
  return { featureNames: [], bitmapsExtensionIgnored: false, unknownExtensions: [] };
}

/** Walks the extensions from `start` to the end marker or `end` (section 3.1). */
function readExtensions(context: ExtensionContext, start: number, end: number, found: ParsedExtensions): void {
  let offset = start;
  while (offset < end) {
    if (end - offset < EXTENSION_HEAD_SIZE) fail('Header extension too large');
    const magic = context.cluster.readUInt32BE(offset);
    const length = context.cluster.readUInt32BE(offset + 4);
    offset += EXTENSION_HEAD_SIZE;
    if (length > end - offset) fail('Header extension too large');
    if (magic === HeaderExtensionMagic.END) return;
    readExtension(context, magic, context.cluster.subarray(offset, offset + length), found);
    offset += alignExtension(length);
  }
}

/** QEMU's first pass: whatever feature table it met before any error. */
function readExtensionsUntilError(context: ExtensionContext, start: number, end: number): FeatureName[] {
  const found = emptyExtensions();
  try {
    readExtensions(context, start, end, found);
  } catch (error) {
    if (!(error instanceof Qcow2FormatError)) throw error;
  }
  return found.featureNames;
}

function readExtension(context: ExtensionContext, magic: number, data: Buffer, found: ParsedExtensions): void {
  switch (magic) {
    case HeaderExtensionMagic.BACKING_FORMAT:
      if (data.length >= BACKING_FORMAT_BUFFER_SIZE) {
        fail(`ERROR: ext_backing_format: len=${data.length} too large (>=${BACKING_FORMAT_BUFFER_SIZE})`);
      }
      found.backingFormat = cString(data);
      return;
    case HeaderExtensionMagic.FEATURE_NAME_TABLE:
      found.featureNames = parseFeatureNameTable(data);
      return;
    case HeaderExtensionMagic.FULL_DISK_ENCRYPTION:
      found.fullDiskEncryption = parseFullDiskEncryptionPointer(context, data);
      return;
    case HeaderExtensionMagic.BITMAPS:
      if (data.length !== BITMAPS_EXTENSION_SIZE) fail('bitmaps_ext: Invalid extension length');
      if ((context.autoclearFeatures & AutoclearFeature.BITMAPS) === 0n) {
        found.bitmapsExtensionIgnored = true;
        return;
      }
      found.bitmaps = parseBitmapsExtension(data, context.clusterSize);
      return;
    case HeaderExtensionMagic.EXTERNAL_DATA_FILE:
      found.externalDataFile = cString(data);
      return;
    default:
      found.unknownExtensions.push({ magic, data: Buffer.from(data) });
  }
}

/** Entries up to the first one with an empty name, as QEMU reads the table. */
function parseFeatureNameTable(data: Buffer): FeatureName[] {
  const entryCount = Math.ceil(data.length / FEATURE_NAME_ENTRY_SIZE);
  const table = zeroExtended(data, entryCount * FEATURE_NAME_ENTRY_SIZE);
  const features: FeatureName[] = [];
  for (let entry = 0; entry < table.length; entry += FEATURE_NAME_ENTRY_SIZE) {
    const name = cString(table.subarray(entry + 2, entry + 2 + FEATURE_NAME_MAX_LENGTH));
    if (name === '') break;
    features.push({ type: table[entry]!, bit: table[entry + 1]!, name });
  }
  return features;
}

function parseFullDiskEncryptionPointer(context: ExtensionContext, data: Buffer): FullDiskEncryptionPointer {
  if (context.cryptMethod !== BigInt(CryptMethod.LUKS)) {
    fail('CRYPTO header extension only expected with LUKS encryption method');
  }
  if (data.length !== FULL_DISK_ENCRYPTION_EXTENSION_SIZE) {
    fail(`CRYPTO header extension size ${data.length}, but expected size ${FULL_DISK_ENCRYPTION_EXTENSION_SIZE}`);
  }
  const offset = data.readBigUInt64BE(0);
  if (offset % BigInt(context.clusterSize) !== 0n) {
    fail(`Encryption header offset '${offset}' is not a multiple of cluster size '${context.clusterSize}'`);
  }
  return {
    offset: toSafeNumber(offset, 'Encryption header offset'),
    length: toSafeNumber(data.readBigUInt64BE(8), 'Encryption header length'),
  };
}

function parseBitmapsExtension(data: Buffer, clusterSize: number): BitmapsExtension {
  if (data.readUInt32BE(4) !== 0) fail('bitmaps_ext: Reserved field is not zero');
  const nbBitmaps = data.readUInt32BE(0);
  const directorySize = data.readBigUInt64BE(8);
  const directoryOffset = data.readBigUInt64BE(16);
  if (nbBitmaps > MAX_BITMAPS) {
    fail(`bitmaps_ext: Image has ${nbBitmaps} bitmaps, exceeding the QEMU supported maximum of ${MAX_BITMAPS}`);
  }
  if (nbBitmaps === 0) fail('found bitmaps extension with zero bitmaps');
  if (directoryOffset % BigInt(clusterSize) !== 0n) fail('bitmaps_ext: invalid bitmap directory offset');
  if (directorySize > MAX_BITMAP_DIRECTORY_SIZE) {
    fail(`bitmaps_ext: bitmap directory size (${directorySize}) exceeds the maximum supported size (${MAX_BITMAP_DIRECTORY_SIZE})`);
  }
  return {
    nbBitmaps,
    directorySize: Number(directorySize),
    // Past 2^53 is past the end of any file, where QEMU reads zeros and then refuses the directory: the exact value does not matter.
    directoryOffset: Number(directoryOffset),
  };
}

/**
 * The whole first cluster, laid out as QEMU 7.2 writes it: fixed fields, unknown header
 * fields, extensions in QEMU's order, end marker, backing file name. Throws when the
 * result would not fit in one cluster or QEMU could not open it again.
 */
export function serializeHeader(header: Qcow2Header): Buffer {
  const clusterSize = 1 << header.clusterBits;
  if (header.clusterBits < MIN_CLUSTER_BITS || header.clusterBits > MAX_CLUSTER_BITS) {
    fail(`Unsupported cluster size: 2^${header.clusterBits}`);
  }
  if (header.version === 2 && header.unknownHeaderFields.length > 0) {
    fail('A version 2 header has no room for additional header fields');
  }
  checkCompressionType(header.compressionType, header.incompatibleFeatures);
  const out = Buffer.alloc(clusterSize);
  const fixedLength = header.version === 2 ? QCOW2_V2_HEADER_LENGTH : QCOW2_V3_HEADER_LENGTH;
  let position = fixedLength;
  const append = (bytes: Buffer, paddedLength: number): void => {
    if (paddedLength > clusterSize - position) {
      fail(`The qcow2 header does not fit in its first cluster (${clusterSize} bytes)`);
    }
    bytes.copy(out, position);
    position += paddedLength;
  };
  if (header.version === 3) out[COMPRESSION_TYPE_OFFSET] = header.compressionType;
  append(header.unknownHeaderFields, header.unknownHeaderFields.length);
  for (const extension of extensionsToWrite(header, clusterSize)) {
    const head = Buffer.alloc(EXTENSION_HEAD_SIZE);
    head.writeUInt32BE(extension.magic, 0);
    head.writeUInt32BE(extension.data.length, 4);
    append(Buffer.concat([head, extension.data]), EXTENSION_HEAD_SIZE + alignExtension(extension.data.length));
  }
  let backingFileOffset = 0;
  let backingFileSize = 0;
  if (header.backingFile !== undefined) {
    const name = cStringBytes(header.backingFile, 'Backing file name', MAX_BACKING_FILE_NAME_LENGTH);
    backingFileOffset = position;
    backingFileSize = name.length;
    append(name, name.length);
  }
  const headerLength = header.version === 2
    ? QCOW2_V2_HEADER_LENGTH : QCOW2_V3_HEADER_LENGTH + header.unknownHeaderFields.length;
  const fields = { ...header, magic: QCOW2_MAGIC, backingFileOffset, backingFileSize, headerLength };
  for (const [name, offset, width] of fixedFieldsOf(header.version)) {
    if (width === 8) out.writeBigUInt64BE(BigInt(fields[name]), offset);
    else out.writeUInt32BE(Number(fields[name]), offset);
  }
  return out;
}

/** Extensions in QEMU 7.2's order, ending with the end marker. */
function extensionsToWrite(header: Qcow2Header, clusterSize: number): UnknownHeaderExtension[] {
  const extensions: UnknownHeaderExtension[] = [];
  if (header.backingFormat !== undefined) {
    extensions.push({
      magic: HeaderExtensionMagic.BACKING_FORMAT,
      data: cStringBytes(header.backingFormat, 'Backing format name', BACKING_FORMAT_BUFFER_SIZE - 1),
    });
  }
  const hasDataFile = (header.incompatibleFeatures & IncompatibleFeature.EXTERNAL_DATA_FILE) !== 0n;
  if (hasDataFile && header.externalDataFile !== undefined) {
    extensions.push({
      magic: HeaderExtensionMagic.EXTERNAL_DATA_FILE,
      data: cStringBytes(header.externalDataFile, 'External data file name', clusterSize),
    });
  }
  if (header.fullDiskEncryption !== undefined && header.fullDiskEncryption.offset !== 0) {
    const data = Buffer.alloc(FULL_DISK_ENCRYPTION_EXTENSION_SIZE);
    data.writeBigUInt64BE(BigInt(header.fullDiskEncryption.offset), 0);
    data.writeBigUInt64BE(BigInt(header.fullDiskEncryption.length), 8);
    extensions.push({ magic: HeaderExtensionMagic.FULL_DISK_ENCRYPTION, data });
  }
  if (header.version === 3 && clusterSize > FEATURE_TABLE_OMITTED_UP_TO_CLUSTER_SIZE) {
    extensions.push({ magic: HeaderExtensionMagic.FEATURE_NAME_TABLE, data: qemuFeatureNameTable() });
  }
  if (header.bitmaps !== undefined && header.bitmaps.nbBitmaps > 0) {
    const data = Buffer.alloc(BITMAPS_EXTENSION_SIZE);
    data.writeUInt32BE(header.bitmaps.nbBitmaps, 0);
    data.writeBigUInt64BE(BigInt(header.bitmaps.directorySize), 8);
    data.writeBigUInt64BE(BigInt(header.bitmaps.directoryOffset), 16);
    extensions.push({ magic: HeaderExtensionMagic.BITMAPS, data });
  }
  extensions.push(...header.unknownExtensions);
  extensions.push({ magic: HeaderExtensionMagic.END, data: Buffer.alloc(0) });
  return extensions;
}

function qemuFeatureNameTable(): Buffer {
  const table = Buffer.alloc(QEMU_FEATURE_NAME_TABLE.length * FEATURE_NAME_ENTRY_SIZE);
  QEMU_FEATURE_NAME_TABLE.forEach((feature, index) => {
    const entry = index * FEATURE_NAME_ENTRY_SIZE;
    table[entry] = feature.type;
    table[entry + 1] = feature.bit;
    table.write(feature.name, entry + 2, FEATURE_NAME_MAX_LENGTH, 'utf8');
  });
  return table;
}

/** A name as QEMU stores it: no NUL inside (QEMU would cut it there), bounded length. */
function cStringBytes(value: string, what: string, maxLength: number): Buffer {
  const bytes = Buffer.from(value, 'utf8');
  if (bytes.includes(0)) fail(`${what} must not contain a NUL byte`);
  if (bytes.length > maxLength) {
    fail(what === 'Backing file name' ? 'Backing file name too long' : `${what} is too long (${bytes.length} > ${maxLength} bytes)`);
  }
  return bytes;
}
