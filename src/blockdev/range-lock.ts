/*
 * A fair asynchronous lock over byte ranges: shared holders of overlapping
 * ranges run together, an exclusive holder runs alone on its range, and a
 * request waits for every earlier conflicting request (holding or queued),
 * so writers are never starved. Drivers use it to keep a cluster from being
 * freed or reallocated while a request still reads or writes it.
 */

interface Entry {
  start: number;
  end: number;
  exclusive: boolean;
  granted: boolean;
  grant: () => void;
}

export type Release = () => void;

export class RangeLock {
  private readonly entries: Entry[] = [];

  private static conflicts(a: Entry, b: Entry): boolean {
    return (a.exclusive || b.exclusive) && a.start < b.end && b.start < a.end;
  }

  /** Takes [start, end) shared or exclusive; resolves with the release function. */
  acquire(start: number, end: number, exclusive: boolean): Promise<Release> {
    return new Promise((resolve) => {
      const entry: Entry = { start, end, exclusive, granted: false, grant: () => {} };
      entry.grant = () => {
        entry.granted = true;
        resolve(() => this.release(entry));
      };
      this.entries.push(entry);
      this.grantReady();
    });
  }

  private release(entry: Entry): void {
    const index = this.entries.indexOf(entry);
    if (index >= 0) this.entries.splice(index, 1);
    this.grantReady();
  }

  private grantReady(): void {
    for (let i = 0; i < this.entries.length; i++) {
      const entry = this.entries[i]!;
      if (entry.granted) continue;
      let blocked = false;
      for (let j = 0; j < i && !blocked; j++) blocked = RangeLock.conflicts(this.entries[j]!, entry);
      if (!blocked) entry.grant();
    }
  }
}
