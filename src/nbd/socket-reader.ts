/*
 * Reads exact byte counts from a stream socket, as a framing protocol needs:
 * incoming chunks are queued (never concatenated on arrival) and a read takes
 * exactly the bytes it asked for. The socket is paused while more than the
 * high-water mark waits unread, so a fast peer cannot fill memory.
 */
import { Socket } from 'node:net';

const HIGH_WATER = 64 << 20;
/** Each of the two buffers an adopted socket reads into. */
const SCRATCH = 256 << 10;

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

  private readonly listeners: Partial<Record<'data' | 'end' | 'close' | 'error', (...args: any[]) => void>>;

  /** `scratch`: the reused buffers an adopted socket's bytes arrive in through receive() (see adopt), instead of 'data' events. */
  constructor(private readonly socket: Socket, private readonly scratch: readonly ArrayBufferLike[] = []) {
    this.listeners = {
      end: () => this.close(new ConnectionClosed()),
      close: () => this.close(new ConnectionClosed()),
      error: (error: Error) => this.close(new ConnectionClosed(error.message, error)),
    };
    if (scratch.length === 0) this.listeners.data = (chunk: Buffer) => this.receive(chunk);
    for (const [event, listener] of Object.entries(this.listeners)) socket.on(event, listener);
  }

  /**
   * Takes over an accepted socket that has not started reading (the server's pauseOnConnect):
   * a new Socket on its handle reads into two buffers used in turn instead of a fresh 64 KiB
   * buffer per read, whose external memory made V8 run a full garbage collection every few
   * dozen MiB a client wrote. Bytes not consumed by the time their buffer comes round again
   * are copied out first; read() hands out copies, readInto() copies into the caller's buffer.
   */
  static adopt(accepted: Socket): { socket: Socket; reader: SocketReader } {
    const scratch = [Buffer.allocUnsafeSlow(SCRATCH), Buffer.allocUnsafeSlow(SCRATCH)];
    let turn = 0;
    let reader: SocketReader | undefined;
    const internals = accepted as unknown as { _handle: unknown; _server: unknown };
    const socket = new Socket({
      handle: internals._handle,
      allowHalfOpen: false,
      onread: {
        // Called before each read, right after the previous one was received.
        buffer: () => {
          turn ^= 1;
          reader?.evict(scratch[turn]!);
          return scratch[turn]!;
        },
        callback: (bytes: number, buffer: Uint8Array) => {
          reader!.receive((buffer as Buffer).subarray(0, bytes));
        },
      },
    } as ConstructorParameters<typeof Socket>[0]);
    // The server counts its open connections through the socket it made: the new one closes instead.
    (socket as unknown as { _server: unknown })._server = internals._server;
    internals._server = null;
    reader = new SocketReader(socket, scratch.map((buffer) => buffer.buffer));
    socket.resume();
    return { socket, reader };
  }

  private receive(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    if (this.buffered > HIGH_WATER) this.socket.pause();
    this.serve();
  }

  /** The bytes still queued in `scratch` are copied out: the next read overwrites it. */
  private evict(scratch: Buffer): void {
    for (let i = 0; i < this.chunks.length; i++) {
      if (this.chunks[i]!.buffer === scratch.buffer) this.chunks[i] = Buffer.from(this.chunks[i]!);
    }
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

  /** Exactly `length` bytes, off the queue; a copy when they are in one of the reused buffers. */
  private take(length: number): Buffer {
    const data = this.takeQueued(length);
    return this.scratch.includes(data.buffer) ? Buffer.from(data) : data;
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

  private takeQueued(length: number): Buffer {
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
