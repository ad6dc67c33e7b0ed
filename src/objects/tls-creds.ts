/*
 * What the TLS credential objects (tls-creds-x509, tls-creds-psk) share, as
 * in QEMU: the end of the connection they serve, whether the peer is checked,
 * the directory their files live in under QEMU's names, and the lookup that
 * nbd-server-start and the nbd driver do by id, with QEMU's texts.
 */
import { stat } from 'node:fs/promises';
import type { SecureContextOptions } from 'node:tls';
import type { QCryptoTLSCredsEndpoint, TlsCredsProperties } from '../generated/qapi-types.js';
import { genericError } from '../errors.js';
import { describeErrno, errnoOf } from '../blockdev/io-error.js';
import type { UserObject } from './object-registry.js';
import { tlsVersions, type TlsVersions } from './tls-priority.js';

export type TlsEndpoint = QCryptoTLSCredsEndpoint;

/** QEMU's file names in a credentials directory. */
export const CredsFile = {
  CA_CERT: 'ca-cert.pem',
  CA_CRL: 'ca-crl.pem',
  SERVER_CERT: 'server-cert.pem',
  SERVER_KEY: 'server-key.pem',
  CLIENT_CERT: 'client-cert.pem',
  CLIENT_KEY: 'client-key.pem',
  DH_PARAMS: 'dh-params.pem',
  PSK: 'keys.psk',
} as const;

export abstract class TlsCreds implements UserObject {
  /** Servers and nodes keep their own reference, so deleting the object never waits for them (as in QEMU). */
  users = 0;
  readonly endpoint: TlsEndpoint;
  readonly verifyPeer: boolean;
  readonly versions: TlsVersions;
  protected readonly dir: string | undefined;
  /**
   * What every TLS session of these credentials is made from (files read, and checked by making
   * a context of them, when the credentials are loaded). Node's tls.Server takes options, not a made context.
   */
  contextOptions: SecureContextOptions = {};

  protected constructor(readonly id: string, readonly type: 'tls-creds-x509' | 'tls-creds-psk', properties: TlsCredsProperties) {
    this.endpoint = properties.endpoint ?? 'client';
    this.verifyPeer = properties['verify-peer'] ?? true;
    this.dir = properties.dir;
    this.versions = tlsVersions(properties.priority);
  }

  /** The path of `name` in dir: undefined when an optional file is missing; an error for a required one or no dir. */
  protected async credentialFile(name: string, required: boolean): Promise<string | undefined> {
    if (this.dir === undefined) {
      if (required) throw genericError("Missing 'dir' property value");
      return undefined;
    }
    const path = `${this.dir}/${name}`;
    try {
      await stat(path);
      return path;
    } catch (error) {
      const code = errnoOf(error);
      if (code === 'ENOENT' && !required) return undefined;
      throw genericError(`Unable to access credentials ${path}: ${describeErrno(code)}`);
    }
  }
}

/** The credentials an id names, for the given end, as nbd-server-start and the nbd driver look them up. */
export function findTlsCreds(find: (id: string) => unknown, id: string, endpoint: TlsEndpoint): TlsCreds {
  const object = find(id);
  if (object === undefined) throw genericError(`No TLS credentials with id '${id}'`);
  if (!(object instanceof TlsCreds)) throw genericError(`Object with id '${id}' is not TLS credentials`);
  if (object.endpoint !== endpoint) throw genericError(`Expected TLS credentials for a ${endpoint} endpoint`);
  return object;
}
