/*
 * The images the mirror data and crash tests work on: the source is the top of the pattern
 * chain `m-base <- m-mid <- m-top` (pattern-chains.ts), made once and copied for each run;
 * the target is empty for sync=full and backed by the source's backing (m-mid) for sync=top
 * and none. The guest writes only where the top has no data, so that sync=none, which never
 * copies the top, still leaves the target reading what the source reads where it was written.
 */
import { copyFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { MirrorSyncMode } from '../../src/generated/qapi-types.js';
import { makePatternChain } from './pattern-chains.js';
import { createQcow2, MiB, qemuIo, runQemuImg } from './qemu-tools.js';

export type MirrorSync = Extract<MirrorSyncMode, 'full' | 'top' | 'none'>;

/** Clear of the top layer's data (6M+1M, 60M+64k), over data, zeroes and holes of the layers below. */
export const WRITE_REGIONS = [
  { offset: 1 * MiB, length: 4 * MiB },
  { offset: 30 * MiB, length: 4 * MiB },
  { offset: 44 * MiB, length: 6 * MiB },
];

const CHAIN_FILES = ['m-base.qcow2', 'm-mid.qcow2', 'm-top.qcow2', 'm-expected.raw'];

/** The layer images of a run, outermost first; node names are `<prefix>-<layer>`. */
export const LAYERS = [
  { layer: 'src', file: 'm-top.qcow2', backing: 'mid' },
  { layer: 'mid', file: 'm-mid.qcow2', backing: 'base' },
  { layer: 'base', file: 'm-base.qcow2', backing: undefined },
] as const;

/** Makes the source chain once in `dir`; returns what copies it into another folder. */
export function mirrorChainTemplate(dir: string): (into: string) => void {
  mkdirSync(dir, { recursive: true });
  makePatternChain(dir, 'm');
  return (into) => {
    mkdirSync(into, { recursive: true });
    for (const file of CHAIN_FILES) copyFileSync(join(dir, file), join(into, file));
  };
}

/**
 * The target image for `sync`, in `dir` next to the source chain. For sync=full it holds old
 * data where the source reads data, zeroes and holes: the mirror must overwrite all of it.
 */
export function createMirrorTarget(dir: string, sync: MirrorSync): string {
  const target = join(dir, 'm-target.qcow2');
  if (sync === 'full') {
    createQcow2(target, 64 * MiB);
    qemuIo(target, ['write -P 0x5a 10M 10M', 'write -P 0x5b 36M 4M', 'write -P 0x5c 59M 5M'], ['-f', 'qcow2']);
  } else {
    createQcow2(target, undefined, { backing: { path: 'm-mid.qcow2', format: 'qcow2' } });
  }
  return target;
}

/** blockdev-add options for a layer or the target, its backing the named node (or the header's, without one). */
export function qcow2Node(name: string, file: string, backing?: string): Record<string, unknown> {
  return { driver: 'qcow2', 'node-name': name, file: { driver: 'file', filename: file }, ...(backing ? { backing } : {}) };
}

/**
 * The nodes of a run in `dir`, innermost first, for blockdev-add (or --blockdev as JSON): the
 * layers as `<prefix>base`, `<prefix>mid`, `<prefix>src`, and the target as `<prefix>tgt`, backed
 * by the source's backing node for sync=top and none.
 */
export function mirrorNodes(dir: string, target: string, sync: MirrorSync, prefix = ''): Record<string, unknown>[] {
  return [
    ...[...LAYERS].reverse().map(({ layer, file, backing }) => qcow2Node(`${prefix}${layer}`, join(dir, file), backing && `${prefix}${backing}`)),
    qcow2Node(`${prefix}tgt`, target, sync === 'full' ? undefined : `${prefix}mid`),
  ];
}

/** The chain's images as `qemu-img info --backing-chain` lists them. */
export function backingChain(image: string): string[] {
  return (JSON.parse(runQemuImg('info', '--output=json', '--backing-chain', image)) as { filename: string }[]).map((entry) => entry.filename);
}
