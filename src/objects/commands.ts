/*
 * object-add and object-del for the object types blockd has: throttle groups,
 * TLS credentials (x509, PSK) and authz-simple (QEMU's other types concern VMs,
 * secrets and other authorization lists).
 */
import type { CommandTable } from '../command-table.js';
import { genericError } from '../errors.js';
import { isIdentifier } from '../blockdev/node-names.js';
import type { ObjectOptions } from '../generated/qapi-types.js';
import { AuthzSimple } from './authz-simple.js';
import type { ObjectRegistry, UserObject } from './object-registry.js';
import { ThrottleGroup } from './throttle-group.js';
import { TlsCredsPsk } from './tls-creds-psk.js';
import { TlsCredsX509 } from './tls-creds-x509.js';

/** Creates the object; TLS credentials load (and check) their files now, as QEMU's do. */
async function createObject(options: ObjectOptions): Promise<UserObject> {
  switch (options['qom-type']) {
    case 'throttle-group': {
      // The unstable flat x-* properties (x-bps-total, ...) are the same limits under older names.
      const flat = Object.fromEntries(Object.entries(options).filter(([key]) => key.startsWith('x-')).map(([key, value]) => [key.slice(2), value]));
      return new ThrottleGroup(options.id, { ...flat, ...options.limits });
    }
    case 'tls-creds-x509':
      return TlsCredsX509.create(options.id, options);
    case 'tls-creds-psk':
      return TlsCredsPsk.create(options.id, options);
    case 'authz-simple':
      return new AuthzSimple(options.id, options.identity);
  }
}

export function registerObjectCommands(registry: CommandTable, objects: ObjectRegistry): void {
  registry.register('object-add', async (options) => {
    if (!isIdentifier(options.id)) {
      throw genericError("Parameter 'id' expects an identifier").withHint("Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.");
    }
    if ('loaded' in options) throw genericError(`Property '${options['qom-type']}.loaded' is not writable`);
    if (objects.find(options.id)) throw genericError(`attempt to add duplicate property '${options.id}' to object (type 'container')`);
    objects.add(await createObject(options));
  });
  registry.register('object-del', ({ id }) => {
    objects.delete(id);
  });
}
