/*
 * The daemon's event bus: domain code (graph, jobs, exports) announces QMP
 * events here without knowing about QMP sessions; the QMP server listens and
 * fans each event out to every negotiated client. The timestamp is taken when
 * the event is raised, as QEMU does, not when it is written.
 */
import { EventEmitter } from 'eventemitter3';
import type { QmpEventMap, QmpEventName } from './generated/qapi-types.js';

export interface EventTimestamp {
  seconds: number;
  microseconds: number;
}

export interface RaisedEvent {
  event: string;
  data: unknown;
  timestamp: EventTimestamp;
}

export function wallClockTimestamp(): EventTimestamp {
  const micros = Math.floor((performance.timeOrigin + performance.now()) * 1000);
  return { seconds: Math.floor(micros / 1e6), microseconds: micros % 1e6 };
}

export class EventBus {
  private readonly emitter = new EventEmitter<{ event: [RaisedEvent] }>();

  emit<K extends QmpEventName>(event: K, data: QmpEventMap[K]): void {
    this.emitter.emit('event', { event, data, timestamp: wallClockTimestamp() });
  }

  /** Subscribes to every event; returns the unsubscribe function. */
  subscribe(listener: (event: RaisedEvent) => void): () => void {
    this.emitter.on('event', listener);
    return () => this.emitter.off('event', listener);
  }
}
