/*
 * Turns a keyval tree (every value a string) into typed command arguments by
 * walking the schema type, as QEMU's keyval input visitor does: integers in
 * C's base-0 syntax, sizes with suffixes (k, M, G, T, P, E), on/off booleans,
 * alternates picked by shape (a nested key means the object branch, a plain
 * value the string branch). Structure errors (missing, unexpected, enum
 * values) are left to the schema validator that runs next, with QMP's texts.
 */
import { qapiTypes } from '../generated/qapi-model.js';
import type { ModelTypeUse } from '../../scripts/qapi/runtime-model.js';
import type { JsonObject, JsonValue } from '../json/value.js';
import { CliError } from './cli-error.js';
import { parseOnOff, type KeyvalNode, type KeyvalTree } from './keyval.js';

const INTEGER_TYPES = new Set(['int', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64']);

/** strtoll/strtoull with base 0: decimal, 0x hex, leading-0 octal; the whole string must be used. */
function parseCInteger(text: string): number | bigint | undefined {
  const match = /^\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(text);
  if (!match) return undefined;
  const digits = match[2]!;
  const magnitude = /^0[xX]/.test(digits) ? BigInt(digits) : digits.length > 1 && digits.startsWith('0') ? BigInt(`0o${digits.slice(1)}`) : BigInt(digits);
  const value = match[1] === '-' ? -magnitude : magnitude;
  return value >= BigInt(Number.MIN_SAFE_INTEGER) && value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value;
}

const SIZE_SUFFIXES: Record<string, number> = { b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

/** qemu_strtosz: a number (fractions allowed with a suffix) and an optional binary suffix. */
function parseSize(text: string): number | undefined {
  const match = /^([0-9]+(?:\.[0-9]+)?)([bkmgtpeBKMGTPE]?)$/.exec(text);
  if (!match) return undefined;
  const [, number, suffix] = match as unknown as [string, string, string];
  if (number.includes('.') && !suffix) return undefined;
  const value = Number(number) * (SIZE_SUFFIXES[suffix.toLowerCase() || 'b'] ?? 1);
  return Number.isSafeInteger(Math.floor(value)) ? Math.floor(value) : undefined;
}

function fullName(path: string[]): string {
  return path.join('.');
}

function scalar(node: KeyvalNode, path: string[]): string {
  if (typeof node !== 'string') throw new CliError(`Parameters '${fullName(path)}.*' are unexpected`);
  return node;
}

function visit(node: KeyvalNode, type: ModelTypeUse, path: string[]): JsonValue {
  if (typeof type !== 'string') {
    if (!Array.isArray(node)) throw new CliError(`Invalid parameter type for '${fullName(path)}', expected: array`);
    return node.map((element, index) => visit(element, type.array, [...path, String(index)]));
  }
  if (INTEGER_TYPES.has(type)) {
    const value = parseCInteger(scalar(node, path));
    if (value === undefined) throw new CliError(`Parameter '${fullName(path)}' expects integer`);
    return value;
  }
  switch (type) {
    case 'str': return scalar(node, path);
    case 'bool': return parseOnOff(scalar(node, path), fullName(path));
    case 'size': {
      const value = parseSize(scalar(node, path));
      if (value === undefined) throw new CliError(`Parameter '${fullName(path)}' expects size`);
      return value;
    }
    case 'number': {
      const text = scalar(node, path);
      const value = Number(text);
      if (text.trim() === '' || !Number.isFinite(value)) throw new CliError(`Invalid parameter type for '${fullName(path)}', expected: number`);
      return value;
    }
    case 'any': return node as JsonValue;
    case 'null': throw new CliError(`Invalid parameter type for '${fullName(path)}', expected: null`);
  }
  const model = qapiTypes[type];
  if (!model) throw new Error(`unknown schema type ${type}`);
  switch (model.kind) {
    case 'enum':
      return scalar(node, path);
    case 'alternate': {
      const objectBranch = model.branches.find((branch) => typeof branch === 'string' && qapiTypes[branch]?.kind === 'object');
      if (typeof node !== 'string' && objectBranch) return visit(node, objectBranch, path);
      const stringBranch = model.branches.find((branch) => branch === 'str' || (typeof branch === 'string' && qapiTypes[branch]?.kind === 'enum'));
      if (typeof node === 'string' && stringBranch) return node;
      throw new CliError(`Invalid parameter type for '${fullName(path)}', expected: ${type}`);
    }
    case 'object':
      if (typeof node === 'string' || Array.isArray(node)) throw new CliError(`Invalid parameter type for '${fullName(path)}', expected: object`);
      return visitObject(node, type, path);
  }
}

function visitObject(tree: KeyvalTree, type: string, path: string[]): JsonObject {
  const model = qapiTypes[type];
  if (!model || model.kind !== 'object') throw new Error(`not an object type: ${type}`);
  let members = model.members;
  const tag = model.tag ? tree[model.tag] : undefined;
  if (model.variants && typeof tag === 'string' && model.variants[tag]) {
    const branch = qapiTypes[model.variants[tag]!];
    if (branch?.kind === 'object') members = [...members, ...branch.members];
  }
  const result: JsonObject = {};
  for (const [key, value] of Object.entries(tree)) {
    const member = members.find((candidate) => candidate.name === key);
    // Undeclared members pass through unchanged; the validator reports them as unexpected.
    result[key] = member ? visit(value, member.type, [...path, key]) : (value as JsonValue);
  }
  return result;
}

/** Typed arguments of `typeName` from a keyval tree. */
export function keyvalArguments(tree: KeyvalTree, typeName: string): JsonObject {
  return visitObject(tree, typeName, []);
}
