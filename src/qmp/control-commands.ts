/*
 * Handlers of the control commands every QMP server has: capabilities
 * negotiation, version, the command list, schema introspection and quit.
 */
import { schemaInfo } from '../generated/qapi-introspection.js';
import type { SchemaInfo } from '../generated/qapi-types.js';
import { versionInfo } from '../version.js';
import type { CommandRegistry } from './command-registry.js';

export interface ControlHooks {
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
  registry.register('quit', () => {
    setImmediate(() => hooks.shutdown('quit command'));
  });
}
