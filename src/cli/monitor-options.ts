/*
 * --chardev, --monitor and --qmp: where QMP is served. --chardev uses QEMU's
 * older option syntax (backend first, "key" alone meaning key=on); only the
 * socket (server mode, UNIX path or TCP host/port) and stdio backends exist
 * here. --qmp is blockd's short form: unix:PATH, tcp:HOST:PORT, ws:HOST:PORT.
 */
import { resolve } from 'node:path';
import type { MonitorAddress } from '../qmp/server.js';
import { CliError } from './cli-error.js';
import { parseKeyval, parseOnOff } from './keyval.js';

export interface Chardev {
  id: string;
  address: MonitorAddress;
  /** Startup waits for a first client unless wait=off (server sockets only). */
  wait: boolean;
}

const KNOWN_BACKENDS = ['socket', 'stdio', 'pty', 'udp', 'memory', 'file', 'ringbuf', 'null', 'parallel', 'pipe', 'mux', 'serial'];

/** QemuOpts: "backend,key=value,flag", commas doubled inside values. */
function parseQemuOpts(text: string): { backend: string; options: Map<string, string> } {
  const parts: string[] = [];
  let current = '';
  for (let i = 0; i < text.length; i++) {
    if (text[i] === ',') {
      if (text[i + 1] === ',') {
        current += ',';
        i++;
        continue;
      }
      parts.push(current);
      current = '';
    } else {
      current += text[i];
    }
  }
  parts.push(current);
  const backend = parts.shift() ?? '';
  const options = new Map<string, string>();
  for (const part of parts) {
    if (part === '') continue;
    const eq = part.indexOf('=');
    if (eq >= 0) options.set(part.slice(0, eq), part.slice(eq + 1));
    else if (part.startsWith('no') && part.length > 2) options.set(part.slice(2), 'off');
    else options.set(part, 'on');
  }
  return { backend, options };
}

export function parseChardev(text: string): Chardev {
  const { backend, options } = parseQemuOpts(text);
  if (backend.includes('=')) throw new CliError('chardev: backend type must come first');
  if (!KNOWN_BACKENDS.includes(backend)) throw new CliError(`'${backend}' is not a valid char driver name`);
  const id = options.get('id');
  if (!id) throw new CliError('chardev: no id specified');
  const allowed: Record<string, string[]> = {
    socket: ['id', 'path', 'host', 'port', 'server', 'wait', 'ipv4', 'ipv6', 'nodelay'],
    stdio: ['id', 'signal'],
  };
  if (!allowed[backend]) throw new CliError(`chardev backend '${backend}' is not supported by blockd (use socket or stdio)`);
  for (const key of options.keys()) {
    if (!allowed[backend]!.includes(key)) throw new CliError(`Invalid parameter '${key}'`);
  }
  if (backend === 'stdio') return { id, address: { type: 'stdio' }, wait: false };

  const server = parseOnOff(options.get('server') ?? 'off', 'server');
  if (!server) throw new CliError('client-mode sockets are not supported; add server=on');
  const wait = parseOnOff(options.get('wait') ?? 'on', 'wait');
  const path = options.get('path');
  if (path !== undefined) {
    if (options.has('host') || options.has('port')) throw new CliError("chardev: 'path' cannot be combined with 'host' or 'port'");
    return { id, address: { type: 'unix', path: resolve(path) }, wait };
  }
  const port = options.get('port');
  if (port === undefined) throw new CliError("chardev: socket needs 'path', or 'host' and 'port'");
  return { id, address: { type: 'tcp', host: options.get('host') || '127.0.0.1', port: parsePort(port) }, wait };
}

function parsePort(text: string): number {
  const port = Number(text);
  if (!/^[0-9]+$/.test(text) || port > 65535) throw new CliError(`Invalid port '${text}'`);
  return port;
}

export interface MonitorSpec {
  chardev: string;
  pretty: boolean;
}

export function parseMonitor(text: string): MonitorSpec {
  const tree = parseKeyval(text, 'chardev');
  for (const key of Object.keys(tree)) {
    if (!['chardev', 'id', 'mode', 'pretty'].includes(key)) throw new CliError(`Parameter '${key}' is unexpected`);
  }
  const chardev = tree.chardev;
  if (typeof chardev !== 'string') throw new CliError("Parameter 'chardev' is missing");
  if (tree.mode !== undefined && tree.mode !== 'control') {
    if (tree.mode === 'readline') throw new CliError('Only QMP is supported');
    throw new CliError(`Parameter 'mode' does not accept value '${String(tree.mode)}'`);
  }
  const pretty = typeof tree.pretty === 'string' ? parseOnOff(tree.pretty, 'pretty') : false;
  return { chardev, pretty };
}

/**
 * --qmp unix:PATH | tcp:HOST:PORT | ws:HOST:PORT, optionally followed by ",pretty=on" and, for
 * ws:, ",origin=ORIGIN" (repeatable): the web origins whose pages may open the WebSocket.
 */
export function parseQmpAddress(text: string): { address: MonitorAddress; pretty: boolean } {
  let spec = text;
  let pretty = false;
  const origins: string[] = [];
  // Options are taken off the end, so a UNIX path may still hold commas.
  for (let match; (match = /,(pretty|origin)=([^,]*)$/.exec(spec)); spec = spec.slice(0, match.index)) {
    if (match[1] === 'pretty') pretty = parseOnOff(match[2]!, 'pretty');
    else if (match[2]) origins.unshift(match[2]);
    else throw new CliError('origin= needs a value such as http://localhost:8080');
  }
  const colon = spec.indexOf(':');
  const scheme = spec.slice(0, colon);
  const rest = spec.slice(colon + 1);
  if (origins.length && scheme !== 'ws') throw new CliError('origin= is only for ws: monitors');
  if (colon > 0 && scheme === 'unix' && rest) return { address: { type: 'unix', path: resolve(rest) }, pretty };
  if (colon > 0 && (scheme === 'tcp' || scheme === 'ws')) {
    const match = /^(\[[^\]]+\]|[^:]*):([0-9]+)$/.exec(rest);
    if (match) {
      const host = match[1]!.replace(/^\[|\]$/g, '') || '127.0.0.1';
      const port = parsePort(match[2]!);
      return { address: scheme === 'ws' ? { type: 'ws', host, port, origins } : { type: 'tcp', host, port }, pretty };
    }
  }
  throw new CliError('expected unix:PATH, tcp:HOST:PORT or ws:HOST:PORT');
}
