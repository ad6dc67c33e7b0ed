/*
 * Who is refused over NBD with TLS, and with what words, differentially:
 * - as a client: qemu-storage-daemon and blockd run the same blockdev-add
 *   script against the same servers (QSD's and blockd's x509 server over TCP
 *   with an authz check, their PSK servers, qemu-nbd with x509 on a UNIX
 *   socket, a plain qemu-nbd):
 *   no credentials, a good certificate, no certificate, a revoked one, one of
 *   another CA, a server of an unknown CA, the wrong hostname, a name the authz refuses,
 *   PSK with the right and a wrong key, the wrong kind of credentials, TLS to
 *   a server without it. Their replies must be equal.
 * - as a server: qemu-img and nbdinfo connect in the same ways to QSD's and
 *   to blockd's servers, set up by the same command line; their output must
 *   be equal, and so must the reasons the servers give for refusing (QSD's
 *   stderr, blockd's log) once the handshake is done. One known difference: a
 *   PSK handshake that fails
 *   (wrong key, x509 client) ends with a TLS alert from blockd's OpenSSL where
 *   GnuTLS hangs up, and QEMU's client words the two differently.
 */
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { freePort, startQemuNbd, type NbdServer } from '../helpers/nbd-servers.js';
import { makeTempDir } from '../helpers/paths.js';
import { createQcow2, MiB, runTool } from '../helpers/qemu-tools.js';
import { describeDifferences, runTranscript, type TranscriptStep } from '../helpers/qmp-transcript.js';
import { startQsd } from '../helpers/qsd-process.js';
import { makeTlsFixtures, type TlsFixtures } from '../helpers/tls-pki.js';
import { waitUntil } from '../helpers/wait-until.js';

const temp = makeTempDir('blockd-nbd-tls-refusals-');
const dir = temp.dir;
let pki: TlsFixtures;

/** One TLS server of each kind, per implementation, started by the same command line. */
interface TlsServers {
  x509Port: number;
  pskPort: number;
  /** The reasons the x509 server gave for refusing clients, in order. */
  refusals(): string[];
  stop(): Promise<void>;
}

function serverArgs(x509Port: number): string[] {
  return [
    '--blockdev', 'driver=null-co,node-name=disk,size=16777216,read-zeroes=on',
    '--object', `tls-creds-x509,id=tls0,dir=${pki.server},endpoint=server`,
    '--object', `authz-simple,id=authz0,identity=${pki.clientName.replaceAll(',', ',,')}`,
    '--nbd-server', `addr.type=inet,addr.host=127.0.0.1,addr.port=${x509Port},tls-creds=tls0,tls-authz=authz0`,
    '--export', 'type=nbd,id=e0,node-name=disk,name=disk',
  ];
}

function pskServerArgs(port: number): string[] {
  return [
    '--blockdev', 'driver=null-co,node-name=disk,size=16777216,read-zeroes=on',
    '--object', `tls-creds-psk,id=tls0,dir=${pki.pskServer},endpoint=server`,
    '--nbd-server', `addr.type=inet,addr.host=127.0.0.1,addr.port=${port},tls-creds=tls0`,
    '--export', 'type=nbd,id=e0,node-name=disk,name=disk',
  ];
}

/**
 * The reasons for refusing a client once the TLS handshake is done. A failed handshake is worded
 * by the TLS library (GnuTLS or OpenSSL), and a client that hangs up itself (it refused the
 * server) is no refusal of the server's.
 */
function afterHandshake(reasons: string[]): string[] {
  return reasons.filter((reason) => !reason.startsWith('TLS handshake failed') && !reason.startsWith('Failed to read'));
}

async function startQsdServers(): Promise<TlsServers> {
  const x509Port = await freePort();
  const pskPort = await freePort();
  mkdirSync(join(dir, 'qsd-x509'));
  mkdirSync(join(dir, 'qsd-psk'));
  const x509 = await startQsd(join(dir, 'qsd-x509'), serverArgs(x509Port));
  const psk = await startQsd(join(dir, 'qsd-psk'), pskServerArgs(pskPort));
  return {
    x509Port,
    pskPort,
    refusals: () => afterHandshake([...x509.stderr().matchAll(/option negotiation failed: (.*)/g)].map((match) => match[1]!)),
    stop: async () => {
      await x509.stop();
      await psk.stop();
    },
  };
}

async function startBlockdServers(): Promise<TlsServers> {
  const x509Port = await freePort();
  const pskPort = await freePort();
  const x509 = await runBlockd([...serverArgs(x509Port), '--qmp', `unix:${join(dir, 'blockd-x509-qmp.sock')}`]);
  const psk = await runBlockd([...pskServerArgs(pskPort), '--qmp', `unix:${join(dir, 'blockd-psk-qmp.sock')}`]);
  return {
    x509Port,
    pskPort,
    refusals: () => afterHandshake(x509.stderr().split('\n').filter((line) => line.includes('"msg":"option negotiation failed"'))
      .map((line) => (JSON.parse(line) as { reason: string }).reason)),
    stop: async () => {
      await x509.stop();
      await psk.stop();
    },
  };
}

let qsdServers: TlsServers;
let blockdServers: TlsServers;
let plain: NbdServer;
/** qemu-nbd with x509 on a UNIX socket, where the client's hostname can only come from tls-hostname. */
let qemuNbdX509: NbdServer;

before(async () => {
  pki = makeTlsFixtures(join(dir, 'pki'));
  qsdServers = await startQsdServers();
  blockdServers = await startBlockdServers();
  plain = await startQemuNbd(createQcow2(join(dir, 'plain.qcow2'), 16 * MiB), { socket: join(dir, 'plain.sock') });
  qemuNbdX509 = await startQemuNbd(createQcow2(join(dir, 'x509.qcow2'), 16 * MiB), { socket: join(dir, 'x509.sock') },
    ['--object', `tls-creds-x509,id=t0,dir=${pki.server},endpoint=server`, '--tls-creds', 't0']);
});

after(async () => {
  await qsdServers?.stop();
  await blockdServers?.stop();
  await plain?.stop();
  await qemuNbdX509?.stop();
  temp.cleanup();
});

describe('as a client', () => {
  const objectAdd = (type: string, id: string, credsDir: string, extra: object = {}): TranscriptStep =>
    ({ execute: 'object-add', arguments: { 'qom-type': type, id, dir: credsDir, endpoint: 'client', ...extra } });
  const credentials = (): TranscriptStep[] => [
    objectAdd('tls-creds-x509', 'cx', pki.client),
    objectAdd('tls-creds-x509', 'intruder', pki.intruder),
    objectAdd('tls-creds-x509', 'revoked', pki.revoked),
    objectAdd('tls-creds-x509', 'ca-only', pki.caOnly),
    // Its own certificate is of another CA than its ca-cert.pem: QEMU's sanity check would refuse it.
    objectAdd('tls-creds-x509', 'stranger', pki.stranger, { 'sanity-check': false }),
    objectAdd('tls-creds-x509', 'distrusting', pki.distrusting),
    objectAdd('tls-creds-psk', 'psk', pki.psk),
    objectAdd('tls-creds-psk', 'alice', pki.psk, { username: 'alice' }),
    objectAdd('tls-creds-psk', 'wrong-key', pki.pskWrong),
  ];

  let next = 0;
  /** blockdev-add of a read-only nbd node, and its blockdev-del (answered "not found" when the add failed). */
  const attach = (server: object, extra: object): TranscriptStep[] => {
    const name = `n${next++}`;
    return [
      { execute: 'blockdev-add', arguments: { driver: 'nbd', 'node-name': name, server, export: 'disk', 'read-only': true, ...extra } },
      { execute: 'blockdev-del', arguments: { 'node-name': name } },
    ];
  };

  function script(servers: TlsServers[]): TranscriptStep[] {
    const steps = credentials();
    for (const { x509Port, pskPort } of servers) {
      const tcp = { type: 'inet', host: '127.0.0.1', port: String(x509Port) };
      const pskTcp = { type: 'inet', host: '127.0.0.1', port: String(pskPort) };
      steps.push(
        ...attach(tcp, {}),
        ...attach(tcp, { 'tls-creds': 'cx' }),
        ...attach(tcp, { 'tls-creds': 'cx', 'tls-hostname': 'localhost' }),
        ...attach(tcp, { 'tls-creds': 'cx', 'tls-hostname': 'elsewhere.example' }),
        ...attach(tcp, { 'tls-creds': 'intruder' }),
        ...attach(tcp, { 'tls-creds': 'revoked' }),
        ...attach(tcp, { 'tls-creds': 'ca-only' }),
        ...attach(tcp, { 'tls-creds': 'stranger' }),
        ...attach(tcp, { 'tls-creds': 'distrusting' }),
        ...attach(tcp, { 'tls-creds': 'psk' }),
        ...attach(pskTcp, {}),
        ...attach(pskTcp, { 'tls-creds': 'psk' }),
        ...attach(pskTcp, { 'tls-creds': 'alice' }),
        ...attach(pskTcp, { 'tls-creds': 'wrong-key' }),
        ...attach(pskTcp, { 'tls-creds': 'cx' }),
      );
    }
    // (A server refusing a client after the handshake is left to TCP: over a UNIX socket QEMU's own
    // client reports it as a failed read or a failed write, depending on timing.)
    steps.push(
      // x509 over a UNIX socket needs tls-hostname: the address names no host.
      ...attach(qemuNbdX509.address, { 'tls-creds': 'cx' }),
      ...attach(qemuNbdX509.address, { 'tls-creds': 'cx', 'tls-hostname': 'localhost' }),
      ...attach(plain.address, { 'tls-creds': 'cx' }),
      ...attach(plain.address, { 'tls-creds': 'psk' }),
    );
    return steps;
  }

  test("qemu-storage-daemon's and blockd's nbd driver are refused alike by QSD's, blockd's and qemu-nbd's servers", async () => {
    const steps = script([qsdServers, blockdServers]);
    const clients = join(dir, 'clients');
    mkdirSync(clients);
    const qsd = await startQsd(clients);
    const blockd: BlockdProcess = await runBlockd(['--qmp', `unix:${join(clients, 'blockd.sock')}`]);
    try {
      const theirs = await runTranscript(qsd.socket, clients, steps);
      const ours = await runTranscript(join(clients, 'blockd.sock'), clients, steps);
      assert.deepEqual(ours, theirs, describeDifferences(ours, theirs, 8));
      // Not vacuous: some attached, some were refused for TLS.
      assert.ok(ours.filter((line) => line === '{"return": {}}').length > 8);
      assert.ok(ours.some((line) => line.includes('Certificate does not match the hostname elsewhere.example')));
    } finally {
      await qsd.stop();
      await blockd.stop();
    }
  });
});

describe('as a server', () => {
  const x509 = (credsDir: string) => `tls-creds-x509,id=c0,dir=${credsDir},endpoint=client`;
  const psk = (credsDir: string, extra = '') => `tls-creds-psk,id=c0,dir=${credsDir},endpoint=client${extra}`;

  /** The clients, each a command line given the servers' addresses. */
  function clients(servers: TlsServers): { name: string; command: string; args: string[] }[] {
    const tcp = `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${servers.x509Port},export=disk`;
    const pskTcp = `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${servers.pskPort},export=disk`;
    const qemuImg = (name: string, object: string | undefined, image: string) =>
      ({ name, command: 'qemu-img', args: ['info', ...(object ? ['--object', object] : []), '--image-opts', image] });
    return [
      qemuImg('plain to x509', undefined, tcp),
      qemuImg('x509', x509(pki.client), `${tcp},tls-creds=c0`),
      qemuImg('intruder', x509(pki.intruder), `${tcp},tls-creds=c0`),
      qemuImg('revoked', x509(pki.revoked), `${tcp},tls-creds=c0`),
      qemuImg('no certificate', x509(pki.caOnly), `${tcp},tls-creds=c0`),
      qemuImg('stranger', `${x509(pki.stranger)},sanity-check=off`, `${tcp},tls-creds=c0`),
      qemuImg('distrusting', x509(pki.distrusting), `${tcp},tls-creds=c0`),
      qemuImg('wrong hostname', x509(pki.client), `${tcp},tls-creds=c0,tls-hostname=elsewhere.example`),
      qemuImg('PSK to x509', psk(pki.psk), `${tcp},tls-creds=c0`),
      qemuImg('plain to PSK', undefined, pskTcp),
      qemuImg('PSK', psk(pki.psk), `${pskTcp},tls-creds=c0`),
      qemuImg('PSK alice', psk(pki.psk, ',username=alice'), `${pskTcp},tls-creds=c0`),
      { name: 'nbdinfo x509', command: 'nbdinfo', args: ['--json', `nbds://127.0.0.1:${servers.x509Port}/disk?tls-certificates=${pki.client}`] },
      { name: 'nbdinfo no certificate', command: 'nbdinfo', args: [`nbds://127.0.0.1:${servers.x509Port}/disk?tls-certificates=${pki.caOnly}`] },
      { name: 'nbdinfo plain', command: 'nbdinfo', args: [`nbd://127.0.0.1:${servers.x509Port}/disk`] },
      { name: 'nbdinfo PSK', command: 'nbdinfo', args: ['--json', `nbds://alice@127.0.0.1:${servers.pskPort}/disk?tls-psk-file=${join(pki.psk, 'keys.psk')}`] },
    ];
  }

  /** Where the handshake fails on the server's side, OpenSSL sends an alert and GnuTLS does not. */
  function pskFailures(servers: TlsServers) {
    const pskTcp = `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${servers.pskPort},export=disk`;
    return [
      { name: 'PSK wrong key', command: 'qemu-img', args: ['info', '--object', psk(pki.pskWrong), '--image-opts', `${pskTcp},tls-creds=c0`] },
      { name: 'x509 to PSK', command: 'qemu-img', args: ['info', '--object', x509(pki.client), '--image-opts', `${pskTcp},tls-creds=c0`] },
    ];
  }

  function run(servers: TlsServers, list: { name: string; command: string; args: string[] }[]): string[] {
    return list.map(({ name, command, args }) => {
      const { status, stdout, stderr } = runTool(command, args);
      const output = `${stdout}${stderr}`.replaceAll(String(servers.x509Port), 'PORT').replaceAll(String(servers.pskPort), 'PSK-PORT');
      return `${name}: exit ${status}: ${output}`;
    });
  }

  test("QEMU's and libnbd's clients are served and refused by blockd as by qemu-storage-daemon", async () => {
    const theirs = run(qsdServers, clients(qsdServers));
    const ours = run(blockdServers, clients(blockdServers));
    assert.deepEqual(ours, theirs, describeDifferences(ours, theirs, 8));
    assert.ok(ours.filter((line) => /exit 0/.test(line)).length >= 5, ours.join('\n'));

    // The servers give the same reasons for the clients they refused.
    const refused = ['intruder', 'revoked', 'no certificate', 'stranger', 'nbdinfo no certificate'].length;
    await waitUntil(() => qsdServers.refusals().length >= refused && blockdServers.refusals().length >= refused, 'both servers reported their refusals');
    assert.deepEqual(blockdServers.refusals(), qsdServers.refusals());
    assert.deepEqual(blockdServers.refusals().slice(0, 2), ['TLS x509 authz check for O=blockd test,CN=intruder is denied', 'The certificate has been revoked']);
  });

  test('a failed PSK handshake is refused by both; QEMU words the alert OpenSSL sends differently', () => {
    const theirs = run(qsdServers, pskFailures(qsdServers));
    const ours = run(blockdServers, pskFailures(blockdServers));
    const alert = (line: string) => line.replace(/TLS handshake failed: .*/, 'TLS handshake failed: A TLS fatal alert has been received.');
    assert.deepEqual(ours, theirs.map(alert));
    for (const line of theirs) assert.match(line, /exit 1: qemu-img: Could not open .*TLS handshake failed: /);
  });
});
