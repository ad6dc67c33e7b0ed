/*
 * The NBD server on TCP: nbd-server-start with an inet address (here from the
 * command line), read and written by libnbd and QEMU over nbd://host:port/name.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { qemuIo, runTool } from '../helpers/qemu-tools.js';

const temp = makeTempDir();
let blockd: BlockdProcess;
let port = 0;

/** A port nobody listens on right now. */
async function freePort(): Promise<number> {
  const server = net.createServer().listen(0, '127.0.0.1');
  await new Promise((resolve) => server.once('listening', resolve));
  const { port: found } = server.address() as net.AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return found;
}

before(async () => {
  port = await freePort();
  blockd = await runBlockd([
    '--blockdev', 'driver=null-co,node-name=n0,size=16777216,read-zeroes=on',
    '--nbd-server', `addr.type=inet,addr.host=127.0.0.1,addr.port=${port}`,
    '--export', 'type=nbd,id=e0,node-name=n0,name=zeros,writable=on',
    '--qmp', `unix:${join(temp.dir, 'qmp.sock')}`,
  ]);
});

after(async () => {
  await blockd.stop();
  temp.cleanup();
});

test('exports are served over TCP', () => {
  const uri = `nbd://127.0.0.1:${port}/zeros`;
  const size = runTool('nbdinfo', ['--size', uri]);
  assert.equal(size.status, 0, size.stderr);
  assert.equal(size.stdout.trim(), '16777216');
  qemuIo(uri, ['write -P 0x5a 0 64k', 'read -P 0 1M 64k'], ['-f', 'raw']);
});
