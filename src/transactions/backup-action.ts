/*
 * blockdev-backup and drive-backup as a transaction action (QEMU's blockdev_backup_* and
 * drive_backup_*): prepare drains the source, runs the backup's checks and creates its job
 * (in the transaction's job transaction when grouped), which waits in 'created'; commit
 * starts it (it pauses at once in the drain it was created in); abort drops it before it
 * ever ran (no BLOCK_JOB_* event); clean ends the drain, and the job runs.
 */
import { usersReached } from '../blockdev/drain.js';
import type { BlockNode } from '../blockdev/node.js';
import { findBackupNode, prepareBackup, type BackupContext } from '../jobs/backup-command.js';
import { prepareDriveBackup, type DriveBackupArguments } from '../jobs/drive-backup.js';
import type { Job } from '../jobs/job.js';
import type { JobTxn } from '../jobs/job-txn.js';
import type { BlockdevBackup } from '../generated/qapi-types.js';
import type { TransactionAction } from './action.js';
import { DrainedSection } from './drained-section.js';

export class BackupAction implements TransactionAction {
  private readonly drain = new DrainedSection();
  /** The new job's own share of the drain, from its start to the transaction's clean. */
  private readonly jobDrain = new DrainedSection();
  private source: BlockNode | undefined;
  private usersBefore = new Set<unknown>();
  private job: Job | undefined;

  constructor(private readonly context: BackupContext, private readonly request: { blockdev: BlockdevBackup } | { drive: DriveBackupArguments }, private readonly txn: JobTxn | undefined) {}

  async prepare(): Promise<void> {
    const { layer } = this.context;
    const args = 'blockdev' in this.request ? this.request.blockdev : this.request.drive;
    const source = findBackupNode(layer, args.device);
    const request = this.request;
    const target = 'blockdev' in request ? findBackupNode(layer, request.blockdev.target) : undefined;
    await this.drain.begin(source);
    this.source = source;
    this.usersBefore = new Set(usersReached([source], 'node'));
    this.job = 'blockdev' in request
      ? await prepareBackup(this.context, args, source, target!, this.txn)
      : await prepareDriveBackup(this.context, request.drive, source, this.txn);
  }

  /**
   * Starts the job. It joined the drained section after the drain began, so it is drained now on
   * its own: it says running, then paused at its first pause point, and runs on at the clean
   * (QEMU's job, drained with its node, does the same).
   */
  async commit(): Promise<void> {
    if (!this.job) return;
    await this.jobDrain.beginUsers(usersReached([this.source!], 'node').filter((user) => !this.usersBefore.has(user)));
    this.job.begin();
  }

  async abort(): Promise<void> {
    await this.job?.cancelUnstarted();
    this.job = undefined;
  }

  async clean(): Promise<void> {
    await this.jobDrain.end();
    // A job that ends before its first real I/O sends its events before the reply, as in QEMU.
    await this.job?.untilStartup();
    await this.drain.end();
  }
}
