/*
 * How QEMU names a node (bdrv_refresh_filename): a format node over a
 * protocol node is called by its file's name, unless options change what it
 * reads or its backing file is not the one its header names; then, like any
 * filter, it gets a "json:{...}" pseudo-filename of its driver, strong
 * options and children, written the way QEMU serialises a QDict.
 */
import { serialize } from '../json/writer.js';
import { qdictOrder } from '../json/qdict-order.js';
import type { JsonValue } from '../json/value.js';
import type { BlockNode } from './node.js';

/** The driver, its strong options and its children: what QEMU puts in a json: filename. */
export function nodeDescription(node: BlockNode): Record<string, JsonValue> {
  const only = node.implicit ? node.primaryChild() : undefined;
  if (only) return nodeDescription(only.child); // an implicit filter is described as its child
  const description: Record<string, JsonValue> = { driver: node.driver.name };
  const options = node.options as unknown as Record<string, JsonValue>;
  for (const key of node.driver.strongOptions) {
    if (options[key] === undefined) continue;
    // QEMU copies a nested option's flattened keys out of the node's own option dict, in that dict's order.
    const flat: Record<string, JsonValue> = {};
    flatten(flat, key, options[key]!);
    for (const flatKey of qdictOrder(Object.keys(flat))) description[flatKey] = flat[flatKey]!;
  }
  const overridden = backingOverridden(node);
  for (const edge of node.children) {
    if (edge.role === 'cow' && !overridden) continue; // the header's own backing file goes without saying
    description[edge.name] = nodeDescription(edge.child);
  }
  if (overridden && !node.backing()) description.backing = null;
  return description;
}

/** Whether the backing file differs from the one the image header names (or the header's was suppressed). */
export function backingOverridden(node: BlockNode): boolean {
  if (!node.driver.supportsBacking) return false;
  const auto = node.state.autoBackingFile ?? '';
  const backing = node.backing();
  return backing ? auto !== nodeFilename(backing.child) : auto !== '';
}

/** The node's filename as query-named-block-nodes reports it. */
export function nodeFilename(node: BlockNode): string {
  if (node.driver.kind === 'protocol') return node.state.info().filename;
  const filtered = node.implicit || node.driver.namedAfterChild ? node.primaryChild() : undefined;
  if (filtered) return nodeFilename(filtered.child);
  const options = node.options as unknown as Record<string, unknown>;
  const json = node.driver.strongOptions.some((key) => options[key] !== undefined) || backingOverridden(node);
  const primary = node.primaryChild()?.child;
  if (!json && node.driver.kind !== 'filter' && primary?.driver.kind === 'protocol') return primary.state.info().filename;
  return jsonFilename(node);
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
