/*
 * Data over NBD with TLS, both ways, with certificates and keys made by
 * openssl in the test: blockd serves a qcow2 image with x509 (TCP, authz on
 * the client's name) and with PSK (a UNIX socket) to qemu-io, qemu-img,
 * nbdinfo and qemu-storage-daemon's nbd driver; blockd's nbd driver reads and
 * writes through qemu-nbd (x509) and qemu-storage-daemon (PSK) exports, and
 * reconnects over TLS after the server restarts. What the clients wrote must
 * be in the images (qemu-img compare, check).
 */
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { BlockdevOptionsNbd, ObjectOptions } from '../../src/generated/qapi-types.js';
import { QmpClient } from '../../src/qmp/client.js';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { freePort, startQemuNbd } from '../helpers/nbd-servers.js';
import { makeTempDir } from '../helpers/paths.js';
import { assertCheckClean, createQcow2, MiB, qemuIo, runQemuImg, runTool } from '../helpers/qemu-tools.js';
import { startQsd, type QsdProcess } from '../helpers/qsd-process.js';
import { makeTlsFixtures, type TlsFixtures } from '../helpers/tls-pki.js';

const temp = makeTempDir('blockd-nbd-tls-');
const dir = temp.dir;
let pki: TlsFixtures;

before(() => {
  pki = makeTlsFixtures(join(dir, 'pki'));
});

after(() => temp.cleanup());

const SIZE = 16 * MiB;
const WRITES = ['write -P 0x5a 0 1M', 'write -P 0xa5 3M 512k', 'write -z 8M 1M', 'write -P 0x33 15M 1M'];
const READS = ['read -P 0x5a 0 1M', 'read -P 0xa5 3M 512k', 'read -P 0 8M 1M', 'read -P 0x33 15M 1M', 'read -P 0 1M 2M'];

/** A qcow2 image and a raw file holding what it must read as once WRITES went through. */
function imageAndExpected(name: string): { image: string; expected: string } {
  const image = createQcow2(join(dir, `${name}.qcow2`), SIZE);
  const expected = join(dir, `${name}-expected.raw`);
  runQemuImg('create', '-q', '-f', 'raw', expected, String(SIZE));
  qemuIo(expected, WRITES, ['-f', 'raw']);
  return { image, expected };
}

const x509Object = (id: string, credsDir: string, endpoint: 'client' | 'server') => `tls-creds-x509,id=${id},dir=${credsDir},endpoint=${endpoint}`;
const pskObject = (id: string, credsDir: string, endpoint: 'client' | 'server', extra = '') => `tls-creds-psk,id=${id},dir=${credsDir},endpoint=${endpoint}${extra}`;
/** QEMU tools' options before an nbd image over TLS: the credentials object, and image options to follow. */
const tlsFlags = (object: string) => ['--object', object, '--image-opts'];

describe('blockd serves over TLS', () => {
  test('x509 over TCP: qemu-io writes, nbdinfo, qemu-img and qemu-storage-daemon read; authz on the client name', async () => {
    const { image, expected } = imageAndExpected('served-x509');
    const port = await freePort();
    const blockd = await runBlockd([
      '--blockdev', `driver=qcow2,node-name=disk,file.driver=file,file.filename=${image}`,
      '--object', x509Object('tls0', pki.server, 'server'),
      '--object', `authz-simple,id=authz0,identity=${pki.clientName.replaceAll(',', ',,')}`,
      '--nbd-server', `addr.type=inet,addr.host=127.0.0.1,addr.port=${port},tls-creds=tls0,tls-authz=authz0`,
      '--export', 'type=nbd,id=e0,node-name=disk,name=disk,writable=on',
      '--qmp', `unix:${join(dir, 'served-x509-qmp.sock')}`,
    ]);
    const nbdImage = `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},export=disk,tls-creds=c0`;
    const qsdDir = join(dir, 'qsd-client');
    let qsd: QsdProcess | undefined;
    try {
      qemuIo(nbdImage, WRITES, tlsFlags(x509Object('c0', pki.client, 'client')));
      runQemuImg('compare', ...tlsFlags(x509Object('c0', pki.client, 'client')), nbdImage, `driver=raw,file.filename=${expected}`);

      const info = runTool('nbdinfo', ['--json', `nbds://127.0.0.1:${port}/disk?tls-certificates=${pki.client}`]);
      assert.equal(info.status, 0, info.stderr);
      const described = JSON.parse(info.stdout) as { protocol: string; TLS: boolean; exports: { 'export-size': number }[] };
      assert.equal(described.TLS, true);
      assert.equal(described.exports[0]!['export-size'], SIZE);
      const map = runTool('nbdinfo', ['--map', '--totals', `nbds://127.0.0.1:${port}/disk?tls-certificates=${pki.client}`]);
      assert.equal(map.status, 0, map.stderr);

      // qemu-storage-daemon's nbd driver over TLS, re-exported in the clear for qemu-io to read.
      mkdirSync(qsdDir);
      qsd = await startQsd(qsdDir, [
        '--object', x509Object('c0', pki.client, 'client'),
        '--blockdev', `driver=nbd,node-name=remote,server.type=inet,server.host=127.0.0.1,server.port=${port},export=disk,tls-creds=c0,read-only=on`,
        '--nbd-server', `addr.type=unix,addr.path=${join(qsdDir, 'nbd.sock')}`,
        '--export', 'type=nbd,id=e0,node-name=remote,name=remote',
      ]);
      qemuIo(`nbd+unix:///remote?socket=${join(qsdDir, 'nbd.sock')}`, READS, ['-r', '-f', 'raw']);
    } finally {
      await qsd?.stop();
      await blockd.stop();
    }
    assertCheckClean(image);
    runQemuImg('compare', '-f', 'qcow2', '-F', 'raw', image, expected);
  });

  test('PSK over a UNIX socket: qemu-io with the default and another username, nbdinfo', async () => {
    const { image, expected } = imageAndExpected('served-psk');
    const socket = join(dir, 'served-psk.sock');
    const blockd = await runBlockd([
      '--blockdev', `driver=qcow2,node-name=disk,file.driver=file,file.filename=${image}`,
      '--object', pskObject('tls0', pki.pskServer, 'server'),
      '--nbd-server', `addr.type=unix,addr.path=${socket},tls-creds=tls0`,
      '--export', 'type=nbd,id=e0,node-name=disk,name=disk,writable=on',
      '--qmp', `unix:${join(dir, 'served-psk-qmp.sock')}`,
    ]);
    const nbdImage = `driver=nbd,server.type=unix,server.path=${socket},export=disk,tls-creds=c0`;
    try {
      qemuIo(nbdImage, WRITES, tlsFlags(pskObject('c0', pki.psk, 'client')));
      qemuIo(nbdImage, READS, ['-r', ...tlsFlags(pskObject('c0', pki.psk, 'client', ',username=alice'))]);
      const info = runTool('nbdinfo', ['--size', `nbds+unix://alice@/disk?socket=${socket}&tls-psk-file=${join(pki.psk, 'keys.psk')}`]);
      assert.equal(info.status, 0, info.stderr);
      assert.equal(info.stdout.trim(), String(SIZE));
    } finally {
      await blockd.stop();
    }
    assertCheckClean(image);
    runQemuImg('compare', '-f', 'qcow2', '-F', 'raw', image, expected);
  });
});

describe("blockd's nbd driver over TLS", () => {
  /** blockd with the nbd node re-exported in the clear on a UNIX socket, for qemu-io to write and read through. */
  async function throughBlockd(name: string, object: ObjectOptions, node: Pick<BlockdevOptionsNbd, 'server' | 'tls-hostname'>, work: (uri: string) => void): Promise<void> {
    const blockd: BlockdProcess = await runBlockd(['--qmp', `unix:${join(dir, `${name}-qmp.sock`)}`]);
    const qmp = await QmpClient.connect(`unix:${join(dir, `${name}-qmp.sock`)}`);
    try {
      await qmp.execute('object-add', object);
      await qmp.execute('blockdev-add', { driver: 'nbd', 'node-name': 'remote', export: 'disk', 'tls-creds': 'c0', ...node });
      await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: join(dir, `${name}-nbd.sock`) } } });
      await qmp.execute('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'remote', name: 'remote', writable: true });
      work(`nbd+unix:///remote?socket=${join(dir, `${name}-nbd.sock`)}`);
      await qmp.execute('block-export-del', { id: 'e0' });
      await qmp.execute('blockdev-del', { 'node-name': 'remote' });
    } finally {
      await qmp.close();
      await blockd.stop();
    }
  }

  test('x509 to qemu-nbd over TCP, the hostname taken from the address', async () => {
    const { image, expected } = imageAndExpected('qemu-nbd-x509');
    const port = await freePort();
    const server = await startQemuNbd(image, { port }, ['--object', x509Object('t0', pki.server, 'server'), '--tls-creds', 't0']);
    try {
      await throughBlockd('to-qemu-nbd', { 'qom-type': 'tls-creds-x509', id: 'c0', dir: pki.client, endpoint: 'client' },
        { server: { type: 'inet', host: '127.0.0.1', port: String(port) } },
        (uri) => qemuIo(uri, [...WRITES, 'flush', ...READS], ['-f', 'raw']));
    } finally {
      await server.stop();
    }
    assertCheckClean(image);
    runQemuImg('compare', '-f', 'qcow2', '-F', 'raw', image, expected);
  });

  test('after the server restarts, the node reconnects over TLS with the credentials it was given, deleted meanwhile', async () => {
    const { image } = imageAndExpected('reconnect');
    qemuIo(image, ['write -P 0x77 0 1M'], ['-f', 'qcow2']);
    const port = await freePort();
    const serverArgs = ['--object', x509Object('t0', pki.server, 'server'), '--tls-creds', 't0'];
    let server = await startQemuNbd(image, { port }, serverArgs);
    const blockd = await runBlockd(['--qmp', `unix:${join(dir, 'reconnect-qmp.sock')}`]);
    const qmp = await QmpClient.connect(`unix:${join(dir, 'reconnect-qmp.sock')}`);
    try {
      await qmp.execute('object-add', { 'qom-type': 'tls-creds-x509', id: 'c0', dir: pki.client, endpoint: 'client' });
      await qmp.execute('blockdev-add', {
        driver: 'nbd', 'node-name': 'remote', export: 'disk', 'tls-creds': 'c0', 'reconnect-delay': 30,
        server: { type: 'inet', host: '127.0.0.1', port: String(port) },
      });
      await qmp.execute('object-del', { id: 'c0' });
      await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: join(dir, 'reconnect-nbd.sock') } } });
      await qmp.execute('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'remote', name: 'remote', writable: true });
      const uri = `nbd+unix:///remote?socket=${join(dir, 'reconnect-nbd.sock')}`;
      qemuIo(uri, ['read -P 0x77 0 1M'], ['-f', 'raw']);
      await server.stop();
      server = await startQemuNbd(image, { port }, serverArgs);
      // The read waits for the reconnection (reconnect-delay), which runs the TLS handshake again.
      qemuIo(uri, ['read -P 0x77 0 1M', 'write -P 0x78 1M 64k', 'flush'], ['-f', 'raw']);
      await qmp.execute('block-export-del', { id: 'e0' });
      await qmp.execute('blockdev-del', { 'node-name': 'remote' });
    } finally {
      await qmp.close();
      await blockd.stop();
      await server.stop();
    }
    qemuIo(image, ['read -P 0x78 1M 64k'], ['-f', 'qcow2']);
    assertCheckClean(image);
  });

  test("PSK to qemu-storage-daemon's export over a UNIX socket, with tls-hostname given and unused", async () => {
    const { image, expected } = imageAndExpected('qsd-psk');
    const qsdDir = join(dir, 'qsd-server');
    mkdirSync(qsdDir);
    const socket = join(qsdDir, 'nbd.sock');
    const qsd = await startQsd(qsdDir, [
      '--blockdev', `driver=qcow2,node-name=disk,file.driver=file,file.filename=${image}`,
      '--object', pskObject('t0', pki.pskServer, 'server'),
      '--nbd-server', `addr.type=unix,addr.path=${socket},tls-creds=t0`,
      '--export', 'type=nbd,id=e0,node-name=disk,name=disk,writable=on',
    ]);
    try {
      await throughBlockd('to-qsd', { 'qom-type': 'tls-creds-psk', id: 'c0', dir: pki.psk, endpoint: 'client', username: 'alice' },
        { server: { type: 'unix', path: socket }, 'tls-hostname': 'localhost' },
        (uri) => qemuIo(uri, [...WRITES, 'flush', ...READS], ['-f', 'raw']));
    } finally {
      await qsd.stop();
    }
    assertCheckClean(image);
    runQemuImg('compare', '-f', 'qcow2', '-F', 'raw', image, expected);
  });
});
