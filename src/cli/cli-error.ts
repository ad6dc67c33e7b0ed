/*
 * A command-line error, printed as qemu-storage-daemon prints them:
 * "blockd: <the option as typed>: <reason>" (or "blockd: <reason>"), exit 1.
 */
export class CliError extends Error {
  constructor(message: string, readonly optionText?: string) {
    super(message);
  }

  format(program = 'blockd'): string {
    return this.optionText ? `${program}: ${this.optionText}: ${this.message}` : `${program}: ${this.message}`;
  }
}
