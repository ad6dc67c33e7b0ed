/* The JSON writer: QEMU's member order, number formats, escapes and pretty form. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { formatDouble, frameMessage, serialize } from '../../src/json/writer.js';
import { qdictOrder, tdbHash } from '../../src/json/qdict-order.js';
import { JsonFloat } from '../../src/json/value.js';

test('members come out in QDict order, as qemu-storage-daemon writes them', () => {
  assert.deepEqual(qdictOrder(['return', 'id']), ['return', 'id']);
  assert.deepEqual(qdictOrder(['id', 'error']), ['id', 'error']);
  assert.deepEqual(qdictOrder(['major', 'minor', 'micro']), ['micro', 'minor', 'major']);
  assert.deepEqual(qdictOrder(['event', 'data', 'timestamp']), ['timestamp', 'event', 'data']);
  assert.equal(serialize({ return: { qemu: { major: 7, minor: 2, micro: 22 }, package: 'p' }, id: 1 }),
    '{"return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "p"}, "id": 1}');
  assert.equal(typeof tdbHash('x'), 'number');
});

test('doubles print like printf %.17g', () => {
  const cases: [number, string][] = [
    [0.5, '0.5'], [0.1, '0.10000000000000001'], [1500, '1500'], [-0, '-0'], [1e300, '1.0000000000000001e+300'],
    [-1.25e-7, '-1.2499999999999999e-07'], [1e-5, '1.0000000000000001e-05'], [123.456, '123.456'], [1e17, '1e+17'],
    [12345678901234567, '12345678901234568'], [0.0001, '0.0001'], [Infinity, '1e+999'], [-Infinity, '-1e+999'],
  ];
  for (const [value, text] of cases) assert.equal(formatDouble(value), text, String(value));
  assert.equal(serialize([new JsonFloat(1000), 18446744073709551615n, 3]), '[1000, 18446744073709551615, 3]');
});

test('strings are pure ASCII with upper-case escapes', () => {
  assert.equal(serialize('a"\\/\b\f\n\r\t\u0001\u007fé😀\u0000'), '"a\\"\\\\/\\b\\f\\n\\r\\t\\u0001\\u007F\\u00E9\\uD83D\\uDE00\\u0000"');
});

test('pretty form matches QEMU, including split empty containers', () => {
  assert.equal(frameMessage({ return: {} }, true), '{\r\n    "return": {\r\n    }\r\n}\r\n');
  assert.equal(frameMessage({ return: [], id: [1, {}] }, true),
    '{\r\n    "return": [\r\n    ],\r\n    "id": [\r\n        1,\r\n        {\r\n        }\r\n    ]\r\n}\r\n');
  assert.equal(frameMessage({ return: {} }), '{"return": {}}\r\n');
});
