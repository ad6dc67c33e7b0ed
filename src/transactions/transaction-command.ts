/*
 * The transaction command and the commands QEMU runs as a transaction of one action
 * (blockdev-snapshot, blockdev-snapshot-sync, blockdev-snapshot-internal-sync,
 * blockdev-backup, drive-backup), so both
 * paths share one implementation. Every node drains once first (running jobs say paused,
 * then running), as QEMU's qmp_transaction does; with completion-mode grouped the jobs the
 * actions create share one job transaction. The bitmap commands stay commands of their
 * own, as in QEMU: their actions call the same functions (bitmap-actions.ts).
 */
import type { Logger } from 'pino';
import type { BlockLayer } from '../blockdev/block-layer.js';
import type { CommandTable } from '../command-table.js';
import { genericError } from '../errors.js';
import type { TransactionAction as ActionRequest, TransactionProperties } from '../generated/qapi-types.js';
import type { BackupContext } from '../jobs/backup-command.js';
import { JobTxn } from '../jobs/job-txn.js';
import { runActions, type TransactionAction } from './action.js';
import { BackupAction } from './backup-action.js';
import { BitmapAddAction, BitmapRemoveAction, bitmapClear, bitmapMerge, bitmapToggle } from './bitmap-actions.js';
import { ExternalSnapshotAction } from './snapshot-action.js';
import { InternalSnapshotAction } from './internal-snapshot-action.js';

export interface TransactionContext extends BackupContext {
  log: Logger;
}

/** An action whose prepare only refuses (the abort action, a mode the action does not support). */
const refusal = (text: string): TransactionAction => ({
  prepare: async () => {
    throw genericError(text);
  },
});

/** QEMU's action table: the action for one request; `txn` is the job transaction when grouped. */
function actionFor(context: TransactionContext, request: ActionRequest, txn: JobTxn | undefined): TransactionAction {
  const { layer } = context;
  const { graph } = layer;
  // Only backups can complete as a group (QEMU's action_check_completion_mode, the first check of every other prepare but abort's).
  if (txn && !['blockdev-backup', 'drive-backup', 'abort'].includes(request.type)) {
    return refusal(`Action '${request.type}' does not support Transaction property completion-mode = grouped`);
  }
  switch (request.type) {
    case 'abort':
      return refusal('Transaction aborted using Abort action');
    case 'block-dirty-bitmap-add':
      return new BitmapAddAction(graph, request.data);
    case 'block-dirty-bitmap-remove':
      return new BitmapRemoveAction(graph, request.data);
    case 'block-dirty-bitmap-clear':
      return bitmapClear(graph, request.data);
    case 'block-dirty-bitmap-enable':
      return bitmapToggle(graph, request.data, true);
    case 'block-dirty-bitmap-disable':
      return bitmapToggle(graph, request.data, false);
    case 'block-dirty-bitmap-merge':
      return bitmapMerge(graph, request.data);
    case 'blockdev-backup':
      return new BackupAction(context, { blockdev: request.data }, txn);
    case 'drive-backup':
      return new BackupAction(context, { drive: request.data }, txn);
    case 'blockdev-snapshot':
      return new ExternalSnapshotAction(layer, { overlay: request.data.overlay }, request.data.node, request.data.node);
    case 'blockdev-snapshot-sync':
      return new ExternalSnapshotAction(layer, { sync: request.data }, request.data['node-name'], request.data.device);
    case 'blockdev-snapshot-internal-sync':
      return new InternalSnapshotAction(layer, request.data);
  }
}

/** Runs a transaction: the drain of everything, then the actions all or nothing. */
export async function runTransaction(context: TransactionContext, { actions, properties }: { actions: ActionRequest[]; properties?: TransactionProperties }): Promise<void> {
  const txn = properties?.['completion-mode'] === 'grouped' ? new JobTxn() : undefined;
  await context.layer.graph.drainedAll(async () => {});
  await runActions(actions.map((request) => actionFor(context, request, txn)), (step, error) => {
    context.log.error({ err: error, step }, `transaction: ${step} failed; the transaction goes on`);
  });
}

export function registerTransactionCommands(registry: CommandTable, layer: BlockLayer, context: Omit<TransactionContext, 'layer'>): void {
  const full = { ...context, layer };
  const alone = (action: ActionRequest) => runTransaction(full, { actions: [action] });
  registry.register('transaction', (args) => runTransaction(full, args));
  registry.register('blockdev-snapshot', (data) => alone({ type: 'blockdev-snapshot', data }));
  registry.register('blockdev-snapshot-sync', (data) => alone({ type: 'blockdev-snapshot-sync', data }));
  registry.register('blockdev-snapshot-internal-sync', (data) => alone({ type: 'blockdev-snapshot-internal-sync', data }));
  registry.register('blockdev-backup', (data) => alone({ type: 'blockdev-backup', data }));
  registry.register('drive-backup', (data) => alone({ type: 'drive-backup', data }));
}
