/*
 * blockdev-create: image creation as a job (QEMU's 'create' job: always
 * finalized automatically, always dismissed by hand, no BLOCK_JOB_* events).
 * 'file' creates a host file with the preallocation asked for, refused
 * unchanged when another user holds it (image-file-creation.ts); 'qcow2' lays
 * out a new image on an existing node, through a user edge holding the write
 * and resize permissions, so a node in use by a format is refused.
 */
import type { BlockLayer } from '../blockdev/block-layer.js';
import { COMMAND_USER, lookupDeviceOrNode } from '../blockdev/block-layer.js';
import { createQcow2, layoutQcow2 } from '../blockdev/drivers/qcow2/create.js';
import { describeErrno, errnoOf } from '../blockdev/io-error.js';
import { createImageFile } from '../blockdev/image-file-creation.js';
import { PERM_ALL, PERM_RESIZE, PERM_WRITE } from '../blockdev/permissions.js';
import type { BlockdevCreateOptions, BlockdevCreateOptionsFile, BlockdevCreateOptionsQcow2 } from '../generated/qapi-types.js';
import { genericError } from '../errors.js';
import type { CommandTable } from '../command-table.js';
import type { JobRegistry } from './job-registry.js';
import type { Job, JobKind } from './job.js';

/** The file, locked against other users before it changes (image-file-creation.ts). */
async function createFile(job: Job, { filename, size, preallocation }: BlockdevCreateOptionsFile): Promise<void> {
  const handle = await createImageFile(filename, { size, preallocation, locked: () => job.startupReached() });
  try {
    await handle.datasync().catch((error: unknown) => {
      throw genericError(`Could not flush file to disk: ${describeErrno(errnoOf(error))}`);
    });
  } finally {
    await handle.close();
  }
}

async function createQcow2Image(job: Job, layer: BlockLayer, options: BlockdevCreateOptionsQcow2): Promise<void> {
  if (options['data-file'] !== undefined) throw new Error('External data files are not supported by blockd');
  if (options.encrypt !== undefined) throw new Error('Encrypted images are not supported by blockd');
  const preallocation = options.preallocation ?? 'off';
  if (preallocation !== 'off' && preallocation !== 'metadata') throw new Error(`Preallocation mode '${preallocation}' for qcow2 is not supported by blockd yet`);
  const { graph, opener } = layer;
  const file = options.file;
  // QEMU's job yields before it opens a file given inline (the reply comes first), not before it looks up a node.
  if (typeof file !== 'string') job.startupReached();
  const node = typeof file === 'string' ? lookupDeviceOrNode(graph, file, file) : await opener.open({ options: file, monitorOwned: false });
  try {
    const edge = await graph.attachUser(COMMAND_USER, node, 'root', { perm: PERM_WRITE | PERM_RESIZE, shared: PERM_ALL });
    try {
      const qcow2Options = {
        size: options.size,
        clusterSize: options['cluster-size'],
        refcountBits: options['refcount-bits'],
        version: options.version === 'v2' ? (2 as const) : (3 as const),
        lazyRefcounts: options['lazy-refcounts'],
        extendedL2: options['extended-l2'],
        compressionType: options['compression-type'],
        backingFile: options['backing-file'],
        backingFormat: options['backing-fmt'],
        preallocation,
      };
      layoutQcow2(qcow2Options); // the option checks, before the first write as in QEMU
      job.startupReached();
      await createQcow2(edge, qcow2Options);
    } finally {
      await graph.detach(edge);
    }
  } finally {
    // A node opened just for this job goes again; a named one stays.
    if (typeof file !== 'string' && node.parents.length === 0) await graph.close(node);
  }
}

/** The job kind for one blockdev-create; refuses drivers blockd cannot create, as QEMU does, before any job exists. */
export function createJobKind(layer: BlockLayer, options: BlockdevCreateOptions): JobKind {
  if (options.driver !== 'file' && options.driver !== 'qcow2') throw genericError('Driver does not support blockdev-create');
  return {
    type: 'create',
    blockJob: false,
    async run(job: Job) {
      job.totalProgress = 1;
      try {
        if (options.driver === 'file') await createFile(job, options);
        else await createQcow2Image(job, layer, options as BlockdevCreateOptionsQcow2);
      } finally {
        job.currentProgress = 1; // QEMU counts the attempt, failed or not
      }
    },
  };
}

export function registerCreateCommand(registry: CommandTable, layer: BlockLayer, jobs: JobRegistry): void {
  registry.register('blockdev-create', async ({ 'job-id': id, options }) => {
    await jobs.start(createJobKind(layer, options), { id, autoFinalize: true, autoDismiss: false }).untilStartup();
  });
}
