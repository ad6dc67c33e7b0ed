/*
 * The command line: qemu-storage-daemon's flags where they overlap, processed
 * as it processes them. A first pass handles --help, --version, --daemonize,
 * --pidfile and unknown options; a second runs every other option in order.
 * Any failure prints "blockd: <option>: <reason>" and exits 1 with nothing
 * left running; success writes the pid file, then serves until quit or a signal.
 */
import { resolve } from 'node:path';
import { Daemon } from './daemon.js';
import { LOG_LEVELS, createLogger } from './log.js';
import type { MonitorAddress } from './qmp/server.js';
import { BLOCKD_VERSION, QMP_LEVEL } from './version.js';
import { splitArgv, type OptionSpec, type ParsedOption } from './cli/argv.js';
import { CliError } from './cli/cli-error.js';
import { isDaemonChild, reportStartup, runDetachedChild } from './cli/daemonize.js';
import { keepServingOnUnhandledRejection } from './cli/last-resort.js';
import { parseChardev, parseMonitor, parseQmpAddress, type Chardev } from './cli/monitor-options.js';
import { removePidFile, writePidFile } from './cli/pidfile.js';
import { USAGE } from './cli/usage.js';
import { keyvalArguments } from './cli/keyval-visitor.js';
import { parseKeyval } from './cli/keyval.js';
import { commandArgumentTypes } from './generated/qapi-model.js';
import { JsonStreamParser } from './json/streamer.js';
import { QmpError } from './errors.js';
import { isJsonObject, type JsonObject, type JsonValue } from './json/value.js';

const OPTIONS: OptionSpec[] = [
  { name: 'help', short: 'h', takesValue: false },
  { name: 'version', short: 'V', takesValue: false },
  { name: 'trace', short: 'T', takesValue: true },
  { name: 'blockdev', takesValue: true },
  { name: 'chardev', takesValue: true },
  { name: 'daemonize', takesValue: false },
  { name: 'export', takesValue: true },
  { name: 'monitor', takesValue: true },
  { name: 'nbd-server', takesValue: true },
  { name: 'object', takesValue: true },
  { name: 'pidfile', takesValue: true },
  { name: 'qmp', takesValue: true },
  { name: 'log-level', takesValue: true },
];

export const DEFAULT_SOCKET = 'blockd-qmp.sock';

/** An option value in keyval or JSON form ("{...}"), as the arguments of a QMP command. */
function optionArguments(text: string, impliedKey: string, typeName: string): JsonObject {
  if (!text.trimStart().startsWith('{')) return keyvalArguments(parseKeyval(text, impliedKey), typeName);
  let parsed: JsonValue | undefined;
  let problem: string | undefined;
  new JsonStreamParser((item) => {
    if ('value' in item) parsed ??= item.value;
    else problem ??= item.error;
  }).feed(Buffer.from(`${text}\n`));
  if (problem) throw new CliError(problem);
  if (!isJsonObject(parsed)) throw new CliError('JSON parse error, expecting value');
  return parsed;
}

function fail(error: unknown, option?: ParsedOption): never {
  const cliError = error instanceof CliError ? error : new CliError((error as Error).message);
  const hint = error instanceof QmpError && error.hint ? `\n${error.hint}` : '';
  const text = (cliError.optionText || !option ? cliError.format() : new CliError(cliError.message, option.text).format()) + hint;
  if (isDaemonChild()) reportStartup({ error: text });
  else process.stderr.write(`${text}\n`);
  process.exitCode = 1;
  setTimeout(() => process.exit(1), isDaemonChild() ? 200 : 0);
  throw cliError;
}

export async function main(argv: string[]): Promise<void> {
  let options: ParsedOption[];
  try {
    options = splitArgv(argv, OPTIONS);
  } catch (error) {
    fail(error);
  }

  // First pass.
  let pidfile: string | undefined;
  let daemonize = false;
  let logLevel: string | undefined;
  for (const option of options) {
    switch (option.name) {
      case 'help':
        process.stdout.write(USAGE);
        process.exit(0);
      case 'version':
        process.stdout.write(`blockd version ${BLOCKD_VERSION} (QMP of QEMU ${QMP_LEVEL.major}.${QMP_LEVEL.minor})\n`);
        process.exit(0);
      case 'daemonize': daemonize = true; break;
      case 'pidfile': pidfile = resolve(option.value!); break;
      case 'log-level':
        if (!(LOG_LEVELS as readonly string[]).includes(option.value!)) fail(new CliError(`unknown log level; use one of ${LOG_LEVELS.join(', ')}`), option);
        logLevel = option.value;
        break;
    }
  }
  if (daemonize && !isDaemonChild()) await runDetachedChild();

  const log = createLogger(logLevel);
  keepServingOnUnhandledRejection(log);
  const daemon = new Daemon(log);
  daemon.onShutdown(() => {
    if (pidfile) removePidFile(pidfile);
  });
  daemon.onShutdown(() => process.exit(0));
  for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) {
    process.on(signal, () => void daemon.shutdown(signal));
  }

  daemon.qmp.holdSessionsUntilStarted();
  // Second pass, in command-line order.
  const chardevs = new Map<string, Chardev>();
  const usedChardevs = new Set<string>();
  let monitors = 0;
  const serve = async (address: MonitorAddress, pretty: boolean, waitForClient: boolean) => {
    monitors++;
    await daemon.addMonitor({ address, pretty, waitForClient });
  };
  let current: ParsedOption | undefined;
  try {
    for (const option of options) {
      current = option;
      switch (option.name) {
        case 'chardev': {
          const chardev = parseChardev(option.value!);
          if (chardevs.has(chardev.id)) throw new CliError(`Duplicate ID '${chardev.id}' for chardev`);
          chardevs.set(chardev.id, chardev);
          break;
        }
        case 'monitor': {
          const monitor = parseMonitor(option.value!);
          const chardev = chardevs.get(monitor.chardev);
          if (!chardev) throw new CliError(`chardev "${monitor.chardev}" not found`);
          if (usedChardevs.has(chardev.id)) throw new CliError(`Device '${chardev.id}' is in use`);
          usedChardevs.add(chardev.id);
          await serve(chardev.address, monitor.pretty, chardev.wait && chardev.address.type !== 'stdio');
          break;
        }
        case 'qmp': {
          const { address, pretty } = parseQmpAddress(option.value!);
          await serve(address, pretty, false);
          break;
        }
        case 'blockdev':
          await daemon.runCommand('blockdev-add', optionArguments(option.value!, 'driver', commandArgumentTypes['blockdev-add']!));
          break;
        case 'nbd-server': {
          // NbdServerOptions has the flat address form; the QMP command takes the legacy nested one.
          const options = optionArguments(option.value!, 'addr', 'NbdServerOptions');
          daemon.registry.validator.checkType('NbdServerOptions', options);
          const { addr, ...rest } = options as { addr: JsonObject };
          const { type, ...address } = addr;
          await daemon.runCommand('nbd-server-start', { ...rest, addr: { type, data: address } });
          break;
        }
        case 'export':
          await daemon.runCommand('block-export-add', optionArguments(option.value!, 'type', commandArgumentTypes['block-export-add']!));
          break;
        case 'object':
          await daemon.runCommand('object-add', optionArguments(option.value!, 'qom-type', commandArgumentTypes['object-add']!));
          break;
        case 'trace':
          log.warn({ pattern: option.value }, 'QEMU trace events do not exist in blockd; use --log-level debug or trace');
          break;
      }
    }
    current = undefined;
    if (monitors === 0) {
      const path = resolve(DEFAULT_SOCKET);
      await serve({ type: 'unix', path }, false, false);
      if (!isDaemonChild()) process.stderr.write(`blockd: no --monitor or --qmp given; serving QMP on unix:${path}\n`);
    }
    if (pidfile) writePidFile(pidfile);
  } catch (error) {
    await daemon.qmp.close();
    fail(error, current);
  }
  daemon.qmp.startupComplete();
  log.info({ version: BLOCKD_VERSION }, 'blockd ready');
  if (isDaemonChild()) reportStartup({ ok: true });
}
