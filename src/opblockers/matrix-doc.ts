/*
 * Renders the op-blocker matrix as the markdown page docs/op-blockers.md, so
 * the document is the table itself and cannot drift from it (a test compares
 * them).
 */
import {
  ALL_HELD_ROLES, BLOCK_OPERATIONS, HELD_ROLES, OPERATION_CHECKS, PERMISSION_ONLY_COMMANDS, ROLE_NODES, verdictOf,
  type BlockOperation, type HeldRole, type HolderKind,
} from './op-blockers.js';

const cell = (held: HeldRole, operation: BlockOperation) => (verdictOf(held, operation).allow ? '✓' : '**busy**');

/** For a running operation and a requested one: the verdict where they share a node, by the running one's roles. */
function sameNode(holder: HolderKind, operation: BlockOperation): string {
  const roles = HELD_ROLES[holder].map((scope) => `${holder}.${scope}` as HeldRole);
  const refused = roles.filter((role) => !verdictOf(role, operation).allow);
  if (refused.length === 0) return '✓';
  if (refused.length === roles.length) return 'busy';
  return `busy on ${refused.map((role) => role.split('.')[1]).join(', ')}`;
}

/** Where a role treats some of `operations` differently from `reference`, in words. */
function exceptionsTo(reference: BlockOperation, operations: readonly BlockOperation[]): string {
  const differing = ALL_HELD_ROLES.flatMap((role) => {
    const other = operations.filter((operation) => verdictOf(role, operation).allow !== verdictOf(role, reference).allow);
    return other.length ? [`\`${role}\` ${verdictOf(role, reference).allow ? 'refuses' : 'allows'} ${other.map((operation) => `\`${operation}\``).join(', ')}`] : [];
  });
  return differing.join('; ') || 'none';
}

export function renderOpBlockerMatrix(): string {
  const checked = BLOCK_OPERATIONS.filter((operation) => OPERATION_CHECKS.some((check) => check.operation === operation));
  const unchecked = BLOCK_OPERATIONS.filter((operation) => !checked.includes(operation));
  const holders = (Object.keys(HELD_ROLES) as HolderKind[]);
  const reasons = [...new Set(ALL_HELD_ROLES.flatMap((role) => BLOCK_OPERATIONS.map((operation) => verdictOf(role, operation))).flatMap((verdict) => (verdict.allow ? [] : [verdict.reason])))];
  const lines = [
    '# Op blockers',
    '',
    'Generated from `src/opblockers/op-blockers.ts` by `renderOpBlockerMatrix()`; a test fails when',
    'this page and the data differ. Besides these blockers, every operation meets the permission',
    'system (see `src/blockdev/permissions.ts`) and image locks, and `block-commit` wants a root',
    'node as `device` (`Need a root block node`: one no node and no job holds).',
    '',
    '## Held role × requested operation',
    '',
    'An operation that holds nodes claims each under a role (rows); a command asks for an',
    'operation on the nodes it walks (columns). **busy** refuses the request with',
    '`Node \'X\' is busy: <reason>`, naming the newest claim that refuses.',
    '',
    `| held role | ${checked.map((operation) => `\`${operation}\``).join(' | ')} |`,
    `|---|${checked.map(() => '---').join('|')}|`,
    ...ALL_HELD_ROLES.map((role) => `| \`${role}\` | ${checked.map((operation) => cell(role, operation)).join(' | ')} |`),
    '',
    `Operations no command asks for yet (for the jobs to come): ${unchecked.map((operation) => `\`${operation}\``).join(', ')}. ` +
      `Each role refuses them as it refuses \`${checked[0]}\`, except: ${exceptionsTo(checked[0]!, unchecked)}.`,
    '',
    'Reasons: ' + reasons.map((reason) => `\`${reason}\``).join('; ') + ' ({type}: the job\'s type, {parent}: the overlay).',
    '',
    '## Where the roles are',
    '',
    '| role | nodes |',
    '|---|---|',
    ...ALL_HELD_ROLES.map((role) => `| \`${role}\` | ${ROLE_NODES[role]} |`),
    '',
    '## Running operation × requested operation × scope',
    '',
    'Derived from the two tables above. *Same node*: the request names a node the running',
    'operation holds; *overlapping*: the request walks a chain segment that contains such a',
    'node (refused as soon as the walk meets it); *disjoint*: no node in common, always ✓.',
    '',
    `| running | ${checked.map((operation) => `\`${operation}\` same node / overlapping / disjoint`).join(' | ')} |`,
    `|---|${checked.map(() => '---').join('|')}|`,
    ...holders.map((holder) => `| ${holder} | ${checked.map((operation) => {
      const verdict = sameNode(holder, operation);
      return `${verdict} / ${verdict === '✓' ? '✓' : 'busy'} / ✓`;
    }).join(' | ')} |`),
    '',
    '## Who asks',
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
