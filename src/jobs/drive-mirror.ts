/*
 * drive-mirror: a mirror whose target is a file the command creates
 * (mode=absolute-paths, the default) or opens as it is (mode=existing), as
 * QEMU's qmp_drive_mirror. A created target has the source's size and
 * format; with sync=top its header names the source's backing image, with
 * sync=none the source itself, so that the copy reads the same once it has
 * that backing. The target opens without its backing file, and gets it when
 * it takes the source's place: the source's own backing node (absolute-paths)
 * or the chain its header names (existing). The file stays if the job cannot
 * start, as QEMU leaves it.
 */
import { checkNotBlocked, type BlockLayer } from '../blockdev/block-layer.js';
import { probeImageFormat } from '../blockdev/image-session.js';
import type { BlockNode } from '../blockdev/node.js';
import type { CommandTable } from '../command-table.js';
import { genericError } from '../errors.js';
import type { BlockdevOptions, QmpCommandMap } from '../generated/qapi-types.js';
import { skipFilters } from './backing-chain.js';
import type { JobRegistry } from './job-registry.js';
import { mirrorSource, skipImplicitFilters, startMirror } from './mirror-command.js';
import { createTargetImage, isImageDriver, probeTargetFormat } from './target-image.js';

type DriveMirrorArguments = QmpCommandMap['drive-mirror']['args'];

/** mode=existing: at the pivot the target's backing chain opens from its header (QEMU's bdrv_open_backing_file). */
async function openBackingFromHeader(layer: BlockLayer, target: BlockNode): Promise<void> {
  const image = skipFilters(target);
  const info = image.state.info().image ?? {};
  const filename = info['full-backing-filename'] as string | undefined;
  if (filename === undefined || image.backing()) return;
  const format = (info['backing-filename-format'] as string | undefined) ?? (await probeImageFormat(filename));
  const options = { driver: format, file: { driver: 'file', filename } } as unknown as BlockdevOptions;
  const backing = await layer.opener.open({ options, monitorOwned: false, asBacking: true });
  await layer.graph.changeBacking(image, backing);
}

export function registerDriveMirrorCommand(registry: CommandTable, layer: BlockLayer, jobs: JobRegistry): void {
  registry.register('drive-mirror', async (args: DriveMirrorArguments) => {
    const source = mirrorSource(layer, args.device);
    // Checked before the target file is made.
    checkNotBlocked(layer.blockers, source, 'mirror-source');
    const mode = args.mode ?? 'absolute-paths';
    let sync = args.sync;
    let backing = skipFilters(source).backing()?.child;
    if (!backing && sync === 'top') sync = 'full';
    if (sync === 'none') backing = source;
    if (args.replaces !== undefined && args['node-name'] === undefined) {
      throw genericError('a node-name must be provided when replacing a named node of the graph');
    }
    let format = args.format ?? (mode === 'existing' ? undefined : source.driver.name);
    if (format !== undefined && !isImageDriver(format)) throw genericError(`Unknown file format '${format}'`);
    const path = args.target;
    // The image names the backing without the implicit filters a job put above it.
    const namedBacking = sync === 'full' || !backing ? undefined : skipImplicitFilters(backing);
    if (mode !== 'existing') await createTargetImage(path, format!, source.length(), namedBacking);
    format ??= await probeTargetFormat(path);
    const options = {
      driver: format,
      ...(args['node-name'] === undefined ? {} : { 'node-name': args['node-name'] }),
      ...(source.settings.discard === 'unmap' ? { discard: 'unmap' } : {}),
      file: { driver: 'file', filename: path },
      ...(format === 'raw' ? {} : { backing: null }),
    } as unknown as BlockdevOptions;
    const target = await layer.opener.open({ options, monitorOwned: false });
    // The target's backing at the pivot: the source's backing node (sync=top), the source (none), or the header's chain.
    const pivotBacking = sync === 'full' ? undefined : sync === 'none' ? source : skipFilters(source).backing()?.child;
    try {
      await startMirror(layer, jobs, {
        jobId: args['job-id'],
        source,
        target,
        replaces: args.replaces,
        sync,
        granularity: args.granularity,
        bufSize: args['buf-size'],
        // A new image reads as zeroes already; an existing one must be made to where the source does.
        zeroTarget: mode === 'existing',
        unmap: args.unmap ?? true,
        args: { ...args, 'filter-node-name': undefined },
        beforePivot: mode === 'existing'
          ? (node) => openBackingFromHeader(layer, node)
          : async (node) => {
            const image = skipFilters(node);
            if (image.backing()?.child !== pivotBacking) await layer.graph.changeBacking(image, pivotBacking);
          },
      });
    } catch (error) {
      if (layer.graph.find(target.name) === target && target.parents.length === 0) await layer.graph.close(target);
      throw error;
    }
  });
}
