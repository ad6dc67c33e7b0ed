/* Every script in examples/ runs to success (CI runs them through npm test). */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { REPO_ROOT } from '../helpers/paths.js';

const dir = join(REPO_ROOT, 'examples');
const examples = readdirSync(dir).filter((name) => /^[0-9]{2}-/.test(name)).sort();

test('there are examples', () => assert.ok(examples.length >= 4));

for (const name of examples) {
  test(`examples/${name}`, () => {
    const result = spawnSync(join(dir, name), { cwd: dir, encoding: 'utf8', timeout: 60_000 });
    assert.equal(result.status, 0, `${name} failed:\n${result.stdout}\n${result.stderr}`);
  });
}
