/*
 * blockdev-backup, and the checks it shares with drive-backup, in qemu-storage-daemon
 * 7.2's order and words (blockdev_backup_prepare, do_backup_common, backup_job_create):
 * the bitmap's rules, then the nodes (same node, compression, op blockers), x-perf, the
 * sizes, the copy-before-write filter's name and the target's writability. Then the job
 * (backup-job.ts) inserts the filter, checks max-chunk against its copy's cluster size and
 * the job id, and starts. The order was observed on qemu-storage-daemon with commands that
 * break two rules at once.
 *
 * Both commands, alone or in a transaction, are a transaction action
 * (../transactions/backup-action.ts): the source stays drained while the action checks
 * and creates its job, which starts at the transaction's commit.
 */
import type { BlockLayer } from '../blockdev/block-layer.js';
import { checkNotBlocked } from '../blockdev/block-layer.js';
import { checkBitmap } from '../blockdev/bitmaps/bitmap-commands.js';
import type { DirtyBitmap } from '../blockdev/bitmaps/dirty-bitmap.js';
import { checkNodeName } from '../blockdev/node-names.js';
import type { BlockNode } from '../blockdev/node.js';
import { genericError, QmpError } from '../errors.js';
import type { BackupCommon } from '../generated/qapi-types.js';
import type { JobRegistry } from './job-registry.js';
import { createBackupJob, type BackupJobOptions } from './backup-job.js';
import type { Job } from './job.js';
import type { JobTxn } from './job-txn.js';

/** What a backup command works with: the graph and the jobs. */
export interface BackupContext {
  layer: BlockLayer;
  jobs: JobRegistry;
}

const INT_MAX = 2147483647;

/** The sync mode and bitmap after do_backup_common's bitmap rules ('incremental' desugared to 'bitmap' + on-success). */
function checkBitmapRules(args: BackupCommon, source: BlockNode): Required<Pick<BackupJobOptions, 'sync'>> & Pick<BackupJobOptions, 'bitmap' | 'bitmapMode'> {
  let sync = args.sync;
  let bitmapMode = args['bitmap-mode'];
  // Before 'incremental' becomes 'bitmap', so the text names what the client asked for.
  if ((sync === 'bitmap' || sync === 'incremental') && args.bitmap === undefined) {
    throw genericError(`must provide a valid bitmap name for '${sync}' sync mode`);
  }
  if (sync === 'incremental') {
    if (bitmapMode !== undefined && bitmapMode !== 'on-success') {
      throw genericError("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'");
    }
    sync = 'bitmap';
    bitmapMode = 'on-success';
  }
  let bitmap: DirtyBitmap | undefined;
  if (args.bitmap !== undefined) {
    bitmap = source.bitmaps.find(args.bitmap);
    if (!bitmap) throw genericError(`Bitmap '${args.bitmap}' could not be found`);
    if (bitmapMode === undefined) throw genericError('Bitmap sync mode must be given when providing a bitmap');
    // A read-only bitmap may still say what to copy.
    checkBitmap(bitmap, { busy: true, inconsistent: true });
    if (sync === 'none') throw genericError(`sync mode '${sync}' does not produce meaningful bitmap outputs`);
    if (bitmapMode === 'never' && sync !== 'bitmap') {
      throw genericError(`Bitmap sync mode '${bitmapMode}' has no meaningful effect when combined with sync mode '${sync}'`);
    }
  }
  if (bitmap === undefined && bitmapMode !== undefined) throw genericError('Cannot specify bitmap sync mode without a bitmap');
  return { sync, bitmap, bitmapMode };
}

/**
 * do_backup_common and backup_job_create's checks for a source and target found by the
 * command, then the job, created but not started. Call inside the source's drained section
 * (the transaction action's).
 */
export async function prepareBackup(context: BackupContext, args: BackupCommon, source: BlockNode, target: BlockNode, txn?: JobTxn): Promise<Job> {
  const { layer, jobs } = context;
  const xPerf = args['x-perf'] ?? {};
  const perf = { maxWorkers: xPerf['max-workers'] ?? 64, maxChunk: xPerf['max-chunk'] ?? 0, useCopyRange: xPerf['use-copy-range'] ?? false };
  const compress = args.compress ?? false;
  const { sync, bitmap, bitmapMode } = checkBitmapRules(args, source);

  if (source === target) throw genericError('Source and target cannot be the same');
  // QEMU names the target by its device name, which a storage daemon's nodes never have.
  if (compress && !target.supportsCompressedWrites()) throw genericError('Compression is not supported for this drive ');
  checkNotBlocked(layer.blockers, source, 'backup-source');
  checkNotBlocked(layer.blockers, target, 'backup-target');
  if (perf.maxWorkers < 1 || perf.maxWorkers > INT_MAX) throw genericError(`max-workers must be between 1 and ${INT_MAX}`);
  if (perf.maxChunk < 0) throw genericError('max-chunk must be zero (which means no limit) or positive');
  // The job writes the bitmap at its end unless bitmap-mode is never.
  if (bitmap && bitmapMode !== 'never') checkBitmap(bitmap, { busy: true, readonly: true, inconsistent: true });
  if (source.length() !== target.length()) throw genericError('Source and target image have different sizes');

  // What opening the copy-before-write filter would refuse (QEMU's bdrv_cbw_append), before the job exists.
  const filterNodeName = args['filter-node-name'];
  try {
    if (filterNodeName !== undefined) {
      checkNodeName(filterNodeName);
      if (layer.graph.has(filterNodeName)) throw genericError(`Duplicate nodes with node-name='${filterNodeName}'`);
    }
    // The filter writes into its target child (permission conflicts there are the filter's to report).
    if (target.readOnly && !target.settings.autoReadOnly) throw genericError('Block node is read-only');
  } catch (error) {
    throw genericError(`Could not create node: ${(error as QmpError).message}`);
  }
  // The filter, max-chunk against its copy's cluster size, then the job id: createBackupJob, in QEMU's order.
  return createBackupJob(layer, jobs, {
    jobId: args['job-id'] ?? '',
    source,
    target,
    sync,
    bitmap,
    bitmapMode,
    compress,
    speed: args.speed ?? 0,
    onSourceError: args['on-source-error'] ?? 'report',
    onTargetError: args['on-target-error'] ?? 'report',
    filterNodeName,
    autoFinalize: args['auto-finalize'] ?? true,
    autoDismiss: args['auto-dismiss'] ?? true,
    perf,
    txn,
  });
}

/** bdrv_lookup_bs: a node by name (a storage daemon has no device names). */
export function findBackupNode(layer: BlockLayer, name: string): BlockNode {
  const node = layer.graph.find(name);
  if (!node) throw genericError(`Cannot find device='${name}' nor node-name='${name}'`);
  return node;
}
