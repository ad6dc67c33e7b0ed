/*
 * A typed QMP client for blockd (and any QMP server): connects over a UNIX
 * socket, TCP or WebSocket, reads the greeting, negotiates, and executes
 * commands with the generated argument and return types. Replies are matched
 * by id, so several commands may be in flight; events are kept in arrival
 * order and can be awaited by name and predicate.
 *
 *   const qmp = await QmpClient.connect('unix:/run/blockd.sock');
 *   const version = await qmp.execute('query-version');
 *   await qmp.close();
 */
import net from 'node:net';
import { WebSocket } from 'ws';
import type { QmpCommandMap, QmpCommandName } from '../generated/qapi-types.js';
import { JsonStreamParser } from '../json/streamer.js';
import { isJsonObject, toPlain, type JsonObject } from '../json/value.js';

export interface QmpGreeting {
  QMP: { version: { qemu: { major: number; minor: number; micro: number }; package: string }; capabilities: string[] };
}

export interface QmpEventMessage {
  event: string;
  data?: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

/** A command's error reply. */
export class QmpCommandError extends Error {
  constructor(readonly errorClass: string, readonly desc: string) {
    super(`${errorClass}: ${desc}`);
    this.name = 'QmpCommandError';
  }
}

interface Pending {
  resolve(value: unknown): void;
  reject(error: Error): void;
}

type Args<K extends QmpCommandName> = QmpCommandMap[K]['args'];
type Returns<K extends QmpCommandName> = QmpCommandMap[K]['returns'] extends void ? Record<string, never> : QmpCommandMap[K]['returns'];

export interface ConnectOptions {
  /** Capabilities to enable; false to skip negotiation. Default: []. */
  negotiate?: string[] | false;
}

export class QmpClient {
  greeting!: QmpGreeting;
  private readonly pending = new Map<number, Pending>();
  private readonly events: QmpEventMessage[] = [];
  private readonly eventWaiters = new Set<() => void>();
  private nextId = 1;
  private closed = false;
  private closeError: Error | undefined;
  private greetingReceived!: (greeting: QmpGreeting) => void;
  private readonly send: (text: string) => void;
  private readonly end: () => void;

  private constructor(transport: { send(text: string): void; end(): void; onData(listener: (chunk: Buffer) => void): void; onClose(listener: (error?: Error) => void): void }) {
    const parser = new JsonStreamParser((item) => {
      if ('value' in item && isJsonObject(item.value)) this.onMessage(item.value);
    });
    transport.onData((chunk) => parser.feed(chunk));
    transport.onClose((error) => this.onClose(error));
    this.send = transport.send;
    this.end = transport.end;
  }

  /** address: "unix:PATH", "tcp:HOST:PORT", "ws:HOST:PORT" (or ws://...), or a bare socket path. */
  static async connect(address: string, options: ConnectOptions = {}): Promise<QmpClient> {
    const client = await QmpClient.open(address);
    if (options.negotiate !== false) await client.execute('qmp_capabilities', { enable: (options.negotiate ?? []) as 'oob'[] });
    return client;
  }

  private static open(address: string): Promise<QmpClient> {
    return new Promise((resolve, reject) => {
      let client: QmpClient;
      const greeted = (greeting: QmpGreeting) => {
        client.greeting = greeting;
        resolve(client);
      };
      if (address.startsWith('ws:') || address.startsWith('ws://')) {
        const url = address.startsWith('ws://') ? address : `ws://${address.slice(3)}/`;
        const socket = new WebSocket(url, { perMessageDeflate: false });
        client = new QmpClient({
          send: (text) => socket.send(text),
          end: () => socket.close(1000),
          onData: (listener) => socket.on('message', (data: Buffer) => listener(Buffer.from(data))),
          onClose: (listener) => {
            socket.on('close', () => listener());
            socket.on('error', (error) => listener(error));
          },
        });
        socket.once('error', reject);
      } else {
        const socket = QmpClient.connectStream(address);
        client = new QmpClient({
          send: (text) => socket.write(text),
          end: () => socket.end(),
          onData: (listener) => socket.on('data', listener),
          onClose: (listener) => {
            socket.on('close', () => listener());
            socket.on('error', (error) => listener(error));
          },
        });
        socket.once('error', reject);
      }
      client.greetingReceived = greeted;
    });
  }

  private static connectStream(address: string): net.Socket {
    if (address.startsWith('tcp:')) {
      const match = /^tcp:(\[[^\]]+\]|[^:]*):([0-9]+)$/.exec(address);
      if (!match) throw new Error(`bad address ${address}`);
      return net.connect({ host: match[1]!.replace(/^\[|\]$/g, ''), port: Number(match[2]) });
    }
    return net.connect(address.startsWith('unix:') ? address.slice(5) : address);
  }

  private onMessage(message: JsonObject): void {
    if (message.QMP !== undefined && !this.greeting) {
      this.greetingReceived(toPlain(message) as QmpGreeting);
      return;
    }
    if (typeof message.event === 'string') {
      this.events.push(toPlain(message) as QmpEventMessage);
      for (const wake of [...this.eventWaiters]) wake();
      return;
    }
    const id = typeof message.id === 'number' ? message.id : undefined;
    const pending = id === undefined ? undefined : this.pending.get(id);
    if (!pending) return; // a reply we did not ask for: ignore, as QMP clients do
    this.pending.delete(id!);
    if (isJsonObject(message.error)) {
      pending.reject(new QmpCommandError(String(message.error.class), String(message.error.desc)));
    } else {
      pending.resolve(toPlain(message.return ?? {}));
    }
  }

  private onClose(error?: Error): void {
    if (this.closed) return;
    this.closed = true;
    this.closeError = error ?? new Error('QMP connection closed');
    for (const pending of this.pending.values()) pending.reject(this.closeError);
    this.pending.clear();
    for (const wake of [...this.eventWaiters]) wake();
  }

  execute<K extends QmpCommandName>(command: K, ...args: Record<string, never> extends Args<K> ? [Args<K>?] : [Args<K>]): Promise<Returns<K>> {
    return this.request('execute', command, args[0]) as Promise<Returns<K>>;
  }

  /** Sends the command with exec-oob (needs the oob capability). */
  executeOob<K extends QmpCommandName>(command: K, ...args: Record<string, never> extends Args<K> ? [Args<K>?] : [Args<K>]): Promise<Returns<K>> {
    return this.request('exec-oob', command, args[0]) as Promise<Returns<K>>;
  }

  /** Executes a command by name with untyped arguments (for commands of other servers, or raw scripting). */
  executeRaw(command: string, args?: Record<string, unknown>): Promise<unknown> {
    return this.request('execute', command, args);
  }

  private request(verb: 'execute' | 'exec-oob', command: string, args?: unknown): Promise<unknown> {
    if (this.closed) return Promise.reject(this.closeError);
    const id = this.nextId++;
    const message: Record<string, unknown> = { [verb]: command, id };
    if (args !== undefined) message.arguments = args;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.send(JSON.stringify(message) + '\n');
    });
  }

  /** Events received so far and not yet taken by waitForEvent. */
  receivedEvents(): readonly QmpEventMessage[] {
    return this.events;
  }

  /** Resolves with (and removes) the first event named `name` matching `predicate`, waiting up to timeoutMs. */
  waitForEvent(name: string, predicate: (event: QmpEventMessage) => boolean = () => true, timeoutMs = 30_000): Promise<QmpEventMessage> {
    return new Promise((resolve, reject) => {
      const check = (): boolean => {
        const index = this.events.findIndex((event) => event.event === name && predicate(event));
        if (index >= 0) {
          const [event] = this.events.splice(index, 1);
          resolve(event!);
          return true;
        }
        if (this.closed) {
          reject(new Error(`connection closed while waiting for ${name}`));
          return true;
        }
        return false;
      };
      if (check()) return;
      const timer = setTimeout(() => {
        this.eventWaiters.delete(wake);
        reject(new Error(`timed out waiting for event ${name}`));
      }, timeoutMs);
      const wake = () => {
        if (check()) {
          clearTimeout(timer);
          this.eventWaiters.delete(wake);
        }
      };
      this.eventWaiters.add(wake);
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await new Promise<void>((resolve) => {
      this.eventWaiters.add(() => resolve());
      this.end();
      setTimeout(resolve, 1000).unref();
    });
  }
}
