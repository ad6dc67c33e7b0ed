/*
 * Build step: schema/ -> src/generated/. Writes the TypeScript types, the
 * validation schemas ajv compiles at start-up, the query-qmp-schema answer and
 * the command/event catalogue the dispatcher checks handlers against.
 * Run with `npm run generate` (part of `npm run build`).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadSchema } from './qapi/model.js';
import { buildIntrospection } from './qapi/introspection.js';
import { buildValidationSchemas } from './qapi/validation-schema.js';
import { buildTypeScript } from './qapi/typescript-types.js';
import { buildRuntimeModel } from './qapi/runtime-model.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const outDir = join(root, 'src', 'generated');
const banner = '/* Generated from schema/ by scripts/gen-schema.ts. Do not edit. */\n';

function writeData(file: string, declarations: string): void {
  writeFileSync(join(outDir, file), banner + declarations);
}

const model = loadSchema(join(root, 'schema'));
mkdirSync(outDir, { recursive: true });

writeFileSync(join(outDir, 'qapi-types.ts'), await buildTypeScript(model));

const validation = buildValidationSchemas(model);
writeData('qapi-validation.ts', [
  `export const validationDefs: Record<string, unknown> = ${JSON.stringify(validation.defs)};`,
  `export const commandArgumentRefs: Record<string, string> = ${JSON.stringify(validation.commands, null, 1)};`,
  '',
].join('\n'));

const introspection = buildIntrospection(model);
writeData('qapi-introspection.ts', `export const schemaInfo: Record<string, unknown>[] = ${JSON.stringify(introspection)};\n`);

const runtime = buildRuntimeModel(model);
writeData('qapi-model.ts', [
  "import type { ModelType } from '../../scripts/qapi/runtime-model.js';",
  `export const qapiTypes: Record<string, ModelType> = ${JSON.stringify(runtime.types)};`,
  `export const commandArgumentTypes: Record<string, string> = ${JSON.stringify(runtime.commandArguments, null, 1)};`,
  '',
].join('\n'));

const catalogue = {
  commands: model.commands.map((command) => ({ name: command.name, allowOob: command.allowOob, features: command.features })),
  events: model.events.map((event) => ({ name: event.name, features: event.features })),
};
writeData('qapi-catalogue.ts', [
  'export interface CommandEntry { name: string; allowOob: boolean; features: string[] }',
  'export interface EventEntry { name: string; features: string[] }',
  `export const commandCatalogue: CommandEntry[] = ${JSON.stringify(catalogue.commands, null, 1)};`,
  `export const eventCatalogue: EventEntry[] = ${JSON.stringify(catalogue.events, null, 1)};`,
  '',
].join('\n'));

process.stderr.write(`schema: ${model.commands.length} commands, ${model.events.length} events, ${introspection.length} introspection entries\n`);
