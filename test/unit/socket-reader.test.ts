/*
 * SocketReader on real sockets: an adopted socket (reused read buffers) delivers every byte in
 * order whether the consumer keeps up or lags behind by many reads, and what read() returned
 * stays intact after later reads reuse the buffers.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import { test } from 'node:test';
import { SocketReader } from '../../src/nbd/socket-reader.js';

/** A connected pair over loopback TCP: the accepted end adopted, the client end to write into. */
async function adoptedPair(): Promise<{ reader: SocketReader; socket: net.Socket; client: net.Socket; close(): void }> {
  const server = net.createServer({ pauseOnConnect: true });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  const { socket, reader } = SocketReader.adopt(await accepted);
  return {
    reader,
    socket,
    client,
    close: () => {
      client.destroy();
      socket.destroy();
      server.close();
    },
  };
}

/** Gives the event loop a turn (its poll phase), so that more reads land while the consumer is away. */
const lag = () => new Promise((resolve) => setImmediate(resolve));

test('an adopted socket delivers a large stream exactly, to a consumer that lags behind', async () => {
  const pair = await adoptedPair();
  try {
    const sent = randomBytes(24 << 20);
    pair.client.end(sent);
    const received = Buffer.alloc(sent.length);
    const held: { at: number; bytes: Buffer }[] = [];
    let at = 0;
    for (let step = 0; at < sent.length; step++) {
      // Alternate small framed reads (kept for later) with payload-sized copies and pauses.
      const small = Math.min(28, sent.length - at);
      const header = await pair.reader.read(small);
      header.copy(received, at);
      if (step % 50 === 0) held.push({ at, bytes: header });
      at += small;
      const size = Math.min([4096, 65536, 262144, 1 << 20][step % 4]!, sent.length - at);
      await pair.reader.readInto(received.subarray(at, at + size));
      at += size;
      if (step % 7 === 0) await lag();
    }
    assert.ok(received.equals(sent), 'the bytes arrive as sent');
    for (const { at: offset, bytes } of held) assert.ok(bytes.equals(sent.subarray(offset, offset + bytes.length)), `bytes read at ${offset} stay intact`);
  } finally {
    pair.close();
  }
});

test('an adopted socket reports the peer closing to a waiting read', async () => {
  const pair = await adoptedPair();
  try {
    pair.client.end(Buffer.from('abc'));
    assert.deepEqual(await pair.reader.read(3), Buffer.from('abc'));
    await assert.rejects(pair.reader.read(1), { name: 'ConnectionClosed' });
  } finally {
    pair.close();
  }
});
