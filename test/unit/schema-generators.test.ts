/*
 * The schema pipeline: the model loader rejects malformed schemas, and the
 * introspection follows QEMU's generator rules (definition order, masking in
 * order of first use, int kinds as "int", unions flattened, features kept).
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { loadSchema } from '../../scripts/qapi/model.js';
import { buildIntrospection } from '../../scripts/qapi/introspection.js';
import { buildTypeScript } from '../../scripts/qapi/typescript-types.js';
import { REPO_ROOT } from '../helpers/paths.js';

const fixture = loadSchema(join(REPO_ROOT, 'test', 'fixtures', 'schema'));

function schemaWith(definitions: unknown[]): () => unknown {
  const dir = mkdtempSync(join(tmpdir(), 'blockd-schema-'));
  writeFileSync(join(dir, 'qapi-schema.json'), JSON.stringify({ include: ['m.json'] }));
  writeFileSync(join(dir, 'm.json'), JSON.stringify(definitions));
  return () => {
    try {
      return loadSchema(dir);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  };
}

test('malformed schemas are rejected with the definition named', () => {
  assert.throws(schemaWith([{ struct: 'A', data: { x: 'Nope' } }]), /unknown type 'Nope'/);
  assert.throws(schemaWith([{ struct: 'A', data: {} }, { struct: 'A', data: {} }]), /'A' is defined twice/);
  assert.throws(schemaWith([{ struct: 'A', data: {}, colour: 'red' }]), /struct 'A': unknown key 'colour'/);
  assert.throws(schemaWith([{ enum: 'E', data: ['a'] }, { union: 'U', base: { k: 'str' }, discriminator: 'k', data: {} }]), /must be of an enum type/);
  assert.throws(schemaWith([{ command: 'c', data: { '*bad name': 'str' } }]), /bad member name/);
});

test('introspection: commands and events first in definition order, then reachable types', () => {
  const info = buildIntrospection(fixture);
  const names = info.map((entry) => `${entry['meta-type']}:${entry.name}`);
  assert.deepEqual(names.slice(0, 4), ['command:try-all', 'command:add-node', 'command:no-args', 'event:SOMETHING_HAPPENED']);
  const tryAll = info[0]!;
  assert.equal(tryAll['arg-type'], '0');
  assert.equal(tryAll['ret-type'], '1');
  const noArgs = info[2]!;
  assert.equal(noArgs['allow-oob'], true);
  assert.deepEqual(noArgs.features, ['unstable']);
  assert.equal(noArgs['ret-type'], '[str]');
  // every type name but builtins and arrays is masked
  for (const entry of info.slice(4)) {
    if (entry['meta-type'] === 'builtin') assert.match(String(entry.name), /^(str|int|bool|null|number|any)$/);
    else if (entry['meta-type'] === 'array') assert.match(String(entry.name), /^\[.+\]$/);
    else assert.match(String(entry.name), /^[0-9]+$/);
  }
});

test('introspection: members, optional defaults, int kinds, features, union flattening', () => {
  const info = buildIntrospection(fixture);
  const byName = new Map(info.map((entry) => [entry.name as string, entry]));
  const args = byName.get('0')!;
  const members = args.members as { name: string; type: string; default?: null; features?: string[] }[];
  assert.deepEqual(members.find((m) => m.name === 'size'), { name: 'size', type: 'int' });
  assert.deepEqual(members.find((m) => m.name === 'count'), { name: 'count', type: 'int', default: null });
  assert.deepEqual(members.find((m) => m.name === 'flag'), { name: 'flag', type: 'bool', default: null, features: ['deprecated'] });
  assert.equal(members.find((m) => m.name === 'anything')!.type, 'any');
  const union = info.find((entry) => entry.tag === 'driver')!;
  assert.deepEqual((union.members as { name: string }[]).map((m) => m.name), ['driver', 'node-name', 'read-only']);
  assert.deepEqual((union.variants as { case: string }[]).map((v) => v.case), ['file', 'null-co']);
  const driverEnum = byName.get((union.members as { type: string }[])[0]!.type)!;
  assert.deepEqual(driverEnum.values, ['file', 'null-co', 'old']);
  assert.deepEqual((driverEnum.members as unknown[])[2], { name: 'old', features: ['deprecated'] });
  const alternate = info.find((entry) => entry['meta-type'] === 'alternate')!;
  assert.equal((alternate.members as { type: string }[])[1]!.type, 'str');
});

test('TypeScript generation names implicit types readably and maps commands and events', async () => {
  const source = await buildTypeScript(fixture);
  assert.match(source, /export interface TryAllArguments \{/);
  assert.match(source, /'try-all': \{ args: TryAllArguments; returns: void \};/);
  assert.match(source, /'no-args': \{ args: QmpEmpty; returns: string\[\] \};/);
  assert.match(source, /'SOMETHING_HAPPENED': SomethingHappenedArguments;/);
  assert.match(source, /export type NodeOptions =/);
});
