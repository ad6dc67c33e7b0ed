/*
 * One action of a transaction, as QEMU's BlkActionOps: prepare does the real work (its
 * effects are visible to the actions after it) and is the only step that may fail;
 * exactly one of commit and abort follows, and clean always ends it. Abort must undo a
 * prepare that stopped half-way, since the failing action's own abort runs too.
 */
export interface TransactionAction {
  prepare(): Promise<void>;
  /** Cannot fail: what is left to do once every action prepared. */
  commit?(): Promise<void>;
  /** Cannot fail: undoes whatever prepare got done. */
  abort?(): Promise<void>;
  /** Cannot fail: after commit or abort (drained sections end, temporary references go). */
  clean?(): Promise<void>;
}

/** Where a step that cannot fail reports that it did (a bug, or storage gone bad): logged, and the transaction goes on. */
export type InfallibleStepFailed = (step: string, error: unknown) => void;

/**
 * Runs the actions all or nothing (QEMU's qmp_transaction): prepares in order; when one
 * fails every action prepared so far, the failing one too, is aborted newest first and the
 * error is thrown; otherwise all commit in order. Every action is cleaned, in order.
 */
export async function runActions(actions: readonly TransactionAction[], failed: InfallibleStepFailed): Promise<void> {
  const started: TransactionAction[] = [];
  const step = async (name: string, action: TransactionAction, work: (() => Promise<void>) | undefined) => {
    if (!work) return;
    try {
      await work.call(action);
    } catch (error) {
      failed(name, error);
    }
  };
  let failure: { error: unknown } | undefined;
  for (const action of actions) {
    started.push(action);
    try {
      await action.prepare();
    } catch (error) {
      failure = { error };
      break;
    }
  }
  if (failure) {
    for (const action of [...started].reverse()) await step('abort', action, action.abort);
  } else {
    for (const action of started) await step('commit', action, action.commit);
  }
  for (const action of started) await step('clean', action, action.clean);
  if (failure) throw failure.error;
}
