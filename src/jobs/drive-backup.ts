/*
 * drive-backup: a backup whose target is a file the command creates (mode=absolute-paths,
 * the default) or opens (mode=existing), as QEMU 7.2's drive_backup_prepare. A created
 * target has the source's size and format (or 'format'); with sync=top its header names
 * the source's backing image, with sync=none the source itself. The target opens with
 * discard=unmap and detect-zeroes=unmap, with the backing chain its header names, except
 * for sync=none: its backing is then the source node itself, so that it reads as the
 * source did at the start once the job has copied what is overwritten. The file is made
 * before the backup's own checks run, and stays when they refuse, as QEMU leaves it. The
 * target node is nobody's but the job's: it closes when the job lets go of it, or at once
 * when the job cannot start.
 */
import type { BlockNode } from '../blockdev/node.js';
import { checkNotBlocked } from '../blockdev/block-layer.js';
import { driverFor } from '../blockdev/drivers/registry.js';
import { genericError } from '../errors.js';
import type { BlockdevOptions, QmpCommandMap } from '../generated/qapi-types.js';
import { skipFilters } from './backing-chain.js';
import { prepareBackup, type BackupContext } from './backup-command.js';
import type { Job } from './job.js';
import type { JobTxn } from './job-txn.js';
import { skipImplicitFilters } from './mirror-command.js';
import { createTargetImage, isImageDriver, probeTargetFormat } from './target-image.js';

export type DriveBackupArguments = QmpCommandMap['drive-backup']['args'];

/** Opens the target file as QEMU does for a backup; with `withoutBacking`, its header's backing chain is not opened. */
async function openTarget(context: BackupContext, path: string, format: string | undefined, withoutBacking: boolean): Promise<BlockNode> {
  if (format !== undefined && !isImageDriver(format)) throw genericError(`Unknown driver '${format}'`);
  format ??= await probeTargetFormat(path);
  const options = {
    driver: format,
    discard: 'unmap',
    'detect-zeroes': 'unmap',
    file: { driver: 'file', filename: path },
    ...(withoutBacking && driverFor(format).supportsBacking ? { backing: null } : {}),
  } as unknown as BlockdevOptions;
  return context.layer.opener.open({ options, monitorOwned: false });
}

/** drive-backup's target, then the backup's checks and its job, created but not started (see prepareBackup). */
export async function prepareDriveBackup(context: BackupContext, args: DriveBackupArguments, source: BlockNode, txn?: JobTxn): Promise<Job> {
  const { layer } = context;
  const mode = args.mode ?? 'absolute-paths';
  const format = args.format ?? (mode === 'existing' ? undefined : source.driver.name);
  // Checked before the target file is made.
  checkNotBlocked(layer.blockers, source, 'backup-source');
  let sync = args.sync;
  // What the new image is laid over: the source's backing image (top), the source itself (none).
  let backing: BlockNode | undefined;
  if (sync === 'top') {
    backing = skipFilters(source).backing()?.child;
    if (!backing) sync = 'full';
  }
  if (sync === 'none') backing = source;
  if (mode !== 'existing') {
    if (!isImageDriver(format!)) throw genericError(`Unknown file format '${format}'`);
    // The image names its backing without the implicit filters a job put above it.
    await createTargetImage(args.target, format!, source.length(), backing && skipImplicitFilters(backing));
  }
  const target = await openTarget(context, args.target, format, sync === 'none');
  try {
    if (sync === 'none') {
      if (!target.driver.supportsBacking) throw genericError(`Driver '${target.driver.name}' of node '${target.name}' does not support backing files`);
      await layer.graph.changeBacking(target, source);
    }
    return await prepareBackup(context, { ...args, sync }, source, target, txn);
  } catch (error) {
    if (layer.graph.find(target.name) === target && target.parents.length === 0) await layer.graph.close(target);
    throw error;
  }
}
