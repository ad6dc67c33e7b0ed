/*
 * The three-layer chains the job tests work on: base <- mid <- top, each
 * layer with data, zero clusters and holes written by qemu-io, and the
 * chain's contents saved as `<chain>-expected.raw` to compare against.
 */
import { join } from 'node:path';
import { createQcow2, MiB, qemuIo, runQemuImg } from './qemu-tools.js';

export function makePatternChain(dir: string, chain: string): void {
  const path = (layer: string) => join(dir, `${chain}-${layer}.qcow2`);
  createQcow2(path('base'), 64 * MiB);
  qemuIo(path('base'), ['write -P 0x11 0 8M', 'write -P 0x12 32M 4M', 'write -P 0x13 60M 4M'], ['-f', 'qcow2']);
  createQcow2(path('mid'), undefined, { backing: { path: `${chain}-base.qcow2`, format: 'qcow2' } });
  qemuIo(path('mid'), ['write -P 0x21 4M 8M', 'write -z 33M 1M', 'write -P 0x22 48M 64k'], ['-f', 'qcow2']);
  createQcow2(path('top'), undefined, { backing: { path: `${chain}-mid.qcow2`, format: 'qcow2' } });
  qemuIo(path('top'), ['write -P 0x31 6M 1M', 'write -z 60M 64k'], ['-f', 'qcow2']);
  runQemuImg('convert', '-O', 'raw', path('top'), join(dir, `${chain}-expected.raw`));
}
