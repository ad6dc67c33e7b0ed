/*
 * Serialises values as QEMU's JSON writer does, so that replies are
 * byte-identical to qemu-storage-daemon's: members in QDict order, ", " and
 * ": " separators, pure ASCII output with upper-case \uXXXX escapes, doubles
 * as printf("%.17g"), and the pretty form of `--monitor pretty=on`
 * (4-space indent, empty containers split over two lines).
 */
import { qdictOrder } from './qdict-order.js';
import { JsonFloat, type JsonValue } from './value.js';

const SHORT_ESCAPES: Record<number, string> = {
  0x22: '\\"', 0x5c: '\\\\', 0x08: '\\b', 0x0c: '\\f', 0x0a: '\\n', 0x0d: '\\r', 0x09: '\\t',
};

function hex4(value: number): string {
  return value.toString(16).toUpperCase().padStart(4, '0');
}

export function quoteString(text: string): string {
  let out = '"';
  for (const char of text) {
    const cp = char.codePointAt(0)!;
    const short = SHORT_ESCAPES[cp];
    if (short !== undefined) out += short;
    else if (cp > 0xffff) out += `\\u${hex4(0xd800 + ((cp - 0x10000) >> 10))}\\u${hex4(0xdc00 + ((cp - 0x10000) & 0x3ff))}`;
    else if (cp < 0x20 || cp >= 0x7f) out += `\\u${hex4(cp)}`;
    else out += char;
  }
  return out + '"';
}

/**
 * C's printf("%.17g", value), except for infinities: QEMU prints "inf", which is not
 * JSON and breaks every client parser; 1e+999 is valid JSON that reads back as infinity.
 */
export function formatDouble(value: number): string {
  if (Number.isNaN(value)) return 'null';
  if (!Number.isFinite(value)) return value > 0 ? '1e+999' : '-1e+999';
  if (value === 0) return Object.is(value, -0) ? '-0' : '0';
  const [mantissa, exponentText] = value.toExponential(16).split('e') as [string, string];
  const exponent = Number(exponentText);
  const negative = mantissa.startsWith('-');
  const digits = mantissa.replace('-', '').replace('.', '');
  const trim = (text: string) => (text.includes('.') ? text.replace(/0+$/, '').replace(/\.$/, '') : text);
  let body: string;
  if (exponent < -4 || exponent >= 17) {
    const sign = exponent < 0 ? '-' : '+';
    body = `${trim(`${digits[0]}.${digits.slice(1)}`)}e${sign}${String(Math.abs(exponent)).padStart(2, '0')}`;
  } else if (exponent < 0) {
    body = trim(`0.${'0'.repeat(-exponent - 1)}${digits}`);
  } else {
    body = trim(`${digits.slice(0, exponent + 1)}.${digits.slice(exponent + 1)}`);
  }
  return negative ? `-${body}` : body;
}

function formatNumber(value: number | bigint | JsonFloat): string {
  if (value instanceof JsonFloat) return formatDouble(value.value);
  if (typeof value === 'bigint') return value.toString();
  if (Number.isInteger(value)) return value === 0 ? '0' : String(value);
  return formatDouble(value);
}

class Writer {
  private out = '';
  private depth = 0;
  private needComma = false;
  private readonly inArray: boolean[] = [];

  constructor(private readonly pretty: boolean) {}

  result(): string {
    return this.out;
  }

  private newline(): void {
    if (this.pretty) this.out += '\n' + ' '.repeat(this.depth * 4);
  }

  private beginItem(name: string | undefined): void {
    if (this.needComma) {
      this.out += ',';
      if (this.pretty) this.newline();
      else this.out += ' ';
    } else {
      if (this.out.length) this.newline();
      this.needComma = true;
    }
    if (name !== undefined) this.out += quoteString(name) + ': ';
  }

  private enter(isArray: boolean, open: string): void {
    this.out += open;
    this.inArray.push(isArray);
    this.depth++;
    this.needComma = false;
  }

  private leave(close: string): void {
    this.inArray.pop();
    this.depth--;
    this.needComma = true;
    this.newline();
    this.out += close;
  }

  write(value: JsonValue | undefined, name?: string): void {
    if (value === undefined) return; // absent optional members are simply not written
    this.beginItem(name);
    if (value === null) this.out += 'null';
    else if (typeof value === 'boolean') this.out += value ? 'true' : 'false';
    else if (typeof value === 'string') this.out += quoteString(value);
    else if (typeof value === 'number' || typeof value === 'bigint' || value instanceof JsonFloat) this.out += formatNumber(value);
    else if (Array.isArray(value)) {
      this.enter(true, '[');
      for (const element of value) this.writeElement(element);
      this.leave(']');
    } else {
      this.enter(false, '{');
      const keys = qdictOrder(Object.keys(value).filter((key) => value[key] !== undefined));
      for (const key of keys) this.write(value[key], key);
      this.leave('}');
    }
  }

  private writeElement(value: JsonValue | undefined): void {
    // QEMU lists cannot hold "nothing"; an undefined element is written as null.
    this.write(value === undefined ? null : value);
  }
}

/** One message as QEMU writes it, without the line end. */
export function serialize(value: JsonValue, pretty = false): string {
  const writer = new Writer(pretty);
  writer.write(value);
  return writer.result();
}

/** One message framed for the wire: every newline is CRLF, as the monitor sends it. */
export function frameMessage(value: JsonValue, pretty = false): string {
  const text = serialize(value, pretty);
  return (pretty ? text.replace(/\n/g, '\r\n') : text) + '\r\n';
}
