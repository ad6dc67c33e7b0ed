/*
 * Turns the tokens of one top-level value into a JsonValue, with the error
 * texts of QEMU's json-parser ("JSON parse error, expecting value", "...
 * duplicate key", ...). Only the first error counts, as in QEMU. Numbers keep
 * QEMU's kinds: int64, else uint64, else double (see value.ts).
 */
import { TokenType } from './lexer.js';
import { decodeCodepoint, isValidCodepoint, lossyDecode } from './modified-utf8.js';
import { JsonFloat, hasMember, setMember, type JsonObject, type JsonValue } from './value.js';

export interface Token {
  type: TokenType;
  text: Uint8Array;
}

class ParseError extends Error {}

const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;
const UINT64_MAX = 2n ** 64n - 1n;

export function parseTokens(tokens: Token[]): { value: JsonValue } | { error: string } {
  const parser = new TokenParser(tokens);
  try {
    return { value: parser.parseValue() };
  } catch (err) {
    if (err instanceof ParseError) return { error: `JSON parse error, ${err.message}` };
    throw err;
  }
}

class TokenParser {
  private pos = 0;

  constructor(private readonly tokens: Token[]) {}

  private peek(): Token {
    const token = this.tokens[this.pos];
    if (!token) throw new ParseError('premature EOI');
    return token;
  }

  private pop(): Token {
    const token = this.peek();
    this.pos++;
    return token;
  }

  parseValue(): JsonValue {
    const token = this.peek();
    switch (token.type) {
      case TokenType.LeftCurly: return this.parseObject();
      case TokenType.LeftSquare: return this.parseArray();
      case TokenType.String: this.pos++; return parseString(token.text);
      case TokenType.Integer: this.pos++; return parseInteger(ascii(token.text));
      case TokenType.Float: this.pos++; return parseFloatToken(ascii(token.text));
      case TokenType.Keyword: this.pos++; return parseKeyword(ascii(token.text));
      default: throw new ParseError('expecting value');
    }
  }

  private parseObject(): JsonObject {
    this.pop();
    const object: JsonObject = {};
    if (this.peek().type === TokenType.RightCurly) {
      this.pop();
      return object;
    }
    this.parsePair(object);
    for (let token = this.pop(); token.type !== TokenType.RightCurly; token = this.pop()) {
      if (token.type !== TokenType.Comma) throw new ParseError('expected separator in dict');
      this.parsePair(object);
    }
    return object;
  }

  private parsePair(object: JsonObject): void {
    const key = this.parseValue();
    if (typeof key !== 'string') throw new ParseError('key is not a string in object');
    if (this.pop().type !== TokenType.Colon) throw new ParseError('missing : in object pair');
    const value = this.parseValue();
    if (hasMember(object, key)) throw new ParseError('duplicate key');
    setMember(object, key, value);
  }

  private parseArray(): JsonValue[] {
    this.pop();
    const list: JsonValue[] = [];
    if (this.peek().type === TokenType.RightSquare) {
      this.pop();
      return list;
    }
    list.push(this.parseValue());
    for (let token = this.pop(); token.type !== TokenType.RightSquare; token = this.pop()) {
      if (token.type !== TokenType.Comma) throw new ParseError('expected separator in list');
      list.push(this.parseValue());
    }
    return list;
  }
}

function ascii(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length).toString('latin1');
}

function parseKeyword(word: string): JsonValue {
  if (word === 'true') return true;
  if (word === 'false') return false;
  if (word === 'null') return null;
  throw new ParseError(`invalid keyword '${word}'`);
}

function parseInteger(text: string): JsonValue {
  const value = BigInt(text);
  if (value >= INT64_MIN && value <= INT64_MAX || value >= 0n && value <= UINT64_MAX) {
    if (value >= BigInt(Number.MIN_SAFE_INTEGER) && value <= BigInt(Number.MAX_SAFE_INTEGER)) return Number(value);
    return value;
  }
  return parseFloatToken(text); // out of 64-bit range: QEMU falls back to a double
}

function parseFloatToken(text: string): JsonValue {
  const value = Number(text);
  return Number.isInteger(value) || Object.is(value, -0) || !Number.isFinite(value) ? new JsonFloat(value) : value;
}

const SIMPLE_ESCAPES: Record<number, string> = {
  0x22: '"', 0x27: "'", 0x5c: '\\', 0x2f: '/', 0x62: '\b', 0x66: '\f', 0x6e: '\n', 0x72: '\r', 0x74: '\t',
};

function hex4(bytes: Uint8Array, pos: number): number {
  let cp = 0;
  for (let i = 0; i < 4; i++) {
    const c = bytes[pos + i];
    if (c === undefined) return -1;
    let digit: number;
    if (c >= 0x30 && c <= 0x39) digit = c - 0x30;
    else if (c >= 0x61 && c <= 0x66) digit = c - 0x61 + 10;
    else if (c >= 0x41 && c <= 0x46) digit = c - 0x41 + 10;
    else return -1;
    cp = (cp << 4) | digit;
  }
  return cp;
}

/** Decodes a quoted string token (either quote style) with QEMU's escapes and checks. */
function parseString(bytes: Uint8Array): string {
  const end = bytes.length - 1; // index of the closing quote
  let out = '';
  let pos = 1;
  while (pos < end) {
    const byte = bytes[pos]!;
    if (byte !== 0x5c) {
      const { codepoint, next } = decodeCodepoint(bytes, pos, end);
      if (codepoint < 0) throw new ParseError('invalid UTF-8 sequence in string');
      out += String.fromCodePoint(codepoint);
      pos = next;
      continue;
    }
    const escapeStart = pos;
    const kind = bytes[pos + 1]!;
    pos += 2;
    const simple = SIMPLE_ESCAPES[kind];
    if (simple !== undefined) {
      out += simple;
      continue;
    }
    if (kind !== 0x75) throw new ParseError('invalid escape sequence in string');
    let cp = hex4(bytes, pos);
    pos += 4;
    if (cp >= 0xd800 && cp <= 0xdbff && bytes[pos] === 0x5c && bytes[pos + 1] === 0x75) {
      const trailing = hex4(bytes, pos + 2);
      if (trailing >= 0xdc00 && trailing <= 0xdfff) {
        cp = 0x10000 + ((cp & 0x3ff) << 10) + (trailing & 0x3ff);
        pos += 6;
      } else {
        cp = -1;
      }
    }
    if (!isValidCodepoint(cp)) {
      const quoted = lossyDecode(bytes.subarray(escapeStart, Math.min(pos, bytes.length)));
      throw new ParseError(`${quoted} is not a valid Unicode character`);
    }
    out += String.fromCodePoint(cp);
  }
  return out;
}
