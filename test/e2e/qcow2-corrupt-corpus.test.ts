/*
 * A corpus of corrupted qcow2 images, made here from valid ones (with data, with an internal
 * snapshot, over a backing file, with compressed clusters) by seeded random changes to header
 * fields, L1, L2, refcount table and refcount block entries. Each goes through one blockd:
 * blockdev-add, an NBD export, writes of a recognisable pattern, reads; then the export and the
 * node are removed. Whatever happens (refused at open, flagged corrupt, or served), the guest
 * pattern never lands in a cluster that holds metadata before or after, the clusters of a
 * snapshot's tables keep their bytes, removal finishes within a bound,
 * and the daemon still answers. A failure names the seed and the mutations, to replay it
 * (BLOCKD_CORPUS_SEED=n runs that one image).
 */
import assert from 'node:assert/strict';
import { copyFileSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { Command } from '../../src/nbd/protocol.js';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { NbdRawClient } from '../helpers/nbd-raw-client.js';
import { makeTempDir } from '../helpers/paths.js';
import { OFLAG_COPIED } from '../helpers/qcow2-layout.js';
import { KiB, MiB, SeededRandom, createQcow2, qemuIo, readAt, runQemuImg, writeAt } from '../helpers/qemu-tools.js';
import { RawConnection } from '../helpers/raw-connection.js';

const CS = 64 * KiB;
const IMAGES = 200;
const REMOVAL_BOUND_MS = 10_000;
const L1E_OFFSET_MASK = 0x00fffffffffffe00n;
const REFT_OFFSET_MASK = 0xfffffffffffffe00n;
/** The guest data: a signature no metadata structure contains. */
const SIGNATURE = Buffer.from('corpus-guest-data-signature-0123');

const { dir, cleanup } = makeTempDir('blockd-qcow2-corpus-');
let daemon: BlockdProcess;
let qmp: RawConnection;
const events: { event: string; data: Record<string, unknown> }[] = [];

before(async () => {
  daemon = await runBlockd(['--qmp', `unix:${join(dir, 'qmp.sock')}`]);
  qmp = await RawConnection.negotiated(join(dir, 'qmp.sock'));
  await command('nbd-server-start', { addr: { type: 'unix', data: { path: join(dir, 'nbd.sock') } } });
});
after(async () => {
  qmp?.end();
  await daemon?.stop();
  cleanup();
});

/** Sends a command; the reply (events meanwhile are collected). */
async function command(execute: string, args?: object, timeoutMs = REMOVAL_BOUND_MS): Promise<{ return?: unknown; error?: { desc: string } }> {
  qmp.send(JSON.stringify({ execute, ...(args ? { arguments: args } : {}) }));
  for (;;) {
    const message = JSON.parse(await qmp.readLine(timeoutMs)) as { event?: string; data?: Record<string, unknown>; return?: unknown; error?: { desc: string } };
    if (!message.event) return message;
    events.push({ event: message.event, data: message.data ?? {} });
  }
}

async function untilEvent(event: string, id: string): Promise<void> {
  const deadline = Date.now() + REMOVAL_BOUND_MS;
  while (!events.some((e) => e.event === event && e.data.id === id)) {
    const message = JSON.parse(await qmp.readLine(Math.max(1, deadline - Date.now()))) as { event?: string; data?: Record<string, unknown> };
    if (message.event) events.push({ event: message.event, data: message.data ?? {} });
  }
}

/** The valid images the corpus starts from. */
function makeBases(): string[] {
  const data = createQcow2(join(dir, 'base-data.qcow2'), MiB);
  qemuIo(data, ['write -P 0x11 0 128k', 'write -P 0x22 256k 64k', 'write -P 0x33 640k 64k']);
  const snapshot = join(dir, 'base-snapshot.qcow2');
  copyFileSync(data, snapshot);
  runQemuImg('snapshot', '-c', 'first', snapshot);
  qemuIo(snapshot, ['write -P 0x44 0 64k', 'write -P 0x55 384k 64k']);
  const backing = createQcow2(join(dir, 'base-backing.qcow2'), MiB, { backing: { path: data, format: 'qcow2' } });
  qemuIo(backing, ['write -P 0x66 64k 128k']);
  const compressed = join(dir, 'base-compressed.qcow2');
  runQemuImg('convert', '-c', '-O', 'qcow2', data, compressed);
  return [data, snapshot, backing, compressed];
}

interface Mutation {
  what: string;
  offset: number;
  bytes: Buffer;
}

const u64 = (value: bigint) => {
  const bytes = Buffer.alloc(8);
  bytes.writeBigUInt64BE(value & 0xffffffffffffffffn);
  return bytes;
};
const u32 = (value: number) => {
  const bytes = Buffer.alloc(4);
  bytes.writeUInt32BE(value >>> 0);
  return bytes;
};

/** One random change, aimed mostly at metadata so that entries point where they must not. */
function mutation(image: Buffer, random: SeededRandom): Mutation {
  const u64At = (offset: number) => image.readBigUInt64BE(offset);
  const l1 = Number(u64At(40));
  const reftable = Number(u64At(48));
  const l2 = Number(u64At(l1) & L1E_OFFSET_MASK);
  const refblock = Number(u64At(reftable) & REFT_OFFSET_MASK);
  const snapshots = Number(u64At(64));
  const snapshotL1 = snapshots ? Number(u64At(snapshots)) : 0;
  const clusters = image.length / CS;
  const targets = [0, l1, reftable, refblock, l2, snapshots, snapshotL1].filter((offset, i) => offset || i === 0);
  const target = () => BigInt(random.int(4) ? random.pick(targets) : random.int(clusters + 2) * CS);
  const flags = () => (random.int(4) ? OFLAG_COPIED : 0n) | (random.int(8) ? 0n : 1n) | (random.int(10) ? 0n : 1n << 62n);
  switch (random.int(snapshotL1 ? 7 : 6)) {
    case 0: {
      const [what, at] = random.pick([['l1_table_offset', 40], ['refcount_table_offset', 48], ['snapshots_offset', 64]] as const);
      return { what, offset: at, bytes: u64(target()) };
    }
    case 1: {
      const [what, at] = random.pick([['l1_size', 36], ['refcount_table_clusters', 56], ['nb_snapshots', 60]] as const);
      return { what, offset: at, bytes: u32(random.pick([0, 1, 2, 3, 17, 0x7fffffff])) };
    }
    case 2:
      return { what: 'L1 entry 0', offset: l1, bytes: u64(target() | (random.int(4) ? OFLAG_COPIED : 0n)) };
    case 3: {
      if (!l2) return { what: 'L1 entry 0', offset: l1, bytes: u64(target() | OFLAG_COPIED) };
      const index = random.int(16);
      return { what: `L2 entry ${index}`, offset: l2 + 8 * index, bytes: u64(target() | flags()) };
    }
    case 4: {
      const index = random.int(2);
      return { what: `refcount table entry ${index}`, offset: reftable + 8 * index, bytes: u64(random.int(3) ? target() : 0n) };
    }
    case 5: {
      const index = random.int(Math.min(clusters + 2, 32));
      return { what: `refcount of cluster ${index}`, offset: refblock + 2 * index, bytes: Buffer.from([0, random.pick([0, 0, 1, 2])]) };
    }
    default: {
      const index = random.int(2);
      return { what: `snapshot L1 entry ${index}`, offset: snapshotL1 + 8 * index, bytes: u64(target() | OFLAG_COPIED) };
    }
  }
}

/** The clusters an image's own header and tables name as metadata, with how many structures each holds. */
function metadataClusters(path: string): Map<number, string[]> {
  const length = statSync(path).size;
  const clusters = new Map<number, string[]>();
  const inFile = (offset: number) => offset >= 0 && offset < length;
  const mark = (what: string, offset: number, length: number) => {
    for (let c = Math.floor(offset / CS); c < Math.ceil((offset + length) / CS) && inFile(c * CS); c++) clusters.set(c, [...(clusters.get(c) ?? []), what]);
  };
  const u64At = (offset: number) => (inFile(offset + 7) ? readAt(path, offset, 8).readBigUInt64BE() : 0n);
  const u32At = (offset: number) => (inFile(offset + 3) ? readAt(path, offset, 4).readUInt32BE() : 0);
  const u16At = (offset: number) => (inFile(offset + 1) ? readAt(path, offset, 2).readUInt16BE() : 0);
  mark('header', 0, CS);
  const l1 = Number(u64At(40));
  const l1Size = Math.min(u32At(36), 1024);
  mark('L1', l1, l1Size * 8);
  for (let i = 0; i < l1Size; i++) {
    const l2 = Number(u64At(l1 + 8 * i) & L1E_OFFSET_MASK);
    if (l2) mark('L2', l2, CS);
  }
  const reftable = Number(u64At(48));
  const reftableClusters = Math.min(u32At(56), 16);
  mark('refcount table', reftable, reftableClusters * CS);
  for (let i = 0; i < (reftableClusters * CS) / 8; i++) {
    const block = Number(u64At(reftable + 8 * i) & REFT_OFFSET_MASK);
    if (block) mark('refcount block', block, CS);
  }
  // Snapshot entries: 40 bytes, extra data, id and name, each 8-aligned.
  let at = Number(u64At(64));
  for (let i = 0; i < Math.min(u32At(60), 64) && inFile(at + 40); i++) {
    const start = at;
    const snapshotL1 = Number(u64At(at));
    mark('snapshot L1', snapshotL1, Math.min(u32At(at + 8), 1024) * 8);
    at += 40 + u32At(at + 36) + u16At(at + 12) + u16At(at + 14);
    mark('snapshot table', start, at - start);
    at = Math.ceil(at / 8) * 8;
  }
  return clusters;
}

/** Whether a cluster of the file contains the guest signature. */
function hasSignature(path: string, cluster: number): boolean {
  return readAt(path, cluster * CS, CS).includes(SIGNATURE);
}

async function exercise(name: string, random: SeededRandom): Promise<string> {
  let client: NbdRawClient;
  try {
    client = await NbdRawClient.open(join(dir, 'nbd.sock'), name);
  } catch (error) {
    return `no NBD session: ${(error as Error).message}`;
  }
  const replies: string[] = [];
  try {
    for (let i = 0; i < 5; i++) {
      const offset = random.int(16) * CS + random.pick([0, 100, 4096]);
      const length = Math.min(random.pick([512, 4096, CS, 2 * CS]), MiB - offset);
      const payload = Buffer.alloc(length);
      for (let at = 0; at < length; at += SIGNATURE.length) SIGNATURE.copy(payload, at);
      client.request(random.int(5) ? Command.WRITE : Command.WRITE_ZEROES, offset, length, 0, payload);
      replies.push(`write ${offset}+${length}: ${describe(await client.readReply())}`);
      client.request(Command.READ, random.int(16) * CS, 4096);
      replies.push(`read: ${(await client.readChunks()).map((chunk) => chunk.type).join(',')}`);
    }
    client.request(Command.FLUSH, 0, 0);
    replies.push(`flush: ${describe(await client.readReply())}`);
    await client.disconnect();
  } catch (error) {
    replies.push(`session ended: ${(error as Error).message}`);
    client.close();
  }
  return replies.join('; ');
}

function describe(reply: { kind: string; error?: number; type?: number }): string {
  return reply.kind === 'simple' ? `error ${reply.error}` : `chunk ${reply.type}`;
}

test(`${IMAGES} corrupted images: refused, flagged corrupt, or served without writing over metadata; always removable`, async () => {
  const bases = makeBases();
  const only = process.env.BLOCKD_CORPUS_SEED;
  const seeds = only ? [Number(only)] : Array.from({ length: IMAGES }, (_, i) => i + 1);
  const outcomes = { refused: 0, corrupt: 0, served: 0 };
  for (const seed of seeds) {
    const random = new SeededRandom(seed);
    const base = bases[seed % bases.length]!;
    const path = join(dir, `corpus-${seed}.qcow2`);
    copyFileSync(base, path);
    const image = readFileSync(path);
    const mutations = Array.from({ length: 1 + random.int(2) }, () => mutation(image, random));
    for (const { offset, bytes } of mutations) writeAt(path, offset, bytes);
    const context = `seed ${seed} (${base}): ${mutations.map((m) => `${m.what} @${m.offset} = ${m.bytes.toString('hex')}`).join(', ')}`;
    const before = metadataClusters(path);
    // blockd writes no snapshot structure: even when a corrupt entry also makes one an active table, its writes are refused.
    const protectedClusters = [...before].filter(([, what]) => what.some((w) => w.startsWith('snapshot')));
    const original = new Map(protectedClusters.map(([c]) => [c, readAt(path, c * CS, CS)]));
    events.length = 0;

    const added = await command('blockdev-add', { driver: 'qcow2', 'node-name': `n${seed}`, file: { driver: 'file', filename: path } });
    let log = '';
    if (added.error) {
      outcomes.refused++;
      log = `refused: ${added.error.desc}`;
    } else {
      const exported = await command('block-export-add', { type: 'nbd', id: `e${seed}`, 'node-name': `n${seed}`, name: `x${seed}`, writable: true });
      assert.equal(exported.error, undefined, `${context}: export ${JSON.stringify(exported)}`);
      log = await exercise(`x${seed}`, random);
      const removed = await command('block-export-del', { id: `e${seed}` }).catch((error: Error) => assert.fail(`${context}: block-export-del did not answer: ${error.message}; ${log}`));
      assert.equal(removed.error, undefined, `${context}: ${JSON.stringify(removed)}`);
      await untilEvent('BLOCK_EXPORT_DELETED', `e${seed}`).catch((error: Error) => assert.fail(`${context}: the export never went: ${error.message}; ${log}`));
      const deleted = await command('blockdev-del', { 'node-name': `n${seed}` }).catch((error: Error) => assert.fail(`${context}: blockdev-del did not answer: ${error.message}; ${log}`));
      assert.equal(deleted.error, undefined, `${context}: ${JSON.stringify(deleted)}; ${log}`);
      if (events.some((e) => e.event === 'BLOCK_IMAGE_CORRUPTED')) outcomes.corrupt++;
      else outcomes.served++;
    }
    const details = `${context}\n  ${log}\n  events: ${JSON.stringify(events)}`;
    const after = metadataClusters(path);
    for (const [cluster, what] of [...before, ...after]) {
      assert.ok(!hasSignature(path, cluster), `guest data in cluster ${cluster}, metadata (${what}) before or after: ${details}`);
    }
    for (const [cluster, bytes] of original) {
      assert.ok(readAt(path, cluster * CS, CS).equals(bytes), `cluster ${cluster} (${before.get(cluster)}) changed: ${details}`);
    }
    rmSync(path); // a failing image stays for a look
  }
  assert.ok((await command('query-version')).return, 'the daemon still answers');
  // The corpus must exercise every outcome, or it proves little.
  if (!only) for (const [outcome, count] of Object.entries(outcomes)) assert.ok(count > 0, `no image was ${outcome}: ${JSON.stringify(outcomes)}`);
  process.stderr.write(`corpus outcomes: ${JSON.stringify(outcomes)}\n`);
});
