/*
 * Errors of the protocol layer with qemu-storage-daemon's exact texts. Domain code
 * throws QmpError (src/errors.ts) and the dispatcher turns it into
 * {"error": {"class", "desc"}}; anything else thrown by a handler is a bug and
 * is reported as a GenericError without taking the daemon down.
 */

import { QmpError, genericError } from '../errors.js';

/** Errors of the protocol layer, worded as QEMU 7.2 words them. */
export const protocolErrors = {
  notAnObject: () => genericError('QMP input must be a JSON object'),
  memberMustBeString: (member: string) => genericError(`QMP input member '${member}' must be a string`),
  memberClash: (member: string, other: string) => genericError(`QMP input member '${member}' clashes with '${other}'`),
  argumentsMustBeObject: () => genericError("QMP input member 'arguments' must be an object"),
  unexpectedMember: (member: string) => genericError(`QMP input member '${member}' is unexpected`),
  lacksExecute: () => genericError("QMP input lacks member 'execute'"),
  commandNotFound: (name: string) => new QmpError('CommandNotFound', `The command ${name} has not been found`),
  oobNotSupported: (name: string) => genericError(`The command ${name} does not support OOB`),
  expectingNegotiation: () => new QmpError('CommandNotFound', "Expecting capabilities negotiation with 'qmp_capabilities'"),
  negotiationComplete: () => new QmpError('CommandNotFound', 'Capabilities negotiation is already complete, command ignored'),
  capabilityNotAvailable: (names: string[]) => genericError(`Capability ${names.join(', ')} not available`),
} as const;
