/*
 * Differential test of the TLS objects: object-add of tls-creds-x509,
 * tls-creds-psk and authz-simple over credential directories made with openssl
 * (good ones, and ones QEMU's loading or sanity check refuses: missing files,
 * a CA that is no CA, a certificate of another CA, one for the wrong purpose,
 * an expired one, a key of another certificate, garbage, an empty CA file,
 * unknown PSK users), object-del, and the lookups of nbd-server-start and the
 * nbd driver (no such id, not credentials, the wrong end). The same script
 * runs against qemu-storage-daemon and blockd; replies must be equal.
 */
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync, copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { differentialPeers } from '../helpers/differential-peers.js';
import { describeDifferences, runTranscript, type TranscriptStep } from '../helpers/qmp-transcript.js';
import { RawConnection } from '../helpers/raw-connection.js';
import { caOnly, issue, makeCa, makePki, pskKey, writePskFile } from '../helpers/tls-pki.js';

/** Credential directories under dir/pki, each made for one case. */
function preparePki(dir: string): void {
  const root = join(dir, 'pki');
  const { ca, server } = makePki(root);
  const other = makeCa(join(root, 'other-ca'), 'Other CA');
  mkdirSync(join(root, 'empty'));
  caOnly(ca, join(root, 'ca-only'));
  // A "CA" whose basic constraints say it is none, and a server certificate it signed.
  issue(makeCa(join(root, 'not-a-ca'), 'Not a CA', ['basicConstraints=critical,CA:FALSE']), join(root, 'not-a-ca'), 'server', { subject: '/CN=server' });
  // Our own certificate signed by another CA than the one in ca-cert.pem.
  issue(other, join(root, 'wrong-ca'), 'server', { subject: '/CN=server' });
  issue(other, join(root, 'wrong-ca'), 'client', { subject: '/CN=client' });
  copyFileSync(ca.cert, join(root, 'wrong-ca', 'ca-cert.pem'));
  issue(ca, join(root, 'client-purpose'), 'server', { subject: '/CN=server', purpose: 'clientAuth' });
  issue(ca, join(root, 'client-purpose'), 'client', { subject: '/CN=client', purpose: 'serverAuth' });
  issue(ca, join(root, 'expired'), 'server', { subject: '/CN=server', days: -1 });
  issue(ca, join(root, 'key-mismatch'), 'server', { subject: '/CN=server' });
  copyFileSync(join(root, 'client', 'client-key.pem'), join(root, 'key-mismatch', 'server-key.pem'));
  caOnly(ca, join(root, 'garbage'));
  writeFileSync(join(root, 'garbage', 'server-cert.pem'), 'garbage\n');
  copyFileSync(join(server, 'server-key.pem'), join(root, 'garbage', 'server-key.pem'));
  issue(ca, join(root, 'empty-ca'), 'server', { subject: '/CN=server' });
  writeFileSync(join(root, 'empty-ca', 'ca-cert.pem'), '');
  writePskFile(join(root, 'psk'), { qemu: pskKey(), alice: pskKey() });
  writePskFile(join(root, 'psk-alice'), { alice: pskKey() });
}

const peers = differentialPeers(preparePki);

const x509 = (id: string, dir: string, extra: object = {}) =>
  ({ execute: 'object-add', arguments: { 'qom-type': 'tls-creds-x509', id, dir: `$DIR/pki/${dir}`, ...extra } });
const psk = (id: string, dir: string, extra: object = {}) =>
  ({ execute: 'object-add', arguments: { 'qom-type': 'tls-creds-psk', id, dir: `$DIR/pki/${dir}`, ...extra } });
const server = { endpoint: 'server' };
const serverStart = (extra: object) => ({ execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$DIR/nbd.sock' } }, ...extra } });
const nbdNode = (extra: object) =>
  ({ execute: 'blockdev-add', arguments: { driver: 'nbd', 'node-name': 'n0', server: { type: 'unix', path: '$DIR/nosuch.sock' }, export: 'disk', ...extra } });
/** Whether the server's socket file exists: a start refused for its credentials must not leave it behind. */
const socketLeft: TranscriptStep = {
  action: async (dir) => {
    const connection = await RawConnection.open(join(dir, 'nbd.sock')).catch(() => undefined);
    connection?.end();
    return connection ? 'the NBD socket accepts connections' : 'no NBD socket';
  },
};

const STEPS: TranscriptStep[] = [
  // x509 loading and QEMU's sanity check.
  x509('x0', 'empty', server),
  x509('x0', 'empty'),
  x509('x0', 'nosuch', server),
  { execute: 'object-add', arguments: { 'qom-type': 'tls-creds-x509', id: 'x0', endpoint: 'server' } },
  x509('x0', 'ca-only', server),
  x509('x0', 'not-a-ca', server),
  x509('x0', 'wrong-ca', server),
  x509('x0', 'wrong-ca'),
  x509('x0', 'client-purpose', server),
  x509('x0', 'client-purpose'),
  x509('x0', 'expired', server),
  x509('x0', 'key-mismatch', server),
  x509('x0', 'garbage', server),
  x509('x0', 'empty-ca', server),
  x509('x0', 'server', { endpoint: 'bogus' }),
  x509('x0', 'server', { ...server, loaded: true }),
  x509('x0', 'server', { ...server, bogus: 1 }),
  x509('x0', 'server', { ...server, 'verify-peer': 'yes' }),
  // Without the sanity check, a certificate of another CA loads.
  x509('unchecked', 'wrong-ca', { ...server, 'sanity-check': false }),
  x509('srv', 'server', { ...server, 'verify-peer': true, 'sanity-check': true, priority: 'NORMAL' }),
  x509('srv', 'server', server),
  x509('1srv', 'server', server),
  x509('cli', 'client', { endpoint: 'client' }),
  x509('cli-ca-only', 'ca-only'),
  x509('cli-server-dir', 'server'),
  // PSK.
  psk('p0', 'empty'),
  psk('p0', 'empty', server),
  psk('p0', 'psk', { ...server, username: 'alice' }),
  psk('p0', 'psk-alice'),
  psk('p0', 'psk-alice', { username: 'bob' }),
  psk('psk-alice', 'psk-alice', { username: 'alice' }),
  psk('psk-cli', 'psk'),
  psk('psk-srv', 'psk', server),
  psk('p1', 'psk', { loaded: false }),
  // authz-simple.
  { execute: 'object-add', arguments: { 'qom-type': 'authz-simple', id: 'az' } },
  { execute: 'object-add', arguments: { 'qom-type': 'authz-simple', id: 'az', identity: 'O=blockd test,CN=client', extra: 1 } },
  { execute: 'object-add', arguments: { 'qom-type': 'authz-simple', id: 'az', identity: 'O=blockd test,CN=client' } },
  { execute: 'object-add', arguments: { 'qom-type': 'authz-simple', id: 'az', identity: 'x' } },
  // Lookups by nbd-server-start: the address is taken first, the credentials checked next.
  serverStart({ 'tls-creds': 'nosuch' }),
  socketLeft,
  serverStart({ 'tls-creds': 'az' }),
  serverStart({ 'tls-creds': 'cli' }),
  serverStart({ 'tls-creds': 'psk-cli' }),
  { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '$DIR/nodir/nbd.sock' } }, 'tls-creds': 'nosuch' } },
  socketLeft,
  // tls-authz is looked up when a client connects, and may be given without credentials.
  serverStart({ 'tls-authz': 'nosuch' }),
  { execute: 'nbd-server-stop' },
  serverStart({ 'tls-creds': 'srv', 'tls-authz': 'nosuch' }),
  socketLeft,
  // The server keeps its credentials: deleting the object is allowed, as in QEMU.
  { execute: 'object-del', arguments: { id: 'srv' } },
  { execute: 'object-del', arguments: { id: 'srv' } },
  { execute: 'nbd-server-stop' },
  serverStart({ 'tls-creds': 'psk-srv', 'tls-authz': 'az' }),
  { execute: 'nbd-server-stop' },
  // Lookups by the nbd driver, before it connects.
  nbdNode({ 'tls-creds': 'nosuch' }),
  nbdNode({ 'tls-creds': 'az' }),
  nbdNode({ 'tls-creds': 'psk-srv' }),
  nbdNode({ 'tls-creds': 'cli' }),
  nbdNode({ 'tls-creds': 'psk-cli', 'tls-hostname': 'localhost' }),
  nbdNode({ 'tls-hostname': 'localhost' }),
  { execute: 'object-del', arguments: { id: 'az' } },
  { execute: 'object-del', arguments: { id: 'cli' } },
  { execute: 'object-del', arguments: { id: 'psk-alice' } },
  { execute: 'object-del', arguments: { id: 'nosuch' } },
];

test('TLS credential and authz objects load, fail and are looked up as in qemu-storage-daemon', async () => {
  const theirs = await runTranscript(peers.qsd.socket, peers.qsd.dir, STEPS);
  const ours = await runTranscript(peers.blockd.socket, peers.blockd.dir, STEPS);
  assert.deepEqual(ours, theirs, describeDifferences(ours, theirs, 8));
});
