/*
 * A set of bits that scales to whole disks (a 1 TiB disk at 64 KiB granularity is 16 Mi
 * bits): 32-bit words, with the number of bits set kept per block of words, so ranges are
 * set and cleared a word at a time and searches skip empty (or full) blocks without
 * looking at their words.
 */

const WORDS_PER_BLOCK = 1024;
const BITS_PER_BLOCK = WORDS_PER_BLOCK * 32;

function popcount(word: number): number {
  let v = word - ((word >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (Math.imul((v + (v >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24);
}

/** The bits [from, to) of one word, as a mask (0 <= from < to <= 32). */
function mask(from: number, to: number): number {
  const high = to === 32 ? 0xffffffff : (1 << to) - 1;
  return (high & ~((1 << from) - 1)) >>> 0;
}

/** The index of the lowest bit set in a non-zero word. */
function lowestBit(word: number): number {
  return 31 - Math.clz32(word & -word);
}

export class GranuleBits {
  private words: Uint32Array;
  private blockCounts: Uint32Array;
  private total = 0;

  constructor(private bits: number) {
    this.words = new Uint32Array(Math.ceil(bits / 32));
    this.blockCounts = new Uint32Array(Math.ceil(this.words.length / WORDS_PER_BLOCK));
  }

  get size(): number {
    return this.bits;
  }

  /** How many bits are set. */
  count(): number {
    return this.total;
  }

  has(bit: number): boolean {
    return (this.words[bit >>> 5]! & (1 << (bit & 31))) !== 0;
  }

  /** Sets bits [first, end). */
  set(first: number, end: number): void {
    this.change(first, end, true);
  }

  /** Clears bits [first, end). */
  clear(first: number, end: number): void {
    this.change(first, end, false);
  }

  /** Sets every bit set in `other` (of the same size): a merge. */
  or(other: GranuleBits): void {
    for (let i = 0; i < this.words.length; i++) {
      const merged = (this.words[i]! | (other.words[i] ?? 0)) >>> 0;
      if (merged !== this.words[i]) this.replaceWord(i, merged);
    }
  }

  /**
   * Bits [first, first + count) as bytes, the lowest bit of each byte first (qcow2's bitmap
   * data and QEMU's serialisation); `first` is a multiple of 32. Bits past the end read clear.
   */
  toBytes(first: number, count: number): Buffer {
    const bytes = Buffer.alloc(Math.ceil(count / 8));
    const words = new Uint32Array(Math.ceil(count / 32));
    words.set(this.words.subarray(first >>> 5, (first >>> 5) + words.length));
    for (let i = 0; i < words.length; i++) {
      const at = i * 4;
      if (at + 4 <= bytes.length) bytes.writeUInt32LE(words[i]!, at);
      else for (let b = at; b < bytes.length; b++) bytes[b] = (words[i]! >>> ((b - at) * 8)) & 0xff;
    }
    if (count & 7) bytes[bytes.length - 1]! &= (1 << (count & 7)) - 1;
    return bytes;
  }

  /** Sets the bits `bytes` has set (as toBytes lays them out) from bit `first`, a multiple of 32. */
  orBytes(first: number, bytes: Buffer): void {
    for (let at = 0; at < bytes.length; at += 4) {
      let word = 0;
      for (let b = 0; b < 4 && at + b < bytes.length; b++) word |= bytes[at + b]! << (b * 8);
      const index = (first >>> 5) + at / 4;
      if (word === 0 || index >= this.words.length) continue;
      if (index === this.words.length - 1 && this.bits & 31) word &= mask(0, this.bits & 31);
      const merged = (this.words[index]! | word) >>> 0;
      if (merged !== this.words[index]) this.replaceWord(index, merged);
    }
  }

  /** The first set bit in [from, to), or -1. */
  findSet(from: number, to: number = this.bits): number {
    return this.find(from, to, true);
  }

  /** The first clear bit in [from, to), or -1. */
  findClear(from: number, to: number = this.bits): number {
    return this.find(from, to, false);
  }

  /** A new size: bits beyond a smaller size are dropped, new ones start clear. */
  resize(bits: number): void {
    const old = this.words;
    this.bits = bits;
    this.words = new Uint32Array(Math.ceil(bits / 32));
    this.words.set(old.subarray(0, this.words.length));
    if (bits & 31 && this.words.length > 0) this.words[this.words.length - 1]! &= mask(0, bits & 31);
    this.blockCounts = new Uint32Array(Math.ceil(this.words.length / WORDS_PER_BLOCK));
    this.total = 0;
    for (let i = 0; i < this.words.length; i++) {
      const count = popcount(this.words[i]!);
      this.blockCounts[Math.floor(i / WORDS_PER_BLOCK)]! += count;
      this.total += count;
    }
  }

  private change(first: number, end: number, value: boolean): void {
    end = Math.min(end, this.bits);
    for (let bit = Math.max(0, first); bit < end;) {
      const index = bit >>> 5;
      const upTo = Math.min(end - index * 32, 32);
      const bits = mask(bit & 31, upTo);
      const word = this.words[index]!;
      const updated = (value ? word | bits : word & ~bits) >>> 0;
      if (updated !== word) this.replaceWord(index, updated);
      bit = index * 32 + upTo;
    }
  }

  private replaceWord(index: number, value: number): void {
    const delta = popcount(value) - popcount(this.words[index]!);
    this.words[index] = value;
    this.blockCounts[Math.floor(index / WORDS_PER_BLOCK)]! += delta;
    this.total += delta;
  }

  private find(from: number, to: number, value: boolean): number {
    to = Math.min(to, this.bits);
    for (let bit = Math.max(0, from); bit < to;) {
      const block = Math.floor(bit / BITS_PER_BLOCK);
      const blockBits = Math.min(BITS_PER_BLOCK, this.bits - block * BITS_PER_BLOCK);
      const count = this.blockCounts[block]!;
      if (value ? count === 0 : count === blockBits) {
        bit = (block + 1) * BITS_PER_BLOCK; // nothing to find in this block
        continue;
      }
      const index = bit >>> 5;
      const word = value ? this.words[index]! : ~this.words[index]! >>> 0;
      const candidates = (word & mask(bit & 31, 32)) >>> 0;
      if (candidates !== 0) {
        const found = index * 32 + lowestBit(candidates);
        return found < to ? found : -1;
      }
      bit = (index + 1) * 32;
    }
    return -1;
  }
}
