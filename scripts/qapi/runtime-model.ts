/*
 * A compact type model for code that must walk values by schema type at run
 * time (the command line's keyval options, which arrive as strings and are
 * converted member by member as QEMU's keyval visitor does).
 */
import { isBuiltin, type SchemaModel, type TypeUse } from './model.js';

export type ModelTypeUse = string | { array: ModelTypeUse };

export type ModelType =
  | { kind: 'enum'; values: string[] }
  | { kind: 'object'; members: { name: string; type: ModelTypeUse; optional: boolean }[]; tag?: string; variants?: Record<string, string> }
  | { kind: 'alternate'; branches: ModelTypeUse[] };

function use(type: TypeUse): ModelTypeUse {
  return typeof type === 'string' ? type : { array: use(type.array) };
}

export function buildRuntimeModel(model: SchemaModel): { types: Record<string, ModelType>; commandArguments: Record<string, string> } {
  const types: Record<string, ModelType> = {};
  for (const type of model.types.values()) {
    if (type.meta === 'enum') types[type.name] = { kind: 'enum', values: type.values.map((value) => value.name) };
    else if (type.meta === 'alternate') types[type.name] = { kind: 'alternate', branches: type.branches.map((branch) => use(branch.type)) };
    else {
      types[type.name] = {
        kind: 'object',
        members: type.members.map((member) => ({ name: member.name, type: use(member.type), optional: member.optional })),
        ...(type.variants ? { tag: type.variants.tag, variants: Object.fromEntries(type.variants.cases.map((c) => [c.name, c.type])) } : {}),
      };
    }
  }
  const commandArguments = Object.fromEntries(model.commands.map((command) => [command.name, command.argType]));
  return { types, commandArguments };
}

export { isBuiltin };
