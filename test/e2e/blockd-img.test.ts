/*
 * bin/blockd-img run as a process beside qemu-img on the same images: map, info, check,
 * compare and create must print the same text and exit with the same status (info may
 * differ only in the disk size, which depends on filesystem accounting).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { REPO_ROOT, makeTempDir } from '../helpers/paths.js';
import { holdImage, sha256File, type HeldImage } from '../helpers/qemu-tools.js';

const BLOCKD_IMG = join(REPO_ROOT, 'bin', 'blockd-img');
const { dir, cleanup } = makeTempDir('blockd-img-test-');
after(cleanup);

function run(command: string, args: string[]): { status: number | null; stdout: string; stderr: string } {
  const [file, argv] = command === 'blockd-img' ? [process.execPath, [BLOCKD_IMG, ...args]] : [command, args];
  const { status, stdout, stderr, error } = spawnSync(file, argv, { cwd: dir, encoding: 'utf8', timeout: 60_000 });
  if (error) throw error;
  return { status, stdout, stderr };
}

function succeed(command: string, ...args: string[]): void {
  const result = run(command, args);
  assert.equal(result.status, 0, `${command} ${args.join(' ')}: ${result.stderr}`);
}

function qemuIo(image: string, format: string, ...commands: string[]): void {
  succeed('qemu-io', '-f', format, ...commands.flatMap((command) => ['-c', command]), image);
}

/** Both tools, same arguments: same stdout, same stderr (program name aside), same exit status. */
function same(args: string[], normalize: (text: string) => string = (text) => text): void {
  const ours = run('blockd-img', args);
  const theirs = run('qemu-img', args);
  const context = `${args.join(' ')}\n--- blockd-img:\n${ours.stdout}${ours.stderr}\n--- qemu-img:\n${theirs.stdout}${theirs.stderr}`;
  assert.equal(normalize(ours.stdout), normalize(theirs.stdout), context);
  assert.equal(ours.stderr.replace(/blockd-img/g, 'qemu-img').trimEnd(), theirs.stderr.trimEnd(), context);
  assert.equal(ours.status, theirs.status, context);
}

before(() => {
  // A three-layer chain of different sizes, data at every layer, zeros hiding lower data.
  succeed('qemu-img', 'create', '-q', '-f', 'qcow2', 'base.qcow2', '32M');
  qemuIo('base.qcow2', 'qcow2', 'write -P 1 0 128k', 'write -P 2 1M 64k', 'write -c -P 5 3M 128k', 'write -P 6 20M 1M');
  succeed('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2', '48M');
  qemuIo('mid.qcow2', 'qcow2', 'write -P 3 64k 64k', 'write -z 1M 64k', 'write -P 9 40M 64k', 'write -P 8 20M 4k');
  succeed('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', '64M');
  qemuIo('top.qcow2', 'qcow2', 'write -P 4 128k 64k', 'write -z -u 0 64k', 'write 50M 4k', 'write -z 20M 64k');
  // Data, a partial cluster (COW zero fill), zero clusters, compressed clusters.
  succeed('qemu-img', 'create', '-q', '-f', 'qcow2', 'mixed.qcow2', '1G');
  qemuIo('mixed.qcow2', 'qcow2', 'write -P 0xab 0 64k', 'write -P 0xcd 1M 4k', 'write -z 2M 64k', 'write -c -P 3 4M 128k', 'write -P 1 600M 64k');
  // A raw file with holes and an unaligned end, and a qcow2 overlay on it.
  succeed('qemu-img', 'create', '-q', '-f', 'raw', 'holes.raw', '10M');
  qemuIo('holes.raw', 'raw', 'write -P 1 0 4k', 'write -P 1 1M 512k', 'write -P 1 9M 1k');
  truncateSync(join(dir, 'holes.raw'), 10485000);
  succeed('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'holes.raw', '-F', 'raw', 'over-raw.qcow2', '16M');
  qemuIo('over-raw.qcow2', 'qcow2', 'write -P 2 4k 4k', 'write -P 3 12M 64k');
  succeed('qemu-img', 'snapshot', '-c', 's1', 'over-raw.qcow2');
  succeed('qemu-img', 'bitmap', '--add', 'over-raw.qcow2', 'bm0');
  succeed('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4k', 'v2.qcow2', '0');
  succeed('qemu-img', 'create', '-q', '-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', 'orphan.qcow2', '1M');
});

const MAPPED = ['top.qcow2', 'mid.qcow2', 'base.qcow2', 'mixed.qcow2', 'holes.raw', 'over-raw.qcow2', 'v2.qcow2'];

describe('map', () => {
  for (const image of MAPPED) {
    test(`--output=json ${image}`, () => same(['map', '--output=json', image]));
    test(`--output=human ${image}`, () => same(['map', image]));
  }
  test('-f raw on a qcow2 file, -s and -l', () => {
    same(['map', '--output=json', '-f', 'raw', 'mixed.qcow2']);
    same(['map', '--output=json', '-s', '1M', '-l', '40M', 'top.qcow2']);
  });
});

describe('info', () => {
  const withoutDiskSize = (text: string) => text.replace(/\n\s*"actual-size": \d+,/g, '').replace(/^disk size: .*\n/gm, '');
  for (const image of MAPPED) {
    test(`--output=json ${image}`, () => same(['info', '--output=json', image], withoutDiskSize));
    test(`human ${image}`, () => same(['info', image], withoutDiskSize));
  }
  test('--backing-chain', () => {
    same(['info', '--backing-chain', '--output=json', 'top.qcow2'], withoutDiskSize);
    same(['info', '--backing-chain', 'over-raw.qcow2'], withoutDiskSize);
  });
  test('errors', () => {
    same(['info', 'missing.qcow2']);
    same(['info', '-f', 'qcow2', 'holes.raw']);
    same(['info', '--output=xml', 'top.qcow2']);
  });
});

describe('check', () => {
  const damaged = (name: string, edit: (bytes: Buffer) => void) => {
    succeed('qemu-img', 'create', '-q', '-f', 'qcow2', name, '64M');
    qemuIo(name, 'qcow2', 'write 0 64k', 'write 64k 64k', 'write -z -u 0 64k');
    const bytes = readFileSync(join(dir, name));
    edit(bytes);
    writeFileSync(join(dir, name), bytes);
  };
  before(() => {
    damaged('leak.qcow2', (bytes) => bytes.writeUInt16BE(1, 0x20000 + 2 * 5)); // freed cluster 5 keeps a refcount
    damaged('corrupt.qcow2', (bytes) => bytes.writeUInt16BE(0, 0x20000 + 2 * 6)); // data cluster 6 loses its refcount
    damaged('copied.qcow2', (bytes) => (bytes[0x40008] = 0)); // COPIED cleared on guest cluster 1
  });
  for (const image of ['top.qcow2', 'mixed.qcow2', 'over-raw.qcow2', 'v2.qcow2', 'leak.qcow2', 'corrupt.qcow2', 'copied.qcow2']) {
    test(`${image}: human and json`, () => {
      same(['check', image]);
      same(['check', '--output=json', image]);
    });
  }
  test('a missing backing file fails the check, as the open fails in qemu-img', () => {
    same(['check', 'orphan.qcow2']);
    same(['map', 'orphan.qcow2']);
    same(['info', '--output=json', 'orphan.qcow2'], (text) => text.replace(/\n\s*"actual-size": \d+,/g, ''));
  });
  test('raw has no check (exit 63); -r is refused', () => {
    same(['check', 'holes.raw']);
    same(['check', '-f', 'raw', 'mixed.qcow2']);
    const repair = run('blockd-img', ['check', '-r', 'all', 'leak.qcow2']);
    assert.equal(repair.status, 1);
    assert.match(repair.stderr, /^blockd-img: -r is not supported/);
  });
});

describe('bitmaps', () => {
  const withoutDiskSize = (text: string) => text.replace(/\n\s*"actual-size": \d+,/g, '').replace(/^disk size: .*\n/gm, '');
  /** Bitmaps made by qemu-img and qemu-io, then the bytes of one structure changed. */
  const withBitmaps = (name: string, edit: (bytes: Buffer, directory: number) => void = () => {}) => {
    succeed('qemu-img', 'create', '-q', '-f', 'qcow2', name, '64M');
    succeed('qemu-img', 'bitmap', '--add', name, 'b0');
    succeed('qemu-img', 'bitmap', '--add', '-g', '131072', '--disable', name, 'b1');
    qemuIo(name, 'qcow2', 'write 0 64k', 'write 10M 1M');
    succeed('qemu-img', 'bitmap', '--merge', 'b0', name, 'b1');
    const bytes = readFileSync(join(dir, name));
    const extension = bytes.indexOf(Buffer.from([0x23, 0x85, 0x28, 0x75]));
    edit(bytes, Number(bytes.readBigUInt64BE(extension + 8 + 16)));
    writeFileSync(join(dir, name), bytes);
  };
  const tableOf = (bytes: Buffer, directory: number, entry: 0 | 1) => Number(bytes.readBigUInt64BE(directory + 32 * entry));
  before(() => {
    withBitmaps('bitmaps.qcow2');
    withBitmaps('bitmap-in-use.qcow2', (bytes, directory) => bytes.writeUInt32BE(3, directory + 12));
    withBitmaps('bitmap-granularity.qcow2', (bytes, directory) => (bytes[directory + 32 + 17] = 32));
    withBitmaps('bitmap-table-entry.qcow2', (bytes, directory) => (bytes[tableOf(bytes, directory, 1) + 7]! |= 0x10));
    withBitmaps('bitmap-table-size.qcow2', (bytes, directory) => bytes.writeUInt32BE(3, directory + 8));
    withBitmaps('bitmap-count.qcow2', (bytes) => bytes.writeUInt32BE(3, bytes.indexOf(Buffer.from([0x23, 0x85, 0x28, 0x75])) + 8));
    // The data cluster of b0 loses its refcount: a corruption for check, no obstacle to info.
    withBitmaps('bitmap-refcount.qcow2', (bytes, directory) => {
      const data = Number(bytes.readBigUInt64BE(tableOf(bytes, directory, 0)));
      bytes.writeUInt16BE(0, 0x20000 + 2 * (data / 65536));
    });
  });
  const images = ['bitmaps.qcow2', 'bitmap-in-use.qcow2', 'bitmap-granularity.qcow2', 'bitmap-table-entry.qcow2', 'bitmap-table-size.qcow2',
    'bitmap-count.qcow2', 'bitmap-refcount.qcow2'];
  for (const image of images) {
    test(image, () => {
      same(['info', '--output=json', image], withoutDiskSize);
      same(['info', image], withoutDiskSize);
      same(['check', image]);
      same(['check', '--output=json', image]);
    });
  }
});

describe('compare', () => {
  before(() => {
    succeed('qemu-img', 'convert', '-O', 'raw', 'top.qcow2', 'top.raw');
    succeed('qemu-img', 'convert', '-O', 'qcow2', '-c', 'top.qcow2', 'top-copy.qcow2');
    succeed('qemu-img', 'convert', '-O', 'raw', 'top.qcow2', 'top-changed.raw');
    qemuIo('top-changed.raw', 'raw', 'write -P 0x77 33555968 512');
    succeed('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'top.qcow2', '-F', 'qcow2', 'grown.qcow2', '80M');
    succeed('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'top.qcow2', '-F', 'qcow2', 'grown-data.qcow2', '80M');
    qemuIo('grown-data.qcow2', 'qcow2', 'write -P 1 70M 512');
    succeed('qemu-img', 'create', '-q', '-f', 'qcow2', 'sparse1.qcow2', '1T');
    succeed('qemu-img', 'create', '-q', '-f', 'qcow2', 'sparse2.qcow2', '1T');
    qemuIo('sparse1.qcow2', 'qcow2', 'write -P 1 900G 64k');
    qemuIo('sparse2.qcow2', 'qcow2', 'write -P 1 900G 64k', 'write -P 2 1000G 512');
  });
  const pairs = [
    ['top.qcow2', 'top.raw'], ['top.raw', 'top-copy.qcow2'], ['top.qcow2', 'top-changed.raw'], ['top-changed.raw', 'top.qcow2'],
    ['top.qcow2', 'mid.qcow2'], ['mid.qcow2', 'top.qcow2'], ['top.qcow2', 'grown.qcow2'], ['grown-data.qcow2', 'top.qcow2'],
    ['sparse1.qcow2', 'sparse2.qcow2'], ['-s', 'top.qcow2', 'top.qcow2'], ['-s', 'top.qcow2', 'grown.qcow2'], ['-q', 'top.qcow2', 'mid.qcow2'],
    ['top.qcow2', 'missing.raw'], ['-f', 'qcow2', 'holes.raw', 'top.qcow2'], ['top.qcow2'],
  ];
  for (const pair of pairs) test(pair.join(' '), () => same(['compare', ...pair]));
});

describe('create', () => {
  const created = (args: string[]) => {
    const ours = run('blockd-img', ['create', ...args.map((arg) => (arg === 'NEW' ? 'ours.img' : arg))]);
    const theirs = run('qemu-img', ['create', ...args.map((arg) => (arg === 'NEW' ? 'theirs.img' : arg))]);
    const context = `create ${args.join(' ')}: ${ours.stdout}${ours.stderr} / ${theirs.stdout}${theirs.stderr}`;
    assert.equal(ours.stdout.replace(/ours\.img/g, 'NEW'), theirs.stdout.replace(/theirs\.img/g, 'NEW'), context);
    assert.equal(ours.stderr.replace(/ours\.img/g, 'NEW').replace(/blockd-img/g, 'qemu-img').trimEnd(), theirs.stderr.replace(/theirs\.img/g, 'NEW').trimEnd(), context);
    assert.equal(ours.status, theirs.status, context);
    if (theirs.status === 0) assert.ok(readFileSync(join(dir, 'ours.img')).equals(readFileSync(join(dir, 'theirs.img'))), `${context}: files differ`);
  };
  const cases = [
    ['-f', 'qcow2', 'NEW', '64M'], ['-f', 'qcow2', 'NEW', '1.5G'], ['-f', 'qcow2', 'NEW', '1000'], ['-f', 'raw', 'NEW', '1000'], ['NEW', '10M'],
    ['-f', 'qcow2', '-o', 'cluster_size=4k,compat=0.10', '-o', 'refcount_bits=16', 'NEW', '1G'],
    ['-f', 'qcow2', '-o', 'lazy_refcounts=on,refcount_bits=1', 'NEW', '64M'],
    ['-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'NEW'], ['-f', 'qcow2', '-o', 'backing_file=holes.raw,backing_fmt=raw', 'NEW', '1G'],
    ['-f', 'qcow2', '-b', 'base.qcow2', 'NEW'], ['-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', 'NEW', '1M'],
    ['-f', 'qcow2', '-o', 'refcount_bits=3', 'NEW', '64M'], ['-f', 'qcow2', '-o', 'compat=0.10,lazy_refcounts=on', 'NEW', '64M'],
    ['-f', 'qcow2', '-o', 'cluster_size=1000', 'NEW', '64M'], ['-f', 'qcow2', '-o', 'foo=bar', 'NEW', '64M'],
    ['-f', 'qcow2', 'NEW'], ['-f', 'qcow2', 'NEW', '12Q'], ['-f', 'qcow2', '-o', 'size=1M', 'NEW', '2M'],
    ...['full', 'falloc', 'metadata', 'xyz'].map((mode) => ['-f', 'raw', '-o', `preallocation=${mode}`, 'NEW', '1000']),
  ];
  for (const args of cases) test(args.join(' '), () => created(args));
});

describe('create over an image another process holds', () => {
  const image = join(dir, 'held.qcow2');
  let holder: HeldImage | undefined;
  let hashBefore = '';
  before(async () => {
    succeed('qemu-img', 'create', '-q', '-f', 'qcow2', 'held.qcow2', '16M');
    qemuIo('held.qcow2', 'qcow2', 'write -P 0x5a 0 1M');
    hashBefore = sha256File(image);
    holder = await holdImage(image);
  });
  after(() => holder?.release());
  // Refused before the first write, as qemu-img refuses; an option the format refuses must not delete the file either.
  for (const args of [['-f', 'qcow2'], ['-f', 'raw'], ['-f', 'qcow2', '-o', 'cluster_size=1000'], ['-f', 'raw', '-o', 'preallocation=full']]) {
    test(args.join(' '), () => same(['create', ...args, 'held.qcow2', '1M']));
  }
  test('the held image is as it was', async () => {
    await holder?.release();
    assert.equal(sha256File(image), hashBefore);
    qemuIo('held.qcow2', 'qcow2', 'read -P 0x5a 0 1M');
    succeed('qemu-img', 'check', 'held.qcow2');
  });
});

describe('the command line', () => {
  test('--help, --version, unknown commands and options', () => {
    const help = run('blockd-img', ['--help']);
    assert.equal(help.status, 0);
    for (const command of ['check', 'compare', 'create', 'info', 'map']) assert.match(help.stdout, new RegExp(`^  ${command} `, 'm'));
    assert.match(run('blockd-img', ['--version']).stdout, /^blockd-img version \d+\.\d+\.\d+ \(qemu-img of QEMU 7\.2\)\n$/);
    assert.deepEqual(run('blockd-img', ['frobnicate']), { status: 1, stdout: '', stderr: 'blockd-img: Command not found: frobnicate\n' });
    same(['info', '--bogus', 'top.qcow2']);
    same(['info', '-f']);
    same(['check']);
  });
});
