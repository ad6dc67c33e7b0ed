/*
 * Generates TypeScript types for every schema type with
 * json-schema-to-typescript, plus the maps that type the command registry and
 * the event bus: QmpCommandMap (command -> arguments and return type) and
 * QmpEventMap (event -> data). Implicit QAPI types get readable names
 * (q_obj_query-version-arg -> QueryVersionArguments).
 */
import { compile, type JSONSchema } from 'json-schema-to-typescript';
import { isBuiltin, type SchemaModel, type TypeUse, EMPTY_OBJECT } from './model.js';

function pascal(name: string): string {
  const shouting = name === name.toUpperCase(); // event names: SOMETHING_HAPPENED -> SomethingHappened
  return name.split(/[-_]/).filter(Boolean)
    .map((part) => part[0]!.toUpperCase() + (shouting ? part.slice(1).toLowerCase() : part.slice(1))).join('');
}

/** The TypeScript name of a named schema type. */
export function tsTypeName(name: string): string {
  if (name === EMPTY_OBJECT) return 'QmpEmpty';
  const argument = /^q_obj_(.+)-arg$/.exec(name);
  if (argument) return `${pascal(argument[1]!)}Arguments`;
  const base = /^q_obj_(.+)-base$/.exec(name);
  if (base) return `${pascal(base[1]!)}Base`;
  return pascal(name);
}

const BUILTIN_SCHEMAS: Record<string, JSONSchema> = {
  str: { type: 'string' }, bool: { type: 'boolean' }, null: { type: 'null' }, number: { type: 'number' }, any: { tsType: 'unknown' },
};

function use(typeUse: TypeUse): JSONSchema {
  if (typeof typeUse !== 'string') return { type: 'array', items: use(typeUse.array) };
  if (isBuiltin(typeUse)) return BUILTIN_SCHEMAS[typeUse] ?? { type: 'integer' };
  return { $ref: `#/definitions/${typeUse}` };
}

function tsUse(typeUse: TypeUse): string {
  if (typeof typeUse !== 'string') return `${tsUse(typeUse.array)}[]`;
  if (isBuiltin(typeUse)) {
    const scalar: Record<string, string> = { str: 'string', bool: 'boolean', null: 'null', any: 'unknown' };
    return scalar[typeUse] ?? 'number';
  }
  return tsTypeName(typeUse);
}

export async function buildTypeScript(model: SchemaModel): Promise<string> {
  const definitions: Record<string, JSONSchema> = {};
  for (const type of model.types.values()) {
    const title = tsTypeName(type.name);
    const described = type.doc ? { description: type.doc } : {};
    if (type.meta === 'enum') {
      definitions[type.name] = { title, ...described, type: 'string', enum: type.values.map((value) => value.name) };
    } else if (type.meta === 'alternate') {
      definitions[type.name] = { title, ...described, anyOf: type.branches.map((branch) => use(branch.type)) };
    } else {
      const objectOf = (members: typeof type.members, extra: Record<string, JSONSchema> = {}): JSONSchema => ({
        type: 'object',
        properties: { ...Object.fromEntries(members.map((member) => [member.name, member.doc ? { ...use(member.type), description: member.doc } : use(member.type)])), ...extra },
        required: members.filter((member) => !member.optional).map((member) => member.name),
        additionalProperties: false,
      });
      if (!type.variants) {
        definitions[type.name] = { title, ...described, ...objectOf(type.members) };
      } else {
        const { tag, cases } = type.variants;
        const tagEnum = model.types.get(type.members.find((member) => member.name === tag)!.type as string)!;
        const branches = (tagEnum.meta === 'enum' ? tagEnum.values : []).map((value) => {
          const branch = cases.find((candidate) => candidate.name === value.name);
          const members = [...type.members.filter((member) => member.name !== tag), ...(branch ? (model.types.get(branch.type) as typeof type).members : [])];
          const schema = objectOf(members, { [tag]: { const: value.name } as JSONSchema });
          (schema.required as string[]).unshift(tag);
          return schema;
        });
        definitions[type.name] = { title, ...described, oneOf: branches };
      }
    }
  }
  const source = await compile(
    { title: 'QapiSchemaRoot', type: 'object', properties: {}, additionalProperties: false, definitions } as JSONSchema,
    'QapiSchemaRoot',
    { bannerComment: '', additionalProperties: false, unreachableDefinitions: true, declareExternallyReferenced: true, format: true, strictIndexSignatures: true },
  );

  const commandMap = model.commands.map((command) => {
    const returns = command.returnsSomething ? tsUse(command.retType) : 'void';
    return `  '${command.name}': { args: ${tsTypeName(command.argType)}; returns: ${returns} };`;
  });
  const eventMap = model.events.map((event) => `  '${event.name}': ${event.hasData ? tsTypeName(event.argType) : 'undefined'};`);
  return [
    '/* Generated from schema/ by scripts/gen-schema.ts. Do not edit. */',
    '/* eslint-disable */',
    source.replace(/export interface QapiSchemaRoot \{\}\n?/, ''),
    '/** Every command: its argument object and its return value. */',
    'export interface QmpCommandMap {',
    ...commandMap,
    '}',
    '',
    '/** Every event and the type of its data member. */',
    'export interface QmpEventMap {',
    ...eventMap,
    '}',
    '',
    'export type QmpCommandName = keyof QmpCommandMap;',
    'export type QmpEventName = keyof QmpEventMap;',
    '',
  ].join('\n');
}
