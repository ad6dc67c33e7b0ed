/*
 * The drivers blockd has, by the name the schema's BlockdevDriver enum gives
 * them. Adding a driver: its schema branch, its file here in drivers/, one
 * line below, and its tests. The filters jobs insert (commit_top,
 * mirror_top) are here too but not in the schema: blockdev-add refuses them.
 */
import { genericError } from '../../errors.js';
import type { BlockDriver } from '../block-driver.js';
import { blkdebugDriver } from './blkdebug.js';
import { blklogwritesDriver } from './blklogwrites/blklogwrites.js';
import { commitTopDriver } from './commit-top.js';
import { copyBeforeWriteDriver } from './copy-before-write.js';
import { copyOnReadDriver } from './copy-on-read.js';
import { fileDriver } from './file.js';
import { mirrorTopDriver } from './mirror-top.js';
import { nbdDriver } from './nbd/nbd-driver.js';
import { nullCoDriver } from './null-co.js';
import { qcow2Driver } from './qcow2/qcow2-driver.js';
import { rawDriver } from './raw.js';
import { snapshotAccessDriver } from './snapshot-access.js';
import { throttleDriver } from './throttle.js';

const DRIVERS = new Map<string, BlockDriver<never>>([
  ['blkdebug', blkdebugDriver],
  ['blklogwrites', blklogwritesDriver],
  ['commit_top', commitTopDriver as BlockDriver<never>],
  ['copy-before-write', copyBeforeWriteDriver],
  ['copy-on-read', copyOnReadDriver],
  ['file', fileDriver],
  ['mirror_top', mirrorTopDriver],
  ['nbd', nbdDriver],
  ['null-co', nullCoDriver],
  ['qcow2', qcow2Driver],
  ['raw', rawDriver],
  ['snapshot-access', snapshotAccessDriver],
  ['throttle', throttleDriver],
]);

export function driverFor(name: string): BlockDriver {
  const driver = DRIVERS.get(name);
  if (!driver) throw genericError(`Driver '${name}' is not supported by blockd yet`);
  return driver as unknown as BlockDriver;
}
