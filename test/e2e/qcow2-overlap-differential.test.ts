/*
 * Differential test of QEMU's overlap check: hand-corrupted qcow2 images whose L1 or L2
 * entries (or refcounts) send a write onto metadata, written through an NBD export of
 * qemu-storage-daemon and of blockd. The replies, events (BLOCK_IMAGE_CORRUPTED with its
 * text, offset and size) and what the node answers afterwards (ENOMEDIUM, which NBD shows
 * as EINVAL) must be the same; the metadata cluster aimed at keeps its bytes; the export
 * and the node can be removed.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { test } from 'node:test';
import { decodeErrorPayload } from '../../src/nbd/messages.js';
import { Command } from '../../src/nbd/protocol.js';
import { differentialPeers } from '../helpers/differential-peers.js';
import { NbdRawClient } from '../helpers/nbd-raw-client.js';
import { KiB, readAt, writeAt, writeU64 } from '../helpers/qemu-tools.js';
import { OFLAG_COPIED, qcow2Layout, type Qcow2Layout } from '../helpers/qcow2-layout.js';
import { describeDifferences, runTranscript, type TranscriptStep } from '../helpers/qmp-transcript.js';

const CS = 64 * KiB;
interface Scenario {
  name: string;
  snapshot?: boolean;
  /** Corrupts the image; returns the metadata range aimed at, whose bytes must not change. */
  corrupt(path: string, layout: Qcow2Layout): [number, number];
  /** Where the first write goes: a guest offset whose cluster the corruption sends onto metadata. */
  writeAt: number;
}

const SCENARIOS: Scenario[] = [
  // The "L2 table" is the refcount table: the write allocates, the table write-back (at flush) is refused.
  { name: 'l1-to-reftable', writeAt: CS + 100, corrupt: (path, { l1, refcountTable }) => (writeU64(path, l1, BigInt(refcountTable) | OFLAG_COPIED), [refcountTable, CS]) },
  // Guest cluster 0 maps onto the L1 table itself.
  { name: 'l1-to-itself', writeAt: 100, corrupt: (path, { l1 }) => (writeU64(path, l1, BigInt(l1) | OFLAG_COPIED), [l1, CS]) },
  { name: 'l1-to-snapshot-l1', snapshot: true, writeAt: 100, corrupt: (path, { l1, snapshotL1 }) => (writeU64(path, l1, BigInt(snapshotL1) | OFLAG_COPIED), [snapshotL1, CS]) },
  { name: 'l2-to-snapshot-l1', snapshot: true, writeAt: CS + 100, corrupt: (path, { l2, snapshotL1 }) => (writeU64(path, l2 + 8, BigInt(snapshotL1) | OFLAG_COPIED), [snapshotL1, CS]) },
  { name: 'l2-to-l2', writeAt: CS + 100, corrupt: (path, { l2 }) => (writeU64(path, l2 + 8, BigInt(l2) | OFLAG_COPIED), [l2, CS]) },
  { name: 'l2-to-refblock', writeAt: CS + 100, corrupt: (path, { l2, refcountBlock }) => (writeU64(path, l2 + 8, BigInt(refcountBlock) | OFLAG_COPIED), [refcountBlock, CS]) },
  // An L2 entry cannot name cluster 0 (that means unallocated): a refcount of 0 for the header makes the allocator hand it out.
  { name: 'header-refcount-zero', writeAt: 8 * CS + 100, corrupt: (path, { refcountBlock }) => (writeAt(path, refcountBlock, Buffer.alloc(2)), [0, 72]) },
];

const imageOf = (dir: string, scenario: Scenario) => join(dir, `${scenario.name}.qcow2`);

const peers = differentialPeers((dir) => {
  for (const scenario of SCENARIOS) {
    const path = imageOf(dir, scenario);
    spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', path, '4M']);
    spawnSync('qemu-io', ['-c', `write -P 0x5a 0 ${4 * CS}`, path]);
    if (scenario.snapshot) {
      spawnSync('qemu-img', ['snapshot', '-c', 'first', path]);
      spawnSync('qemu-io', ['-c', `write -P 0x6b 0 ${CS}`, path]);
    }
  }
});

/** What an NBD reply says: its error and message, or a digest of the data read. */
function describeChunks(chunks: { type: number; payload: Buffer }[]): string {
  return chunks.map(({ type, payload }) => {
    if (type & 0x8000) {
      const { error, message } = decodeErrorPayload(payload, type);
      return `error ${error} "${message}"`;
    }
    return `chunk ${type} ${createHash('sha256').update(payload).digest('hex').slice(0, 16)}`;
  }).join(', ');
}

function stepsFor(scenario: Scenario, index: number): TranscriptStep[] {
  let client: NbdRawClient | undefined;
  const request = (what: string, send: (nbd: NbdRawClient) => void): TranscriptStep => ({
    action: async () => {
      send(client!);
      return `${what}: ${describeChunks(await client!.readChunks().catch(async () => []))}`;
    },
  });
  return [
    { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': `n${index}`, file: { driver: 'file', filename: `$DIR/${scenario.name}.qcow2` } } },
    { execute: 'block-export-add', arguments: { type: 'nbd', id: `e${index}`, 'node-name': `n${index}`, name: scenario.name, writable: true } },
    {
      action: async (dir) => {
        client = await NbdRawClient.open(join(dir, 'nbd.sock'), scenario.name);
        return 'client connected';
      },
    },
    request('write', (nbd) => nbd.request(Command.WRITE, scenario.writeAt, 100, 0, Buffer.alloc(100, 0xee))),
    request('flush', (nbd) => nbd.request(Command.FLUSH, 0, 0)),
    request('second write', (nbd) => nbd.request(Command.WRITE, 2 * CS, CS, 0, Buffer.alloc(CS, 0xdd))),
    request('read', (nbd) => nbd.request(Command.READ, 0, 4096)),
    request('block status', (nbd) => nbd.request(Command.BLOCK_STATUS, 0, CS)),
    request('flush', (nbd) => nbd.request(Command.FLUSH, 0, 0)),
    {
      action: async () => {
        await client!.disconnect();
        return 'client left';
      },
    },
    { execute: 'block-export-del', arguments: { id: `e${index}` } },
    { awaitEvent: { event: 'BLOCK_EXPORT_DELETED', data: { id: `e${index}` } } },
    { execute: 'blockdev-del', arguments: { 'node-name': `n${index}` } },
  ];
}

const STEPS: TranscriptStep[] = [
  { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$DIR/nbd.sock' } } } },
];

test('writes onto metadata are refused as qemu-storage-daemon refuses them', async () => {
  const aimedAt: { path: string; offset: number; bytes: Buffer }[] = [];
  SCENARIOS.forEach((scenario, index) => {
    for (const peer of [peers.qsd, peers.blockd]) {
      const path = imageOf(peer.dir, scenario);
      const [offset, length] = scenario.corrupt(path, qcow2Layout(path));
      aimedAt.push({ path, offset, bytes: readAt(path, offset, length) });
    }
    STEPS.push(...stepsFor(scenario, index));
  });
  STEPS.push({ execute: 'nbd-server-stop' });
  const expected = await runTranscript(peers.qsd.socket, peers.qsd.dir, STEPS);
  const actual = await runTranscript(peers.blockd.socket, peers.blockd.dir, STEPS);
  assert.deepEqual(actual, expected, describeDifferences(actual, expected));
  // Each scenario met the overlap check.
  assert.equal(expected.filter((line) => line.includes('Preventing invalid write on metadata')).length, SCENARIOS.length, expected.join('\n'));
  await peers.stopBlockd();
  await peers.stopQsd();
  for (const { path, offset, bytes } of aimedAt) {
    assert.ok(readAt(path, offset, bytes.length).equals(bytes), `${path}: the metadata at ${offset} kept its bytes`);
  }
});
