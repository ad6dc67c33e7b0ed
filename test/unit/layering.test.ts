/*
 * The folders are the architecture (../shared/DESIGN.md, Layout): protocol knows
 * nothing of storage, storage knows nothing of QMP, and the NBD server and the nbd
 * client driver share src/nbd/ without importing each other. This reads every import
 * under src/ and fails on one that crosses a line the design draws.
 */
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { test } from 'node:test';
import { REPO_ROOT } from '../helpers/paths.js';

const SRC = join(REPO_ROOT, 'src');

function sourceFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return entry.name === 'generated' ? [] : sourceFiles(path);
    return entry.name.endsWith('.ts') ? [path] : [];
  });
}

/** Every relative import of a file, as a path under src/ ("qmp/errors.ts"). */
function importsOf(file: string): string[] {
  const text = readFileSync(file, 'utf8');
  const specifiers = [...text.matchAll(/(?:from\s+|import\s*\(\s*|import\s+)'(\.{1,2}\/[^']+)'/g)].map((match) => match[1]!);
  return specifiers.map((specifier) => relative(SRC, resolve(dirname(file), specifier)).replace(/\.js$/, '.ts'));
}

/** [files this rule is about, imports they must not have, why]. */
const RULES: [RegExp, RegExp, string][] = [
  [/^blockdev\//, /^(qmp|exports|jobs|transactions)\//, 'storage knows nothing of QMP, exports or jobs'],
  [/^qmp\//, /^(blockdev|jobs|exports|opblockers|objects|transactions|nbd)\//, 'the protocol knows nothing of storage'],
  [/^nbd\//, /^(?!nbd\/)/, 'the NBD codec stands alone'],
  [/^(json|net)\//, /^(qmp|blockdev|jobs|exports|nbd)\//, 'shared utilities depend on no layer'],
  [/^(errors|command-table)\.ts$/, /^(qmp|blockdev|jobs|exports)\//, 'the shared error type and command table depend on no layer'],
  [/^blockdev\/drivers\/nbd\//, /^exports\//, 'the nbd client driver does not use the NBD server'],
  [/^exports\//, /^blockdev\/drivers\/nbd\//, 'the NBD server does not use the nbd client driver'],
  [/^tools\//, /^qmp\//, 'offline tools do not go through QMP'],
];

test('imports under src/ follow the layering of DESIGN.md', () => {
  const violations: string[] = [];
  for (const file of sourceFiles(SRC)) {
    const from = relative(SRC, file);
    for (const target of importsOf(file)) {
      for (const [subject, forbidden, why] of RULES) {
        if (subject.test(from) && forbidden.test(target)) violations.push(`${from} imports ${target}: ${why}`);
      }
    }
  }
  assert.deepEqual(violations, []);
});
