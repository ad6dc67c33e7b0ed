/*
 * The NBD server: one listening socket (UNIX, created 0600, or TCP), the exports
 * by name, and the connections. With max-connections set, clients beyond the limit
 * wait before the greeting until a slot frees, as they wait in QEMU's listen
 * backlog, which holds max-connections of them: more are dropped at once. Each
 * connection runs the handshake, which must end within 10 s (QEMU 8.2's default
 * handshake limit, TLS included), then transmission; whatever a client does
 * wrong ends that connection only. With TLS credentials every client must
 * start TLS first.
 */
import net from 'node:net';
import type { Logger } from 'pino';
import { listenOn, listenUnixPrivate } from '../../net/socket-listener.js';
import { ProtocolViolation } from '../../nbd/messages.js';
import type { NbdClientHandle, NbdExport } from './nbd-export.js';
import { TlsFailure } from '../../net/tls-session.js';
import { HandshakeAborted, negotiate, type ExportLookup, type ServerTls } from './server-handshake.js';
import { ServerTransmission } from './server-transmission.js';
import { ConnectionClosed, SocketReader } from '../../nbd/socket-reader.js';
import type { NbdChannel } from '../../nbd/nbd-channel.js';

/** A client that has not finished its handshake by then is dropped: it would hold a slot forever. */
const HANDSHAKE_LIMIT_MS = 10_000;

export type NbdListenAddress = { type: 'unix'; path: string } | { type: 'inet'; host: string; port: number };

export class NbdServer implements ExportLookup {
  /** Oldest first: the order LIST reports them in. */
  private readonly exports = new Map<string, NbdExport>();
  private readonly sockets = new Set<net.Socket>();
  /** The reader of each adopted socket (none for a TLS server's: see accept). */
  private readonly readers = new Map<net.Socket, SocketReader | undefined>();
  private readonly waiting: net.Socket[] = [];
  private active = 0;
  private nextConnection = 1;

  private constructor(
    private readonly server: net.Server,
    readonly address: string,
    readonly maxConnections: number,
    private readonly log: Logger,
    private readonly tls: ServerTls | undefined,
  ) {}

  /**
   * Listens on `address`. `tls` then gives the TLS settings every client must use: as in QEMU,
   * the address is taken before the credentials are looked up, and let go if that fails.
   */
  static async start(address: NbdListenAddress, maxConnections: number, log: Logger, resolveTls?: () => ServerTls): Promise<NbdServer> {
    // Paused: a connection's socket is taken over by a reader of reused buffers (SocketReader.adopt).
    const server = net.createServer({ allowHalfOpen: false, noDelay: true, pauseOnConnect: true });
    let description: string;
    if (address.type === 'unix') {
      await listenUnixPrivate(server, address.path);
      description = `unix:${address.path}`;
    } else {
      await listenOn(server, { host: address.host, port: address.port });
      const bound = server.address() as net.AddressInfo;
      description = `inet:${bound.address}:${bound.port}`;
    }
    let tls: ServerTls | undefined;
    try {
      tls = resolveTls?.();
    } catch (error) {
      await new Promise((resolve) => server.close(resolve));
      throw error;
    }
    const nbd = new NbdServer(server, description, maxConnections, log, tls);
    server.on('connection', (socket) => nbd.accept(socket));
    log.info({ address: description, maxConnections, tlsCreds: tls?.creds.id }, 'NBD server listening');
    return nbd;
  }

  findExport(name: string): NbdExport | undefined {
    return this.exports.get(name);
  }

  listExports(): NbdExport[] {
    return [...this.exports.values()];
  }

  addExport(exported: NbdExport): void {
    this.exports.set(exported.name, exported);
    exported.onShutdown = () => {
      if (this.exports.get(exported.name) === exported) this.exports.delete(exported.name);
    };
  }

  private accept(accepted: net.Socket): void {
    // TLS takes over a plain socket's reading, which only a socket of 'data' events hands over.
    const { socket, reader } = this.tls ? { socket: accepted, reader: undefined } : SocketReader.adopt(accepted);
    this.readers.set(socket, reader);
    this.sockets.add(socket);
    socket.on('error', () => socket.destroy());
    socket.on('close', () => {
      this.sockets.delete(socket);
      this.readers.delete(socket);
      const index = this.waiting.indexOf(socket);
      if (index >= 0) this.waiting.splice(index, 1);
    });
    if (this.maxConnections > 0 && this.active >= this.maxConnections) {
      if (this.waiting.length >= this.maxConnections) {
        this.log.warn('NBD connection dropped: max-connections reached and the backlog is full');
        socket.destroy();
        return;
      }
      this.waiting.push(socket);
      return;
    }
    this.serve(socket);
  }

  private serve(socket: net.Socket): void {
    this.active++;
    void this.runConnection(socket, this.nextConnection++).finally(() => {
      this.active--;
      const next = this.waiting.shift();
      if (next) this.serve(next);
    });
  }

  private async runConnection(socket: net.Socket, number: number): Promise<void> {
    const log = this.log.child({ connection: number });
    // STARTTLS replaces the socket and reader with TLS ones.
    const channel: NbdChannel = { socket, reader: this.readers.get(socket) ?? new SocketReader(socket) };
    socket.resume(); // accepted paused (see start)
    let handle: NbdClientHandle | undefined;
    let exported: NbdExport | undefined;
    const handshakeLimit = setTimeout(() => {
      log.warn('NBD client dropped: handshake not finished within 10 s');
      channel.socket.destroy();
    }, HANDSHAKE_LIMIT_MS);
    try {
      const client = await negotiate(channel, this, this.tls).finally(() => clearTimeout(handshakeLimit));
      if (!client) return;
      exported = client.exported;
      handle = { disconnect: () => channel.socket.destroy() };
      exported.addClient(handle);
      log.debug({ export: exported.name, structured: client.structuredReplies, tls: channel.socket !== socket }, 'NBD client connected');
      await new ServerTransmission(channel.socket, channel.reader, client, log).run();
    } catch (error) {
      if (error instanceof ProtocolViolation || error instanceof HandshakeAborted) {
        log.warn({ reason: error.message }, 'Disconnect client, due to a protocol error');
      } else if (error instanceof TlsFailure) {
        log.warn({ reason: error.message }, 'option negotiation failed');
      } else if (!(error instanceof ConnectionClosed)) {
        log.error({ err: error }, 'NBD connection failed');
      }
    } finally {
      if (handle) exported?.removeClient(handle);
      channel.socket.end();
      // A peer that stops reading must not keep the socket (and the export) forever.
      setTimeout(() => channel.socket.destroy(), 1000).unref();
    }
  }

  /** Stops listening and disconnects everyone still connected (exports are closed by the caller first). */
  async stop(): Promise<void> {
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      for (const socket of this.sockets) socket.destroy();
    });
    this.log.info({ address: this.address }, 'NBD server stopped');
  }
}
