/*
 * The QMP server: monitors (listeners on UNIX, TCP, WebSocket or stdio), the
 * sessions they accept, and event fan-out. Unlike qemu-storage-daemon, whose
 * socket monitor serves one client at a time, every monitor here serves any
 * number of clients at once, each with its own negotiation state; events go
 * to every negotiated client of every monitor.
 */
import type { Logger } from 'pino';
import type { RaisedEvent } from '../event-bus.js';
import type { MainLoopLock } from '../main-loop-lock.js';
import type { CommandRegistry } from './command-registry.js';
import { InBandScheduler } from './in-band-scheduler.js';
import { QmpSession } from './session.js';
import type { JsonObject } from '../json/value.js';
import { listenStream, type AcceptConnection, type Listener } from './transports/stream-listener.js';
import { listenWebSocket } from './transports/websocket-listener.js';
import { serveStdio } from './transports/stdio-connection.js';

export type MonitorAddress =
  | { type: 'unix'; path: string }
  | { type: 'tcp'; host: string; port: number }
  /** origins: the web origins allowed to open it (a handshake without an Origin header is a non-browser client). */
  | { type: 'ws'; host: string; port: number; origins?: string[] }
  | { type: 'stdio' };

export interface MonitorOptions {
  address: MonitorAddress;
  pretty?: boolean;
  /** Resolve only once a first client has connected (a chardev without wait=off). */
  waitForClient?: boolean;
}

export interface QmpServerOptions {
  registry: CommandRegistry;
  log: Logger;
  version: () => JsonObject;
  /** In-band commands, replies included, run as sections of this lock (the daemon's: job ends and the shutdown take it too). */
  lock?: MainLoopLock;
}

export class QmpServer {
  private readonly scheduler: InBandScheduler;
  private readonly sessions = new Set<QmpSession>();
  private readonly listeners: Listener[] = [];
  private readonly log: Logger;

  /** Resolved once start-up is over: until then clients are accepted but not greeted. */
  private started: Promise<void> = Promise.resolve();
  private endStartup: (() => void) | undefined;

  constructor(private readonly options: QmpServerOptions) {
    this.log = options.log.child({ component: 'qmp' });
    this.scheduler = new InBandScheduler(options.lock);
  }

  /** Opens a monitor; resolves once it is listening. */
  async listen(monitor: MonitorOptions): Promise<Listener> {
    let firstClient!: () => void;
    const connected = new Promise<void>((resolve) => (firstClient = resolve));
    const accept = this.acceptor(monitor.pretty ?? false, () => firstClient());
    const { address } = monitor;
    let listener: Listener;
    switch (address.type) {
      case 'unix': listener = await listenStream({ type: 'unix', path: address.path }, accept); break;
      case 'tcp': listener = await listenStream({ type: 'tcp', host: address.host, port: address.port }, accept); break;
      case 'ws': listener = await listenWebSocket(address, accept, this.log); break;
      case 'stdio': listener = serveStdio(accept); break;
    }
    this.listeners.push(listener);
    this.log.info({ address: listener.address }, 'QMP monitor listening');
    if (monitor.waitForClient) {
      this.log.info({ address: listener.address }, 'waiting for a first QMP client (add wait=off to the chardev to skip)');
      await connected;
    }
    return listener;
  }

  /**
   * Start-up begins: clients that connect meanwhile are greeted, and their commands run, only
   * once every option on the command line is done (as qemu-storage-daemon's main loop starts
   * after them), so nobody sees half a graph.
   */
  holdSessionsUntilStarted(): void {
    this.started = new Promise((resolve) => (this.endStartup = resolve));
  }

  startupComplete(): void {
    this.endStartup?.();
  }

  private acceptor(pretty: boolean, onConnect: () => void): AcceptConnection {
    return (connection) => {
      onConnect();
      const session = new QmpSession(connection, {
        registry: this.options.registry,
        scheduler: this.scheduler,
        log: this.log,
        pretty,
        version: this.options.version,
        offeredCapabilities: ['oob'],
      });
      this.sessions.add(session);
      // What a client sends before start-up is over waits with it.
      let live = false;
      let ended = false;
      const early: Uint8Array[] = [];
      void this.started.then(() => {
        live = true;
        session.start();
        for (const chunk of early.splice(0)) session.receive(chunk);
        if (ended) session.endOfInput();
      });
      return {
        receive: (chunk) => (live ? session.receive(chunk) : void early.push(chunk)),
        endOfInput: () => (live ? session.endOfInput() : void (ended = true)),
        close: () => {
          session.close();
          this.sessions.delete(session);
        },
      };
    };
  }

  /** Sends an event to every negotiated client. */
  broadcast(event: RaisedEvent): void {
    for (const session of this.sessions) session.deliverEvent(event);
  }

  /** Closes every monitor and client connection. */
  async close(): Promise<void> {
    await Promise.all(this.listeners.splice(0).map((listener) => listener.close()));
  }
}
