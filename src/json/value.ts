/*
 * The JSON values QMP carries. QEMU distinguishes integers (int64 or uint64)
 * from floats even when a float has an integral value ("1e3"), and it keeps
 * integers exact across the whole int64/uint64 range. JavaScript numbers can
 * do neither, so: safe integers are numbers, larger integers are bigints, and
 * a float whose value is integral is wrapped in JsonFloat. A plain
 * non-integral number is a float.
 */

export class JsonFloat {
  constructor(readonly value: number) {}

  /** Logs and JSON.stringify show the number itself. */
  toJSON(): number {
    return this.value;
  }
}

export type JsonScalar = string | number | bigint | boolean | null | JsonFloat;
export type JsonValue = JsonScalar | JsonValue[] | JsonObject;
export interface JsonObject {
  [key: string]: JsonValue;
}

export function isJsonObject(value: unknown): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value) && !(value instanceof JsonFloat);
}

/** True for QEMU's integer kinds (QNUM_I64 / QNUM_U64). */
export function isJsonInteger(value: unknown): value is number | bigint {
  return typeof value === 'bigint' || (typeof value === 'number' && Number.isInteger(value));
}

export function isJsonNumber(value: unknown): value is number | bigint | JsonFloat {
  return typeof value === 'number' || typeof value === 'bigint' || value instanceof JsonFloat;
}

/** Sets a member so that a key such as "__proto__" stays an ordinary own property. */
export function setMember(object: JsonObject, key: string, value: JsonValue): void {
  if (key === '__proto__') {
    Object.defineProperty(object, key, { value, enumerable: true, writable: true, configurable: true });
  } else {
    object[key] = value;
  }
}

export function hasMember(object: JsonObject, key: string): boolean {
  return Object.prototype.hasOwnProperty.call(object, key);
}

/**
 * The plain JavaScript form handed to command handlers: floats become numbers and
 * bigints become numbers (handlers work in numbers; the schema validator has already
 * range-checked the exact value).
 */
export function toPlain(value: JsonValue): unknown {
  if (value instanceof JsonFloat) return value.value;
  if (typeof value === 'bigint') return Number(value);
  if (Array.isArray(value)) return value.map(toPlain);
  if (value !== null && typeof value === 'object') {
    const out: Record<string, unknown> = {};
    for (const key of Object.keys(value)) setMember(out as JsonObject, key, toPlain(value[key]) as JsonValue);
    return out;
  }
  return value;
}
