/*
 * One QMP client connection, independent of its transport: greeting,
 * capabilities negotiation, the JSON stream parser, the in-band queue with
 * QEMU's flow control (one queued request without OOB, eight with it; reading
 * pauses beyond that), immediate execution of exec-oob requests, and delivery
 * of events once negotiation is complete. Each session has its own state;
 * nothing here outlives the connection.
 */
import type { Logger } from 'pino';
import type { RaisedEvent } from '../event-bus.js';
import { protocolErrors } from './errors.js';
import type { SessionControl } from '../command-table.js';
import type { CommandRegistry } from './command-registry.js';
import type { InBandScheduler, RequestQueueOwner } from './in-band-scheduler.js';
import { dispatchRequest, isOutOfBand } from './request-dispatch.js';
import { JsonStreamParser, type StreamItem } from '../json/streamer.js';
import { frameMessage } from '../json/writer.js';
import type { JsonObject, JsonValue } from '../json/value.js';

/** What a transport offers a session: bytes out, flow control, closing. */
export interface Connection {
  readonly description: string;
  write(text: string): void;
  pause(): void;
  resume(): void;
  close(): void;
}

export interface SessionOptions {
  registry: CommandRegistry;
  scheduler: InBandScheduler;
  log: Logger;
  pretty: boolean;
  /** The greeting's version object (the query-version answer). */
  version: () => JsonObject;
  offeredCapabilities: string[];
}

const QUEUE_LIMIT_WITH_OOB = 8;

let nextSessionId = 1;

export class QmpSession implements RequestQueueOwner, SessionControl {
  readonly id = nextSessionId++;
  negotiated = false;
  private oobEnabled = false;
  private closed = false;
  private paused = false;
  private inputEnded = false;
  private running = 0;
  private readonly queue: StreamItem[] = [];
  private readonly parser = new JsonStreamParser((item) => this.onItem(item));
  private readonly log: Logger;
  private readonly commandLogs = new Map<string, Logger>();

  constructor(private readonly connection: Connection, private readonly options: SessionOptions) {
    this.log = options.log.child({ session: this.id });
  }

  start(): void {
    this.log.debug({ peer: this.connection.description }, 'client connected');
    this.send({ QMP: { version: this.options.version(), capabilities: this.options.offeredCapabilities } });
  }

  receive(chunk: Uint8Array): void {
    if (!this.closed) this.parser.feed(chunk);
  }

  /** The client sent EOF: finish what it asked for, then close our side. */
  endOfInput(): void {
    this.inputEnded = true;
    this.closeIfDone();
  }

  private closeIfDone(): void {
    if (this.inputEnded && !this.closed && this.queue.length === 0 && this.running === 0) this.connection.close();
  }

  /** The transport went away: drop queued requests; a running command finishes but its reply is discarded. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.queue.length = 0;
    this.options.scheduler.forget(this);
    this.log.debug('client disconnected');
  }

  negotiate(capabilities: string[]): void {
    if (this.negotiated) throw protocolErrors.negotiationComplete();
    const unavailable = capabilities.filter((name) => !this.options.offeredCapabilities.includes(name));
    if (unavailable.length) throw protocolErrors.capabilityNotAvailable(unavailable);
    this.oobEnabled = capabilities.includes('oob');
    this.negotiated = true;
  }

  deliverEvent(event: RaisedEvent): void {
    if (!this.negotiated || this.closed) return;
    const message: JsonObject = { timestamp: { ...event.timestamp }, event: event.event };
    if (event.data !== undefined) message.data = event.data as JsonValue;
    this.send(message);
  }

  private send(message: JsonObject): void {
    if (this.closed) return;
    this.log.trace({ out: message }, 'qmp send');
    this.connection.write(frameMessage(message, this.options.pretty));
  }

  private get queueLimit(): number {
    return this.oobEnabled ? QUEUE_LIMIT_WITH_OOB : 1;
  }

  private onItem(item: StreamItem): void {
    if ('value' in item && isOutOfBand(item.value)) {
      void this.execute(item.value);
      return;
    }
    this.queue.push(item);
    if (this.queue.length >= this.queueLimit && !this.paused) {
      this.paused = true;
      this.connection.pause();
    }
    this.options.scheduler.wake(this);
  }

  async runNext(): Promise<boolean> {
    const item = this.queue.shift();
    if (!item) return false;
    if ('error' in item) {
      this.send({ error: { class: 'GenericError', desc: item.error } });
      this.closeIfDone();
    } else {
      await this.execute(item.value);
    }
    if (this.paused && !this.closed && this.queue.length < this.queueLimit) {
      this.paused = false;
      this.connection.resume();
    }
    return true;
  }

  private commandLog(command: string): Logger {
    let log = this.commandLogs.get(command);
    if (!log) {
      log = this.log.child({ cmd: command });
      this.commandLogs.set(command, log);
    }
    return log;
  }

  private async execute(request: JsonValue): Promise<void> {
    this.log.trace({ in: request }, 'qmp request');
    this.running++;
    try {
      const response = await dispatchRequest(
        request,
        this.options.registry,
        { negotiated: this.negotiated, oobEnabled: this.oobEnabled },
        { session: this, log: this.log, commandLog: (command) => this.commandLog(command) },
      );
      this.send(response);
    } finally {
      this.running--;
      this.closeIfDone();
    }
  }
}
