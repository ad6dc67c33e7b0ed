/*
 * Argument validation through ajv with QEMU's wording, on a fixture schema
 * that has every form (nested structs, a union, alternates, lists, all int
 * kinds). The expected texts are those of QEMU 7.2's input visitor.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { loadSchema } from '../../scripts/qapi/model.js';
import { buildValidationSchemas } from '../../scripts/qapi/validation-schema.js';
import { ArgumentValidator } from '../../src/qmp/argument-validator.js';
import { QmpError } from '../../src/errors.js';
import { JsonStreamParser } from '../../src/json/streamer.js';
import type { JsonObject } from '../../src/json/value.js';
import { REPO_ROOT } from '../helpers/paths.js';

const model = loadSchema(join(REPO_ROOT, 'test', 'fixtures', 'schema'));
const schemas = buildValidationSchemas(model);
const validator = new ArgumentValidator(schemas.defs, schemas.commands);

function check(command: string, text: string): string {
  let args: JsonObject | undefined;
  new JsonStreamParser((item) => {
    if ('value' in item) args = item.value as JsonObject;
  }).feed(Buffer.from(text));
  assert.ok(args, `fixture ${text} must parse`);
  try {
    validator.check(command, args);
    return 'OK';
  } catch (error) {
    assert.ok(error instanceof QmpError);
    assert.equal(error.errorClass, 'GenericError');
    return error.desc;
  }
}

const cases: [string, string, string][] = [
  ['try-all', '{}', "Parameter 'size' is missing"],
  ['try-all', '{"foo": 1}', "Parameter 'size' is missing"],
  ['try-all', '{"size": "x"}', "Parameter 'size' expects uint64"],
  ['try-all', '{"size": 1.5}', "Parameter 'size' expects uint64"],
  ['try-all', '{"size": -1}', 'OK'],
  ['try-all', '{"size": 18446744073709551615}', 'OK'],
  ['try-all', '{"size": 1, "count": -1}', "Parameter 'count' expects uint32_t"],
  ['try-all', '{"size": 1, "count": 4294967296}', "Parameter 'count' expects uint32_t"],
  ['try-all', '{"size": 1, "count": 4294967295}', 'OK'],
  ['try-all', '{"size": 1, "small": 200}', "Parameter 'small' expects int8_t"],
  ['try-all', '{"size": 1, "signed": 1e3}', "Invalid parameter type for 'signed', expected: integer"],
  ['try-all', '{"size": 1, "signed": 9223372036854775808}', "Invalid parameter type for 'signed', expected: integer"],
  ['try-all', '{"size": 1, "signed": -9223372036854775808}', 'OK'],
  ['try-all', '{"size": 1, "ratio": "x"}', "Invalid parameter type for 'ratio', expected: number"],
  ['try-all', '{"size": 1, "ratio": 1}', 'OK'],
  ['try-all', '{"size": 1, "node": 5}', "Invalid parameter type for 'node', expected: NodeRef"],
  ['try-all', '{"size": 1, "node": null}', "Invalid parameter type for 'node', expected: NodeRef"],
  ['try-all', '{"size": 1, "node": "some-node"}', 'OK'],
  ['try-all', '{"size": 1, "node": {"driver": "bogus"}}', "Parameter 'driver' does not accept value 'bogus'"],
  ['try-all', '{"size": 1, "node": {"driver": 1.0}}', "Invalid parameter type for 'node.driver', expected: string"],
  ['try-all', '{"size": 1, "node": {"driver": "file"}}', "Parameter 'node.filename' is missing"],
  ['try-all', '{"size": 1, "node": {"driver": "file", "filename": "a", "cache": {"direct": 1}}}', "Invalid parameter type for 'node.cache.direct', expected: boolean"],
  ['try-all', '{"size": 1, "node": {"driver": "file", "filename": "a", "cache": {"x": 1}, "zzz": 2}}', "Parameter 'node.cache.x' is unexpected"],
  ['try-all', '{"size": 1, "node": {"driver": "file", "filename": "a", "size": 2}}', "Parameter 'node.size' is unexpected"],
  ['try-all', '{"size": 1, "node": {"driver": "null-co", "size": 2, "read-zeroes": true}}', 'OK'],
  ['try-all', '{"size": 1, "node": {"driver": "old", "size": 2}}', "Parameter 'node.size' is unexpected"],
  ['try-all', '{"size": 1, "backing": null}', 'OK'],
  ['try-all', '{"size": 1, "backing": true}', "Invalid parameter type for 'backing', expected: NodeRefOrNull"],
  ['try-all', '{"size": 1, "names": ["a", 1]}', "Invalid parameter type for 'names[1]', expected: string"],
  ['try-all', '{"size": 1, "names": {}}', "Invalid parameter type for 'names', expected: array"],
  ['try-all', '{"size": 1, "drivers": ["bogus"]}', "Parameter 'null' does not accept value 'bogus'"],
  ['try-all', '{"size": 1, "actions": [{"type": "file", "data": {}}, {"type": "file", "data": {"size": "x"}}]}', "Invalid parameter type for 'actions[1].data.size', expected: integer"],
  ['try-all', '{"size": 1, "actions": [{"type": "bogus"}]}', "Parameter 'type' does not accept value 'bogus'"],
  ['try-all', '{"size": 1, "actions": [{"type": "file"}]}', "Parameter 'actions[0].data' is missing"],
  ['try-all', '{"size": 1, "anything": {"x": [1, null]}}', 'OK'],
  ['try-all', '{"size": 1, "flag": false}', 'OK'],
  ['try-all', '{"size": 1, "foo": 1}', "Parameter 'foo' is unexpected"],
  ['try-all', '{"size": 1, "__proto__": 1}', "Parameter '__proto__' is unexpected"],
  // Several unexpected members: QEMU names the first left in its GHashTable (observed on qemu-storage-daemon 7.2).
  ['no-args', '{"foo": 1, "bar": 2, "baz": 3}', "Parameter 'baz' is unexpected"],
  ['add-node', '{"driver": "null-co", "size": 5}', 'OK'],
  ['add-node', '{"driver": "null-co", "filename": 5}', "Parameter 'filename' is unexpected"],
  ['add-node', '{}', "Parameter 'driver' is missing"],
  ['add-node', '{"driver": "file", "read-only": "yes"}', "Invalid parameter type for 'read-only', expected: boolean"],
  ['no-args', '{"a": 1}', "Parameter 'a' is unexpected"],
  ['no-args', '{}', 'OK'],
];

for (const [command, args, expected] of cases) {
  test(`${command} ${args}`, () => {
    assert.equal(check(command, args), expected);
  });
}
