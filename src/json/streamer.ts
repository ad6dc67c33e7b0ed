/*
 * Splits a QMP byte stream into top-level JSON values the way QEMU's
 * json-streamer does: tokens are collected until braces and brackets balance
 * (or go negative), then parsed. Lexical errors and the size, count and depth
 * limits each produce one error and reset the state, so a client can always
 * get back to a clean parser.
 */
import { JsonLexer, MAX_TOKEN_SIZE, TokenType } from './lexer.js';
import { parseTokens, type Token } from './parser.js';
import { lossyDecode } from './modified-utf8.js';
import type { JsonValue } from './value.js';

const MAX_TOKEN_COUNT = 2 * 1024 * 1024;
const MAX_NESTING = 1024;

export type StreamItem = { value: JsonValue } | { error: string };

export class JsonStreamParser {
  private readonly lexer: JsonLexer;
  private tokens: Token[] = [];
  private braces = 0;
  private brackets = 0;
  private size = 0;

  constructor(private readonly sink: (item: StreamItem) => void) {
    this.lexer = new JsonLexer((type, text) => this.onToken(type, text));
  }

  feed(chunk: Uint8Array): void {
    this.lexer.feed(chunk);
  }

  private onToken(type: TokenType, text: Uint8Array): void {
    switch (type) {
      case TokenType.LeftCurly: this.braces++; break;
      case TokenType.RightCurly: this.braces--; break;
      case TokenType.LeftSquare: this.brackets++; break;
      case TokenType.RightSquare: this.brackets--; break;
      case TokenType.Error:
        return this.finish({ error: `JSON parse error, stray '${lossyDecode(text)}'` });
      case TokenType.Oversized:
        return this.finish({ error: 'JSON token size limit exceeded' });
      default: break;
    }
    if (this.size + text.length + 1 > MAX_TOKEN_SIZE) return this.finish({ error: 'JSON token size limit exceeded' });
    if (this.tokens.length + 1 > MAX_TOKEN_COUNT) return this.finish({ error: 'JSON token count limit exceeded' });
    if (this.braces + this.brackets > MAX_NESTING) return this.finish({ error: 'JSON nesting depth limit exceeded' });

    this.tokens.push({ type, text });
    this.size += text.length;
    if ((this.braces > 0 || this.brackets > 0) && this.braces >= 0 && this.brackets >= 0) return;
    this.finish(parseTokens(this.tokens));
  }

  private finish(item: StreamItem): void {
    this.tokens = [];
    this.braces = 0;
    this.brackets = 0;
    this.size = 0;
    this.sink(item);
  }
}
