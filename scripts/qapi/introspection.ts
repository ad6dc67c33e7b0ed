/*
 * Builds the `query-qmp-schema` answer in QEMU's SchemaInfo shape: commands and
 * events in definition order, then every type they reach in order of first
 * use; non-builtin type names masked as "0", "1", ...; all integer kinds shown
 * as "int"; unions flattened with tag and variants. Clients such as libvirt
 * navigate it from a command's arg-type, so the reachable set is what counts.
 */
import { BUILTIN_JSON_TYPES, isBuiltin, type Member, type SchemaModel, type TypeUse } from './model.js';

export type SchemaInfo = Record<string, unknown>;

export function buildIntrospection(model: SchemaModel): SchemaInfo[] {
  const entries: SchemaInfo[] = [];
  const used: TypeUse[] = [];
  const usedKeys = new Set<string>();
  const masked = new Map<string, string>();

  const mask = (name: string): string => {
    let number = masked.get(name);
    if (number === undefined) {
      number = String(masked.size);
      masked.set(name, number);
    }
    return number;
  };

  const isInt = (name: string) => isBuiltin(name) && BUILTIN_JSON_TYPES[name] === 'int';

  /** Registers a type as reachable and returns the name it has on the wire. */
  const use = (type: TypeUse): string => {
    let canonical: TypeUse = type;
    if (typeof type === 'string' && isInt(type)) canonical = 'int';
    else if (typeof type !== 'string' && typeof type.array === 'string' && isInt(type.array)) canonical = { array: 'int' };
    const key = JSON.stringify(canonical);
    if (!usedKeys.has(key)) {
      usedKeys.add(key);
      used.push(canonical);
    }
    if (typeof canonical !== 'string') return `[${use(canonical.array)}]`;
    return isBuiltin(canonical) ? canonical : mask(canonical);
  };

  const withFeatures = (info: SchemaInfo, features: string[]): SchemaInfo => {
    if (features.length) info.features = features;
    return info;
  };

  const member = (m: Member): SchemaInfo => {
    const info: SchemaInfo = { name: m.name, type: use(m.type) };
    if (m.optional) info.default = null;
    return withFeatures(info, m.features);
  };

  // Commands and events keep their names and come first, in definition order.
  const calls = [
    ...model.commands.map((command) => ({ position: command.position, command, event: undefined })),
    ...model.events.map((event) => ({ position: event.position, command: undefined, event })),
  ];
  calls.sort((a, b) => a.position - b.position);
  for (const { command, event } of calls) {
    if (command) {
      const info: SchemaInfo = { name: command.name, 'meta-type': 'command', 'arg-type': use(command.argType), 'ret-type': use(command.retType) };
      if (command.allowOob) info['allow-oob'] = true;
      entries.push(withFeatures(info, command.features));
    } else if (event) {
      entries.push(withFeatures({ name: event.name, 'meta-type': 'event', 'arg-type': use(event.argType) }, event.features));
    }
  }

  // Then every reachable type; visiting one may reach more, which join the end of the queue.
  for (let i = 0; i < used.length; i++) {
    const type = used[i]!;
    if (typeof type !== 'string') {
      const element = use(type.array);
      entries.push({ name: `[${element}]`, 'meta-type': 'array', 'element-type': element });
      continue;
    }
    if (isBuiltin(type)) {
      entries.push({ name: type, 'meta-type': 'builtin', 'json-type': BUILTIN_JSON_TYPES[type] });
      continue;
    }
    const named = model.types.get(type)!;
    const name = mask(type);
    switch (named.meta) {
      case 'enum':
        entries.push(withFeatures({
          name, 'meta-type': 'enum',
          members: named.values.map((value) => withFeatures({ name: value.name }, value.features)),
          values: named.values.map((value) => value.name),
        }, named.features));
        break;
      case 'object': {
        const info: SchemaInfo = { name, 'meta-type': 'object', members: named.members.map(member) };
        if (named.variants) {
          info.tag = named.variants.tag;
          info.variants = named.variants.cases.map((branch) => ({ case: branch.name, type: use(branch.type) }));
        }
        entries.push(withFeatures(info, named.features));
        break;
      }
      case 'alternate':
        entries.push(withFeatures({
          name, 'meta-type': 'alternate', members: named.branches.map((branch) => ({ type: use(branch.type) })),
        }, named.features));
        break;
    }
  }
  return entries;
}
