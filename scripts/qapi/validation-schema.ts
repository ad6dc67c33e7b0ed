/*
 * Turns the model into the JSON Schemas that ajv compiles at start-up to check
 * command arguments. QEMU stops at the first problem in visiting order (each
 * member in declaration order, a nested struct's unexpected members before the
 * next sibling, the object's own unexpected members last), so every object
 * schema is an `allOf` in exactly that order and ajv runs with allErrors off:
 * the first error ajv reports is the one QEMU reports. Leaf checks use the
 * `qapi` keyword (src/qmp/argument-validator.ts) because QMP numbers are not
 * plain JavaScript numbers (int64/uint64 exactness, floats with integral value).
 */
import { isBuiltin, type Member, type ObjectType, type SchemaModel, type TypeUse } from './model.js';

export type JsonSchema = Record<string, unknown>;

export const DEFS_ID = 'qapi';

export function typeSchema(use: TypeUse): JsonSchema {
  if (typeof use !== 'string') return { allOf: [{ qapi: 'array' }, { items: typeSchema(use.array) }] };
  if (isBuiltin(use)) return use === 'any' ? {} : { qapi: use };
  return { $ref: `#/$defs/${use}` };
}

function memberCheck(member: Member): JsonSchema {
  const properties = { [member.name]: typeSchema(member.type) };
  return member.optional ? { properties } : { required: [member.name], properties };
}

function unexpectedCheck(members: Member[]): JsonSchema {
  return { properties: Object.fromEntries(members.map((member) => [member.name, true])), additionalProperties: false };
}

function objectSchema(model: SchemaModel, type: ObjectType): JsonSchema {
  const checks: JsonSchema[] = [{ qapi: 'object' }, ...type.members.map(memberCheck)];
  if (!type.variants) {
    checks.push(unexpectedCheck(type.members));
    return { allOf: checks };
  }
  const { tag } = type.variants;
  const tagType = model.types.get(type.members.find((member) => member.name === tag)!.type as string)!;
  if (tagType.meta !== 'enum') throw new Error(`${type.name}: tag is not an enum`);
  for (const value of tagType.values) {
    const branch = type.variants.cases.find((candidate) => candidate.name === value.name);
    const branchMembers = branch ? (model.types.get(branch.type) as ObjectType).members : [];
    checks.push({
      if: { properties: { [tag]: { const: value.name } } },
      then: { allOf: [...branchMembers.map(memberCheck), unexpectedCheck([...type.members, ...branchMembers])] },
    });
  }
  return { allOf: checks };
}

/** QEMU picks an alternate's branch by the JSON kind of the value; none fitting is a type error naming the alternate. */
function alternateSchema(model: SchemaModel, name: string, branches: { type: TypeUse }[]): JsonSchema {
  const kindOf = (use: TypeUse): string => {
    if (typeof use !== 'string') return 'array';
    if (isBuiltin(use)) {
      if (use === 'str') return 'str';
      if (use === 'bool') return 'bool';
      if (use === 'null') return 'null';
      return 'number';
    }
    const named = model.types.get(use)!;
    return named.meta === 'enum' ? 'str' : 'object';
  };
  let schema: JsonSchema = { qapi: { alternate: name } };
  for (const branch of [...branches].reverse()) {
    schema = { if: { qapi: kindOf(branch.type) }, then: typeSchema(branch.type), else: schema };
  }
  return schema;
}

/** One schema document holding a definition per named type; commands refer into it. */
export function buildValidationSchemas(model: SchemaModel): { defs: JsonSchema; commands: Record<string, string> } {
  const $defs: Record<string, JsonSchema> = {};
  for (const type of model.types.values()) {
    switch (type.meta) {
      case 'enum':
        $defs[type.name] = { allOf: [{ qapi: 'str' }, { enum: type.values.map((value) => value.name) }] };
        break;
      case 'object':
        $defs[type.name] = objectSchema(model, type);
        break;
      case 'alternate':
        $defs[type.name] = alternateSchema(model, type.name, type.branches);
        break;
    }
  }
  const commands = Object.fromEntries(model.commands.map((command) => [command.name, `${DEFS_ID}#/$defs/${command.argType}`]));
  return { defs: { $id: DEFS_ID, $defs }, commands };
}
