/*
 * What a domain module needs to offer QMP commands: a table to register typed
 * handlers in, and what a handler knows of its caller. The QMP layer's
 * CommandRegistry implements it; storage, jobs and exports register through this
 * interface and never import qmp/.
 */
import type { Logger } from 'pino';
import type { QmpCommandMap, QmpCommandName } from './generated/qapi-types.js';

/** What a handler knows about the client calling it. */
export interface SessionControl {
  readonly id: number;
  readonly negotiated: boolean;
  /** Leaves negotiation mode with the given capabilities; throws QmpError when one is not offered. */
  negotiate(capabilities: string[]): void;
}

export interface CommandContext {
  session: SessionControl;
  log: Logger;
  /** The logger for one command's handler (carries the command name). */
  commandLog(command: string): Logger;
}

export type CommandHandler<K extends QmpCommandName> = (
  args: QmpCommandMap[K]['args'],
  context: CommandContext,
) => QmpCommandMap[K]['returns'] | Promise<QmpCommandMap[K]['returns']>;

export interface CommandTable {
  /** Registers the handler of a command the schema declares (a name it does not declare is a bug). */
  register<K extends QmpCommandName>(name: K, handler: CommandHandler<K>): void;
}
