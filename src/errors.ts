/*
 * The error type every layer throws: a QMP error class and QEMU's text. Storage,
 * jobs and exports throw it (usually through genericError); the QMP dispatcher
 * turns it into {"error": {"class", "desc"}}. The wire format lives in qmp/.
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
