/*
 * QMP handlers for the node graph: blockdev-add/del, query-named-block-nodes,
 * block_resize and block-set-write-threshold. Thin adapters from the
 * generated argument types to graph calls, with qemu-storage-daemon's error
 * texts for the checks the commands themselves make.
 */
import type { CommandTable } from '../command-table.js';
import { genericError } from '../errors.js';
import { COMMAND_USER, asQmpError, checkNotBlocked, lookupDeviceOrNode, type BlockLayer } from './block-layer.js';
import { PERM_ALL, PERM_RESIZE } from './permissions.js';
import { blockdevSnapshotDeleteInternalSync } from './internal-snapshot.js';
import { blockdevReopen } from './reopen.js';
import { changeBackingFile } from './change-backing-file.js';
import { blockDeviceInfo, checkListable } from './node-info.js';
import { registerBitmapCommands } from './bitmaps/bitmap-commands.js';

export function registerBlockCommands(registry: CommandTable, layer: BlockLayer): void {
  const { graph, opener, blockers } = layer;
  registerBitmapCommands(registry, layer);
  registry.register('blockdev-add', async (options) => {
    if (options['node-name'] === undefined) throw genericError("'node-name' must be specified for the root node");
    await opener.open({ options, monitorOwned: true });
  });

  registry.register('blockdev-del', async ({ 'node-name': name }) => {
    const node = graph.find(name);
    if (!node) throw genericError(`Failed to find node with node-name='${name}'`);
    if (node.parents.some((edge) => 'user' in edge.parent && !edge.parent.user.job)) throw genericError(`Node ${name} is in use`);
    checkNotBlocked(blockers, node, 'drive-del');
    if (!node.monitorOwned) throw genericError(`Node ${name} is not owned by the monitor`);
    if (node.parents.length > 0) throw genericError(`Block device ${name} is in use`);
    await graph.close(node);
  });

  registry.register('query-named-block-nodes', async ({ flat }) => {
    const nodes = graph.list();
    if (!flat) checkListable(nodes);
    const known = new Map();
    return Promise.all(nodes.map((node) => blockDeviceInfo(node, flat ?? false, known)));
  });

  registry.register('block_resize', async ({ device, 'node-name': nodeName, size }) => {
    const node = lookupDeviceOrNode(graph, device, nodeName);
    if (size < 0) throw genericError("Parameter 'size' expects a >0 size");
    // QEMU's resize check words an op blocker its own way, whatever the blocker.
    if (blockers.reason(node, 'resize')) throw genericError(`Device '${device ?? '(null)'}' is in use`);
    const user = await graph.attachUser(COMMAND_USER, node, 'root', { perm: PERM_RESIZE, shared: PERM_ALL });
    try {
      if (node.readOnly) throw genericError('Image is read-only');
      await user.truncate(size).catch((error: unknown) => {
        throw asQmpError(error);
      });
    } finally {
      await graph.detach(user);
    }
  });

  registry.register('blockdev-snapshot-delete-internal-sync', (args) => blockdevSnapshotDeleteInternalSync(layer, args));
  registry.register('blockdev-reopen', ({ options }) => blockdevReopen(layer, options));
  registry.register('change-backing-file', (args) => changeBackingFile(layer, args));

  registry.register('block-set-write-threshold', ({ 'node-name': name, 'write-threshold': threshold }) => {
    const node = graph.find(name);
    if (!node) throw genericError(`Device '${name}' not found`);
    node.writeThreshold = threshold;
  });
}
