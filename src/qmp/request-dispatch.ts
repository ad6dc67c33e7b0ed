/*
 * Executes one parsed request and builds its response, with QEMU's checks in
 * QEMU's order: the envelope (members walked in QDict order, so that the first
 * problem found is the one qemu-storage-daemon reports), command lookup,
 * OOB permission, argument validation, then the handler. In negotiation mode
 * only qmp_capabilities exists and every CommandNotFound carries the
 * negotiation hint instead.
 */
import { QmpError } from '../errors.js';
import { protocolErrors } from './errors.js';
import type { CommandContext } from '../command-table.js';
import type { CommandRegistry } from './command-registry.js';
import { qdictOrder } from '../json/qdict-order.js';
import { hasMember, isJsonObject, type JsonObject, type JsonValue } from '../json/value.js';

export interface DispatchState {
  negotiated: boolean;
  oobEnabled: boolean;
}

const NEGOTIATION_COMMAND = 'qmp_capabilities';

/** True for requests QEMU runs at once instead of queueing: exec-oob without execute. */
export function isOutOfBand(request: JsonValue): boolean {
  return isJsonObject(request) && hasMember(request, 'exec-oob') && !hasMember(request, 'execute');
}

/** Checks the request envelope; returns the command name and whether it came as exec-oob. */
function checkEnvelope(request: JsonObject, oobEnabled: boolean): { command: string; oob: boolean } {
  let execKey: string | undefined;
  for (const key of qdictOrder(Object.keys(request))) {
    const value = request[key];
    if (key === 'execute' || (key === 'exec-oob' && oobEnabled)) {
      if (typeof value !== 'string') throw protocolErrors.memberMustBeString(key);
      if (execKey) throw protocolErrors.memberClash(key, execKey);
      execKey = key;
    } else if (key === 'arguments') {
      if (!isJsonObject(value)) throw protocolErrors.argumentsMustBeObject();
    } else if (key !== 'id') {
      throw protocolErrors.unexpectedMember(key);
    }
  }
  if (!execKey) throw protocolErrors.lacksExecute();
  return { command: request[execKey] as string, oob: execKey === 'exec-oob' };
}

function errorResponse(error: unknown, context: CommandContext): JsonObject {
  if (error instanceof QmpError) return { error: { class: error.errorClass, desc: error.desc } };
  context.log.error({ err: error }, 'command handler failed unexpectedly');
  const text = error instanceof Error ? error.message : String(error);
  return { error: { class: 'GenericError', desc: text } };
}

export async function dispatchRequest(
  request: JsonValue,
  registry: CommandRegistry,
  state: DispatchState,
  context: CommandContext,
): Promise<JsonObject> {
  if (!isJsonObject(request)) return errorResponse(protocolErrors.notAnObject(), context);
  const hasId = hasMember(request, 'id');
  let response: JsonObject;
  try {
    response = { return: await execute(request, registry, state, context) };
  } catch (error) {
    response = errorResponse(error, context);
    const body = response.error as JsonObject;
    if (!state.negotiated && body.class === 'CommandNotFound') body.desc = protocolErrors.expectingNegotiation().desc;
  }
  if (hasId) response.id = request.id!;
  return response;
}

async function execute(request: JsonObject, registry: CommandRegistry, state: DispatchState, context: CommandContext): Promise<JsonValue> {
  const { command, oob } = checkEnvelope(request, state.oobEnabled);
  const entry = registry.entry(command);
  if (!entry || (!state.negotiated && command !== NEGOTIATION_COMMAND)) throw protocolErrors.commandNotFound(command);
  if (oob && !entry.allowOob) throw protocolErrors.oobNotSupported(command);
  return registry.call(command, (request.arguments ?? {}) as JsonObject, context);
}
