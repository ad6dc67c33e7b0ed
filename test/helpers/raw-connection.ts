/*
 * A byte-level QMP connection for protocol tests: sends exactly the bytes
 * given and returns each reply as its raw text (CRLF checked and stripped),
 * so tests compare what is on the wire, not a re-parsed object.
 */
import net from 'node:net';
import { WebSocket } from 'ws';

export class RawConnection {
  private buffer = '';
  private readonly lines: string[] = [];
  private waiter: (() => void) | undefined;
  closed = false;

  private constructor(private readonly sendBytes: (data: string | Buffer) => void, private readonly endFn: () => void) {}

  static open(address: string): Promise<RawConnection> {
    return new Promise((resolve, reject) => {
      if (address.startsWith('ws:')) {
        const socket = new WebSocket(`ws://${address.slice(3)}/`);
        const connection = new RawConnection((data) => socket.send(data), () => socket.close());
        socket.on('message', (data: Buffer) => connection.onFrame(data.toString('latin1')));
        socket.on('close', () => connection.onClose());
        socket.once('open', () => resolve(connection));
        socket.once('error', reject);
        return;
      }
      const match = /^tcp:(.*):([0-9]+)$/.exec(address);
      const socket = match ? net.connect({ host: match[1], port: Number(match[2]) }) : net.connect(address.replace(/^unix:/, ''));
      const connection = new RawConnection((data) => socket.write(data), () => socket.end());
      socket.on('data', (chunk) => connection.onData(chunk.toString('latin1')));
      socket.on('close', () => connection.onClose());
      socket.on('error', () => connection.onClose());
      socket.once('connect', () => resolve(connection));
      socket.once('error', reject);
    });
  }

  /** Opens a connection and completes capabilities negotiation (greeting and its reply consumed). */
  static async negotiated(address: string): Promise<RawConnection> {
    const connection = await RawConnection.open(address);
    await connection.readLine();
    connection.send('{"execute":"qmp_capabilities"}');
    await connection.readLine();
    return connection;
  }

  private onData(text: string): void {
    this.buffer += text;
    let index;
    while ((index = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, index + 1);
      this.buffer = this.buffer.slice(index + 1);
      if (!line.endsWith('\r\n')) throw new Error(`line without CRLF: ${JSON.stringify(line)}`);
      this.lines.push(line.slice(0, -2));
    }
    this.waiter?.();
  }

  /** WebSocket: each frame is one message; it must still end with CRLF. */
  private onFrame(text: string): void {
    if (!text.endsWith('\r\n')) throw new Error(`frame without CRLF: ${JSON.stringify(text)}`);
    this.lines.push(text.slice(0, -2));
    this.waiter?.();
  }

  private onClose(): void {
    this.closed = true;
    this.waiter?.();
  }

  send(data: string | Buffer): void {
    this.sendBytes(data);
  }

  end(): void {
    this.endFn();
  }

  /** The next reply line (without CRLF). */
  async readLine(timeoutMs = 5000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    while (!this.lines.length) {
      if (this.closed) throw new Error('connection closed');
      const left = deadline - Date.now();
      if (left <= 0) throw new Error('timed out waiting for a reply');
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.waiter = undefined;
    }
    return this.lines.shift()!;
  }

  async readLines(count: number, timeoutMs = 5000): Promise<string[]> {
    const lines: string[] = [];
    for (let i = 0; i < count; i++) lines.push(await this.readLine(timeoutMs));
    return lines;
  }

  /**
   * Asserts that the server has nothing more to say: the reply to a marker request must be the
   * next line, since whatever the server still had to send (a stray reply, an event) comes first.
   */
  async expectNothingMore(): Promise<void> {
    this.send('{"execute": "query-version", "id": "nothing-more"}');
    const line = await this.readLine();
    if (!line.includes('"id": "nothing-more"')) throw new Error(`unexpected message: ${line}`);
  }

  /** Waits until the peer closes the connection. */
  async waitClosed(timeoutMs = 5000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed) {
      if (Date.now() > deadline) throw new Error('connection still open');
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
}
