/*
 * QEMU's "modified UTF-8": UTF-8 where NUL may also be written as C0 80, and
 * where surrogates, noncharacters and code points past U+10FFFF are invalid.
 * The parser uses it to decode strings, the writer to escape them, and error
 * texts that quote raw input bytes ("stray '...'") go through lossyDecode so
 * they reach the wire exactly as QEMU prints them.
 */

const MIN_CODEPOINT_FOR_LENGTH = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];

export function isValidCodepoint(cp: number): boolean {
  if (cp < 0 || cp > 0x10ffff) return false;
  if ((cp >= 0xfdd0 && cp <= 0xfdef) || (cp & 0xfffe) === 0xfffe) return false;
  if (cp >= 0xd800 && cp <= 0xdfff) return false;
  return true;
}

/**
 * Decodes one code point at bytes[pos]. Returns -1 as codepoint for an invalid
 * sequence; `next` is where decoding continues (past what was consumed).
 */
export function decodeCodepoint(bytes: Uint8Array, pos: number, end: number): { codepoint: number; next: number } {
  let p = pos;
  const lead = bytes[p++]!;
  if (lead < 0x80) return { codepoint: lead, next: p };
  if (lead >= 0xfe || (lead & 0x40) === 0) return { codepoint: -1, next: p };
  let length = 0;
  let mask = 0x80;
  while (lead & mask) {
    length++;
    mask >>= 1;
  }
  let cp = lead & (mask - 1);
  for (let i = 1; i < length; i++) {
    const byte = p < end ? bytes[p]! : 0;
    if ((byte & 0xc0) !== 0x80) return { codepoint: -1, next: p };
    p++;
    cp = (cp << 6) | (byte & 0x3f);
  }
  if (!isValidCodepoint(cp)) return { codepoint: -1, next: p };
  if (cp < MIN_CODEPOINT_FOR_LENGTH[length - 2]! && !(cp === 0 && length === 2)) return { codepoint: -1, next: p };
  return { codepoint: cp, next: p };
}

/** Raw bytes to a string, invalid sequences becoming U+FFFD the way QEMU's writer does it. */
export function lossyDecode(bytes: Uint8Array): string {
  let out = '';
  let pos = 0;
  while (pos < bytes.length) {
    if (bytes[pos] === 0) break; // QEMU strings end at NUL
    const { codepoint, next } = decodeCodepoint(bytes, pos, bytes.length);
    out += String.fromCodePoint(codepoint < 0 ? 0xfffd : codepoint);
    pos = next;
  }
  return out;
}

/** The bytes QEMU would hold for a string: UTF-8, with NUL as C0 80. */
export function encodeModifiedUtf8(text: string): Buffer {
  const utf8 = Buffer.from(text, 'utf8');
  if (!utf8.includes(0)) return utf8;
  const parts: number[] = [];
  for (const byte of utf8) {
    if (byte === 0) parts.push(0xc0, 0x80);
    else parts.push(byte);
  }
  return Buffer.from(parts);
}
