/*
 * The process's last line of defence: a promise rejection nobody handled is a
 * bug, logged at error level with its stack, and the daemon keeps serving its
 * other clients and jobs (Node would end the process, leaving images unclosed).
 * The sources are fixed where they are found; tests check this never fires.
 */
import type { Logger } from 'pino';

export function keepServingOnUnhandledRejection(log: Logger): void {
  process.on('unhandledRejection', (reason) => {
    log.error({ err: reason }, 'unhandled promise rejection (a bug in blockd); the daemon keeps serving');
  });
}
