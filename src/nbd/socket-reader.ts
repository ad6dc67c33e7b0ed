/*
 * Reads exact byte counts from a stream socket, as a framing protocol needs:
 * incoming chunks are queued (never concatenated on arrival) and a read takes
 * exactly the bytes it asked for. The socket is paused while more than the
 * high-water mark waits unread, so a fast peer cannot fill memory.
 */
import type { Socket } from 'node:net';

const HIGH_WATER = 64 << 20;

export class ConnectionClosed extends Error {
  /** `failure`: the socket error that ended the connection (a reset), none for an orderly end. */
  constructor(message = 'connection closed', readonly failure?: Error) {
    super(message);
    this.name = 'ConnectionClosed';
  }
}

export class SocketReader {
  private readonly chunks: Buffer[] = [];
  private buffered = 0;
  private closedWith: Error | undefined;
  private waiter: { length: number; resolve: (data: Buffer) => void; reject: (error: Error) => void } | undefined;

  private readonly listeners: Record<'data' | 'end' | 'close' | 'error', (...args: any[]) => void>;

  constructor(private readonly socket: Socket) {
    this.listeners = {
      data: (chunk: Buffer) => {
        this.chunks.push(chunk);
        this.buffered += chunk.length;
        if (this.buffered > HIGH_WATER) socket.pause();
        this.serve();
      },
      end: () => this.close(new ConnectionClosed()),
      close: () => this.close(new ConnectionClosed()),
      error: (error: Error) => this.close(new ConnectionClosed(error.message, error)),
    };
    for (const [event, listener] of Object.entries(this.listeners)) socket.on(event, listener);
  }

  /**
   * Stops reading the socket, so that another layer (TLS) can take it over; returns the bytes
   * received but not read, which belong to that layer.
   */
  detach(): Buffer {
    if (this.waiter) throw new Error('SocketReader: detached while a read waits');
    for (const [event, listener] of Object.entries(this.listeners)) this.socket.off(event, listener);
    const rest = Buffer.concat(this.chunks);
    this.chunks.length = 0;
    this.buffered = 0;
    return rest;
  }

  /** Bytes received but not read yet. */
  get pending(): number {
    return this.buffered;
  }

  /** Resolves with exactly `length` bytes; rejects with ConnectionClosed if the peer goes first. */
  read(length: number): Promise<Buffer> {
    if (this.waiter) throw new Error('SocketReader: one read at a time');
    if (length === 0) return Promise.resolve(Buffer.alloc(0));
    if (this.buffered >= length) return Promise.resolve(this.take(length));
    if (this.closedWith) return Promise.reject(this.closedWith);
    return new Promise((resolve, reject) => {
      this.waiter = { length, resolve, reject };
      this.socket.resume();
    });
  }

  /** Fills `target` with the next bytes (a copy into a buffer the caller owns, e.g. a pooled one). */
  async readInto(target: Buffer): Promise<Buffer> {
    let filled = 0;
    while (filled < target.length) {
      if (this.buffered === 0) await this.read(1).then((byte) => (target[filled++] = byte[0]!));
      while (filled < target.length && this.chunks.length) {
        const chunk = this.chunks[0]!;
        const step = Math.min(chunk.length, target.length - filled);
        chunk.copy(target, filled, 0, step);
        filled += step;
        this.buffered -= step;
        if (step === chunk.length) this.chunks.shift();
        else this.chunks[0] = chunk.subarray(step);
      }
      if (this.buffered <= HIGH_WATER && this.socket.isPaused()) this.socket.resume();
    }
    return target;
  }

  private serve(): void {
    const waiter = this.waiter;
    if (!waiter || this.buffered < waiter.length) return;
    this.waiter = undefined;
    waiter.resolve(this.take(waiter.length));
  }

  private close(error: Error): void {
    if (this.closedWith) return;
    this.closedWith = error;
    const waiter = this.waiter;
    if (waiter && this.buffered < waiter.length) {
      this.waiter = undefined;
      waiter.reject(error);
    }
  }

  private take(length: number): Buffer {
    this.buffered -= length;
    if (this.buffered <= HIGH_WATER && this.socket.isPaused()) this.socket.resume();
    const first = this.chunks[0]!;
    if (first.length === length) return this.chunks.shift()!;
    if (first.length > length) {
      this.chunks[0] = first.subarray(length);
      return first.subarray(0, length);
    }
    const out = Buffer.allocUnsafe(length);
    let filled = 0;
    while (filled < length) {
      const chunk = this.chunks[0]!;
      const step = Math.min(chunk.length, length - filled);
      chunk.copy(out, filled, 0, step);
      filled += step;
      if (step === chunk.length) this.chunks.shift();
      else this.chunks[0] = chunk.subarray(step);
    }
    return out;
  }
}
