/*
 * Node names: QEMU's rules for names users give (an identifier of at most 31
 * bytes) and its form for generated ones ("#block" + counter + two random
 * digits), which users cannot take because of the "#".
 */
import { genericError } from '../errors.js';

const IDENTIFIER = /^[A-Za-z][A-Za-z0-9._-]*$/;

export function isIdentifier(name: string): boolean {
  return IDENTIFIER.test(name);
}

export function checkNodeName(name: string): void {
  if (!isIdentifier(name)) throw genericError(`Invalid node-name: '${name}'`);
  if (Buffer.byteLength(name) > 31) throw genericError('Node name too long');
}

let generated = 0;

export function generateNodeName(): string {
  const digits = String(Math.floor(Math.random() * 100)).padStart(2, '0');
  return `#block${generated++}${digits}`;
}
