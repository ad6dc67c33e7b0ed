/* The QMP JSON stream: QEMU's dialect, error texts, limits and number kinds. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { JsonStreamParser, type StreamItem } from '../../src/json/streamer.js';
import { JsonFloat } from '../../src/json/value.js';

function parseAll(...chunks: (string | Buffer)[]): StreamItem[] {
  const items: StreamItem[] = [];
  const parser = new JsonStreamParser((item) => items.push(item));
  for (const chunk of chunks) parser.feed(typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : chunk);
  return items;
}

const errors = (items: StreamItem[]) => items.map((item) => ('error' in item ? item.error : 'value'));

test('values split across chunks and several values per chunk', () => {
  const items = parseAll('{"exe', 'cute": "a"}{"b":', ' [1, 2]}\n{"c": {}}');
  assert.deepEqual(items, [{ value: { execute: 'a' } }, { value: { b: [1, 2] } }, { value: { c: {} } }]);
});

test('top-level scalars need a delimiter, as in QEMU', () => {
  assert.deepEqual(parseAll('42'), []);
  assert.deepEqual(parseAll('42 '), [{ value: 42 }]);
  assert.deepEqual(parseAll('null'), []);
  assert.deepEqual(parseAll('"s"'), [{ value: 's' }]);
});

test('single quotes and escapes', () => {
  assert.deepEqual(parseAll(`{'a': 'it\\'s "x"', "b": "\\u00e9\\ud83d\\ude00\\/\\b\\f\\n\\r\\t"}`), [
    { value: { a: `it's "x"`, b: 'é😀/\b\f\n\r\t' } },
  ]);
});

test('integers keep QEMU kinds: int64, uint64, then double', () => {
  const [item] = parseAll('[0, -0, 9007199254740993, 18446744073709551615, -9223372036854775808, 18446744073709551616, 1.0, 1e3, 0.5]');
  assert.ok(item && 'value' in item);
  const [zero, minusZero, big, u64, i64min, tooBig, oneFloat, thousand, half] = item.value as unknown[];
  assert.equal(zero, 0);
  assert.ok(Object.is(minusZero, 0), '-0 is the integer 0');
  assert.equal(big, 9007199254740993n);
  assert.equal(u64, 18446744073709551615n);
  assert.equal(i64min, -9223372036854775808n);
  assert.ok(tooBig instanceof JsonFloat && tooBig.value === 18446744073709551616);
  assert.ok(oneFloat instanceof JsonFloat && oneFloat.value === 1);
  assert.ok(thousand instanceof JsonFloat && thousand.value === 1000);
  assert.equal(half, 0.5);
});

test('syntax errors carry QEMU texts', () => {
  assert.deepEqual(errors(parseAll('{"a": }')), ['JSON parse error, expecting value']);
  assert.deepEqual(errors(parseAll('{"a": 1,}')), ['JSON parse error, expecting value']);
  assert.deepEqual(errors(parseAll('{"a" 1}')), ['JSON parse error, missing : in object pair']);
  assert.deepEqual(errors(parseAll('{1: 2}')), ['JSON parse error, key is not a string in object']);
  assert.deepEqual(errors(parseAll('[1 2]')), ['JSON parse error, expected separator in list']);
  assert.deepEqual(errors(parseAll('{"a": 1 "b": 2}')), ['JSON parse error, expected separator in dict']);
  assert.deepEqual(errors(parseAll('[nul]')), ["JSON parse error, invalid keyword 'nul'"]);
  assert.deepEqual(errors(parseAll('{"a": 1, "a": 2}')), ['JSON parse error, duplicate key']);
  assert.deepEqual(errors(parseAll('["\\q"]')), ['JSON parse error, invalid escape sequence in string']);
  assert.deepEqual(errors(parseAll('["\\uFFFF"]')), ['JSON parse error, \\uFFFF is not a valid Unicode character']);
  assert.deepEqual(errors(parseAll('["\\uD800\\u0041"]')), ['JSON parse error, \\uD800 is not a valid Unicode character']);
});

test('lexical errors resynchronise at structural characters and control bytes', () => {
  assert.deepEqual(errors(parseAll(Buffer.from('\x01}', 'latin1'))), ["JSON parse error, stray '\u0001'", 'JSON parse error, expecting value']);
  assert.deepEqual(errors(parseAll(Buffer.from([0xff]))), ["JSON parse error, stray '\uFFFD'"]);
  // After an error, garbage is skipped up to a newline; the next value parses.
  const items = parseAll('{"a": 01 garbage\n{"ok": true}');
  assert.deepEqual(errors(items), ["JSON parse error, stray '01'", 'value']);
  assert.deepEqual(items[1], { value: { ok: true } });
});

test('strings must be valid modified UTF-8; C0 80 is NUL', () => {
  assert.deepEqual(errors(parseAll(Buffer.from([0x22, 0xc3, 0x28, 0x22]))), ['JSON parse error, invalid UTF-8 sequence in string']);
  assert.deepEqual(errors(parseAll(Buffer.from([0x22, 0xe0, 0x80, 0x80, 0x22]))), ['JSON parse error, invalid UTF-8 sequence in string']);
  assert.deepEqual(parseAll(Buffer.from([0x22, 0xc0, 0x80, 0x22])), [{ value: '\0' }]);
});

test('nesting deeper than 1024 is refused, and parsing restarts after it', () => {
  const items = parseAll('['.repeat(1025));
  assert.deepEqual(errors(items), ['JSON nesting depth limit exceeded']);
  assert.deepEqual(parseAll('['.repeat(1024) + ']'.repeat(1024)).length, 1);
});

test('a string over 64 MiB is refused without buffering it whole', () => {
  const items: StreamItem[] = [];
  const parser = new JsonStreamParser((item) => items.push(item));
  parser.feed(Buffer.from('"'));
  const block = Buffer.alloc(1 << 20, 0x61);
  for (let i = 0; i < 65; i++) parser.feed(block);
  assert.equal(errors(items)[0], 'JSON token size limit exceeded');
});
