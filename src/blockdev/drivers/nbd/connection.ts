/*
 * The nbd node's link to its server across connection losses, with QEMU's
 * semantics: open-timeout bounds how long the first connection may be retried;
 * after a drop, requests wait up to reconnect-delay seconds while a background
 * loop reconnects (backing off 1, 2, 4 ... 16 s), then fail with EIO until it
 * succeeds. A server that broke the protocol is not reconnected to.
 */
import type { Logger } from 'pino';
import type { SocketAddress } from '../../../generated/qapi-types.js';
import { SocketReader } from '../../../nbd/socket-reader.js';
import { genericError } from '../../../errors.js';
import { IoError } from '../../io-error.js';
import { negotiate, type ClientTls, type ExportInfo } from './negotiate.js';
import { NbdSession, SessionLost } from './session.js';
import { connectSocket } from './socket-connect.js';

export interface ServerTarget {
  address: SocketAddress;
  exportName: string;
  /** The block status context to ask for: base:allocation, or the one x-dirty-bitmap names. */
  statusQuery: string;
  /** Seconds requests wait for a reconnection (0: they fail at once). */
  reconnectDelay: number;
  /** Seconds the first connection may be retried (0: one attempt). */
  openTimeout: number;
  /** TLS for every connection (tls-creds), reconnections included. */
  tls?: ClientTls;
}

/** Checks that a (re)negotiated export suits the node; throws if it does not. */
export type ExportCheck = (info: ExportInfo) => void;

type State = 'connected' | 'waiting' | 'failing' | 'closed';

const MAX_PAUSE_SECONDS = 16;

/** A pause that close() can cut short. */
class Pause {
  private wake: (() => void) | undefined;

  sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => this.wake?.(), ms);
      this.wake = () => {
        clearTimeout(timer);
        this.wake = undefined;
        resolve();
      };
    });
  }

  cancel(): void {
    this.wake?.();
  }
}

async function connectOnce(target: ServerTarget, log: Logger, signal?: AbortSignal): Promise<NbdSession> {
  const socket = await connectSocket(target.address, signal);
  const channel = { socket, reader: new SocketReader(socket) };
  const onAbort = () => channel.socket.destroy();
  signal?.addEventListener('abort', onAbort, { once: true });
  try {
    const info = await negotiate(channel, target.exportName, target.statusQuery, target.tls);
    return new NbdSession(channel.socket, channel.reader, info, log);
  } catch (error) {
    throw signal?.aborted ? genericError('Connection attempt cancelled by timeout') : error;
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
}

export class NbdConnection {
  private state: State = 'connected';
  private reconnecting = false;
  private delayTimer: NodeJS.Timeout | undefined;
  private readonly waiters = new Set<{ resolve(): void; reject(error: Error): void }>();
  private readonly pause = new Pause();
  private lastFailure: Error | undefined;

  private constructor(private session: NbdSession, private readonly target: ServerTarget, private readonly check: ExportCheck, private readonly log: Logger) {
    this.watch(session);
  }

  /** Connects (retrying until open-timeout) and checks the export once; the first failure's text is QEMU's. */
  static async open(target: ServerTarget, check: ExportCheck, log: Logger): Promise<NbdConnection> {
    const abort = new AbortController();
    const timer = target.openTimeout > 0 ? setTimeout(() => abort.abort(), target.openTimeout * 1000) : undefined;
    const pause = new Pause();
    abort.signal.addEventListener('abort', () => pause.cancel());
    let session: NbdSession | undefined;
    let lastError: unknown;
    try {
      for (let seconds = 1; !session; seconds = Math.min(2 * seconds, MAX_PAUSE_SECONDS)) {
        try {
          session = await connectOnce(target, log, abort.signal);
        } catch (error) {
          // The timeout reports the last real failure, as QEMU does, when there was one.
          lastError = abort.signal.aborted && lastError ? lastError : error;
          if (!timer || abort.signal.aborted) throw lastError;
          await pause.sleep(seconds * 1000);
          if (abort.signal.aborted) throw lastError;
        }
      }
    } finally {
      clearTimeout(timer);
    }
    try {
      check(session.info);
    } catch (error) {
      await session.disconnect();
      throw error;
    }
    return new NbdConnection(session, target, check, log);
  }

  /** A getter, not an inline comparison, so that TypeScript does not narrow `state` across awaits. */
  private get closed(): boolean {
    return this.state === 'closed';
  }

  /** What the current (or last) connection negotiated. */
  get info(): ExportInfo {
    return this.session.info;
  }

  /** Runs `request` on a live session; a request cut off by a dropped connection is sent again after a reconnection. */
  async run<T>(request: (session: NbdSession) => Promise<T>): Promise<T> {
    for (;;) {
      const session = await this.liveSession();
      try {
        return await request(session);
      } catch (error) {
        if (!(error instanceof SessionLost)) throw error;
        this.lost(session, error);
        // Sent again only while waiting for (or after) a reconnection, as QEMU does with reconnect-delay.
        if (this.state === 'failing' || this.state === 'closed') throw new IoError('EIO', `NBD connection lost: ${error.message}`);
      }
    }
  }

  async close(): Promise<void> {
    this.enter('closed');
    this.pause.cancel();
    await this.session.disconnect();
  }

  private async liveSession(): Promise<NbdSession> {
    for (;;) {
      if (this.state === 'connected') {
        const { failure } = this.session;
        if (!failure) return this.session;
        this.lost(this.session, failure); // seen before the session's end was announced
        continue;
      }
      if (this.state === 'closed') throw new IoError('EIO', this.lastFailure?.message ?? 'NBD connection closed');
      this.reconnectInBackground();
      if (this.state !== 'waiting') throw new IoError('EIO', 'NBD server not connected');
      // QEMU starts the delay with the first request that has to wait for the server.
      this.delayTimer ??= setTimeout(() => this.enter('failing'), this.target.reconnectDelay * 1000);
      await new Promise<void>((resolve, reject) => this.waiters.add({ resolve, reject }));
    }
  }

  private watch(session: NbdSession): void {
    void session.ended.then((lost) => this.lost(session, lost));
  }

  private lost(session: NbdSession, lost: SessionLost): void {
    if (session !== this.session || this.state !== 'connected') return;
    if (lost.violation) {
      this.lastFailure = lost;
      this.enter('closed');
      return;
    }
    this.log.warn({ reason: lost.message }, 'NBD connection lost');
    this.enter(this.target.reconnectDelay > 0 ? 'waiting' : 'failing');
  }

  private enter(state: State): void {
    this.state = state;
    clearTimeout(this.delayTimer);
    this.delayTimer = undefined;
    for (const waiter of this.waiters) {
      if (state === 'connected') waiter.resolve();
      else if (state !== 'waiting') waiter.reject(new IoError('EIO', 'NBD server did not come back in time'));
    }
    if (state !== 'waiting') this.waiters.clear();
  }

  /** Tries to connect until it succeeds or the node closes; requests pick the new session up. */
  private reconnectInBackground(): void {
    if (this.reconnecting || this.state === 'closed') return;
    this.reconnecting = true;
    void (async () => {
      for (let seconds = 1; !this.closed; seconds = Math.min(2 * seconds, MAX_PAUSE_SECONDS)) {
        try {
          const session = await connectOnce(this.target, this.log);
          try {
            if (this.closed) throw new Error('node closed');
            this.check(session.info);
          } catch (error) {
            await session.disconnect();
            throw error;
          }
          this.session = session;
          this.watch(session);
          this.log.info('NBD connection re-established');
          this.enter('connected');
          return;
        } catch (error) {
          if (this.closed) return;
          this.log.debug({ err: error }, 'NBD reconnection attempt failed');
          await this.pause.sleep(seconds * 1000);
        }
      }
    })().finally(() => {
      this.reconnecting = false;
    });
  }
}
