/*
 * The parts of the TLS credentials blockd decides by itself, without a QEMU
 * peer to compare with in the differential tests: the TLS versions a GnuTLS
 * priority string allows (and the ones refused), passwordid refused, and a
 * certificate's distinguished name written as GnuTLS writes it (the expected
 * text is what qemu-storage-daemon printed for the same subject when its
 * authz check refused it).
 */
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { distinguishedName } from '../../src/net/tls-session.js';
import { TlsCredsX509 } from '../../src/objects/tls-creds-x509.js';
import { tlsVersions } from '../../src/objects/tls-priority.js';
import { makeTempDir } from '../helpers/paths.js';
import { issue, makeCa, makePki } from '../helpers/tls-pki.js';

const temp = makeTempDir('blockd-tls-unit-');
after(() => temp.cleanup());

test('a GnuTLS priority string gives the TLS versions it allows', () => {
  assert.deepEqual(tlsVersions(undefined), { minVersion: 'TLSv1.2', maxVersion: 'TLSv1.3' });
  assert.deepEqual(tlsVersions('NORMAL'), { minVersion: 'TLSv1.2', maxVersion: 'TLSv1.3' });
  assert.deepEqual(tlsVersions('NORMAL:-VERS-TLS1.3'), { minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2' });
  assert.deepEqual(tlsVersions('@SYSTEM:-VERS-ALL:+VERS-TLS1.3'), { minVersion: 'TLSv1.3', maxVersion: 'TLSv1.3' });
  assert.deepEqual(tlsVersions('SECURE256:-VERS-TLS-ALL:+VERS-TLS1.2'), { minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2' });
  assert.throws(() => tlsVersions('NORMAL:-VERS-ALL'), { message: "TLS priority 'NORMAL:-VERS-ALL' leaves no TLS version enabled" });
  for (const priority of ['bogus', 'NORMAL:%COMPAT', 'NORMAL:+ANON-DH', 'NORMAL:+VERS-TLS1.1']) {
    assert.throws(() => tlsVersions(priority), { message: new RegExp(`^TLS priority '${priority.replace('+', '\\+')}' is not supported by blockd: it takes one of NORMAL`) });
  }
});

test('a priority blockd cannot honour, and an encrypted key (passwordid), are refused when the object is created', async () => {
  const { server } = makePki(join(temp.dir, 'pki'));
  await assert.rejects(TlsCredsX509.create('t0', { dir: server, endpoint: 'server', priority: 'NORMAL:%COMPAT' }), { message: /^TLS priority 'NORMAL:%COMPAT' is not supported by blockd/ });
  await assert.rejects(TlsCredsX509.create('t0', { dir: server, endpoint: 'server', passwordid: 'sec0' }),
    { message: "No secret with id 'sec0' (blockd has no secret objects: give an unencrypted key)" });
  const creds = await TlsCredsX509.create('t0', { dir: server, endpoint: 'server', priority: 'NORMAL:-VERS-TLS1.3' });
  assert.equal(creds.contextOptions.maxVersion, 'TLSv1.2');
});

test('distinguished names read as GnuTLS writes them, escapes and e-mail included', () => {
  const ca = makeCa(join(temp.dir, 'dn-ca'));
  const dir = issue(ca, join(temp.dir, 'dn'), 'client', { subject: '/C=GB/O=Acme, Inc./OU=a/CN=client "x"/emailAddress=a@b.c' });
  const certificate = new X509Certificate(readFileSync(join(dir, 'client-cert.pem')));
  assert.equal(distinguishedName(certificate), 'C=GB,O=Acme\\, Inc.,OU=a,CN=client \\"x\\",EMAIL=a@b.c');
});
