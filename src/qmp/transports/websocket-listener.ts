/*
 * QMP over WebSocket: one QMP message per text frame in both directions, with
 * the same session semantics as a stream socket (greeting first, negotiation,
 * CRLF-terminated messages). Dead peers are found with ping/pong and dropped;
 * compression is off and frames are capped so one client cannot exhaust memory;
 * web pages are refused unless their origin is allowed.
 */
import http from 'node:http';
import type net from 'node:net';
import type { Logger } from 'pino';
import { WebSocketServer, type WebSocket } from 'ws';
import type { Connection } from '../session.js';
import type { AcceptConnection, Listener } from './stream-listener.js';
import { describeSocketError } from '../../net/socket-listener.js';

const MAX_FRAME = 8 * 1024 * 1024;
const HEARTBEAT_MS = 30_000;

function websocketConnection(socket: WebSocket, description: string): Connection {
  return {
    description,
    write: (text) => {
      if (socket.readyState === socket.OPEN) socket.send(text);
    },
    pause: () => socket.pause(),
    resume: () => socket.resume(),
    close: () => socket.close(1000),
  };
}

/**
 * Browsers send the page's origin with every WebSocket handshake, and any page open on the
 * host could otherwise drive the daemon; other clients send none. So a handshake with an
 * Origin is accepted only when it is one of the allowed origins.
 */
function originAllowed(origin: string | undefined, allowed: readonly string[]): boolean {
  return origin === undefined || allowed.some((entry) => entry.toLowerCase() === origin.toLowerCase());
}

function refuse(socket: net.Socket, status: string): void {
  socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Type: text/plain\r\n\r\n${status}: origin not allowed\n`);
}

export async function listenWebSocket(
  { host, port, origins = [] }: { host: string; port: number; origins?: readonly string[] },
  accept: AcceptConnection,
  log: Logger,
): Promise<Listener> {
  const httpServer = http.createServer((_request, response) => {
    response.writeHead(426, { 'content-type': 'text/plain' }).end('QMP over WebSocket: connect with a WebSocket client\n');
  });
  const wss = new WebSocketServer({ noServer: true, maxPayload: MAX_FRAME, perMessageDeflate: false });
  const alive = new WeakMap<WebSocket, boolean>();

  httpServer.on('upgrade', (request, socket, head) => {
    if (!originAllowed(request.headers.origin, origins)) {
      log.warn({ origin: request.headers.origin, peer: request.socket.remoteAddress }, 'WebSocket handshake refused: origin not allowed');
      refuse(socket as net.Socket, '403 Forbidden');
      return;
    }
    wss.handleUpgrade(request, socket as net.Socket, head, (ws) => {
      const peer = `ws:${request.socket.remoteAddress}:${request.socket.remotePort}`;
      const handlers = accept(websocketConnection(ws, peer));
      alive.set(ws, true);
      ws.on('pong', () => alive.set(ws, true));
      ws.on('message', (data: Buffer | ArrayBuffer | Buffer[]) => {
        const chunk = Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data as ArrayBuffer);
        handlers.receive(chunk);
      });
      ws.on('error', () => ws.terminate());
      ws.on('close', () => handlers.close());
    });
  });

  const heartbeat = setInterval(() => {
    for (const ws of wss.clients) {
      if (!alive.get(ws)) ws.terminate();
      else {
        alive.set(ws, false);
        ws.ping();
      }
    }
  }, HEARTBEAT_MS);
  heartbeat.unref();

  await new Promise<void>((resolve, reject) => {
    httpServer.once('error', (error: NodeJS.ErrnoException) =>
      reject(new Error(`Failed to bind socket to ${host}:${port}: ${describeSocketError(error)}`)));
    httpServer.listen({ host, port }, resolve);
  });
  const bound = httpServer.address() as net.AddressInfo;
  return {
    address: `ws:${bound.address.includes(':') ? `[${bound.address}]` : bound.address}:${bound.port}`,
    close: () => new Promise<void>((resolve) => {
      clearInterval(heartbeat);
      for (const ws of wss.clients) ws.close(1001);
      wss.close();
      httpServer.close(() => resolve());
      setTimeout(() => {
        for (const ws of wss.clients) ws.terminate();
        httpServer.closeAllConnections();
      }, 200).unref();
    }),
  };
}
