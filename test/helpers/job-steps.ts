/*
 * The pieces the job tests' QMP scripts are made of: nodes over the images of a test's
 * directory ($DIR), pattern chains with every node named, raw nodes that fail through
 * blkdebug, an NBD server with writable exports, and actions that run QEMU's tools against
 * an export and record what they say (timings masked).
 */
import { spawnSync } from 'node:child_process';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { MiB, runQemuImg } from './qemu-tools.js';
import type { TranscriptStep } from './qmp-transcript.js';

/** A qcow2 image's file node, named <name>-file. */
export const file = (name: string) => ({ driver: 'file', filename: `$DIR/${name}.qcow2`, 'node-name': `${name}-file` });

/** A pattern chain (pattern-chains.ts) with every node named: <chain>-base <- <chain>-mid <- <chain>-top. */
export const addChain = (chain: string): TranscriptStep[] => [
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': `${chain}-base`, file: file(`${chain}-base`), backing: null } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': `${chain}-mid`, file: file(`${chain}-mid`), backing: `${chain}-base` } },
  { execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': `${chain}-top`, file: file(`${chain}-top`), backing: `${chain}-mid` } },
];

export const addImage = (name: string, extra: object = {}): TranscriptStep => ({ execute: 'blockdev-add', arguments: { driver: 'qcow2', 'node-name': name, file: file(name), ...extra } });

/** A raw node over $DIR/<name>.raw; `fileExtra` goes to its file node (e.g. a node-name). */
export const addRaw = (name: string, fileExtra: object = {}): TranscriptStep => ({
  execute: 'blockdev-add',
  arguments: { driver: 'raw', 'node-name': name, file: { driver: 'file', filename: `$DIR/${name}.raw`, ...fileExtra } },
});

/** A raw node whose file passes through blkdebug: the first `event` in the disk's last sector (a copy's last) fails with `errno`. */
export const addFailing = (name: string, event: 'read_aio' | 'write_aio', errno: number): TranscriptStep => ({
  execute: 'blockdev-add',
  arguments: {
    driver: 'raw', 'node-name': name,
    file: { driver: 'blkdebug', 'inject-error': [{ event, errno, sector: 64 * 2048 - 1, once: true }], image: { driver: 'file', filename: `$DIR/${name}.raw` } },
  },
});

/** For I/O error cases: <id>-src.raw a copy of chain a's contents, <id>-tgt.raw blank, for each id. */
export function prepareErrorCopies(dir: string, ids: readonly string[]): void {
  for (const id of ids) {
    copyFileSync(join(dir, 'a-expected.raw'), join(dir, `${id}-src.raw`));
    runQemuImg('create', '-q', '-f', 'raw', join(dir, `${id}-tgt.raw`), String(64 * MiB));
  }
}

export const nbdServer: TranscriptStep = { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$DIR/nbd.sock' } } } };

/** A writable export named as its id. */
export const exportNode = (id: string, node: string): TranscriptStep => ({ execute: 'block-export-add', arguments: { type: 'nbd', id, name: id, 'node-name': node, writable: true } });

function tool(command: string, args: string[]): string {
  const result = spawnSync(command, args, { encoding: 'utf8' });
  return `$ ${command} ${args.join(' ')}\n${result.stdout}${result.stderr}exit ${result.status}`;
}

const exportUri = (dir: string, name: string) => `nbd+unix:///${name}?socket=${dir}/nbd.sock`;

/** What an export serves, next to a raw image of the expected contents: the transcript records "Images are identical." or where they differ. */
export const compareExport = (name: string, expected: string): TranscriptStep => ({
  action: async (dir) => tool('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', exportUri(dir, name), join(dir, expected)]).replaceAll(dir, '$DIR'),
});

/** qemu-io through an export (writes, or reads with -P that fail on a mismatch); `readOnly` for a read-only export. */
export const qemuIoExport = (name: string, commands: string[], { readOnly = false } = {}): TranscriptStep => ({
  action: async (dir) => tool('qemu-io', ['-f', 'raw', ...(readOnly ? ['-r'] : []), ...commands.flatMap((command) => ['-c', command]), exportUri(dir, name)])
    // Timings masked, the slow ones too (qemu-io prints those as 0:00:01.00).
    .replaceAll(dir, '$DIR').replace(/ops; .*$/gm, 'ops; (timing)'),
});

/** nbdinfo --map of an export's meta context (base:allocation, qemu:dirty-bitmap:NAME): the extents, or the error. */
export const nbdinfoMap = (name: string, context = 'base:allocation'): TranscriptStep => ({
  action: async (dir) => tool('nbdinfo', [`--map=${context}`, exportUri(dir, name)]).replaceAll(dir, '$DIR'),
});
