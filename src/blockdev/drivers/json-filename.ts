/*
 * QEMU's "json:{...}" pseudo-filenames, used where a node cannot be named by a
 * plain path: the node's driver-relevant options, children expanded, written
 * the way QEMU serialises a QDict.
 */
import { serialize } from '../../qmp/json/writer.js';
import type { JsonValue } from '../../qmp/json/value.js';
import type { BlockNode } from '../node.js';

/** The driver, its strong options and its children: what QEMU puts in a json: filename. */
export function nodeDescription(node: BlockNode): Record<string, JsonValue> {
  const description: Record<string, JsonValue> = { driver: node.driver.name };
  const options = node.options as unknown as Record<string, JsonValue>;
  for (const key of node.driver.strongOptions) {
    if (options[key] !== undefined) description[key] = options[key]!;
  }
  for (const edge of node.children) description[edge.name] = nodeDescription(edge.child);
  return description;
}

export function jsonFilename(node: BlockNode): string {
  return `json:${serialize(nodeDescription(node))}`;
}
