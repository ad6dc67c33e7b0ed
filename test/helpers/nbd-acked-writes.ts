/*
 * A guest that keeps several NBD writes in flight (a few raw connections, a few requests
 * pipelined on each) and records exactly what the server acknowledged: each write's range,
 * data, and when it was sent and acknowledged on one logical clock, and which writes a
 * flush or FUA made durable (and when). A crash test kills the server in `onAck` and then
 * knows which writes it must find (acknowledged) and which it must read back (durable).
 * With `exclusive`, no two writes in flight overlap, so the acknowledged writes applied in
 * order are exactly what the disk holds; a test can pause the guest and wait for a number
 * of acknowledgements to move between the phases of a job.
 */
import { encodeRequestHeader } from '../../src/nbd/messages.js';
import { Command, CommandFlag } from '../../src/nbd/protocol.js';
import { NbdRawClient } from './nbd-raw-client.js';
import type { SeededRandom } from './qemu-tools.js';

export interface AckedWrite {
  offset: number;
  length: number;
  /** What the write put there; undefined for a write-zeroes. */
  data?: Buffer;
  /** Logical times: sent before `ackedAt`, acknowledged at `ackedAt`. */
  sentAt: number;
  ackedAt: number;
  /** Acknowledged with FUA, or covered by a flush acknowledged later on the same connection. */
  durable: boolean;
  /** The logical time it became durable (its FUA acknowledgement or the flush's); 0 while not durable. */
  durableAt: number;
}

export interface WriterOptions {
  socket: string;
  exportName: string;
  /** Where the writes land (each inside one of them, 512-byte aligned and at least 256 KiB long). */
  regions: { offset: number; length: number }[];
  random: SeededRandom;
  connections?: number;
  /** Requests each connection keeps in flight. */
  depth?: number;
  /** Called on every acknowledged write, with the number acknowledged so far (the place to kill the server). */
  onAck?: (acked: number) => void;
  /** Never two overlapping writes in flight at once (overlapping writes still follow each other). */
  exclusive?: boolean;
}

type Pending = { write: AckedWrite; fua: boolean } | { flushCovers: AckedWrite[] };

/** A write's range in one of the regions: often sector-aligned, sometimes any bytes (the server's read-modify-write). */
function randomRange(random: SeededRandom, regions: WriterOptions['regions']): { offset: number; length: number } {
  const region = random.pick(regions);
  if (random.chance(0.3)) {
    const length = 1 + random.int(12 * 1024);
    return { offset: region.offset + random.int(region.length - length + 1), length };
  }
  const length = random.pick([512, 4096, 4096, 16 * 1024, 64 * 1024, 192 * 1024]);
  return { offset: region.offset + random.int((region.length - length) / 512 + 1) * 512, length };
}

export class AckedWriter {
  /** Every write sent, in order; one never acknowledged keeps ackedAt 0 (it may or may not have reached the disk). */
  readonly sent: AckedWrite[] = [];
  /** The acknowledged writes, in the order of their acknowledgements. */
  readonly acked: AckedWrite[] = [];
  private clock = 0;
  private stopped = false;
  private paused = false;
  /** Wakes connections with nothing in flight when the guest resumes or stops. */
  private wakeUp = () => {};
  private woken = new Promise<void>((resolve) => (this.wakeUp = resolve));
  /** Writes in flight on every connection (what `exclusive` keeps apart). */
  private readonly inFlight = new Set<AckedWrite>();
  /** Requests in flight on every connection, flushes included. */
  private outstanding = 0;
  private ended = false;
  private readonly ackWaiters: { count: number; resolve: () => void; reject: (error: Error) => void }[] = [];
  private readonly idleWaiters: (() => void)[] = [];
  private readonly loops: Promise<void>[] = [];

  private constructor(private readonly options: WriterOptions, clients: NbdRawClient[]) {
    this.loops = clients.map((client) => this.run(client));
    void Promise.allSettled(this.loops).then(() => {
      this.ended = true;
      for (const waiter of this.ackWaiters.splice(0)) waiter.reject(new Error(`the writer ended after ${this.acked.length} acknowledged writes`));
      for (const wake of this.idleWaiters.splice(0)) wake();
    });
  }

  static async start(options: WriterOptions): Promise<AckedWriter> {
    const clients = await Promise.all(Array.from({ length: options.connections ?? 3 }, () => NbdRawClient.open(options.socket, options.exportName, [])));
    return new AckedWriter(options, clients);
  }

  /** The logical time now: a write sent after it is later than everything before. */
  now(): number {
    return ++this.clock;
  }

  /** Sends nothing more; the requests in flight may still be acknowledged. */
  stop(): void {
    this.stopped = true;
    this.wakeUp();
  }

  /** Sends nothing more for now; resolves once every request in flight was answered. */
  async pause(): Promise<void> {
    this.paused = true;
    if (this.outstanding > 0 && !this.ended) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
  }

  resume(): void {
    this.paused = false;
    const wakeUp = this.wakeUp;
    this.woken = new Promise<void>((resolve) => (this.wakeUp = resolve));
    wakeUp();
  }

  /** Resolves once `count` writes were acknowledged in all (rejects if the writer ends first). */
  acknowledged(count: number): Promise<void> {
    if (this.acked.length >= count) return Promise.resolve();
    if (this.ended) return Promise.reject(new Error(`the writer ended after ${this.acked.length} acknowledged writes`));
    return new Promise((resolve, reject) => this.ackWaiters.push({ count, resolve, reject }));
  }

  /** Resolves once every connection has ended (the server closed it, or it drained after stop()). */
  async finished(): Promise<void> {
    await Promise.all(this.loops);
  }

  /** A range for the next write; undefined when `exclusive` finds none clear of the writes in flight. */
  private pickRange(): { offset: number; length: number } | undefined {
    const { random, regions, exclusive } = this.options;
    for (let attempt = 0; attempt < 50; attempt++) {
      const range = randomRange(random, regions);
      const clear = !exclusive || ![...this.inFlight].some((write) => write.offset < range.offset + range.length && range.offset < write.offset + write.length);
      if (clear) return range;
    }
    return undefined;
  }

  private send(client: NbdRawClient, pending: Map<bigint, Pending>, connectionAcked: AckedWrite[]): void {
    const { random } = this.options;
    const range = random.chance(0.06) ? undefined : this.pickRange();
    this.outstanding++;
    if (!range) {
      const cookie = BigInt(this.now());
      client.socket.write(encodeRequestHeader({ flags: 0, type: Command.FLUSH, cookie, offset: 0, length: 0 }));
      pending.set(cookie, { flushCovers: [...connectionAcked] });
      return;
    }
    const { offset, length } = range;
    const zeroes = random.chance(0.1);
    const fua = random.chance(0.1);
    const data = zeroes ? undefined : random.bytes(length);
    const write: AckedWrite = { offset, length, data, sentAt: this.now(), ackedAt: 0, durable: false, durableAt: 0 };
    const cookie = BigInt(this.clock);
    // Cookies are send times: unique across the connections, and a reply names its request.
    client.socket.write(encodeRequestHeader({ flags: fua ? CommandFlag.FUA : 0, type: zeroes ? Command.WRITE_ZEROES : Command.WRITE, cookie, offset, length }));
    if (data) client.socket.write(data);
    this.sent.push(write);
    this.inFlight.add(write);
    pending.set(cookie, { write, fua });
  }

  /** One request answered: wakes whoever waits for this many acknowledgements or for the guest to be idle. */
  private answered(): void {
    this.outstanding--;
    for (const waiter of this.ackWaiters.filter((candidate) => candidate.count <= this.acked.length)) {
      this.ackWaiters.splice(this.ackWaiters.indexOf(waiter), 1);
      waiter.resolve();
    }
    if (this.outstanding === 0) for (const wake of this.idleWaiters.splice(0)) wake();
  }

  private async run(client: NbdRawClient): Promise<void> {
    const pending = new Map<bigint, Pending>();
    const connectionAcked: AckedWrite[] = [];
    const depth = this.options.depth ?? 4;
    try {
      for (;;) {
        while (!this.stopped && !this.paused && pending.size < depth) this.send(client, pending, connectionAcked);
        if (pending.size === 0) {
          if (this.stopped) break;
          await this.woken;
          continue;
        }
        const reply = await client.readReply();
        const request = pending.get(reply.cookie);
        if (!request) throw new Error(`a reply for cookie ${reply.cookie} that was not in flight`);
        pending.delete(reply.cookie);
        const error = reply.kind === 'simple' ? reply.error : reply.type & 0x8000 ? 1 : 0;
        if (error !== 0) throw new Error(`the server failed a ${'write' in request ? 'write' : 'flush'} (NBD error ${error})`);
        if ('flushCovers' in request) {
          const at = this.now();
          for (const write of request.flushCovers.filter((covered) => !covered.durable)) Object.assign(write, { durable: true, durableAt: at });
          this.answered();
          continue;
        }
        const { write } = request;
        write.ackedAt = this.now();
        write.durable = request.fua;
        if (request.fua) write.durableAt = write.ackedAt;
        this.inFlight.delete(write);
        connectionAcked.push(write);
        this.acked.push(write);
        this.options.onAck?.(this.acked.length);
        this.answered();
      }
      await client.disconnect();
    } catch (error) {
      // A server that was killed or stopped ends the connection mid-reply: what was acknowledged stands.
      if (!client.socket.destroyed && !client.socket.readableEnded) throw error;
      client.close();
    }
  }
}
