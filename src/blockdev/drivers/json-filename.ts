/*
 * QEMU's "json:{...}" pseudo-filenames, used where a node cannot be named by a
 * plain path: the node's driver-relevant options, children expanded, written
 * the way QEMU serialises a QDict.
 */
import { serialize } from '../../qmp/json/writer.js';
import { qdictOrder } from '../../qmp/json/qdict-order.js';
import type { JsonValue } from '../../qmp/json/value.js';
import type { BlockNode } from '../node.js';

/** The driver, its strong options and its children: what QEMU puts in a json: filename. */
export function nodeDescription(node: BlockNode): Record<string, JsonValue> {
  const description: Record<string, JsonValue> = { driver: node.driver.name };
  const options = node.options as unknown as Record<string, JsonValue>;
  for (const key of node.driver.strongOptions) {
    if (options[key] === undefined) continue;
    // QEMU copies a nested option's flattened keys out of the node's own option dict, in that dict's order.
    const flat: Record<string, JsonValue> = {};
    flatten(flat, key, options[key]!);
    for (const flatKey of qdictOrder(Object.keys(flat))) description[flatKey] = flat[flatKey]!;
  }
  for (const edge of node.children) description[edge.name] = nodeDescription(edge.child);
  return description;
}

/** QEMU holds options flattened ("inject-error.0.event"), and so names them. */
function flatten(into: Record<string, JsonValue>, key: string, value: JsonValue): void {
  if (value !== null && typeof value === 'object' && !('value' in value && Object.keys(value).length === 1)) {
    // QEMU flattens by walking the nested dict in its own (QDict) order; the result's order follows from that.
    const nested = value as Record<string, JsonValue>;
    for (const inner of qdictOrder(Object.keys(nested))) flatten(into, `${key}.${inner}`, nested[inner]!);
  } else {
    into[key] = value;
  }
}

export function jsonFilename(node: BlockNode): string {
  return `json:${serialize(nodeDescription(node))}`;
}
