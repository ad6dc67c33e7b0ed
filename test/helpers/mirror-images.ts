/*
 * The images the mirror data and crash tests work on: the source is the top of the pattern
 * chain `m-base <- m-mid <- m-top` (pattern-chains.ts); the target holds old data for
 * sync=full and is backed by the source's backing (m-mid) for sync=top and none. All are made
 * once and copied for each run. The guest writes only where the top has no data, so that sync=none, which never
 * copies the top, still leaves the target reading what the source reads where it was written.
 */
import { copyFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { MirrorSyncMode } from '../../src/generated/qapi-types.js';
import { makePatternChain } from './pattern-chains.js';
import { convertToRaw, createQcow2, MiB, qemuIo, runQemuImg } from './qemu-tools.js';

export type MirrorSync = Extract<MirrorSyncMode, 'full' | 'top' | 'none'>;

/** Clear of the top layer's data (6M+1M, 60M+64k), over data, zeroes and holes of the layers below. */
export const WRITE_REGIONS = [
  { offset: 1 * MiB, length: 4 * MiB },
  { offset: 30 * MiB, length: 4 * MiB },
  { offset: 44 * MiB, length: 6 * MiB },
];

const SYNCS: MirrorSync[] = ['full', 'top', 'none'];

/** The layer images of a run, outermost first. */
const LAYERS = [
  { layer: 'src', file: 'm-top.qcow2', backing: 'mid' },
  { layer: 'mid', file: 'm-mid.qcow2', backing: 'base' },
  { layer: 'base', file: 'm-base.qcow2', backing: undefined },
] as const;

/** A run's images: the source chain, `m-expected.raw` (what the source reads), the target and what it reads before the job. */
export interface MirrorRunImages {
  target: string;
  targetInitial: string;
}

/**
 * Makes the source chain and a target for each sync mode once in `dir`; returns what copies
 * them into a run's folder (the target as `m-target.qcow2`, what it reads as `target-initial.raw`).
 */
export function mirrorChainTemplate(dir: string): (into: string, sync: MirrorSync) => MirrorRunImages {
  mkdirSync(dir, { recursive: true });
  makePatternChain(dir, 'm');
  for (const sync of SYNCS) {
    const target = createMirrorTarget(join(dir, `m-target-${sync}.qcow2`), sync);
    convertToRaw(target, join(dir, `target-initial-${sync}.raw`));
  }
  return (into, sync) => {
    mkdirSync(into, { recursive: true });
    for (const file of ['m-base.qcow2', 'm-mid.qcow2', 'm-top.qcow2', 'm-expected.raw']) copyFileSync(join(dir, file), join(into, file));
    const images = { target: join(into, 'm-target.qcow2'), targetInitial: join(into, 'target-initial.raw') };
    copyFileSync(join(dir, `m-target-${sync}.qcow2`), images.target);
    copyFileSync(join(dir, `target-initial-${sync}.raw`), images.targetInitial);
    return images;
  };
}

/**
 * The target image for `sync`, next to the source chain. For sync=full it holds old data
 * where the source reads data, zeroes and holes: the mirror must overwrite all of it.
 */
function createMirrorTarget(target: string, sync: MirrorSync): string {
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
