/*
 * Wire-level differential test of an NBD server with tls-creds: the same
 * bytes go to qemu-storage-daemon and to blockd, both with x509 credentials;
 * the option replies (types and messages) and where the server hangs up must
 * be the same. Before STARTTLS every option is refused with ERR_TLS_REQD
 * (ABORT too, then the server closes), EXPORT_NAME, a STARTTLS with a payload
 * and a client without fixed newstyle end the connection; after the TLS
 * handshake STARTTLS is refused as already done and the handshake and
 * requests run as without TLS.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { encodeInfoRequest, encodeMetaContextRequest, encodeOption } from '../../src/nbd/messages.js';
import { ClientFlag, Command, Info, Option } from '../../src/nbd/protocol.js';
import { differentialPeers } from '../helpers/differential-peers.js';
import { describeOptionReplies, NbdRawClient } from '../helpers/nbd-raw-client.js';
import { makePki } from '../helpers/tls-pki.js';

function serverArgs(where: string): string[] {
  return [
    '--blockdev', 'driver=null-co,node-name=n0,size=1048576,read-zeroes=on',
    '--object', `tls-creds-x509,id=tls0,dir=${join(where, 'pki', 'server')},endpoint=server`,
    '--nbd-server', `addr.type=unix,addr.path=${join(where, 'nbd.sock')},tls-creds=tls0`,
    '--export', 'type=nbd,id=e0,node-name=n0,name=disk,description=a disk',
  ];
}

/** Each daemon has its own certificates, under its directory. */
const peers = differentialPeers((where) => makePki(join(where, 'pki')), serverArgs);

/** The client's side of the TLS handshake: its certificate, the CA, the server's name (a UNIX socket names none). */
const tlsOptions = (where: string) => ({
  ca: readFileSync(join(where, 'pki', 'client', 'ca-cert.pem')),
  cert: readFileSync(join(where, 'pki', 'client', 'client-cert.pem')),
  key: readFileSync(join(where, 'pki', 'client', 'client-key.pem')),
  servername: 'localhost',
});

const SCENARIOS: Record<string, (where: string) => Promise<string[]>> = {
  async 'options before and after STARTTLS'(where) {
    const client = await NbdRawClient.connect(join(where, 'nbd.sock'));
    const log = [`greeting flags ${client.handshakeFlags}`];
    client.sendClientFlags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES);
    const before: [number, Buffer?][] = [
      [Option.LIST],
      [Option.STRUCTURED_REPLY],
      [Option.INFO, encodeInfoRequest('disk', [Info.BLOCK_SIZE])],
      [Option.GO, encodeInfoRequest('disk', [])],
      [Option.LIST_META_CONTEXT, encodeMetaContextRequest('disk', [])],
      [42, Buffer.from('some data')],
      [Option.STARTTLS],
    ];
    for (const [option, data] of before) log.push(describeOptionReplies(await client.option(option, data), 'latin1'));
    await client.startTls(tlsOptions(where));
    log.push('TLS started');
    const after: [number, Buffer?][] = [
      [Option.STARTTLS],
      [Option.STARTTLS, Buffer.from('x')],
      [Option.LIST],
      [Option.STRUCTURED_REPLY],
      [Option.GO, encodeInfoRequest('disk', [Info.NAME, Info.BLOCK_SIZE])],
    ];
    for (const [option, data] of after) log.push(describeOptionReplies(await client.option(option, data), 'latin1'));
    log.push((await client.read(0, 4096)).equals(Buffer.alloc(4096)) ? 'read zeroes over TLS' : 'read something else');
    await client.disconnect();
    return log;
  },

  async 'ABORT before STARTTLS'(where) {
    const client = await NbdRawClient.connect(join(where, 'nbd.sock'));
    client.sendClientFlags(ClientFlag.FIXED_NEWSTYLE);
    const log = [describeOptionReplies(await client.option(Option.ABORT), 'latin1')];
    await client.closed();
    log.push('closed');
    return log;
  },

  async 'what ends the connection before TLS'(where) {
    const log: string[] = [];
    const attempts: [string, number, number, Buffer?][] = [
      ['EXPORT_NAME', ClientFlag.FIXED_NEWSTYLE, Option.EXPORT_NAME, Buffer.from('disk')],
      ['STARTTLS with a payload', ClientFlag.FIXED_NEWSTYLE, Option.STARTTLS, Buffer.from('x')],
      ['a client without fixed newstyle', 0, Option.LIST],
    ];
    for (const [what, flags, option, data] of attempts) {
      const client = await NbdRawClient.connect(join(where, 'nbd.sock'));
      client.sendClientFlags(flags);
      client.socket.write(encodeOption(option, data));
      await client.closed();
      log.push(`${what}: closed with ${client.reader.pending} bytes unread: ${client.reader.pending ? (await client.readOptionReplies()).map((r) => r.data.toString()).join() : ''}`);
    }
    return log;
  },

  async 'requests over TLS'(where) {
    const client = await NbdRawClient.connect(join(where, 'nbd.sock'));
    client.sendClientFlags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES);
    await client.option(Option.STARTTLS);
    await client.startTls(tlsOptions(where));
    await client.option(Option.STRUCTURED_REPLY);
    await client.option(Option.SET_META_CONTEXT, encodeMetaContextRequest('disk', ['base:allocation']));
    const log = [describeOptionReplies(await client.option(Option.GO, encodeInfoRequest('disk', [Info.BLOCK_SIZE])), 'latin1')];
    const status = await client.blockStatus(0, 1048576);
    log.push(`block status ${JSON.stringify([...status.entries()])}`);
    log.push(`flush: error ${await client.change(Command.FLUSH, 0, 0)}`);
    await client.disconnect();
    return log;
  },
};

for (const [name, scenario] of Object.entries(SCENARIOS)) {
  test(`NBD with TLS on the wire: ${name}`, { timeout: 60_000 }, async () => {
    const theirs = await scenario(peers.qsd.dir);
    const ours = await scenario(peers.blockd.dir);
    assert.deepEqual(ours, theirs);
  });
}
