/* The qcow2 on-disk codec against images made by qemu-img and qemu-io: header round trips and QEMU's open errors, L1/L2/compressed/extended-L2 entries, refcount blocks. */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { copyFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { inflateRawSync } from 'node:zlib';
import { HeaderExtensionMagic, QEMU_FEATURE_NAME_TABLE, Qcow2FormatError } from '../../src/blockdev/drivers/qcow2/format-constants.js';
import { parseHeader, serializeHeader, type Qcow2Header } from '../../src/blockdev/drivers/qcow2/header.js';
import {
  decodeCompressedDescriptor, decodeExtendedL2Entry, decodeL1Entry, decodeL2Entry, decodeRefcountTableEntry,
  encodeCompressedDescriptor, encodeExtendedL2Entry, encodeL1Entry, encodeL2Entry, encodeRefcountTableEntry,
  subclusterType, type ExtendedL2Entry, type L1Entry, type L2Entry, type L2EntryContext, type RefcountTableEntry,
} from '../../src/blockdev/drivers/qcow2/table-entries.js';
import {
  getRefcount, getRefcountBigInt, maxRefcount, maxSafeRefcount, refcountBitsFromOrder, refcountBlockEntries,
  refcountLocation, refcountTableEntriesPerCluster, setRefcount, type RefcountBits,
} from '../../src/blockdev/drivers/qcow2/refcount-block.js';
import { makeTempDir } from '../helpers/paths.js';
import { readAt, writeAt } from '../helpers/qemu-tools.js';

const KiB = 1024, MiB = 1024 * KiB;
const { dir, cleanup } = makeTempDir('blockd-qcow2-format-');
after(cleanup);

function run(command: string, args: string[]): { status: number | null; stdout: string; stderr: string } {
  const { status, stdout, stderr, error } = spawnSync(command, args, { cwd: dir, encoding: 'utf8' });
  if (error) throw error;
  return { status, stdout, stderr };
}

function succeed(command: string, ...args: string[]): string {
  const result = run(command, args);
  assert.equal(result.status, 0, `${command} ${args.join(' ')}: ${result.stderr}`);
  return result.stdout;
}

function createImage(name: string, options: string[] = [], size: string | undefined = '64M'): string {
  const args = ['create', '-f', 'qcow2', ...options, join(dir, name), ...(size ? [size] : [])];
  // LUKS times its key derivation by CPU usage, which a loaded machine can starve: qemu-img then fails and is run again.
  let result = run('qemu-img', args);
  for (let attempt = 1; attempt < 5 && result.status !== 0 && result.stderr.includes('Unable to get accurate CPU usage'); attempt++) {
    result = run('qemu-img', args);
  }
  assert.equal(result.status, 0, `qemu-img ${args.join(' ')}: ${result.stderr}`);
  return join(dir, name);
}

function qemuIo(path: string, ...commands: string[]): void {
  succeed('qemu-io', ...commands.flatMap((command) => ['-c', command]), path);
}

function headerOf(path: string): Qcow2Header {
  return parseHeader(readAt(path, 0, 2 * MiB), statSync(path).size);
}

function readEntry(path: string, offset: number): bigint {
  return readAt(path, offset, 8).readBigUInt64BE(0);
}

function copyImage(source: string, name: string): string {
  copyFileSync(source, join(dir, name));
  return join(dir, name);
}

describe('the header', () => {
  const base = createImage('base.qcow2');
  succeed('qemu-img', 'create', '-f', 'raw', join(dir, 'base.raw'), '1M');
  const roundTrips: [string, string[], Partial<Qcow2Header>, string?][] = [
    ['default 64M', [], {
      version: 3, clusterBits: 16, size: 64 * MiB, l1Size: 1, l1TableOffset: 0x30000, refcountTableOffset: 0x10000,
      refcountTableClusters: 1, headerLength: 112, featureNames: [...QEMU_FEATURE_NAME_TABLE], backingFile: undefined,
    }],
    ['cluster_size=512', ['-o', 'cluster_size=512'], { clusterBits: 9, l1Size: 2048 }],
    ['cluster_size=4096', ['-o', 'cluster_size=4096'], { clusterBits: 12, l1Size: 32, featureNames: [] }],
    ['cluster_size=2M', ['-o', 'cluster_size=2M'], { clusterBits: 21, refcountTableOffset: 2 * MiB }],
    ['refcount_bits=1', ['-o', 'refcount_bits=1'], { refcountOrder: 0 }],
    ['refcount_bits=64', ['-o', 'refcount_bits=64'], { refcountOrder: 6 }],
    ['compat=0.10', ['-o', 'compat=0.10'], { version: 2, headerLength: 72, refcountOrder: 4, incompatibleFeatures: 0n }],
    ['lazy_refcounts=on', ['-o', 'lazy_refcounts=on'], { compatibleFeatures: 1n }],
    ['relative raw backing file', ['-b', 'base.raw', '-F', 'raw'],
      { backingFile: 'base.raw', backingFormat: 'raw', backingFileOffset: 0x210, backingFileSize: 8 }, ''],
    ['absolute qcow2 backing file', ['-b', base, '-F', 'qcow2'], { backingFile: base, backingFormat: 'qcow2' }],
    ['v2 with a backing file', ['-o', 'compat=0.10', '-b', 'base.raw', '-F', 'raw'], { version: 2, backingFile: 'base.raw' }, ''],
    ['512-byte clusters with a backing file', ['-o', 'cluster_size=512', '-b', base, '-F', 'qcow2'], { backingFile: base }],
    ['extended_l2=on', ['-o', 'extended_l2=on'], { incompatibleFeatures: 0x10n }],
    ['compression_type=zstd', ['-o', 'compression_type=zstd'], { compressionType: 1, incompatibleFeatures: 0x8n }],
    ['external data file', ['-o', 'data_file=data.raw,data_file_raw=on'],
      { externalDataFile: 'data.raw', incompatibleFeatures: 0x4n, autoclearFeatures: 0x2n }],
    ['LUKS encryption', ['--object', 'secret,id=sec0,data=abc', '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10'],
      { cryptMethod: 2, fullDiskEncryption: { offset: 0x40000, length: 0x1f9000 } }],
  ];
  roundTrips.forEach(([label, options, expected, size], index) => {
    test(`round trip, byte for byte: ${label}`, () => {
      const path = createImage(`round-trip-${index}.qcow2`, options, size ?? '64M');
      const header = headerOf(path);
      for (const [key, value] of Object.entries(expected)) {
        assert.deepEqual(header[key as keyof Qcow2Header], value, key);
      }
      const clusterSize = 2 ** header.clusterBits;
      const written = serializeHeader(header);
      assert.equal(written.length, clusterSize);
      const stored = Math.min(clusterSize, statSync(path).size);
      assert.deepEqual(written.subarray(0, stored), readAt(path, 0, stored));
      assert.ok(written.subarray(stored).every((byte) => byte === 0));
    });
  });

  test('the bitmaps extension round-trips while autoclear bit 0 is set', () => {
    const path = createImage('bitmaps.qcow2');
    succeed('qemu-img', 'bitmap', '--add', path, 'bm0');
    const header = headerOf(path);
    assert.deepEqual(header.bitmaps, { nbBitmaps: 1, directorySize: 32, directoryOffset: 0x50000 });
    assert.deepEqual(serializeHeader(header), readAt(path, 0, 64 * KiB));
    // Without the autoclear bit QEMU ignores the extension and drops it on its next header write.
    writeAt(path, 95, Buffer.from([0]));
    const stale = headerOf(path);
    assert.equal(stale.bitmaps, undefined);
    assert.equal(stale.bitmapsExtensionIgnored, true);
    qemuIo(path, 'read 0 512');
    assert.deepEqual(serializeHeader(stale), readAt(path, 0, 64 * KiB));
  });

  test('unknown header fields and extensions survive, and QEMU accepts them', () => {
    const path = copyImage(base, 'unknown-parts.qcow2');
    const header = headerOf(path);
    const unknownExtensions = [
      { magic: 0x12345678, data: Buffer.from('first') },
      { magic: 0x9abcdef0, data: Buffer.from('second!!x') },
    ];
    writeAt(path, 0, serializeHeader({ ...header, unknownHeaderFields: Buffer.from('ABCDEFGH'), unknownExtensions }));
    assert.match(succeed('qemu-img', 'check', path), /No errors were found/);
    succeed('qemu-img', 'amend', '-o', 'lazy_refcounts=on', path);
    const rewritten = headerOf(path);
    assert.equal(rewritten.headerLength, 120);
    assert.deepEqual(rewritten.unknownHeaderFields, Buffer.from('ABCDEFGH'));
    assert.equal(rewritten.compatibleFeatures, 1n);
    // QEMU keeps unknown extensions in a list it builds head-first: each rewrite reverses them.
    assert.deepEqual(rewritten.unknownExtensions, [...unknownExtensions].reverse());
    assert.deepEqual(serializeHeader(rewritten), readAt(path, 0, 64 * KiB));
  });

  test('bytes past the end of the file read as zeros', () => {
    const path = createImage('small-clusters.qcow2', ['-o', 'cluster_size=512']);
    const cluster = readAt(path, 0, 512);
    const withGarbage = Buffer.concat([cluster.subarray(0, 112), Buffer.alloc(400, 0xee)]);
    assert.deepEqual(parseHeader(withGarbage, 112), parseHeader(cluster, 512));
  });

  test('serializeHeader refuses what QEMU could not write or open', () => {
    const small = headerOf(createImage('no-room.qcow2', ['-o', 'cluster_size=512']));
    assert.throws(() => serializeHeader({ ...small, backingFile: 'b'.repeat(400) }), /does not fit in its first cluster/);
    assert.throws(() => serializeHeader({ ...headerOf(base), backingFile: 'b'.repeat(1024) }), /^Qcow2FormatError: Backing file name too long$/);
    assert.throws(() => serializeHeader({ ...headerOf(base), backingFormat: 'f'.repeat(16) }), /Backing format name is too long/);
    assert.throws(() => serializeHeader({ ...headerOf(base), compressionType: 1 }), /feature bit must be set/);
  });
});

describe('open errors, with QEMU 7.2 texts', () => {
  const base = createImage('errors-base.qcow2');
  const withBacking = createImage('errors-backing.qcow2', ['-b', base, '-F', 'qcow2']);
  const with4k = createImage('errors-4k.qcow2', ['-o', 'cluster_size=4096']);
  const withBitmap = createImage('errors-bitmap.qcow2');
  succeed('qemu-img', 'bitmap', '--add', withBitmap, 'bm0');
  const u32 = (value: number) => { const b = Buffer.alloc(4); b.writeUInt32BE(value); return b; };
  const u64 = (value: bigint) => { const b = Buffer.alloc(8); b.writeBigUInt64BE(value); return b; };
  const renamedFeature = Buffer.alloc(48);
  renamedFeature.writeUInt8(9, 1);
  renamedFeature.write('future feature', 2);
  const nonLuksFde = serializeHeader({ ...headerOf(base),
    unknownExtensions: [{ magic: HeaderExtensionMagic.FULL_DISK_ENCRYPTION, data: Buffer.alloc(16) }] });
  const cases: [string, string, [number, Buffer][], string][] = [
    ['bad magic', base, [[0, Buffer.from('QFIX')]], 'Image is not in qcow2 format'],
    ['version 4', base, [[4, u32(4)]], 'Unsupported qcow2 version 4'],
    ['cluster_bits 22', base, [[20, u32(22)]], 'Unsupported cluster size: 2^22'],
    ['cluster_bits 8', base, [[20, u32(8)]], 'Unsupported cluster size: 2^8'],
    ['header_length 100', base, [[100, u32(100)]], 'qcow2 header too short'],
    ['header_length past the cluster', base, [[100, u32(0x10008)]], 'qcow2 header exceeds cluster size'],
    ['backing file offset past cluster 0', base, [[8, u64(0x10008n)]], 'Invalid backing file offset'],
    ['unknown compression type', base, [[72, u64(0x8n)], [104, Buffer.from([2])]], 'qcow2: unknown compression type: 2'],
    ['zstd without its feature bit', base, [[104, Buffer.from([1])]], 'qcow2: Compression type incompatible feature bit must be set'],
    ['unknown incompatible bits, one named by the feature table', base, [[72, u64(0x200n | (1n << 40n))], [0x1c8, renamedFeature]],
      'Unsupported qcow2 feature(s): future feature, Unknown incompatible feature: 10000000000'],
    ['unknown incompatible bit without a feature table', with4k, [[72, u64(0x20n)]],
      'Unsupported qcow2 feature(s): Unknown incompatible feature: 20'],
    ['extended L2 with 4 KiB clusters', with4k, [[72, u64(0x10n)]], 'Unsupported subcluster size: 128'],
    ['refcount_order 7', base, [[96, u32(7)]], 'Reference count entry width too large; may not exceed 64 bits'],
    ['no refcount table', base, [[56, u32(0)]], 'Image does not contain a reference count table'],
    ['refcount table over 8 MiB', base, [[56, u32(129)]], 'Reference count table too large'],
    ['refcount table unaligned', base, [[48, u64(0x10200n)]], 'Reference count table offset invalid'],
    ['too many snapshots', base, [[60, u32(65537)]], 'Snapshot table too large'],
    ['L1 table over 32 MiB', base, [[36, u32(0x400001)]], 'Active L1 table too large'],
    ['L1 table unaligned', base, [[40, u64(0x30200n)]], 'Active L1 table offset invalid'],
    ['virtual size of 2^60', base, [[24, u64(1n << 60n)]], 'Image is too big'],
    ['L1 table too small for the size', base, [[36, u32(0)]], 'L1 table is too small'],
    ['extension running past the area', base, [[0x74, u32(0x10000)]], 'Header extension too large'],
    ['backing format of 16 bytes', withBacking, [[0x74, u32(16)]], 'ERROR: ext_backing_format: len=16 too large (>=16)'],
    ['bitmaps extension with no bitmaps', withBitmap, [[0x200, u32(0)]], 'found bitmaps extension with zero bitmaps'],
    ['raw external data without a data file', base, [[88, u64(0x2n)]], 'data-file-raw requires a data file'],
    ['encryption header pointer without LUKS', base, [[0, nonLuksFde]], 'CRYPTO header extension only expected with LUKS encryption method'],
    ['backing file name of 1024 bytes', withBacking, [[16, u32(1024)]], 'Backing file name too long'],
  ];
  cases.forEach(([label, source, patches, message], index) => {
    test(label, () => {
      const path = copyImage(source, `error-${index}.qcow2`);
      for (const [offset, bytes] of patches) writeAt(path, offset, bytes);
      assert.throws(() => headerOf(path), (error: unknown) => {
        assert.ok(error instanceof Qcow2FormatError);
        assert.equal(error.message, message);
        return true;
      });
      const qemu = run('qemu-img', ['map', '-f', 'qcow2', '--output=json', path]);
      assert.notEqual(qemu.status, 0);
      assert.equal(qemu.stderr.split('\n')[0], `qemu-img: Could not open '${path}': ${message}`);
    });
  });
});

const standard: L2EntryContext = { clusterBits: 16, version: 3, externalDataFile: false };

function invalid(entry: L1Entry | L2Entry | ExtendedL2Entry | RefcountTableEntry): string {
  return entry.type === 'INVALID' ? entry.reason : 'valid';
}

describe('L1 and L2 entries', () => {
  test('the worked example of section 13', () => {
    const path = createImage('worked-example.qcow2');
    qemuIo(path, 'write -P 0xab 0 64k', 'write -P 0xcd 1M 4k', 'write -z 2M 64k');
    const header = headerOf(path);
    const l1Raw = readEntry(path, header.l1TableOffset);
    assert.deepEqual(decodeL1Entry(l1Raw, 16), { type: 'ALLOCATED', l2Offset: 0x40000, copied: true });
    assert.equal(encodeL1Entry(0x40000, true), l1Raw);
    const l2Table = readAt(path, 0x40000, 64 * KiB);
    const entries = Array.from({ length: 8192 }, (_, index) => decodeL2Entry(l2Table.readBigUInt64BE(index * 8), standard));
    assert.deepEqual(entries[0], { type: 'NORMAL', hostOffset: 0x50000, copied: true });
    assert.deepEqual(entries[16], { type: 'NORMAL', hostOffset: 0x60000, copied: true });
    assert.deepEqual(entries[32], { type: 'ZERO_PLAIN', copied: false });
    const others = entries.filter((_, index) => ![0, 16, 32].includes(index));
    assert.ok(others.every((entry) => entry.type === 'UNALLOCATED' && !entry.copied));
    for (const index of [0, 16, 32]) {
      const entry = entries[index]!;
      assert.ok(entry.type !== 'INVALID');
      assert.equal(encodeL2Entry(entry, 16), l2Table.readBigUInt64BE(index * 8));
    }
    assert.ok(readAt(path, 0x50000, 64 * KiB).every((byte) => byte === 0xab));
    assert.deepEqual(decodeRefcountTableEntry(readEntry(path, header.refcountTableOffset), 16),
      { type: 'ALLOCATED', blockOffset: 0x20000 });
    const block = readAt(path, 0x20000, 64 * KiB);
    assert.deepEqual(Array.from({ length: 8 }, (_, index) => getRefcount(block, index, 16)), [1, 1, 1, 1, 1, 1, 1, 0]);
    assert.equal(statSync(path).size, 0x70000);
  });

  test('a zeroed cluster that keeps its allocation is ZERO_ALLOC', () => {
    const path = createImage('zero-alloc.qcow2');
    qemuIo(path, 'write -P 1 0 128k', 'write -z 0 64k', 'write -z -u 64k 64k');
    assert.deepEqual(decodeL2Entry(readEntry(path, 0x40000), standard), { type: 'ZERO_ALLOC', hostOffset: 0x50000, copied: true });
    assert.deepEqual(decodeL2Entry(readEntry(path, 0x40008), standard), { type: 'ZERO_PLAIN', copied: false });
    assert.equal(encodeL2Entry({ type: 'ZERO_ALLOC', hostOffset: 0x50000, copied: true }, 16), 0x8000000000050001n);
  });

  test('malformed entries are INVALID with a reason', () => {
    assert.match(invalid(decodeL2Entry(0xc000000000050000n, standard)), /copied flag must never be set/);
    assert.match(invalid(decodeL2Entry(0x8000000000050002n, standard)), /reserved bits set/);
    assert.match(invalid(decodeL2Entry(0x8100000000050000n, standard)), /reserved bits set/);
    assert.match(invalid(decodeL2Entry(0x8000000000050200n, standard)), /Cluster allocation offset 0x50200 unaligned/);
    assert.match(invalid(decodeL2Entry(0x50201n, standard)), /Preallocated zero cluster offset 0x50200 unaligned/);
    assert.match(invalid(decodeL2Entry(0x8040000000000000n, standard)), /beyond 2\^53/);
    assert.match(invalid(decodeL2Entry(0x1n, { ...standard, version: 2 })), /pre-v3 image/);
    assert.match(invalid(decodeL1Entry(0x8000000000040001n, 16)), /reserved bits set/);
    assert.match(invalid(decodeL1Entry(0x8000000000040200n, 16)), /L2 table offset 0x40200 unaligned/);
    assert.match(invalid(decodeRefcountTableEntry(0x20001n, 16)), /reserved bits set/);
    assert.match(invalid(decodeRefcountTableEntry(0x20200n, 16)), /unaligned/);
    assert.deepEqual(decodeL1Entry(0n, 16), { type: 'UNALLOCATED', copied: false });
    assert.deepEqual(decodeRefcountTableEntry(0n, 16), { type: 'UNALLOCATED' });
    // Bit 62 is looked at first, whatever bit 0 says.
    assert.equal(decodeL2Entry(0x4000000000050001n, standard).type, 'COMPRESSED');
  });

  test('with an external data file, offset 0 plus COPIED is a real cluster', () => {
    const dataFile = { ...standard, externalDataFile: true };
    assert.deepEqual(decodeL2Entry(0x8000000000000000n, dataFile), { type: 'NORMAL', hostOffset: 0, copied: true });
    assert.deepEqual(decodeL2Entry(0x8000000000000000n, standard), { type: 'UNALLOCATED', copied: true });
    assert.equal(decodeL2Entry(0x4000000000050000n, dataFile).type, 'INVALID');
  });

  test('encoders refuse what an entry cannot hold', () => {
    assert.throws(() => encodeL1Entry(0x123, false), RangeError);
    assert.throws(() => encodeL2Entry({ type: 'NORMAL', hostOffset: 2 ** 56, copied: true }, 16), RangeError);
    assert.throws(() => encodeRefcountTableEntry(0x20100), RangeError);
    assert.equal(encodeRefcountTableEntry(0x20000), 0x20000n);
    assert.throws(() => encodeCompressedDescriptor({ hostOffset: 0x50000, length: 64 * KiB + 1 }, 16), RangeError);
  });
});

describe('compressed clusters', () => {
  for (const clusterSize of [4 * KiB, 64 * KiB, 2 * MiB]) {
    test(`two streams in one host cluster, ${clusterSize / KiB} KiB clusters`, () => {
      const clusterBits = Math.log2(clusterSize);
      const path = createImage(`compressed-${clusterBits}.qcow2`, ['-o', `cluster_size=${clusterSize}`]);
      qemuIo(path, `write -c -P 0x41 0 ${clusterSize}`, `write -c -P 0x42 ${clusterSize} ${clusterSize}`);
      const header = headerOf(path);
      const l1 = decodeL1Entry(readEntry(path, header.l1TableOffset), clusterBits);
      assert.equal(l1.type, 'ALLOCATED');
      const l2Offset = l1.type === 'ALLOCATED' ? l1.l2Offset : 0;
      const raws = [readEntry(path, l2Offset), readEntry(path, l2Offset + 8)];
      const streams = raws.map((raw) => decodeL2Entry(raw, { ...standard, clusterBits }));
      const fileEnd = statSync(path).size;
      streams.forEach((entry, index) => {
        assert.equal(entry.type, 'COMPRESSED');
        if (entry.type !== 'COMPRESSED') return;
        const { hostOffset, compressedSize, nbSectors } = entry.compressed;
        assert.equal(compressedSize, nbSectors * 512 - (hostOffset % 512));
        const data = inflateRawSync(readAt(path, hostOffset, compressedSize));
        assert.deepEqual(data, Buffer.alloc(clusterSize, 0x41 + index));
        // The first stream ends where the second starts, the second at the end of the file.
        const end = index === 0 && streams[1]!.type === 'COMPRESSED' ? streams[1]!.compressed.hostOffset : fileEnd;
        assert.equal(encodeCompressedDescriptor({ hostOffset, length: end - hostOffset }, clusterBits), raws[index]);
        assert.equal(encodeL2Entry(entry, clusterBits), raws[index]);
      });
      if (clusterSize === 64 * KiB) {
        assert.deepEqual(raws, [0x4000000000050000n, 0x400000000005004fn]);
        assert.equal(getRefcount(readAt(path, 0x20000, 64), 5, 16), 2);
      }
    });
  }

  test('a stream crossing into the next sectors counts them', () => {
    const raw = encodeCompressedDescriptor({ hostOffset: 0x5fff0, length: 100 }, 16);
    assert.deepEqual(decodeCompressedDescriptor(raw, 16), { hostOffset: 0x5fff0, nbSectors: 2, compressedSize: 528 });
  });
});

describe('extended L2 entries', () => {
  test('the example of section 4.5', () => {
    const path = createImage('extended-l2.qcow2', ['-o', 'extended_l2=on']);
    qemuIo(path, 'write 4k 4k', 'write -z 64k 8k', 'write 128k 64k');
    const table = readAt(path, 0x40000, 48);
    const raws = [0, 1, 2].map((index) => [table.readBigUInt64BE(index * 16), table.readBigUInt64BE(index * 16 + 8)] as const);
    const entries = raws.map(([raw, bitmap]) => decodeExtendedL2Entry(raw, bitmap, standard));
    assert.deepEqual(entries, [
      { type: 'ALLOCATED', hostOffset: 0x50000, copied: true, allocatedMask: 0xc, zeroMask: 0 },
      { type: 'UNALLOCATED', copied: false, zeroMask: 0xf },
      { type: 'ALLOCATED', hostOffset: 0x60000, copied: true, allocatedMask: 0xffffffff, zeroMask: 0 },
    ]);
    const types = entries.map((entry) => Array.from({ length: 32 }, (_, index) => subclusterType(entry, index)));
    assert.deepEqual(types[0]!.slice(0, 5), ['UNALLOCATED_ALLOC', 'UNALLOCATED_ALLOC', 'NORMAL', 'NORMAL', 'UNALLOCATED_ALLOC']);
    assert.deepEqual(types[1]!.slice(0, 5), ['ZERO_PLAIN', 'ZERO_PLAIN', 'ZERO_PLAIN', 'ZERO_PLAIN', 'UNALLOCATED_PLAIN']);
    assert.ok(types[2]!.every((type) => type === 'NORMAL'));
    entries.forEach((entry, index) => {
      assert.ok(entry.type !== 'INVALID');
      assert.deepEqual(encodeExtendedL2Entry(entry, 16), { entry: raws[index]![0], bitmap: raws[index]![1] });
    });
  });

  test('inconsistent bitmaps are INVALID', () => {
    const cases: [bigint, bigint, RegExp][] = [
      [0x8000000000050000n, 0x0000000100000001n, /corrupted subcluster allocation bitmap/],
      [0n, 0x1n, /Unallocated cluster has non-zero subcluster allocation map/],
      [0x4000000000050000n, 0x1n, /Compressed cluster with non-zero subcluster/],
      [0x8000000000050001n, 0x1n, /reserved bits set/],
    ];
    for (const [raw, bitmap, reason] of cases) {
      const entry = decodeExtendedL2Entry(raw, bitmap, standard);
      assert.match(invalid(entry), reason);
      assert.equal(subclusterType(entry, 0), 'INVALID');
    }
    assert.deepEqual(encodeExtendedL2Entry({ type: 'UNALLOCATED', copied: false, zeroMask: 0xffffffff }, 16),
      { entry: 0n, bitmap: 0xffffffff00000000n });
  });
});

describe('refcount blocks', () => {
  const widths: RefcountBits[] = [1, 2, 4, 8, 16, 32, 64];
  for (const width of widths) {
    test(`a fresh image with refcount_bits=${width}`, () => {
      const path = createImage(`refcount-${width}.qcow2`, ['-o', `refcount_bits=${width}`]);
      const header = headerOf(path);
      assert.equal(refcountBitsFromOrder(header.refcountOrder), width);
      const block = readAt(path, 0x20000, 64 * KiB);
      assert.deepEqual(Array.from({ length: 6 }, (_, index) => getRefcount(block, index, width)), [1, 1, 1, 1, 0, 0]);
      const built = Buffer.alloc(64 * KiB);
      for (let index = 0; index < 4; index++) setRefcount(built, index, width, 1);
      assert.deepEqual(built, block);
      if (width === 1) assert.equal(block[0], 0x0f);
      if (width === 16) assert.deepEqual(block.subarray(0, 10), Buffer.from('00010001000100010000', 'hex'));
    });
  }

  const leaks: [RefcountBits, bigint][] = [[2, 3n], [4, 15n], [8, 200n], [64, 1n << 60n]];
  for (const [width, refcount] of leaks) {
    test(`qemu-img check reads what setRefcount wrote, refcount_bits=${width}`, () => {
      const path = createImage(`leak-${width}.qcow2`, ['-o', `refcount_bits=${width}`]);
      const block = readAt(path, 0x20000, 64 * KiB);
      setRefcount(block, 3, width, refcount);
      assert.deepEqual([0, 1, 2, 4].map((index) => getRefcount(block, index, width)), [1, 1, 1, 0]);
      writeAt(path, 0x20000, block);
      const check = run('qemu-img', ['check', path]);
      assert.equal(check.status, 3, check.stderr);
      assert.match(check.stdout + check.stderr, new RegExp(`Leaked cluster 3 refcount=${refcount} reference=1`));
      assert.equal(getRefcountBigInt(block, 3, width), refcount);
      if (refcount > BigInt(Number.MAX_SAFE_INTEGER)) assert.throws(() => getRefcount(block, 3, width), Qcow2FormatError);
    });
  }

  test('limits and packing', () => {
    assert.equal(maxRefcount(1), 1n);
    assert.equal(maxRefcount(16), 65535n);
    assert.equal(maxRefcount(64), (1n << 64n) - 1n);
    assert.equal(maxSafeRefcount(32), 2 ** 32 - 1);
    assert.equal(maxSafeRefcount(64), Number.MAX_SAFE_INTEGER);
    const nibbles = Buffer.alloc(2);
    assert.throws(() => setRefcount(nibbles, 0, 4, 16), RangeError);
    assert.throws(() => setRefcount(nibbles, 4, 4, 1), RangeError);
    setRefcount(nibbles, 1, 4, 0xa);
    setRefcount(nibbles, 2, 4, 0x5);
    assert.deepEqual(nibbles, Buffer.from([0xa0, 0x05]));
    setRefcount(nibbles, 1, 4, 0);
    assert.deepEqual([0, 1, 2, 3].map((index) => getRefcount(nibbles, index, 4)), [0, 0, 5, 0]);
    const pairs = Buffer.alloc(1);
    setRefcount(pairs, 2, 2, 3);
    setRefcount(pairs, 0, 2, 1);
    assert.equal(pairs[0], 0x31);
  });

  test('geometry: each refcount block of a 4 KiB-cluster image counts its own cluster', () => {
    assert.equal(refcountBlockEntries(16, 16), 32768);
    assert.equal(refcountTableEntriesPerCluster(16), 8192);
    assert.deepEqual(refcountLocation(32768 + 5, 16, 16), { tableIndex: 1, blockIndex: 5 });
    const path = createImage('refcount-geometry.qcow2', ['-o', 'cluster_size=4096']);
    qemuIo(path, 'write -P 7 0 20M');
    const header = headerOf(path);
    const table = readAt(path, header.refcountTableOffset, 4 * KiB);
    const blocks = [0, 1, 2].map((index) => decodeRefcountTableEntry(table.readBigUInt64BE(index * 8), 12));
    blocks.forEach((entry, tableIndex) => {
      assert.equal(entry.type, 'ALLOCATED');
      if (entry.type !== 'ALLOCATED') return;
      const location = refcountLocation(entry.blockOffset / 4096, 12, 16);
      assert.equal(location.tableIndex, tableIndex);
      assert.equal(getRefcount(readAt(path, entry.blockOffset, 4096), location.blockIndex, 16), 1);
    });
  });
});
