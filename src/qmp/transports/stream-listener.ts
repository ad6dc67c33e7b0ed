/*
 * UNIX-socket and TCP listeners for QMP. Each accepted socket becomes a
 * session; the transport only moves bytes and maps flow control to
 * pause/resume. A UNIX socket is created mode 0600, and a stale socket file
 * (nobody listening) is replaced, while a live one or a non-socket file at the
 * path is an error rather than something to delete.
 */
import { chmodSync, existsSync, lstatSync, unlinkSync } from 'node:fs';
import { dirname } from 'node:path';
import net from 'node:net';
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

async function isLiveSocket(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
}

export async function removeStaleSocket(path: string): Promise<void> {
  if (!existsSync(dirname(path))) throw new Error(`Failed to bind socket to ${path}: No such file or directory`);
  let stats;
  try {
    stats = lstatSync(path);
  } catch {
    return; // nothing there
  }
  if (!stats.isSocket()) throw new Error(`Failed to bind socket to ${path}: the path exists and is not a socket`);
  if (await isLiveSocket(path)) throw new Error(`Failed to bind socket to ${path}: Address already in use`);
  unlinkSync(path);
}

export async function listenStream(address: StreamAddress, accept: AcceptConnection): Promise<Listener> {
  const server = net.createServer({ allowHalfOpen: true });
  let description: string;
  if (address.type === 'unix') {
    const path = address.path!;
    await removeStaleSocket(path);
    const previousUmask = process.umask(0o177); // the socket file is created 0600
    try {
      await listenOn(server, { path });
    } finally {
      process.umask(previousUmask);
    }
    chmodSync(path, 0o600);
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

export function listenOn(server: net.Server, options: net.ListenOptions): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (error: NodeJS.ErrnoException) => {
      const where = options.path ?? `${options.host}:${options.port}`;
      reject(new Error(`Failed to bind socket to ${where}: ${describeErrno(error)}`));
    };
    server.once('error', onError);
    server.listen(options, () => {
      server.off('error', onError);
      resolve();
    });
  });
}

export function describeErrno(error: NodeJS.ErrnoException): string {
  const texts: Record<string, string> = {
    EADDRINUSE: 'Address already in use',
    EACCES: 'Permission denied',
    ENOENT: 'No such file or directory',
    EADDRNOTAVAIL: 'Cannot assign requested address',
    ENAMETOOLONG: 'File name too long',
  };
  return (error.code && texts[error.code]) ?? error.message;
}
