/*
 * Loads schema/*.json (the QAPI-like source form described in schema/README.md)
 * and resolves it into a model: named types with flattened members, implicit
 * argument and base types named as QAPI names them, commands and events in
 * definition order. Every generator in scripts/ works from this model, and it
 * rejects a malformed schema with a message naming the definition at fault.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

export const BUILTIN_JSON_TYPES = {
  str: 'string', number: 'number', int: 'int', int8: 'int', int16: 'int', int32: 'int', int64: 'int',
  uint8: 'int', uint16: 'int', uint32: 'int', uint64: 'int', size: 'int', bool: 'boolean', null: 'null', any: 'value',
} as const;
export type BuiltinName = keyof typeof BUILTIN_JSON_TYPES;

export function isBuiltin(name: string): name is BuiltinName {
  return Object.prototype.hasOwnProperty.call(BUILTIN_JSON_TYPES, name);
}

/** A reference to a type: a name, or an array of one. */
export type TypeUse = string | { array: TypeUse };

export interface Member {
  name: string;
  type: TypeUse;
  optional: boolean;
  features: string[];
  doc?: string;
}

export interface EnumType {
  meta: 'enum';
  name: string;
  values: { name: string; features: string[] }[];
  features: string[];
  doc?: string;
}

export interface ObjectType {
  meta: 'object';
  name: string;
  /** All members in visiting order: base members first. */
  members: Member[];
  /** For unions: the tag member and the branch type (an object type) per tag value. */
  variants?: { tag: string; cases: { name: string; type: string }[] };
  features: string[];
  implicit: boolean;
  doc?: string;
}

export interface AlternateType {
  meta: 'alternate';
  name: string;
  branches: { name: string; type: TypeUse }[];
  features: string[];
  doc?: string;
}

export type NamedType = EnumType | ObjectType | AlternateType;

export interface Command {
  name: string;
  argType: string;
  retType: TypeUse;
  returnsSomething: boolean;
  boxed: boolean;
  allowOob: boolean;
  features: string[];
  doc?: string;
  module: string;
  /** Index of the definition among all definitions, for definition-order listings. */
  position: number;
}

export interface Event {
  name: string;
  argType: string;
  hasData: boolean;
  boxed: boolean;
  features: string[];
  doc?: string;
  module: string;
  position: number;
}

export interface SchemaModel {
  types: Map<string, NamedType>;
  commands: Command[];
  events: Event[];
  modules: string[];
}

export const EMPTY_OBJECT = 'q_empty';

type MembersSource = Record<string, unknown>;

class SchemaError extends Error {}

function fail(where: string, message: string): never {
  throw new SchemaError(`${where}: ${message}`);
}

const NAME_PATTERN = /^[A-Za-z][A-Za-z0-9_-]*$/;
const ENUM_VALUE_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/;

function stringList(where: string, value: unknown): string[] {
  if (value === undefined) return [];
  if (!Array.isArray(value) || value.some((item) => typeof item !== 'string')) fail(where, 'features must be a list of strings');
  return value as string[];
}

function typeUse(where: string, value: unknown): TypeUse {
  if (typeof value === 'string') return value;
  if (Array.isArray(value) && value.length === 1 && typeof value[0] === 'string') return { array: value[0] };
  return fail(where, `a type is a name or a one-element list, not ${JSON.stringify(value)}`);
}

function checkKeys(where: string, definition: Record<string, unknown>, allowed: string[]): void {
  for (const key of Object.keys(definition)) {
    if (!allowed.includes(key)) fail(where, `unknown key '${key}'`);
  }
}

function parseMembers(where: string, source: unknown): Member[] {
  if (typeof source !== 'object' || source === null || Array.isArray(source)) fail(where, "'data' must be an object of members");
  return Object.entries(source as MembersSource).map(([rawName, spec]) => {
    const optional = rawName.startsWith('*');
    const name = optional ? rawName.slice(1) : rawName;
    if (!NAME_PATTERN.test(name)) fail(where, `bad member name '${rawName}'`);
    if (typeof spec === 'object' && spec !== null && !Array.isArray(spec)) {
      const long = spec as Record<string, unknown>;
      checkKeys(`${where} member '${name}'`, long, ['type', 'features', 'doc']);
      return {
        name, optional, type: typeUse(`${where} member '${name}'`, long.type),
        features: stringList(where, long.features), doc: long.doc as string | undefined,
      };
    }
    return { name, optional, type: typeUse(`${where} member '${name}'`, spec), features: [] };
  });
}

/** Reads the module list and every module, in order. */
export function loadSchema(schemaDir: string): SchemaModel {
  const index = JSON.parse(readFileSync(join(schemaDir, 'qapi-schema.json'), 'utf8')) as { include: string[] };
  const definitions: { module: string; definition: Record<string, unknown> }[] = [];
  for (const module of index.include) {
    const list = JSON.parse(readFileSync(join(schemaDir, module), 'utf8')) as unknown;
    if (!Array.isArray(list)) fail(module, 'a module is a JSON array of definitions');
    for (const definition of list) definitions.push({ module, definition: definition as Record<string, unknown> });
  }
  return resolve(definitions);
}

function resolve(definitions: { module: string; definition: Record<string, unknown> }[]): SchemaModel {
  const model: SchemaModel = { types: new Map(), commands: [], events: [], modules: [] };
  const pendingStructs: { where: string; type: ObjectType; base?: string; own: Member[] }[] = [];
  const pendingUnions: { where: string; type: ObjectType; base: string; cases: Record<string, unknown> }[] = [];
  const addType = (where: string, type: NamedType) => {
    if (isBuiltin(type.name) || model.types.has(type.name)) fail(where, `type '${type.name}' is defined twice`);
    model.types.set(type.name, type);
  };
  model.types.set(EMPTY_OBJECT, { meta: 'object', name: EMPTY_OBJECT, members: [], features: [], implicit: true });

  for (const [position, { module, definition }] of definitions.entries()) {
    if (!model.modules.includes(module)) model.modules.push(module);
    const kind = ['enum', 'struct', 'union', 'alternate', 'command', 'event'].find((key) => key in definition);
    if (!kind) fail(module, `definition without a kind: ${JSON.stringify(definition).slice(0, 80)}`);
    const name = definition[kind] as string;
    const where = `${module}: ${kind} '${name}'`;
    if (typeof name !== 'string' || !NAME_PATTERN.test(name)) fail(module, `bad ${kind} name ${JSON.stringify(name)}`);
    const features = stringList(where, definition.features);
    const doc = definition.doc as string | undefined;

    switch (kind) {
      case 'enum': {
        checkKeys(where, definition, ['enum', 'data', 'features', 'doc']);
        if (!Array.isArray(definition.data)) fail(where, "'data' must be a list of values");
        const values = (definition.data as unknown[]).map((value) => {
          const entry = typeof value === 'string' ? { name: value, features: [] } : value as { name: string; features?: string[] };
          if (!ENUM_VALUE_PATTERN.test(entry.name)) fail(where, `bad enum value '${entry.name}'`);
          return { name: entry.name, features: stringList(where, entry.features) };
        });
        addType(where, { meta: 'enum', name, values, features, doc });
        break;
      }
      case 'struct': {
        checkKeys(where, definition, ['struct', 'data', 'base', 'features', 'doc']);
        const type: ObjectType = { meta: 'object', name, members: [], features, implicit: false, doc };
        addType(where, type);
        pendingStructs.push({ where, type, base: definition.base as string | undefined, own: parseMembers(where, definition.data ?? {}) });
        break;
      }
      case 'union': {
        checkKeys(where, definition, ['union', 'base', 'discriminator', 'data', 'features', 'doc']);
        let base = definition.base;
        if (typeof base !== 'string') {
          const implicitBase: ObjectType = { meta: 'object', name: `q_obj_${name}-base`, members: [], features: [], implicit: true };
          addType(where, implicitBase);
          pendingStructs.push({ where, type: implicitBase, own: parseMembers(where, base) });
          base = implicitBase.name;
        }
        const type: ObjectType = {
          meta: 'object', name, members: [], features, implicit: false, doc,
          variants: { tag: definition.discriminator as string, cases: [] },
        };
        addType(where, type);
        pendingUnions.push({ where, type, base: base as string, cases: definition.data as Record<string, unknown> });
        break;
      }
      case 'alternate': {
        checkKeys(where, definition, ['alternate', 'data', 'features', 'doc']);
        const branches = Object.entries(definition.data as Record<string, unknown>).map(([branch, spec]) => ({
          name: branch, type: typeUse(where, typeof spec === 'object' && spec !== null && !Array.isArray(spec) ? (spec as { type: unknown }).type : spec),
        }));
        addType(where, { meta: 'alternate', name, branches, features, doc });
        break;
      }
      case 'command':
      case 'event': {
        const allowed = kind === 'command'
          ? ['command', 'data', 'returns', 'boxed', 'allow-oob', 'features', 'doc']
          : ['event', 'data', 'boxed', 'features', 'doc'];
        checkKeys(where, definition, allowed);
        let argType = EMPTY_OBJECT;
        const data = definition.data;
        if (typeof data === 'string') {
          argType = data;
        } else if (data !== undefined) {
          const implicit: ObjectType = { meta: 'object', name: `q_obj_${name}-arg`, members: [], features: [], implicit: true };
          addType(where, implicit);
          pendingStructs.push({ where, type: implicit, own: parseMembers(where, data) });
          argType = implicit.name;
        }
        if (definition.boxed && typeof data !== 'string') fail(where, "'boxed' needs 'data' to name a type");
        if (kind === 'command') {
          const returns = definition.returns;
          model.commands.push({
            name, argType, retType: returns === undefined ? EMPTY_OBJECT : typeUse(where, returns),
            returnsSomething: returns !== undefined, boxed: definition.boxed === true,
            allowOob: definition['allow-oob'] === true, features, doc, module, position,
          });
        } else {
          model.events.push({ name, argType, hasData: data !== undefined, boxed: definition.boxed === true, features, doc, module, position });
        }
        break;
      }
    }
  }

  // Flatten struct bases (bases may be defined later in the file, so this runs after reading everything).
  const flattened = new Set<string>([EMPTY_OBJECT]);
  const flatten = (entry: (typeof pendingStructs)[number], seen: string[]): void => {
    if (flattened.has(entry.type.name)) return;
    if (seen.includes(entry.type.name)) fail(entry.where, `base cycle through '${entry.type.name}'`);
    let baseMembers: Member[] = [];
    if (entry.base) {
      const base = model.types.get(entry.base);
      if (!base || base.meta !== 'object' || base.variants) fail(entry.where, `base '${entry.base}' is not a struct`);
      const baseEntry = pendingStructs.find((candidate) => candidate.type.name === entry.base);
      if (baseEntry) flatten(baseEntry, [...seen, entry.type.name]);
      baseMembers = base.members;
    }
    entry.type.members = [...baseMembers, ...entry.own];
    flattened.add(entry.type.name);
  };
  for (const entry of pendingStructs) flatten(entry, []);

  for (const { where, type, base, cases } of pendingUnions) {
    const baseType = model.types.get(base);
    if (!baseType || baseType.meta !== 'object' || baseType.variants) fail(where, `base '${base}' is not a struct`);
    type.members = baseType.members;
    const tag = type.members.find((member) => member.name === type.variants!.tag);
    if (!tag || tag.optional || typeof tag.type !== 'string') fail(where, `discriminator '${type.variants!.tag}' must be a mandatory base member`);
    const tagEnum = model.types.get(tag.type);
    if (!tagEnum || tagEnum.meta !== 'enum') fail(where, `discriminator '${tag.name}' must be of an enum type`);
    for (const [value, spec] of Object.entries(cases ?? {})) {
      if (!tagEnum.values.some((candidate) => candidate.name === value)) fail(where, `'${value}' is not a value of ${tagEnum.name}`);
      const typeName = typeof spec === 'string' ? spec : (spec as { type: string }).type;
      const branch = model.types.get(typeName);
      if (!branch || branch.meta !== 'object' || branch.variants) fail(where, `branch '${value}' must name a struct`);
      type.variants!.cases.push({ name: value, type: typeName });
    }
  }

  checkReferences(model);
  return model;
}

function checkReferences(model: SchemaModel): void {
  const check = (where: string, use: TypeUse) => {
    const name = typeof use === 'string' ? use : null;
    if (name === null) return check(where, (use as { array: TypeUse }).array);
    if (!isBuiltin(name) && !model.types.has(name)) fail(where, `unknown type '${name}'`);
  };
  for (const type of model.types.values()) {
    if (type.meta === 'object') type.members.forEach((member) => check(`${type.name}.${member.name}`, member.type));
    if (type.meta === 'alternate') type.branches.forEach((branch) => check(`${type.name}.${branch.name}`, branch.type));
  }
  for (const command of model.commands) {
    check(command.name, command.argType);
    check(command.name, command.retType);
    const arg = model.types.get(command.argType);
    if (!arg || arg.meta !== 'object') fail(command.name, "'data' must be an object type");
  }
  for (const event of model.events) check(event.name, event.argType);
}

/** The type names a TypeUse mentions (the element for arrays). */
export function elementName(use: TypeUse): string {
  return typeof use === 'string' ? use : elementName(use.array);
}
