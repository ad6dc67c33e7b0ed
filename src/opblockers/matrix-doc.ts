/*
 * Renders the op-blocker data as the markdown page docs/op-blockers.md, so the
 * document is the table itself and cannot drift from it (a test compares them).
 */
import { BLOCKER_SOURCES, BLOCK_OPERATIONS, OPERATION_CHECKS, PERMISSION_ONLY_COMMANDS, type BlockerSource } from './op-blockers.js';

const SOURCE_TEXT: Record<BlockerSource, string> = {
  'block-job': 'a block job, on every node it holds (stream: until dismissed)',
  'backing-link': 'a backing link, on the backing node',
};

export function renderOpBlockerMatrix(): string {
  const sources = Object.keys(BLOCKER_SOURCES) as BlockerSource[];
  const lines = [
    '# Op blockers',
    '',
    'Generated from `src/opblockers/op-blockers.ts` by `renderOpBlockerMatrix()`; a test fails when',
    'this page and the data differ. Besides these blockers, every operation meets the permission',
    'system (see `src/blockdev/permissions.ts`) and image locks.',
    '',
    '## Who blocks what',
    '',
    'Rows are operations, columns the sources of blockers; **blocked** means the operation is',
    'refused on a node while such a blocker is on it, with `Node \'X\' is busy: <reason>`.',
    '',
    `| operation | ${sources.map((source) => `${source}: ${SOURCE_TEXT[source]}`).join(' | ')} |`,
    `|---|${sources.map(() => '---').join('|')}|`,
    ...BLOCK_OPERATIONS.map((operation) =>
      `| \`${operation}\` | ${sources.map((source) => (BLOCKER_SOURCES[source].allows.includes(operation) ? 'allowed' : '**blocked**')).join(' | ')} |`),
    '',
    'Reasons: ' + sources.map((source) => `${source}: \`${BLOCKER_SOURCES[source].reason('…')}\``).join('; ') + '.',
    '',
    '## Who checks',
    '',
    '| command | operation | nodes checked |',
    '|---|---|---|',
    ...OPERATION_CHECKS.map((check) => `| \`${check.command}\` | \`${check.operation}\` | ${check.nodes} |`),
    '',
    `Permission checks only (no op blocker, as in QEMU): ${PERMISSION_ONLY_COMMANDS.map((command) => `\`${command}\``).join(', ')}.`,
    '',
  ];
  return lines.join('\n');
}
