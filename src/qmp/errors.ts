/*
 * The one error type that reaches the wire, and the registry of protocol-level
 * errors with qemu-storage-daemon's exact texts. Domain code throws QmpError
 * (usually through genericError) and the dispatcher turns it into
 * {"error": {"class", "desc"}}; anything else thrown by a handler is a bug and
 * is reported as a GenericError without taking the daemon down.
 */

export type QmpErrorClass = 'GenericError' | 'CommandNotFound' | 'DeviceNotActive' | 'DeviceNotFound' | 'KVMMissingCap';

export class QmpError extends Error {
  /** Advice QEMU prints after the error on the command line (never sent over QMP). */
  hint?: string;

  constructor(readonly errorClass: QmpErrorClass, readonly desc: string) {
    super(desc);
    this.name = 'QmpError';
  }

  withHint(hint: string): this {
    this.hint = hint;
    return this;
  }
}

export function genericError(desc: string): QmpError {
  return new QmpError('GenericError', desc);
}

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
