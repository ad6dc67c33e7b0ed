/*
 * object-add and object-del. The only object type blockd has is the throttle
 * group (QEMU's other types concern VMs, TLS and authorization).
 */
import type { CommandTable } from '../command-table.js';
import { genericError } from '../errors.js';
import { isIdentifier } from '../blockdev/node-names.js';
import type { ObjectRegistry } from './object-registry.js';
import { ThrottleGroup } from './throttle-group.js';

export function registerObjectCommands(registry: CommandTable, objects: ObjectRegistry): void {
  registry.register('object-add', (options) => {
    if (!isIdentifier(options.id)) {
      throw genericError("Parameter 'id' expects an identifier").withHint("Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.");
    }
    if (objects.find(options.id)) throw genericError(`attempt to add duplicate property '${options.id}' to object (type 'container')`);
    switch (options['qom-type']) {
      case 'throttle-group': {
        // The unstable flat x-* properties (x-bps-total, ...) are the same limits under older names.
        const flat = Object.fromEntries(Object.entries(options).filter(([key]) => key.startsWith('x-')).map(([key, value]) => [key.slice(2), value]));
        objects.add(new ThrottleGroup(options.id, { ...flat, ...options.limits }));
        break;
      }
    }
  });
  registry.register('object-del', ({ id }) => {
    objects.delete(id);
  });
}
