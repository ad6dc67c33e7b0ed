/*
 * QEMU's keyval syntax for option values: "key=value" pairs separated by
 * commas (",," is a literal comma), dotted keys for nested members, numeric
 * fragments for list elements, and an optional implied key for the first
 * value ("--monitor c,pretty=on" = "chardev=c,pretty=on"). Values stay
 * strings; converting them to the schema's types is the caller's job.
 */
import { CliError } from './cli-error.js';

export type KeyvalTree = { [key: string]: KeyvalNode };
export type KeyvalNode = string | KeyvalTree | KeyvalNode[];

const NAME = /^[A-Za-z][A-Za-z0-9_-]*/;
const INDEX = /^[0-9]+/;

export function parseKeyval(text: string, impliedKey?: string): KeyvalTree {
  const root: KeyvalTree = {};
  let s = 0;
  let implied = impliedKey;
  while (s < text.length) {
    s = parseOne(root, text, s, implied);
    implied = undefined;
  }
  return listify(root, []) as KeyvalTree;
}

function parseOne(root: KeyvalTree, text: string, start: number, impliedKey: string | undefined): number {
  const rest = text.slice(start);
  const stop = rest.search(/[=,]/);
  const length = stop < 0 ? rest.length : stop;
  if (length && rest[length] !== '=') {
    if (rest.slice(0, length) === 'help' || rest.slice(0, length) === '?') throw new CliError('Help is not available for this option');
    if (impliedKey) {
      put(root, [impliedKey], rest.slice(0, length), impliedKey);
      return start + length + (rest[length] === ',' ? 1 : 0);
    }
  }
  // Key fragments
  const fragments: string[] = [];
  let pos = 0;
  for (;;) {
    const fragment = rest.slice(pos);
    const match = (fragments.length ? INDEX.exec(fragment) : null) ?? NAME.exec(fragment);
    const fragmentLength = match ? match[0].length : 0;
    const keyEnd = length;
    if (!fragmentLength || (pos + fragmentLength < keyEnd && rest[pos + fragmentLength] !== '.')) {
      throw new CliError(`Invalid parameter '${rest.slice(0, keyEnd)}'`);
    }
    fragments.push(rest.slice(pos, pos + fragmentLength));
    pos += fragmentLength;
    if (rest[pos] !== '.') break;
    pos++;
  }
  const key = rest.slice(0, pos);
  if (rest[pos] !== '=') throw new CliError(`Expected '=' after parameter '${key}'`);
  pos++;
  let value = '';
  for (;;) {
    if (pos >= rest.length) break;
    if (rest[pos] === ',') {
      pos++;
      if (rest[pos] !== ',') break;
    }
    value += rest[pos++];
  }
  put(root, fragments, value, key);
  return start + pos;
}

function put(root: KeyvalTree, fragments: string[], value: string, key: string): void {
  let current = root;
  for (let i = 0; i < fragments.length - 1; i++) {
    const existing = current[fragments[i]!];
    if (existing === undefined) current[fragments[i]!] = {};
    else if (typeof existing === 'string') throw new CliError(`Parameters '${fragments.slice(0, i + 1).join('.')}.*' used inconsistently`);
    current = current[fragments[i]!] as KeyvalTree;
  }
  const last = fragments[fragments.length - 1]!;
  if (typeof current[last] === 'object') throw new CliError(`Parameters '${key}.*' used inconsistently`);
  current[last] = value;
}

/** Turns objects whose keys are all indices into lists, as keyval_listify does. */
function listify(node: KeyvalNode, path: string[]): KeyvalNode {
  if (typeof node === 'string' || Array.isArray(node)) return node;
  let hasIndex = false;
  let hasMember = false;
  for (const [key, value] of Object.entries(node)) {
    if (/^[0-9]/.test(key)) hasIndex = true;
    else hasMember = true;
    node[key] = listify(value, [...path, key]);
  }
  if (hasIndex && hasMember) throw new CliError(`Parameters '${path.map((p) => `${p}.`).join('')}*' used inconsistently`);
  if (!hasIndex) return node;
  const list: KeyvalNode[] = [];
  const count = Object.keys(node).length;
  for (let i = 0; i < count; i++) {
    const element = node[String(i)];
    if (element === undefined) throw new CliError(`Parameter '${path.map((p) => `${p}.`).join('')}${i}' missing`);
    list.push(element);
  }
  return list;
}

/** keyval's boolean words. */
export function parseOnOff(value: string, name: string): boolean {
  if (['on', 'yes', 'true', 'y'].includes(value)) return true;
  if (['off', 'no', 'false', 'n'].includes(value)) return false;
  throw new CliError(`Parameter '${name}' expects 'on' or 'off'`);
}
