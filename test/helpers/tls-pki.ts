/*
 * Certificates and pre-shared keys for the TLS tests, made with openssl in a
 * test's temporary directory and laid out as QEMU's tls-creds objects read
 * them: a directory per end holding ca-cert.pem and server-cert.pem /
 * server-key.pem (or client-cert.pem / client-key.pem); keys.psk with
 * `username:hexkey` lines. EC P-256 keys: quick to make, and GnuTLS and
 * OpenSSL both take them.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface CertificateAuthority {
  cert: string;
  key: string;
}

function openssl(args: string[]): void {
  execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

function newKeyArgs(keyFile: string): string[] {
  return ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', keyFile];
}

/** A self-signed CA (basic constraints CA, may sign certificates) in `dir`. */
export function makeCa(dir: string, name = 'Test CA', extensions = ['basicConstraints=critical,CA:TRUE', 'keyUsage=critical,keyCertSign,cRLSign']): CertificateAuthority {
  mkdirSync(dir, { recursive: true });
  const ca = { cert: join(dir, 'ca-cert.pem'), key: join(dir, 'ca-key.pem') };
  openssl(['req', '-x509', ...newKeyArgs(ca.key), '-out', ca.cert, '-days', '2', '-subj', `/CN=${name}`, ...extensions.flatMap((ext) => ['-addext', ext])]);
  return ca;
}

export interface CertificateOptions {
  /** The subject, openssl's /A=B/C=D form. */
  subject: string;
  /** extendedKeyUsage; default the role's (serverAuth or clientAuth), critical. */
  purpose?: string;
  /** subjectAltName for a server; default DNS:localhost,IP:127.0.0.1. */
  altNames?: string;
  /** Days of validity; negative makes a certificate that has already expired. */
  days?: number;
}

/**
 * A key and a certificate the CA signs, written as `dir/ROLE-cert.pem` and `dir/ROLE-key.pem` with
 * the CA's certificate beside them as ca-cert.pem: a directory a tls-creds-x509 object takes.
 */
export function issue(ca: CertificateAuthority, dir: string, role: 'server' | 'client', options: CertificateOptions): string {
  mkdirSync(dir, { recursive: true });
  const key = join(dir, `${role}-key.pem`);
  const csr = join(dir, `${role}.csr`);
  const extensions = join(dir, `${role}.ext`);
  const lines = [
    'basicConstraints=critical,CA:FALSE',
    'keyUsage=critical,digitalSignature,keyEncipherment',
    `extendedKeyUsage=critical,${options.purpose ?? (role === 'server' ? 'serverAuth' : 'clientAuth')}`,
  ];
  if (role === 'server') lines.push(`subjectAltName=${options.altNames ?? 'DNS:localhost,IP:127.0.0.1'}`);
  writeFileSync(extensions, `${lines.join('\n')}\n`);
  openssl(['req', ...newKeyArgs(key), '-out', csr, '-subj', options.subject]);
  openssl(['x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-CAcreateserial', '-CAserial', join(dir, 'ca.srl'),
    '-out', join(dir, `${role}-cert.pem`), '-days', String(options.days ?? 2), '-extfile', extensions]);
  copyFileSync(ca.cert, join(dir, 'ca-cert.pem'));
  return dir;
}

/** dir/dh-params.pem (the RFC 7919 ffdhe2048 group), the optional DH parameters of server credentials. */
export function writeDhParams(dir: string): void {
  openssl(['genpkey', '-genparam', '-algorithm', 'DH', '-pkeyopt', 'group:ffdhe2048', '-out', join(dir, 'dh-params.pem')]);
}

/** dir/ca-crl.pem: the CA's revocation list, naming the certificates given (openssl ca keeps its database beside it). */
export function writeCrl(ca: CertificateAuthority, dir: string, revoked: string[]): void {
  const database = join(dir, 'crl-db');
  mkdirSync(database, { recursive: true });
  writeFileSync(join(database, 'index.txt'), '');
  const config = join(database, 'ca.cnf');
  writeFileSync(config, `[ca]\ndefault_ca = crl\n[crl]\ndatabase = ${join(database, 'index.txt')}\ndefault_md = sha256\ndefault_crl_days = 2\n`);
  const signer = ['-config', config, '-keyfile', ca.key, '-cert', ca.cert];
  for (const cert of revoked) openssl(['ca', ...signer, '-revoke', cert]);
  openssl(['ca', ...signer, '-gencrl', '-out', join(dir, 'ca-crl.pem')]);
}

/** A directory with only the CA's certificate: a client that has no certificate of its own. */
export function caOnly(ca: CertificateAuthority, dir: string): string {
  mkdirSync(dir, { recursive: true });
  copyFileSync(ca.cert, join(dir, 'ca-cert.pem'));
  return dir;
}

/** A random 32-byte key in hex, as psktool makes them. */
export function pskKey(): string {
  return randomBytes(32).toString('hex');
}

/** dir/keys.psk with one `username:hexkey` line per entry. */
export function writePskFile(dir: string, keys: Record<string, string>): string {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'keys.psk'), Object.entries(keys).map(([user, key]) => `${user}:${key}\n`).join(''));
  return dir;
}

/** The usual set: one CA, a server for localhost and 127.0.0.1, and a client, under root/{ca,server,client}. */
export function makePki(root: string): { ca: CertificateAuthority; server: string; client: string } {
  const ca = makeCa(join(root, 'ca'));
  const server = issue(ca, join(root, 'server'), 'server', { subject: '/O=blockd test/CN=server' });
  writeDhParams(server);
  return { ca, server, client: issue(ca, join(root, 'client'), 'client', { subject: '/O=blockd test/CN=client' }) };
}

/** Credential directories for every situation the TLS interop tests put clients and servers in. */
export interface TlsFixtures {
  /** x509 server for localhost and 127.0.0.1, with a revocation list (ca-crl.pem). */
  server: string;
  /** x509 client whose distinguished name is `clientName`. */
  client: string;
  clientName: string;
  /** A client of the same CA with another name (an authz check refuses it). */
  intruder: string;
  /** A client whose certificate the server's ca-crl.pem revokes. */
  revoked: string;
  /** A client that trusts our CA but has no certificate. */
  caOnly: string;
  /** A client that trusts our CA, with a certificate from another CA. */
  stranger: string;
  /** A client with a certificate and trust from another CA only: our server is unknown to it. */
  distrusting: string;
  /** PSK server: keys.psk knows "qemu" and "alice". */
  pskServer: string;
  /** PSK client: the server's keys for "qemu" (the default username) and "alice". */
  psk: string;
  /** PSK client: "qemu" with another key. */
  pskWrong: string;
}

export function makeTlsFixtures(root: string): TlsFixtures {
  const { ca, server, client } = makePki(root);
  const revoked = issue(ca, join(root, 'revoked'), 'client', { subject: '/O=blockd test/CN=revoked' });
  writeCrl(ca, server, [join(revoked, 'client-cert.pem')]);
  const other = makeCa(join(root, 'other-ca'), 'Other CA');
  const stranger = issue(other, join(root, 'stranger'), 'client', { subject: '/O=blockd test/CN=stranger' });
  copyFileSync(ca.cert, join(stranger, 'ca-cert.pem'));
  const keys = { qemu: pskKey(), alice: pskKey() };
  const pskServer = writePskFile(join(root, 'psk-server'), keys);
  writeDhParams(pskServer);
  return {
    server,
    client,
    clientName: 'O=blockd test,CN=client',
    intruder: issue(ca, join(root, 'intruder'), 'client', { subject: '/O=blockd test/CN=intruder' }),
    revoked,
    caOnly: caOnly(ca, join(root, 'ca-only')),
    stranger,
    distrusting: issue(other, join(root, 'distrusting'), 'client', { subject: '/O=blockd test/CN=client' }),
    pskServer,
    psk: writePskFile(join(root, 'psk'), keys),
    pskWrong: writePskFile(join(root, 'psk-wrong'), { qemu: pskKey() }),
  };
}
