/*
 * The last line of defence: in a process with it installed, a promise rejection
 * nobody handles is logged at error level and the process goes on (without it
 * Node ends the process at once).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { test } from 'node:test';
import { REPO_ROOT } from '../helpers/paths.js';

test('an unhandled rejection is logged at error level and the process keeps running', () => {
  const lastResort = pathToFileURL(join(REPO_ROOT, 'dist/src/cli/last-resort.js')).href;
  const script = [
    "import { pino } from 'pino';",
    `import { keepServingOnUnhandledRejection } from '${lastResort}';`,
    'keepServingOnUnhandledRejection(pino(pino.destination({ dest: 2, sync: true })));',
    "Promise.reject(new Error('boom'));",
    // Runs only if the process survived the rejection, which Node reports before any callback of the next turn.
    "setImmediate(() => process.stdout.write('still serving'));",
  ].join('\n');
  const result = spawnSync(process.execPath, ['--input-type=module', '-e', script], { cwd: REPO_ROOT, encoding: 'utf8' });
  assert.equal(result.status, 0, result.stderr);
  assert.equal(result.stdout, 'still serving');
  const record = JSON.parse(result.stderr.trim().split('\n').at(-1)!) as { level: number; msg: string; err: { message: string } };
  assert.deepEqual([record.level, record.msg, record.err.message], [50, 'unhandled promise rejection (a bug in blockd); the daemon keeps serving', 'boom']);
});
