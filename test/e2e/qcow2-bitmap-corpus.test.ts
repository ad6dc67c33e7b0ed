/*
 * A corpus of qcow2 images with damaged bitmap metadata, against qemu-storage-daemon. Each
 * starts as a valid image QEMU made (qemu-img create, qemu-io writes, qemu-img bitmap add,
 * disable, merge; several bitmaps and granularities, cluster sizes from 2 to 64 KiB, data
 * clusters, clean and all-ones table entries), then seeded random changes hit the bitmaps
 * extension, the directory entries, the bitmap tables, the data clusters (truncation, a
 * refcount of 0, garbage bits) or the autoclear bits. One long-running qemu-storage-daemon
 * and one blockd open each image with the same blockdev-add: read-only, both must accept or
 * refuse alike (same error class and text), and when they accept, list the same dirty
 * bitmaps with the same x-debug-block-dirty-bitmap-sha256 for each consistent one, and
 * leave the file untouched. Read-write, each daemon on its own copy (at the same path, one
 * after the other): the same answers, then after blockdev-del `qemu-img check` of both
 * copies gives the same verdict. A failure names the seed and its mutations
 * (BLOCKD_BITMAP_CORPUS_SEED=n runs that one image).
 */
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, readFileSync, renameSync, rmSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { inspect, isDeepStrictEqual } from 'node:util';
import { QmpClient, QmpCommandError } from '../../src/qmp/client.js';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { qcow2BitmapLayout, type BitmapEntryLayout, type Qcow2BitmapLayout } from '../helpers/qcow2-layout.js';
import { KiB, MiB, SeededRandom, createQcow2, qemuImgCheck, qemuIo, runQemuImg, sha256File, writeAt, writeU64 } from '../helpers/qemu-tools.js';
import { startQsd, type QsdProcess } from '../helpers/qsd-process.js';

const IMAGES = 200;
/** Read-write opens write the image: every other image goes through that pass too, to keep the run short. */
const READ_WRITE_EVERY = 2;

const { dir, cleanup } = makeTempDir('blockd-bitmap-corpus-');
let qsdProcess: QsdProcess;
let blockdProcess: BlockdProcess;
const peers: { qsd?: QmpClient; blockd?: QmpClient } = {};

before(async () => {
  mkdirSync(join(dir, 'qsd'));
  qsdProcess = await startQsd(join(dir, 'qsd'));
  blockdProcess = await runBlockd(['--qmp', `unix:${join(dir, 'blockd.sock')}`]);
  peers.qsd = await QmpClient.connect(`unix:${qsdProcess.socket}`);
  peers.blockd = await QmpClient.connect(`unix:${join(dir, 'blockd.sock')}`);
});
after(async () => {
  await peers.qsd?.close();
  await peers.blockd?.close();
  await qsdProcess?.stop();
  await blockdProcess?.stop();
  cleanup();
});

/** Sets table entry `index` of bitmap `name` (a valid change when the entry was 0: that part reads as all ones). */
function setTableEntry(path: string, name: string, index: number, value: bigint): void {
  const entry = qcow2BitmapLayout(readFileSync(path)).entries.find((candidate) => candidate.name === name)!;
  writeU64(path, entry.tableOffset + 8 * index, value);
}

/** The valid images the corpus starts from, all made by QEMU's tools. */
function makeBases(): string[] {
  const base = (name: string) => join(dir, `base-${name}.qcow2`);
  // 64 KiB clusters: data before and after the bitmaps, every qemu-img bitmap verb, one bitmap without data.
  const verbs = createQcow2(base('verbs'), 64 * MiB);
  qemuIo(verbs, ['write -P 0x11 0 256k']);
  runQemuImg('bitmap', '--add', verbs, 'b0');
  runQemuImg('bitmap', '--add', '-g', '131072', verbs, 'b1');
  runQemuImg('bitmap', '--add', '--disable', verbs, 'b2');
  qemuIo(verbs, ['write -P 0x22 3M 64k', 'write 10M 128k', 'write 63M 512']);
  runQemuImg('bitmap', '--add', verbs, 'b3');
  qemuIo(verbs, ['write 50M 64k']);
  runQemuImg('bitmap', '--disable', verbs, 'b3');
  runQemuImg('bitmap', '--merge', 'b0', verbs, 'b2');
  runQemuImg('bitmap', '--add', verbs, 'empty');
  // 4 KiB clusters: a 512-byte granularity bitmap over four table entries, two clean, one of them made all ones.
  const small = createQcow2(base('small'), 64 * MiB, { clusterSize: 4 * KiB });
  runQemuImg('bitmap', '--add', '-g', '512', small, 'fine');
  runQemuImg('bitmap', '--add', '-g', '1048576', small, 'coarse');
  qemuIo(small, ['write 0 4k', 'write 40M 64k', 'write 63M 512']);
  setTableEntry(small, 'fine', 3, 1n);
  // 16 KiB clusters: names of several lengths, the largest and a small granularity.
  const names = createQcow2(base('names'), 48 * MiB, { clusterSize: 16 * KiB });
  qemuIo(names, ['write -P 0x33 1M 32k']);
  runQemuImg('bitmap', '--add', '-g', '4096', names, 'a');
  runQemuImg('bitmap', '--add', '-g', '2147483648', names, 'a-much-longer-bitmap-name-0123456789');
  runQemuImg('bitmap', '--add', '-g', '8192', '--disable', names, 'seven77');
  qemuIo(names, ['write 2M 16k', 'write 47M 4k']);
  runQemuImg('bitmap', '--merge', 'a', names, 'seven77');
  // 2 KiB clusters: two table entries per fine bitmap, the second all ones.
  const tiny = createQcow2(base('tiny'), 16 * MiB, { clusterSize: 2 * KiB });
  runQemuImg('bitmap', '--add', '-g', '512', tiny, 'x');
  runQemuImg('bitmap', '--add', '-g', '1024', tiny, 'y');
  qemuIo(tiny, ['write 1M 2k', 'write 5M 1k']);
  setTableEntry(tiny, 'x', 1, 1n);
  // 64 KiB clusters, 128 MiB: bitmaps with no data cluster at all (every table entry 0).
  const clean = createQcow2(base('clean'), 128 * MiB);
  qemuIo(clean, ['write -P 0x44 0 64k']);
  runQemuImg('bitmap', '--add', clean, 'idle');
  runQemuImg('bitmap', '--add', '-g', '65536', '--disable', clean, 'frozen');
  return [verbs, small, names, tiny, clean];
}

type Category = 'header extension' | 'autoclear' | 'directory entry' | 'bitmap table' | 'data cluster';

interface Mutation {
  category: Category;
  what: string;
  apply(path: string): void;
}

const u64 = (value: bigint) => {
  const bytes = Buffer.alloc(8);
  bytes.writeBigUInt64BE(BigInt.asUintN(64, value));
  return bytes;
};
const u32 = (value: number) => {
  const bytes = Buffer.alloc(4);
  bytes.writeUInt32BE(value >>> 0);
  return bytes;
};
const u16 = (value: number) => Buffer.from([(value >> 8) & 0xff, value & 0xff]);

function poke(category: Category, what: string, offset: number, bytes: Buffer): Mutation {
  return { category, what: `${what} @${offset} = ${bytes.toString('hex')}`, apply: (path) => writeAt(path, offset, bytes) };
}

/** Where a cluster's refcount sits (16-bit or other widths: the refcount order is read from the header). */
function refcountField(image: Buffer, clusterSize: number, offset: number): { at: number; width: number } | undefined {
  const order = image.readUInt32BE(96);
  const perBlock = (clusterSize * 8) / 2 ** order;
  const cluster = Math.floor(offset / clusterSize);
  const block = Number(image.readBigUInt64BE(Number(image.readBigUInt64BE(48)) + 8 * Math.floor(cluster / perBlock)) & ~0x1ffn);
  if (!block || order !== 4) return undefined;
  return { at: block + 2 * (cluster % perBlock), width: 2 };
}

/** Offsets a damaged pointer may name: metadata of every kind, data, unaligned, past the end. */
function pointerTarget(image: Buffer, layout: Qcow2BitmapLayout, random: SeededRandom): bigint {
  const cs = layout.clusterSize;
  const metadata = [0, Number(image.readBigUInt64BE(40)), Number(image.readBigUInt64BE(48)), layout.directoryOffset,
    ...layout.entries.flatMap((entry) => [entry.tableOffset, ...entry.dataClusters])];
  switch (random.int(5)) {
    case 0: return BigInt(random.pick(metadata));
    case 1: return BigInt(random.pick(metadata) + random.pick([512, cs / 2, 8]));
    case 2: return BigInt(image.length + random.int(4) * cs);
    case 3: return random.pick([0n, 1n << 40n, (1n << 56n) - BigInt(cs), 1n << 62n]);
    default: return BigInt(random.int(Math.ceil(image.length / cs) + 2) * cs);
  }
}

function extensionMutation(layout: Qcow2BitmapLayout, image: Buffer, random: SeededRandom): Mutation {
  const at = layout.extension;
  const n = layout.nbBitmaps;
  const size = layout.directorySize;
  switch (random.int(5)) {
    case 0: return poke('header extension', 'nb_bitmaps', at, u32(random.pick([0, n - 1, n + 1, n + 7, 65535, 65536, 0xffffffff])));
    case 1: return poke('header extension', 'reserved', at + 4, u32(random.pick([1, 0x80000000, random.int(0x100000000)])));
    case 2: {
      const value = random.pick([0, size - 8, size + 8, size - 1, size + 1, 24, 8, 65535 * 1024, 65535 * 1024 + 1, 2 ** 32 + size]);
      return poke('header extension', 'directory size', at + 8, u64(BigInt(value)));
    }
    case 3: return poke('header extension', 'directory offset', at + 16, u64(pointerTarget(image, layout, random)));
    default: return poke('header extension', 'extension length', at - 4, u32(random.pick([0, 16, 23, 25, 32])));
  }
}

function autoclearMutation(image: Buffer, random: SeededRandom): Mutation {
  const autoclear = image.readBigUInt64BE(88);
  const [what, value] = random.pick([
    ['autoclear bitmaps bit cleared', autoclear & ~1n],
    ['autoclear all cleared', 0n],
    ['autoclear blockd write-intent bit set', autoclear | (1n << 40n)],
    ['autoclear unknown bit set', autoclear | (1n << BigInt(2 + random.int(38)))],
  ] as const);
  return poke('autoclear', what, 88, u64(value));
}

function directoryMutation(layout: Qcow2BitmapLayout, image: Buffer, random: SeededRandom): Mutation {
  const entry = random.pick(layout.entries);
  const at = entry.at;
  const label = (field: string) => `entry '${entry.name}' ${field}`;
  const category = 'directory entry';
  switch (random.int(10)) {
    case 0: return poke(category, label('table offset'), at, u64(pointerTarget(image, layout, random)));
    case 1: {
      const size = entry.tableSize;
      return poke(category, label('table size'), at + 8, u32(random.pick([0, size - 1, size + 1, 0x8000000, 0x8000001, 0xffffffff])));
    }
    case 2: {
      const flags = entry.flags;
      return poke(category, label('flags'), at + 12, u32(random.pick([flags | 1, flags ^ 2, flags | 4, flags | 0x80000000, 3, random.int(0x100000000)])));
    }
    case 3: return poke(category, label('type'), at + 16, Buffer.from([random.pick([0, 2, 255])]));
    case 4: return poke(category, label('granularity bits'), at + 17, Buffer.from([random.pick([0, 8, 9, 9 + random.int(23), 31, 32, 255])]));
    case 5: {
      const size = entry.nameSize;
      return poke(category, label('name size'), at + 18, u16(random.pick([0, size - 1, size + 1, size + 8, 1023, 1024, 0xffff])));
    }
    case 6: return poke(category, label('extra data size'), at + 20, u32(random.pick([8, 1, 0xffffffff, random.int(0x10000)])));
    case 7: {
      const padding = entry.size - 24 - entry.nameSize;
      if (!padding) return poke(category, label('name byte 0'), at + 24, Buffer.from([0x5f]));
      return poke(category, label('padding'), at + 24 + entry.nameSize + random.int(padding), Buffer.from([1 + random.int(255)]));
    }
    case 8: {
      // A name the same as another's: the second one cannot be created.
      const other = layout.entries.find((candidate) => candidate !== entry && candidate.nameSize === entry.nameSize);
      if (other) return poke(category, label(`name = '${other.name}'`), at + 24, Buffer.from(other.name, 'latin1'));
      return poke(category, label('name byte 0'), at + 24, Buffer.from(entry.name.slice(0, 1) === 'b' ? 'c' : 'b'));
    }
    default:
      return poke(category, label('name byte'), at + 24 + random.int(entry.nameSize), Buffer.from([random.pick([0x00, 0xff, 0xc3, 0x80, 0x2f, 0x20, 0x7f])]));
  }
}

function tableMutation(layout: Qcow2BitmapLayout, image: Buffer, random: SeededRandom): Mutation {
  const entry = random.pick(layout.entries);
  const index = random.int(entry.tableSize);
  const at = entry.tableOffset + 8 * index;
  const raw = image.readBigUInt64BE(at);
  const cs = BigInt(layout.clusterSize);
  const reservedBit = random.pick([1n + BigInt(random.int(8)), 56n + BigInt(random.int(8))]);
  const anyData = layout.entries.flatMap((candidate) => candidate.dataClusters);
  const value = random.pick([
    raw | (1n << reservedBit),
    (raw || pointerTarget(image, layout, random)) + random.pick([512n, cs / 2n]),
    pointerTarget(image, layout, random),
    BigInt(image.length) + cs * BigInt(random.int(3)),
    (raw || BigInt(random.pick(anyData.length ? anyData : [layout.directoryOffset]))) | 1n,
    1n,
    0n,
    BigInt(anyData.length ? random.pick(anyData) : layout.directoryOffset),
  ]);
  return poke('bitmap table', `bitmap '${entry.name}' table entry ${index}`, at, u64(value));
}

function dataMutation(layout: Qcow2BitmapLayout, image: Buffer, random: SeededRandom): Mutation {
  const withData = layout.entries.filter((entry) => entry.dataClusters.length);
  const cs = layout.clusterSize;
  const entry: BitmapEntryLayout = withData.length ? random.pick(withData) : random.pick(layout.entries);
  const cluster = entry.dataClusters.length ? random.pick(entry.dataClusters) : entry.tableOffset;
  switch (random.int(4)) {
    case 0: {
      // The file ends before (or inside) a cluster of bitmap data or table, or the last cluster goes.
      const end = random.pick([cluster, cluster + cs / 2, entry.tableOffset, image.length - cs, layout.directoryOffset]);
      return { category: 'data cluster', what: `file truncated to ${end} (bitmap '${entry.name}')`, apply: (path) => truncateSync(path, end) };
    }
    case 1: {
      const field = refcountField(image, cs, random.pick([cluster, entry.tableOffset, layout.directoryOffset]));
      if (!field) return { category: 'data cluster', what: 'file truncated by one cluster', apply: (path) => truncateSync(path, image.length - cs) };
      return poke('data cluster', `refcount of a cluster of bitmap '${entry.name}'`, field.at, Buffer.alloc(field.width));
    }
    case 2: {
      const bytes = random.bytes(cs);
      return { category: 'data cluster', what: `garbage bits in ${cluster} (bitmap '${entry.name}', seed ${random.seed})`, apply: (path) => writeAt(path, cluster, bytes) };
    }
    default:
      return poke('data cluster', `all ones at ${cluster} (bitmap '${entry.name}')`, cluster, Buffer.alloc(cs, 0xff));
  }
}

function mutation(image: Buffer, random: SeededRandom): Mutation {
  const layout = qcow2BitmapLayout(image);
  switch (random.pick([0, 0, 1, 2, 2, 2, 3, 3, 3, 4, 4])) {
    case 0: return extensionMutation(layout, image, random);
    case 1: return autoclearMutation(image, random);
    case 2: return directoryMutation(layout, image, random);
    case 3: return tableMutation(layout, image, random);
    default: return dataMutation(layout, image, random);
  }
}

interface Answer {
  error?: { class: string; desc: string };
  bitmaps?: unknown[];
  sha256?: Record<string, string>;
  del?: string;
}

async function execute(client: QmpClient, command: string, args: Record<string, unknown>): Promise<{ value?: unknown; error?: { class: string; desc: string } }> {
  try {
    return { value: await client.executeRaw(command, args) };
  } catch (error) {
    if (error instanceof QmpCommandError) return { error: { class: error.errorClass, desc: error.desc } };
    throw error;
  }
}

/** blockdev-add of `path`, then what the node holds (dirty bitmaps, sha256 of each consistent one), then blockdev-del. */
async function openAndQuery(client: QmpClient, path: string, node: string, readOnly: boolean): Promise<Answer> {
  const added = await execute(client, 'blockdev-add', { driver: 'qcow2', 'node-name': node, 'read-only': readOnly, file: { driver: 'file', filename: path } });
  if (added.error) return { error: added.error };
  const nodes = (await client.executeRaw('query-named-block-nodes', { flat: true })) as { 'node-name': string; 'dirty-bitmaps'?: { name: string; inconsistent?: boolean }[] }[];
  const bitmaps = nodes.find((candidate) => candidate['node-name'] === node)?.['dirty-bitmaps'] ?? [];
  const sha256: Record<string, string> = {};
  for (const bitmap of bitmaps) {
    if (bitmap.inconsistent) continue;
    const hash = await execute(client, 'x-debug-block-dirty-bitmap-sha256', { node, name: bitmap.name });
    sha256[bitmap.name] = hash.error ? `error: ${hash.error.desc}` : (hash.value as { sha256: string }).sha256;
  }
  const deleted = await execute(client, 'blockdev-del', { 'node-name': node });
  return { bitmaps, sha256, del: deleted.error ? `${deleted.error.class}: ${deleted.error.desc}` : 'ok' };
}

/**
 * The two ways blockd knowingly differs from QEMU 7.2 on damaged bitmaps, both confined to
 * x-debug-block-dirty-bitmap-sha256 (everything else must be equal):
 * - a name that is not UTF-8 (a damaged byte): QEMU lists it with U+FFFD in place of the byte
 *   and then cannot find it by that name; blockd finds it.
 * - bits set past the end of the disk in the last 64-bit word of the bitmap data (garbage, or
 *   a granularity made larger): QEMU keeps them unseen by every count and query but hashes
 *   them; blockd drops them, so its hash is that of the bits that cover the disk.
 */
function knownDifference(blockd: Answer, qsd: Answer, diskSize: number): string | undefined {
  if (!isDeepStrictEqual({ ...blockd, sha256: undefined }, { ...qsd, sha256: undefined })) return undefined;
  const reasons = new Set<string>();
  for (const bitmap of (qsd.bitmaps ?? []) as { name: string; granularity: number }[]) {
    const [ours, theirs] = [blockd.sha256?.[bitmap.name], qsd.sha256?.[bitmap.name]];
    if (ours === theirs) continue;
    if (bitmap.name.includes('\ufffd') && theirs === `error: Dirty bitmap '${bitmap.name}' not found`) reasons.add('name not UTF-8');
    else if (Math.ceil(diskSize / bitmap.granularity) % 64 !== 0 && !theirs!.startsWith('error')) reasons.add('bits past the end of the disk');
    else return undefined;
  }
  return [...reasons].join(' + ') || undefined;
}

/** The virtual size field of a qcow2 image's header. */
function virtualSize(path: string): bigint {
  return readFileSync(path).readBigUInt64BE(24);
}

/** qemu-img check's verdict: 0 clean, 2 corruptions, 3 leaks only, 1 the check could not run. */
function checkVerdict(path: string): string {
  const report = qemuImgCheck(path);
  return ({ 0: 'clean', 1: 'check failed', 2: 'corrupt', 3: 'leaks' } as Record<number, string>)[report.status ?? -1] ?? `status ${report.status}`;
}

test(`${IMAGES} images with damaged bitmap metadata: blockd accepts, refuses and loads as qemu-storage-daemon does`, async (t) => {
  const bases = makeBases();
  const sizes = new Map(bases.map((base) => [base, Number(virtualSize(base))]));
  const only = process.env.BLOCKD_BITMAP_CORPUS_SEED;
  const seeds = only ? [Number(only)] : Array.from({ length: IMAGES }, (_, i) => i + 1);
  const counts: Record<string, { images: number; refused: number; accepted: number; readWrite: number; readWriteRefused: number }> = {};
  const refusals = new Map<string, number>();
  // Every difference is collected, so that one run shows them all.
  const differences: string[] = [];
  const known: Record<string, number> = {};
  const compare = (label: string, blockd: unknown, qsd: unknown, diskSize = 0) => {
    if (isDeepStrictEqual(blockd, qsd)) return;
    const why = knownDifference(blockd as Answer, qsd as Answer, diskSize);
    if (why) known[why] = (known[why] ?? 0) + 1;
    else differences.push(`${label}\n  blockd: ${inspect(blockd, { depth: 5, breakLength: Infinity })}\n  qsd:    ${inspect(qsd, { depth: 5, breakLength: Infinity })}`);
  };
  for (const seed of seeds) {
    const random = new SeededRandom(seed);
    const base = bases[seed % bases.length]!;
    const path = join(dir, `corpus-${seed}.qcow2`);
    copyFileSync(base, path);
    const image = readFileSync(path);
    const mutations = Array.from({ length: random.chance(0.3) ? 2 : 1 }, () => mutation(image, random));
    for (const change of mutations) change.apply(path);
    const context = `seed ${seed} (${base}): ${mutations.map((change) => change.what).join(', ')}`;
    const tally = (counts[mutations[0]!.category] ??= { images: 0, refused: 0, accepted: 0, readWrite: 0, readWriteRefused: 0 });
    tally.images++;

    const before = sha256File(path);
    const [qsd, blockd] = await Promise.all([openAndQuery(peers.qsd!, path, `ro${seed}`, true), openAndQuery(peers.blockd!, path, `ro${seed}`, true)]);
    compare(`read-only: ${context}`, blockd, qsd, sizes.get(base));
    compare(`the file after read-only opens: ${context}`, sha256File(path), before);
    if (qsd.error) {
      tally.refused++;
      const text = qsd.error.desc.replace(/'[^']*'/g, "'…'").replace(/\d+/g, 'N');
      refusals.set(text, (refusals.get(text) ?? 0) + 1);
    } else {
      tally.accepted++;
    }

    if (seed % READ_WRITE_EVERY === 0 || only) {
      // Each daemon writes its own copy, at the same path (texts may name it), one after the other.
      const writable = join(dir, `rw-${seed}.qcow2`);
      const answers: Record<string, Answer & { check: string }> = {};
      for (const peer of ['qsd', 'blockd'] as const) {
        copyFileSync(path, writable);
        const answer = await openAndQuery(peers[peer]!, writable, `rw${seed}`, false);
        answers[peer] = { ...answer, check: checkVerdict(writable) };
        renameSync(writable, `${writable}.${peer}`);
      }
      compare(`read-write: ${context}`, answers.blockd, answers.qsd, sizes.get(base));
      tally.readWrite++;
      if (answers.qsd!.error) tally.readWriteRefused++;
      rmSync(`${writable}.qsd`);
      rmSync(`${writable}.blockd`);
    }
    rmSync(path);
  }
  assert.ok((await peers.blockd!.executeRaw('query-version', {})) !== undefined, 'blockd still answers');
  const total = Object.values(counts).reduce((sum, tally) => sum + tally.images, 0);
  t.diagnostic(`${total} images; per category of the first mutation: ${JSON.stringify(counts)}`);
  t.diagnostic(`known differences (see knownDifference): ${JSON.stringify(known)}`);
  t.diagnostic(`refusals (texts with names and numbers elided): ${JSON.stringify(Object.fromEntries([...refusals].sort((a, b) => b[1] - a[1])))}`);
  assert.equal(differences.length, 0, `${differences.length} differences from qemu-storage-daemon:\n${differences.join('\n')}`);
  if (!only) {
    // The corpus must both refuse and accept in every category, or it proves little.
    for (const [category, tally] of Object.entries(counts)) {
      assert.ok(category === 'autoclear' || (tally.refused > 0 && tally.accepted > 0), `${category}: ${JSON.stringify(tally)}`);
    }
    assert.equal(Object.keys(counts).length, 5, JSON.stringify(counts));
  }
});
