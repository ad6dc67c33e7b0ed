/*
 * Handlers of the control commands every QMP server has: capabilities
 * negotiation, version, the command list, schema introspection and quit.
 */
import { schemaInfo } from '../generated/qapi-introspection.js';
import type { SchemaInfo } from '../generated/qapi-types.js';
import { versionInfo } from '../version.js';
import type { CommandRegistry } from './command-registry.js';

export interface ControlHooks {
  /** Stops what clients would hear about (exports, later jobs): QEMU sends those events before the quit reply. */
  stopServices(): Promise<void>;
  /** Starts an orderly shutdown once the quit reply has been sent. */
  shutdown(reason: string): void;
}

export function registerControlCommands(registry: CommandRegistry, hooks: ControlHooks): void {
  registry.register('qmp_capabilities', (args, { session }) => {
    session.negotiate(args.enable ?? []);
  });
  registry.register('query-version', () => versionInfo());
  registry.register('query-commands', () => registry.names().map((name) => ({ name })));
  registry.register('query-qmp-schema', () => schemaInfo as unknown as SchemaInfo[]);
  registry.register('quit', async () => {
    await hooks.stopServices();
    setImmediate(() => hooks.shutdown('quit command'));
  });
}
