/*
 * The root logger: structured JSON lines on stderr through pino. The level
 * comes from --log-level, else BLOCKD_LOG_LEVEL, else "info". Components take
 * child loggers (component, session, cmd, ...) so every line carries its context.
 */
import { pino, type Logger } from 'pino';

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

export function createLogger(level?: string): Logger {
  const chosen = level ?? process.env.BLOCKD_LOG_LEVEL ?? 'info';
  return pino({ level: chosen, base: { pid: process.pid }, timestamp: pino.stdTimeFunctions.isoTime }, pino.destination({ dest: 2, sync: true }));
}
