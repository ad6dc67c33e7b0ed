/*
 * Which unexpected member QEMU names when there are several. QEMU's input
 * visitor copies an object's keys into a GHashTable (glib 2.74, g_str_hash),
 * removes each member as it is visited, then reports the first key left in
 * the table's iteration order. This replays that table (open addressing with
 * quadratic probing, tombstones, resizes) so blockd names the same member.
 */
import { encodeModifiedUtf8 } from './modified-utf8.js';

const UNUSED = 0;
const TOMBSTONE = 1;
const MIN_SHIFT = 3;
const PRIME_MOD = [1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071, 262139, 524287, 1048573];

function strHash(key: string): number {
  let h = 5381;
  for (const byte of encodeModifiedUtf8(key)) {
    const signed = byte > 127 ? byte - 256 : byte; // glib hashes signed chars
    h = (Math.imul(h, 33) + signed) >>> 0;
  }
  return h < 2 ? 2 : h;
}

class GlibStringSet {
  private size = 0;
  private mod = 0;
  private mask = 0;
  private hashes: number[] = [];
  private keys: (string | null)[] = [];
  private nodes = 0;
  private occupied = 0;

  constructor() {
    this.setShift(MIN_SHIFT);
    this.hashes = new Array(this.size).fill(UNUSED);
    this.keys = new Array(this.size).fill(null);
  }

  private setShift(shift: number): void {
    this.size = 1 << shift;
    this.mod = PRIME_MOD[shift]!;
    this.mask = this.size - 1;
  }

  private toIndex(hash: number): number {
    return Number((BigInt(hash) * 11n) & 0xffffffffn) % this.mod;
  }

  private lookup(key: string): { index: number; hash: number } {
    const hash = strHash(key);
    let index = this.toIndex(hash);
    let tombstone = -1;
    let step = 0;
    while (this.hashes[index] !== UNUSED) {
      if (this.hashes[index] === hash && this.keys[index] === key) return { index, hash };
      if (this.hashes[index] === TOMBSTONE && tombstone < 0) tombstone = index;
      step++;
      index = (index + step) & this.mask;
    }
    return { index: tombstone >= 0 ? tombstone : index, hash };
  }

  insert(key: string): void {
    const { index, hash } = this.lookup(key);
    const old = this.hashes[index]!;
    if (old >= 2) return;
    this.hashes[index] = hash;
    this.keys[index] = key;
    this.nodes++;
    if (old === UNUSED) {
      this.occupied++;
      this.maybeResize();
    }
  }

  remove(key: string): void {
    const { index } = this.lookup(key);
    if (this.hashes[index]! < 2) return;
    this.hashes[index] = TOMBSTONE;
    this.keys[index] = null;
    this.nodes--;
    this.maybeResize();
  }

  private maybeResize(): void {
    if ((this.size > this.nodes * 4 && this.size > 1 << MIN_SHIFT) || this.size <= this.occupied + Math.floor(this.occupied / 16)) this.resize();
  }

  private resize(): void {
    const oldSize = this.size;
    let wanted = Math.trunc(this.nodes * 1.333);
    let shift = 0;
    while (wanted) {
      wanted >>= 1;
      shift++;
    }
    this.setShift(Math.max(shift, MIN_SHIFT));
    if (this.size > oldSize) {
      this.hashes.length = this.size;
      this.keys.length = this.size;
      this.hashes.fill(UNUSED, oldSize);
      this.keys.fill(null, oldSize);
    }
    const relocated = new Array<boolean>(Math.max(this.size, oldSize)).fill(false);
    for (let i = 0; i < oldSize; i++) {
      let hash = this.hashes[i]!;
      if (hash < 2) {
        this.hashes[i] = UNUSED;
        continue;
      }
      if (relocated[i]) continue;
      this.hashes[i] = UNUSED;
      let key = this.keys[i]!;
      this.keys[i] = null;
      for (;;) {
        let index = this.toIndex(hash);
        let step = 0;
        while (relocated[index]) {
          step++;
          index = (index + step) & this.mask;
        }
        relocated[index] = true;
        const replacedHash = this.hashes[index]!;
        const replacedKey = this.keys[index]!;
        this.hashes[index] = hash;
        this.keys[index] = key;
        if (replacedHash < 2) break;
        hash = replacedHash;
        key = replacedKey;
      }
    }
    if (this.size < oldSize) {
      this.hashes.length = this.size;
      this.keys.length = this.size;
    }
    this.occupied = this.nodes;
  }

  first(): string | undefined {
    for (let i = 0; i < this.size; i++) if (this.hashes[i]! >= 2) return this.keys[i]!;
    return undefined;
  }
}

/**
 * The member QEMU reports as unexpected: `present` are the object's keys in QDict
 * order, `visited` the declared members in visiting order.
 */
export function firstUnexpectedMember(present: readonly string[], visited: readonly string[]): string | undefined {
  const table = new GlibStringSet();
  for (const key of present) table.insert(key);
  const keys = new Set(present);
  for (const member of visited) if (keys.has(member)) table.remove(member);
  return table.first();
}
