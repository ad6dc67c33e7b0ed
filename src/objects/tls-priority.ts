/*
 * A tls-creds object's `priority` is a GnuTLS priority string; blockd speaks
 * TLS through OpenSSL, so it understands the part that decides which TLS
 * versions may be used: a base keyword (whose cipher choice OpenSSL's defaults
 * stand in for) and +/-VERS-TLS1.2, +/-VERS-TLS1.3, +/-VERS-ALL. Anything else
 * is refused when the object is created, rather than silently ignored.
 */
import type { SecureVersion } from 'node:tls';
import { genericError } from '../errors.js';

const BASE_KEYWORDS = new Set(['NORMAL', 'PERFORMANCE', 'SECURE128', 'SECURE192', 'SECURE256', '@SYSTEM']);
const VERSIONS = ['TLSv1.2', 'TLSv1.3'] as const;

export interface TlsVersions {
  minVersion: SecureVersion;
  maxVersion: SecureVersion;
}

export function tlsVersions(priority: string | undefined): TlsVersions {
  if (priority === undefined) return { minVersion: 'TLSv1.2', maxVersion: 'TLSv1.3' };
  const unsupported = () =>
    genericError(`TLS priority '${priority}' is not supported by blockd: it takes one of ${[...BASE_KEYWORDS].join(', ')}, followed by +/-VERS-TLS1.2, +/-VERS-TLS1.3 or +/-VERS-ALL`);
  const [base, ...modifiers] = priority.split(':');
  if (!BASE_KEYWORDS.has(base!)) throw unsupported();
  const enabled = new Set<string>(VERSIONS);
  for (const modifier of modifiers) {
    const match = /^([+-])VERS-(ALL|TLS-ALL|TLS1\.2|TLS1\.3)$/.exec(modifier);
    if (!match) throw unsupported();
    const [, sign, version] = match;
    const affected = version === 'ALL' || version === 'TLS-ALL' ? VERSIONS : [`TLSv${version!.slice(3)}`];
    for (const name of affected) {
      if (sign === '+') enabled.add(name);
      else enabled.delete(name);
    }
  }
  const allowed = VERSIONS.filter((version) => enabled.has(version));
  if (allowed.length === 0) throw genericError(`TLS priority '${priority}' leaves no TLS version enabled`);
  return { minVersion: allowed[0]!, maxVersion: allowed[allowed.length - 1]! };
}
