/* createQcow2 against qemu-img create: byte-identical files for each option set, a clean qemu-img check, QEMU's refusals. */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { ImageTooLargeError, createQcow2, layoutQcow2, type Qcow2CreateOptions } from '../../src/blockdev/drivers/qcow2/create.js';
import { Qcow2FormatError } from '../../src/blockdev/drivers/qcow2/format-constants.js';
import { createImageFile } from '../../src/blockdev/image-file-creation.js';
import { openImage } from '../../src/blockdev/image-session.js';
import { makeTempDir } from '../helpers/paths.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const { dir, cleanup } = makeTempDir('blockd-qcow2-create-');
after(cleanup);

function qemuImg(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const { status, stdout, stderr, error } = spawnSync('qemu-img', args, { cwd: dir, encoding: 'utf8' });
  if (error) throw error;
  return { status, stdout, stderr };
}

/** [qemu-img -o text, size text, the same as createQcow2 options] */
const CASES: [string, string, Qcow2CreateOptions][] = [
  ['', '64M', { size: 64 * MiB }],
  ['', '1G', { size: GiB }],
  ['', '1T', { size: 1024 * GiB }],
  ['', '0', { size: 0 }],
  ['', '1000', { size: 1024 }],
  ['cluster_size=512', '64M', { size: 64 * MiB, clusterSize: 512 }],
  ['cluster_size=512', '1G', { size: GiB, clusterSize: 512 }], // the L1 table needs refcount blocks placed after it
  ['cluster_size=4096', '64M', { size: 64 * MiB, clusterSize: 4096 }],
  ['cluster_size=2M', '64M', { size: 64 * MiB, clusterSize: 2 * MiB }],
  ['cluster_size=1024,refcount_bits=32', '16G', { size: 16 * GiB, clusterSize: 1024, refcountBits: 32 }], // the refcount table grows
  ...[1, 2, 4, 8, 16, 32, 64].map((bits): [string, string, Qcow2CreateOptions] => [`refcount_bits=${bits}`, '64M', { size: 64 * MiB, refcountBits: bits }]),
  ['compat=0.10', '64M', { size: 64 * MiB, version: 2 }],
  ['lazy_refcounts=on', '64M', { size: 64 * MiB, lazyRefcounts: true }],
  ['extended_l2=on', '1G', { size: GiB, extendedL2: true }],
  ['compression_type=zstd', '64M', { size: 64 * MiB, compressionType: 'zstd' }],
  ['backing_file=base.raw,backing_fmt=raw', '64M', { size: 64 * MiB, backingFile: 'base.raw', backingFormat: 'raw' }],
  ['compat=0.10,backing_file=base.qcow2,backing_fmt=qcow2', '64M', { size: 64 * MiB, version: 2, backingFile: 'base.qcow2', backingFormat: 'qcow2' }],
  ['cluster_size=4096,backing_file=base.raw,backing_fmt=raw', '64M', { size: 64 * MiB, clusterSize: 4096, backingFile: 'base.raw', backingFormat: 'raw' }],
  // metadata preallocation: L2 tables and data clusters range by range, refcount blocks wherever the allocator needs them
  ['preallocation=metadata', '64M', { size: 64 * MiB, preallocation: 'metadata' }],
  ['preallocation=metadata', '513M', { size: 513 * MiB, preallocation: 'metadata' }], // two L2 ranges
  ['preallocation=metadata', '1000', { size: 1024, preallocation: 'metadata' }],
  ['preallocation=metadata,cluster_size=512', '4M', { size: 4 * MiB, clusterSize: 512, preallocation: 'metadata' }],
  ['preallocation=metadata,cluster_size=512,refcount_bits=1', '3M', { size: 3 * MiB, clusterSize: 512, refcountBits: 1, preallocation: 'metadata' }],
  ['preallocation=metadata,cluster_size=4096', '64M', { size: 64 * MiB, clusterSize: 4096, preallocation: 'metadata' }],
  ['preallocation=metadata,compat=0.10', '64M', { size: 64 * MiB, version: 2, preallocation: 'metadata' }],
];

describe('createQcow2 writes what qemu-img create writes', () => {
  writeFileSync(join(dir, 'base.raw'), Buffer.alloc(0));
  qemuImg('create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '64M');
  for (const [options, size, createOptions] of CASES) {
    test(`-o ${options || '(defaults)'} ${size}`, async () => {
      const theirs = join(dir, 'qemu.qcow2');
      const ours = join(dir, 'blockd.qcow2');
      const created = qemuImg('create', '-q', '-f', 'qcow2', '-u', ...(options ? ['-o', options] : []), theirs, size);
      assert.equal(created.status, 0, created.stderr);
      const file = await createImageFile(ours, { size: 0 });
      await createQcow2(file, createOptions).finally(() => file.close());
      assert.equal(statSync(ours).size, statSync(theirs).size);
      assert.ok(readFileSync(ours).equals(readFileSync(theirs)), 'files differ');
      const check = qemuImg('check', ours);
      assert.equal(check.status, 0, check.stdout + check.stderr);
    });
  }
});

test('the file ends right after the L1 entries (reference section 12)', () => {
  const end = (options: Qcow2CreateOptions) => layoutQcow2(options).length;
  assert.equal(end({ size: 64 * MiB }), 0x30008);
  assert.equal(end({ size: 10 * GiB }), 196768);
  assert.equal(end({ size: 1024 * GiB }), 212992);
  assert.equal(end({ size: 64 * MiB, clusterSize: 4096 }), 12544);
  assert.equal(end({ size: 64 * MiB, clusterSize: 2 * MiB }), 6291464);
});

test('createQcow2 on a file edge (blockdev-create style) truncates and writes through it', async () => {
  const path = join(dir, 'edge.qcow2');
  writeFileSync(path, Buffer.alloc(3 * MiB, 0xee));
  const session = await openImage(path, { format: 'raw', writable: true });
  try {
    await createQcow2(session.disk, { size: 64 * MiB });
  } finally {
    await session.close();
  }
  qemuImg('create', '-q', '-f', 'qcow2', join(dir, 'edge-ref.qcow2'), '64M');
  assert.ok(readFileSync(path).equals(readFileSync(join(dir, 'edge-ref.qcow2'))));
});

describe("QEMU's refusals, with its texts", () => {
  const refusals: [Qcow2CreateOptions, string][] = [
    [{ size: 1000 }, 'Image size must be a multiple of 512 bytes'],
    [{ size: MiB, clusterSize: 1000 }, 'Cluster size must be a power of two between 512 and 2048k'],
    [{ size: MiB, clusterSize: 4 * MiB }, 'Cluster size must be a power of two between 512 and 2048k'],
    [{ size: MiB, version: 2, lazyRefcounts: true }, 'Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
    [{ size: MiB, refcountBits: 3 }, 'Refcount width must be a power of two and may not exceed 64 bits'],
    [{ size: MiB, refcountBits: 128 }, 'Refcount width must be a power of two and may not exceed 64 bits'],
    [{ size: MiB, version: 2, refcountBits: 8 }, 'Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)'],
    [{ size: MiB, backingFormat: 'raw' }, 'Backing format cannot be used without backing file'],
    [{ size: MiB, version: 2, extendedL2: true }, 'Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
    [{ size: MiB, extendedL2: true, clusterSize: 4096 }, 'Extended L2 entries are only supported with cluster sizes of at least 16384 bytes'],
    [{ size: MiB, version: 2, compressionType: 'zstd' }, 'Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
  ];
  for (const [options, message] of refusals) {
    test(message, () => assert.throws(() => layoutQcow2(options), (error: unknown) => error instanceof Qcow2FormatError && error.message === message));
  }
  test('a backing file without a format is fine for blockdev-create (qemu-img refuses it itself)', () => {
    assert.doesNotThrow(() => layoutQcow2({ size: MiB, backingFile: 'base.raw' }));
  });
  test('an L1 table over 32 MiB is "too large"', () => {
    assert.throws(() => layoutQcow2({ size: 2 ** 50, clusterSize: 4096 }), ImageTooLargeError);
  });
});
