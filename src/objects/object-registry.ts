/*
 * User-created objects (object-add / --object) by id. Objects that nodes
 * depend on (a throttle group) count their users so object-del refuses to
 * delete one that is still in use.
 */
import { genericError } from '../errors.js';

export interface UserObject {
  readonly id: string;
  readonly type: string;
  /** Nodes using the object; it cannot be deleted while non-zero. */
  users: number;
}

export class ObjectRegistry {
  private readonly objects = new Map<string, UserObject>();

  add(object: UserObject): void {
    if (this.objects.has(object.id)) throw genericError(`attempt to add duplicate property '${object.id}' to object (type 'container')`);
    this.objects.set(object.id, object);
  }

  find(id: string): UserObject | undefined {
    return this.objects.get(id);
  }

  delete(id: string): void {
    const object = this.objects.get(id);
    if (!object) throw genericError(`object '${id}' not found`);
    if (object.users > 0) throw genericError(`object '${id}' is in use, can not be deleted`);
    this.objects.delete(id);
  }
}
