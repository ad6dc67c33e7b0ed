/*
 * Checks command arguments against the schema with ajv, compiled once at
 * start-up from the generated validation schemas, and words the first failure
 * as QEMU's input visitor does. Paths are dotted for struct members and
 * indexed for list elements ("file.filename", "actions[1].data.name"); enum,
 * int-range and alternate errors name only the member itself, and 'null' for a
 * list element, which is what QEMU 7.2 prints.
 */
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import { genericError, type QmpError } from '../errors.js';
import { firstUnexpectedMember } from '../json/glib-hash-order.js';
import { qdictOrder } from '../json/qdict-order.js';
import { isJsonInteger, isJsonNumber, isJsonObject, type JsonObject, type JsonValue } from '../json/value.js';

type LeafProblem =
  | { kind: 'type'; expected: string; bare?: boolean }
  | { kind: 'expects'; what: string; bare: boolean };

const INT_RANGES: Record<string, [bigint, bigint]> = {
  int8: [-(2n ** 7n), 2n ** 7n - 1n],
  int16: [-(2n ** 15n), 2n ** 15n - 1n],
  int32: [-(2n ** 31n), 2n ** 31n - 1n],
  int: [-(2n ** 63n), 2n ** 63n - 1n],
  int64: [-(2n ** 63n), 2n ** 63n - 1n],
};
const UINT_MAX: Record<string, bigint> = { uint8: 2n ** 8n - 1n, uint16: 2n ** 16n - 1n, uint32: 2n ** 32n - 1n };
const UINT64_MAX = 2n ** 64n - 1n;

/** Checks one value against a builtin kind; returns the problem QEMU would report, or null. */
export function checkLeaf(kind: string, data: unknown): LeafProblem | null {
  switch (kind) {
    case 'str': return typeof data === 'string' ? null : { kind: 'type', expected: 'string' };
    case 'bool': return typeof data === 'boolean' ? null : { kind: 'type', expected: 'boolean' };
    case 'null': return data === null ? null : { kind: 'type', expected: 'null' };
    case 'number': return isJsonNumber(data) ? null : { kind: 'type', expected: 'number' };
    case 'object': return isJsonObject(data) ? null : { kind: 'type', expected: 'object' };
    case 'array': return Array.isArray(data) ? null : { kind: 'type', expected: 'array' };
  }
  const signed = INT_RANGES[kind];
  if (signed) {
    const [min, max] = INT_RANGES.int64!;
    if (!isJsonInteger(data) || BigInt(data) < min || BigInt(data) > max) return { kind: 'type', expected: 'integer' };
    const value = BigInt(data);
    if (value < signed[0] || value > signed[1]) return { kind: 'expects', what: `${kind}_t`, bare: true };
    return null;
  }
  // uint64 and size accept any int64 too (negative values wrap), as QEMU does for compatibility.
  if (!isJsonInteger(data)) return { kind: 'expects', what: 'uint64', bare: false };
  let value = BigInt(data);
  if (value < -(2n ** 63n) || value > UINT64_MAX) return { kind: 'expects', what: 'uint64', bare: false };
  if (value < 0n) value += 2n ** 64n;
  const max = UINT_MAX[kind];
  if (max !== undefined && value > max) return { kind: 'expects', what: `${kind}_t`, bare: true };
  return null;
}

interface QapiKeywordFunction {
  (schema: string | { alternate: string }, data: unknown): boolean;
  errors?: Partial<ErrorObject>[];
}

const qapiKeyword: QapiKeywordFunction = function qapi(schema, data) {
  const problem: LeafProblem | null = typeof schema === 'string'
    ? checkLeaf(schema, data)
    : { kind: 'type', expected: schema.alternate, bare: true };
  if (!problem) return true;
  qapiKeyword.errors = [{ keyword: 'qapi', message: 'qapi', params: problem }];
  return false;
};

interface PathStep {
  name: string;
  inList: boolean;
}

function pathSteps(root: JsonValue, pointer: string): { steps: PathStep[]; value: JsonValue | undefined } {
  const steps: PathStep[] = [];
  let current: JsonValue | undefined = root;
  for (const raw of pointer.split('/').slice(1)) {
    const segment = raw.replace(/~1/g, '/').replace(/~0/g, '~');
    const inList = Array.isArray(current);
    steps.push({ name: segment, inList });
    current = inList ? (current as JsonValue[])[Number(segment)] : (current as JsonObject | undefined)?.[segment];
  }
  return { steps, value: current };
}

/** QEMU's full_name(): "a.b", "list[2].c". */
function fullName(steps: PathStep[]): string {
  let name = '';
  for (const step of steps) {
    if (step.inList) name += `[${step.name}]`;
    else name += name ? `.${step.name}` : step.name;
  }
  return name;
}

/** The bare member name QEMU uses in some messages: the last member, or 'null' for a list element. */
function bareName(steps: PathStep[]): string {
  const last = steps[steps.length - 1];
  return !last || last.inList ? 'null' : last.name;
}

export function describeValidationError(error: ErrorObject, args: JsonObject): QmpError {
  const { steps, value } = pathSteps(args, error.instancePath);
  switch (error.keyword) {
    case 'required':
      return genericError(`Parameter '${fullName([...steps, { name: error.params.missingProperty as string, inList: false }])}' is missing`);
    case 'additionalProperties': {
      // With several unexpected members, name the one QEMU's GHashTable yields first.
      const declared = Object.keys((error.parentSchema as { properties: Record<string, unknown> }).properties);
      const member = firstUnexpectedMember(qdictOrder(Object.keys(value as JsonObject)), declared) ?? String(error.params.additionalProperty);
      return genericError(`Parameter '${fullName([...steps, { name: member, inList: false }])}' is unexpected`);
    }
    case 'enum':
      return genericError(`Parameter '${bareName(steps)}' does not accept value '${String(value)}'`);
    case 'qapi': {
      const problem = error.params as LeafProblem;
      const name = problem.bare ? bareName(steps) : fullName(steps);
      return problem.kind === 'type'
        ? genericError(`Invalid parameter type for '${name}', expected: ${problem.expected}`)
        : genericError(`Parameter '${name}' expects ${problem.what}`);
    }
    default:
      return genericError(`Parameter '${fullName(steps)}' is invalid`);
  }
}

export class ArgumentValidator {
  private readonly validators = new Map<string, ValidateFunction>();
  private readonly ajv: Ajv;

  constructor(defs: Record<string, unknown>, commandRefs: Record<string, string>) {
    const ajv = (this.ajv = new Ajv({ allErrors: false, verbose: true, strict: true, strictTypes: false, strictRequired: false, validateSchema: false, addUsedSchema: false }));
    ajv.addKeyword({ keyword: 'qapi', schemaType: ['string', 'object'], errors: true, validate: qapiKeyword });
    ajv.addSchema(defs);
    for (const [command, ref] of Object.entries(commandRefs)) {
      this.validators.set(command, ajv.compile({ $ref: ref }));
    }
  }

  /** Throws the QEMU-worded error for the first problem in the arguments. */
  check(command: string, args: JsonObject): void {
    const validate = this.validators.get(command);
    if (!validate) throw new Error(`no validator for command ${command}`);
    this.report(validate, args);
  }

  /** The same check for a value of a named schema type (command-line options that are not command arguments). */
  checkType(typeName: string, value: JsonObject): void {
    const key = `type:${typeName}`;
    let validate = this.validators.get(key);
    if (!validate) this.validators.set(key, (validate = this.ajv.compile({ $ref: `qapi#/$defs/${typeName}` })));
    this.report(validate, value);
  }

  private report(validate: ValidateFunction, args: JsonObject): void {
    if (validate(args)) return;
    const first = validate.errors?.find((error) => error.keyword !== 'if');
    if (!first) throw genericError('Invalid arguments');
    throw describeValidationError(first, args);
  }
}
