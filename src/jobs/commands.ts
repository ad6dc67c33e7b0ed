/*
 * QMP handlers for jobs: the generic job-* verbs, their block-job-* twins
 * (looked up by device = job id, block jobs only, DeviceNotActive when
 * missing) and the queries. Each applies QEMU's checks in QEMU's order.
 */
import type { CommandTable } from '../command-table.js';
import { genericError } from '../errors.js';
import type { MirrorCopyMode } from '../generated/qapi-types.js';
import type { JobRegistry } from './job-registry.js';
import type { Job } from './job.js';

function finalize(job: Job): Promise<void> {
  job.checkVerb('finalize');
  return job.finalize();
}

function dismiss(job: Job): Promise<void> {
  job.checkVerb('dismiss');
  return job.dismiss();
}

export function registerJobCommands(registry: CommandTable, jobs: JobRegistry): void {
  registry.register('query-jobs', () => jobs.queryJobs());
  registry.register('query-block-jobs', () => jobs.queryBlockJobs());

  registry.register('job-pause', async ({ id }) => jobs.find(id).userPause());
  registry.register('job-resume', ({ id }) => jobs.find(id).userResume());
  registry.register('job-cancel', ({ id }) => {
    const job = jobs.find(id);
    job.checkVerb('cancel');
    return job.cancel(true);
  });
  registry.register('job-complete', ({ id }) => jobs.find(id).complete());
  registry.register('job-finalize', async ({ id }) => finalize(jobs.find(id)));
  registry.register('job-dismiss', async ({ id }) => dismiss(jobs.find(id)));

  registry.register('block-job-set-speed', ({ device, speed }) => jobs.findBlockJob(device).setSpeed(speed));
  registry.register('block-job-pause', async ({ device }) => jobs.findBlockJob(device).userPause());
  registry.register('block-job-resume', ({ device }) => jobs.findBlockJob(device).userResume());
  registry.register('block-job-cancel', ({ device, force }) => {
    const job = jobs.findBlockJob(device);
    if (job.isUserPaused && !force) throw genericError(`The block job for device '${device}' is currently paused`);
    job.checkVerb('cancel');
    return job.cancel(force ?? false);
  });
  registry.register('block-job-complete', ({ device }) => jobs.findBlockJob(device).complete());
  registry.register('block-job-finalize', async ({ id }) => finalize(jobs.findBlockJob(id)));
  // QEMU 8.2's verb: only a mirror has something to change (its copy mode).
  registry.register('block-job-change', (options) => {
    const job = jobs.findBlockJob(options.id);
    job.checkVerb('change');
    if (!job.kind.change || options.type !== job.type) throw genericError(`Job type '${job.type}' does not support changing`);
    job.kind.change((options as { 'copy-mode': MirrorCopyMode })['copy-mode']);
  });
  registry.register('block-job-dismiss', async ({ id }) => dismiss(jobs.findBlockJob(id)));
}
