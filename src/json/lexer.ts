/*
 * Byte-level JSON lexer with QEMU's dialect and recovery rules: single-quoted
 * strings and \' escapes are accepted, keywords are [a-z]+ (the parser rejects
 * unknown ones), and after a lexical error input is skipped up to the next
 * structural character or control byte, which is how a client resynchronises.
 * Numbers and keywords end on the byte after them (lookahead), so "42" is only
 * a token once a delimiter arrives, as in QEMU.
 */

export const enum TokenType {
  Error,
  LeftCurly,
  RightCurly,
  LeftSquare,
  RightSquare,
  Colon,
  Comma,
  Integer,
  Float,
  Keyword,
  String,
  /** A token that grew past the size limit; its text is dropped. */
  Oversized,
}

const enum State {
  Start,
  Recovery,
  DqString,
  DqEscape,
  SqString,
  SqEscape,
  Zero,
  Sign,
  Digits,
  Mantissa,
  MantissaDigits,
  ExpE,
  ExpSign,
  ExpDigits,
  Keyword,
}

export const MAX_TOKEN_SIZE = 64 * 1024 * 1024;

/*
 * A transition is one integer: the next state, or TOKEN + a token type, or ERROR;
 * LOOKAHEAD marks a byte that is only looked at and fed again from the new state.
 */
const TOKEN = 0x100;
const ERROR = 0x200;
const LOOKAHEAD = 0x1000;

const CHAR_0 = 0x30;
const CHAR_9 = 0x39;

function isDigit(byte: number): boolean {
  return byte >= CHAR_0 && byte <= CHAR_9;
}

export type TokenSink = (type: TokenType, text: Uint8Array) => void;

export class JsonLexer {
  private state = State.Start;
  private token = new Uint8Array(64);
  private length = 0;

  constructor(private readonly sink: TokenSink) {}

  feed(chunk: Uint8Array): void {
    for (let i = 0; i < chunk.length; i++) this.feedByte(chunk[i]!);
  }

  private feedByte(byte: number): void {
    for (;;) {
      const step = this.transition(byte);
      const lookahead = (step & LOOKAHEAD) !== 0;
      const target = step & ~LOOKAHEAD;
      if (!lookahead) this.append(byte);
      if (target & TOKEN) {
        this.emit(target & ~TOKEN);
        this.state = State.Start;
      } else if (target === ERROR) {
        this.emit(TokenType.Error);
        this.state = State.Recovery;
      } else {
        if (target === State.Start || target === State.Recovery) this.length = 0;
        this.state = target;
      }
      if (!lookahead) break;
    }
    if (this.length > MAX_TOKEN_SIZE) {
      this.length = 0;
      this.token = new Uint8Array(64);
      this.sink(TokenType.Oversized, new Uint8Array(0));
      this.state = State.Start;
    }
  }

  private emit(type: TokenType): void {
    const text = this.token.slice(0, this.length);
    this.length = 0;
    if (this.token.length > 1 << 20) this.token = new Uint8Array(64); // give back a huge string's buffer
    this.sink(type, text);
  }

  private append(byte: number): void {
    if (this.length === this.token.length) {
      const grown = new Uint8Array(this.token.length * 2);
      grown.set(this.token);
      this.token = grown;
    }
    this.token[this.length++] = byte;
  }

  private transition(byte: number): number {
    const error = ERROR;
    switch (this.state) {
      case State.Start:
        switch (byte) {
          case 0x22: return (State.DqString);
          case 0x27: return (State.SqString);
          case CHAR_0: return (State.Zero);
          case 0x2d: return (State.Sign);
          case 0x7b: return (TOKEN | TokenType.LeftCurly);
          case 0x7d: return (TOKEN | TokenType.RightCurly);
          case 0x5b: return (TOKEN | TokenType.LeftSquare);
          case 0x5d: return (TOKEN | TokenType.RightSquare);
          case 0x2c: return (TOKEN | TokenType.Comma);
          case 0x3a: return (TOKEN | TokenType.Colon);
          case 0x20: case 0x09: case 0x0d: case 0x0a: return (State.Start);
        }
        if (byte >= 0x31 && byte <= CHAR_9) return (State.Digits);
        if (byte >= 0x61 && byte <= 0x7a) return (State.Keyword);
        return error;
      case State.Recovery:
        // Skip to a structural character, a control byte other than TAB, or 0xFE/0xFF.
        if (byte === 0x09) return (State.Recovery);
        if (byte < 0x20 || byte >= 0xfe) return (LOOKAHEAD | State.Start);
        if (byte === 0x5b || byte === 0x5d || byte === 0x7b || byte === 0x7d || byte === 0x3a || byte === 0x2c) {
          return (LOOKAHEAD | State.Start);
        }
        return (State.Recovery);
      case State.DqString:
      case State.SqString: {
        const quote = this.state === State.DqString ? 0x22 : 0x27;
        if (byte < 0x20 || byte > 0xfd) return error;
        if (byte === 0x5c) return (this.state === State.DqString ? State.DqEscape : State.SqEscape);
        if (byte === quote) return (TOKEN | TokenType.String);
        return (this.state);
      }
      case State.DqEscape:
      case State.SqEscape:
        if (byte < 0x20 || byte > 0xfd) return error;
        return (this.state === State.DqEscape ? State.DqString : State.SqString);
      case State.Zero:
        if (isDigit(byte)) return error;
        if (byte === 0x2e) return (State.Mantissa);
        return (LOOKAHEAD | TOKEN | TokenType.Integer);
      case State.Sign:
        if (byte === CHAR_0) return (State.Zero);
        if (isDigit(byte)) return (State.Digits);
        return error;
      case State.Digits:
        if (isDigit(byte)) return (State.Digits);
        if (byte === 0x65 || byte === 0x45) return (State.ExpE);
        if (byte === 0x2e) return (State.Mantissa);
        return (LOOKAHEAD | TOKEN | TokenType.Integer);
      case State.Mantissa:
        if (isDigit(byte)) return (State.MantissaDigits);
        return error;
      case State.MantissaDigits:
        if (isDigit(byte)) return (State.MantissaDigits);
        if (byte === 0x65 || byte === 0x45) return (State.ExpE);
        return (LOOKAHEAD | TOKEN | TokenType.Float);
      case State.ExpE:
        if (byte === 0x2b || byte === 0x2d) return (State.ExpSign);
        if (isDigit(byte)) return (State.ExpDigits);
        return error;
      case State.ExpSign:
        if (isDigit(byte)) return (State.ExpDigits);
        return error;
      case State.ExpDigits:
        if (isDigit(byte)) return (State.ExpDigits);
        return (LOOKAHEAD | TOKEN | TokenType.Float);
      case State.Keyword:
        if (byte >= 0x61 && byte <= 0x7a) return (State.Keyword);
        return (LOOKAHEAD | TOKEN | TokenType.Keyword);
    }
  }
}
