/*
 * Command handlers registered by name and typed by the generated schema
 * types. Registering a name the schema does not declare fails at once, and
 * missingHandlers() lists schema commands nobody registered, so the two can
 * never drift apart silently (a test asserts the list is empty for the daemon).
 */
import type { CommandContext, CommandHandler, CommandTable } from '../command-table.js';
import { commandCatalogue, type CommandEntry } from '../generated/qapi-catalogue.js';
import type { QmpCommandName } from '../generated/qapi-types.js';
import { commandArgumentRefs, validationDefs } from '../generated/qapi-validation.js';
import { ArgumentValidator } from './argument-validator.js';
import { genericError } from '../errors.js';
import { toPlain, type JsonObject, type JsonValue } from '../json/value.js';

type AnyHandler = (args: unknown, context: CommandContext) => unknown;

export class CommandRegistry implements CommandTable {
  private readonly handlers = new Map<string, AnyHandler>();
  private readonly entries = new Map<string, CommandEntry>(commandCatalogue.map((entry) => [entry.name, entry]));
  readonly validator = new ArgumentValidator(validationDefs, commandArgumentRefs);

  register<K extends QmpCommandName>(name: K, handler: CommandHandler<K>): void {
    if (!this.entries.has(name)) throw new Error(`command '${name}' is not declared in schema/`);
    if (this.handlers.has(name)) throw new Error(`command '${name}' registered twice`);
    this.handlers.set(name, handler as AnyHandler);
  }

  entry(name: string): CommandEntry | undefined {
    return this.entries.get(name);
  }

  handler(name: string): AnyHandler | undefined {
    return this.handlers.get(name);
  }

  /** Command names in schema order. */
  names(): string[] {
    return [...this.entries.keys()];
  }

  /** Validates the arguments against the schema and runs the handler; returns its result ({} when none). */
  async call(name: string, args: JsonObject, context: CommandContext): Promise<JsonValue> {
    this.validator.check(name, args);
    const handler = this.handlers.get(name);
    if (!handler) throw genericError(`The command ${name} has no implementation`);
    const result = await handler(toPlain(args), { ...context, log: context.commandLog(name) });
    return (result ?? {}) as JsonValue;
  }

  missingHandlers(): string[] {
    return this.names().filter((name) => !this.handlers.has(name));
  }
}
