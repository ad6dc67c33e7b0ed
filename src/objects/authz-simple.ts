/*
 * authz-simple: allows exactly one identity. The NBD server asks it, by id
 * and at every connection as QEMU does (so deleting or replacing the object
 * takes effect for the next client), whether a client's x509 distinguished
 * name may connect.
 */
import type { UserObject } from './object-registry.js';

export class AuthzSimple implements UserObject {
  readonly type = 'authz-simple';
  users = 0;

  constructor(readonly id: string, readonly identity: string) {}

  isAllowed(identity: string): boolean {
    return identity === this.identity;
  }
}

/** Whether the authorization object `id` allows `identity`; an error text when it cannot be asked. */
export function authzAllows(find: (id: string) => unknown, id: string, identity: string): boolean | { error: string } {
  const object = find(id);
  if (object === undefined) return { error: `Cannot find QAuthZ object ID ${id}` };
  if (!(object instanceof AuthzSimple)) return { error: `Object '${id}' is not a QAuthZ subclass` };
  return object.isAllowed(identity);
}
