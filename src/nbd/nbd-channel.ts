/*
 * The connection an NBD handshake talks over: the socket and the reader of
 * its bytes. STARTTLS hands the socket to TLS, and both are replaced by their
 * TLS counterparts for the rest of the connection, on either end.
 */
import type { Socket } from 'node:net';
import { ProtocolViolation } from './messages.js';
import { SocketReader } from './socket-reader.js';

export interface NbdChannel {
  socket: Socket;
  reader: SocketReader;
}

export async function switchToTls(channel: NbdChannel, start: (socket: Socket) => Promise<Socket>): Promise<void> {
  // The peer waits for STARTTLS's answer before its first TLS byte: anything already here broke the protocol.
  if (channel.reader.detach().length > 0) throw new ProtocolViolation('data received before the TLS handshake');
  channel.socket = await start(channel.socket);
  channel.reader = new SocketReader(channel.socket);
}
