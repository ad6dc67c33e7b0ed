/*
 * The op-blocker data: docs/op-blockers.md is exactly what the data renders
 * (UPDATE_DOCS=1 rewrites it), and every command that starts an operation on
 * nodes is accounted for, either as a checked operation or as permission-only.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { commandArgumentTypes } from '../../src/generated/qapi-model.js';
import { renderOpBlockerMatrix } from '../../src/opblockers/matrix-doc.js';
import { OPERATION_CHECKS, PERMISSION_ONLY_COMMANDS } from '../../src/opblockers/op-blockers.js';
import { REPO_ROOT } from '../helpers/paths.js';

const DOC = join(REPO_ROOT, 'docs', 'op-blockers.md');

test('docs/op-blockers.md is generated from the data', () => {
  const rendered = renderOpBlockerMatrix();
  if (process.env.UPDATE_DOCS) writeFileSync(DOC, rendered);
  assert.equal(readFileSync(DOC, 'utf8'), rendered, 'run UPDATE_DOCS=1 node --test dist/test/unit/op-blocker-matrix.test.js');
});

/**
 * Commands that start no operation on a node: protocol, queries, job verbs, servers, objects,
 * the dirty bitmap commands (as in QEMU, a bitmap's busy flag guards it, not op blockers), and
 * transaction (each of its actions asks for its own operation, as the command it stands for does).
 */
const NOT_OPERATIONS = /^(qmp_capabilities|quit|query-.*|job-.*|block-job-.*|nbd-server-(start|stop|remove)|block-export-del|object-(add|del)|block-dirty-bitmap-.*|x-debug-block-dirty-bitmap-sha256|transaction)$/;

test('every command that starts an operation is in the op-blocker table', () => {
  const accounted = new Set([...OPERATION_CHECKS.map((check) => check.command), ...PERMISSION_ONLY_COMMANDS]);
  const missing = Object.keys(commandArgumentTypes).filter((command) => !NOT_OPERATIONS.test(command) && !accounted.has(command));
  assert.deepEqual(missing, []);
});
