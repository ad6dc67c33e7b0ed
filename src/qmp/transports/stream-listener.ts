/*
 * UNIX-socket and TCP listeners for QMP. Each accepted socket becomes a
 * session; the transport only moves bytes and maps flow control to
 * pause/resume. Binding (mode 0600, stale socket files) is net/socket-listener's.
 */
import net from 'node:net';
import { listenOn, listenUnixPrivate } from '../../net/socket-listener.js';
import type { Connection } from '../session.js';

export interface StreamAddress {
  type: 'unix' | 'tcp';
  path?: string;
  host?: string;
  port?: number;
}

export interface Listener {
  /** Where it listens, e.g. "unix:/run/blockd.sock" or "tcp:127.0.0.1:4444". */
  readonly address: string;
  close(): Promise<void>;
}

export interface ConnectionHandlers {
  receive(chunk: Uint8Array): void;
  /** The client finished sending (half-close): answer what is queued, then close. */
  endOfInput(): void;
  close(): void;
}

export type AcceptConnection = (connection: Connection) => ConnectionHandlers;

export function socketConnection(socket: net.Socket, description: string): Connection {
  return {
    description,
    write: (text) => {
      if (!socket.destroyed && socket.writable) socket.write(text);
    },
    pause: () => socket.pause(),
    resume: () => socket.resume(),
    close: () => socket.end(),
  };
}

/** Wires an accepted socket to a session. */
export function serveSocket(socket: net.Socket, description: string, accept: AcceptConnection): void {
  socket.setNoDelay?.(true);
  const handlers = accept(socketConnection(socket, description));
  socket.on('data', (chunk: Buffer) => handlers.receive(chunk));
  socket.on('end', () => handlers.endOfInput());
  socket.on('error', () => socket.destroy()); // a broken client only loses its own connection
  socket.on('close', () => handlers.close());
}

export async function listenStream(address: StreamAddress, accept: AcceptConnection): Promise<Listener> {
  const server = net.createServer({ allowHalfOpen: true });
  let description: string;
  if (address.type === 'unix') {
    const path = address.path!;
    await listenUnixPrivate(server, path);
    description = `unix:${path}`;
  } else {
    const host = address.host ?? '127.0.0.1';
    await listenOn(server, { host, port: address.port ?? 0 });
    const bound = server.address() as net.AddressInfo;
    description = `tcp:${bound.address.includes(':') ? `[${bound.address}]` : bound.address}:${bound.port}`;
  }
  let connections = 0;
  const sockets = new Set<net.Socket>();
  server.on('connection', (socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    const peer = address.type === 'unix' ? `${description}#${++connections}` : `tcp:${socket.remoteAddress}:${socket.remotePort}`;
    serveSocket(socket, peer, accept);
  });
  return {
    address: description,
    close: () => new Promise<void>((resolve) => {
      for (const socket of sockets) socket.end();
      server.close(() => resolve());
      // close() unlinks the UNIX socket file; give lingering clients a moment, then force them off
      setTimeout(() => sockets.forEach((socket) => socket.destroy()), 200).unref();
    }),
  };
}
