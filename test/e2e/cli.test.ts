/*
 * The command line, run for real: qemu-storage-daemon's messages and exit
 * statuses for bad options, the default socket, pid files, --daemonize,
 * stale and live sockets, wait=on, stdio monitors, and clean shutdown by
 * quit and by signal (sockets and pid file removed).
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { runBlockd } from '../helpers/blockd-process.js';
import { BLOCKD_BIN, makeTempDir } from '../helpers/paths.js';
import { QmpClient } from '../../src/qmp/client.js';

function runSync(args: string[], cwd?: string): { status: number | null; stdout: string; stderr: string } {
  const result = spawnSync(process.execPath, [BLOCKD_BIN, ...args], { cwd, encoding: 'utf8', timeout: 20_000 });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

async function waitFor(condition: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

test('--help and --version', () => {
  const help = runSync(['--help']);
  assert.equal(help.status, 0);
  assert.match(help.stdout, /^Usage: blockd \[options\]/);
  for (const option of ['--chardev', '--monitor', '--qmp', '--pidfile', '--daemonize', '--log-level']) assert.ok(help.stdout.includes(option), option);
  const version = runSync(['-V']);
  assert.equal(version.status, 0);
  assert.match(version.stdout, /^blockd version \d+\.\d+\.\d+ \(QMP of QEMU 7\.2\)\n$/);
});

test('bad command lines: exact messages, exit status 1', () => {
  const cases: [string[], string][] = [
    [['--bogus'], "blockd: unrecognized option '--bogus'"],
    [['foo'], 'blockd: foo: Unexpected argument'],
    [['--pidfile'], "blockd: option '--pidfile' requires an argument"],
    [['--monitor', 'nope'], 'blockd: --monitor nope: chardev "nope" not found'],
    [['--chardev', 'socket,id=c,path=/tmp/x.sock,server=on,wait=off', '--monitor', 'c,pretty'], "blockd: --monitor c,pretty: Expected '=' after parameter 'pretty'"],
    [['--chardev', 'bogus,id=c'], "blockd: --chardev bogus,id=c: 'bogus' is not a valid char driver name"],
    [['--chardev', 'socket,path=/tmp/x.sock,server=on'], 'blockd: --chardev socket,path=/tmp/x.sock,server=on: chardev: no id specified'],
    [['--chardev', 'stdio,id=a', '--chardev', 'stdio,id=a'], "blockd: --chardev stdio,id=a: Duplicate ID 'a' for chardev"],
    [['--chardev', 'stdio,id=a', '--monitor', 'a', '--monitor', 'a'], "blockd: --monitor a: Device 'a' is in use"],
    [['--qmp', 'http:x'], 'blockd: --qmp http:x: expected unix:PATH, tcp:HOST:PORT or ws:HOST:PORT'],
    [['--export', 'type=nbd,id=e,node-name=x'], "blockd: --export type=nbd,id=e,node-name=x: Cannot find device='' nor node-name='x'"],
    [['--blockdev', 'null-co,node-name=x', '--export', 'type=nbd,id=e,node-name=x'], 'blockd: --export type=nbd,id=e,node-name=x: NBD server not running'],
    [['--nbd-server', 'addr.type=unix'], "blockd: --nbd-server addr.type=unix: Parameter 'addr.path' is missing"],
    [['--nbd-server', 'addr.type=unix,addr.path=/nonexist/x.sock'], 'blockd: --nbd-server addr.type=unix,addr.path=/nonexist/x.sock: Failed to bind socket to /nonexist/x.sock: No such file or directory'],
    [['--nbd-server', 'addr.type=inet,addr.host=127.0.0.1,addr.port=abc'],
      'blockd: --nbd-server addr.type=inet,addr.host=127.0.0.1,addr.port=abc: address resolution failed for 127.0.0.1:abc: Servname not supported for ai_socktype'],
    [['--log-level', 'loud'], 'blockd: --log-level loud: unknown log level; use one of fatal, error, warn, info, debug, trace, silent'],
    [['--qmp', 'unix:/nonexistent-dir/x.sock'], 'blockd: --qmp unix:/nonexistent-dir/x.sock: Failed to bind socket to /nonexistent-dir/x.sock: No such file or directory'],
  ];
  for (const [args, message] of cases) {
    const result = runSync(args);
    assert.equal(result.status, 1, args.join(' '));
    assert.equal(result.stderr.split('\n').filter((line) => !line.startsWith('{')).join('\n').trim(), message);
  }
});

test('with no monitor option, QMP is served on ./blockd-qmp.sock and stderr says so', async () => {
  const temp = makeTempDir();
  const daemon = await runBlockd([], { cwd: temp.dir });
  const socket = join(temp.dir, 'blockd-qmp.sock');
  assert.ok(daemon.stderr().includes(`serving QMP on unix:${socket}`));
  const client = await QmpClient.connect(socket);
  assert.equal((await client.execute('query-version')).qemu.major, 7);
  await client.close();
  assert.deepEqual(await daemon.stop('SIGINT'), { code: 0, signal: null });
  assert.ok(!existsSync(socket), 'socket removed at exit');
  temp.cleanup();
});

test('pid file: written when ready, locked against a second daemon, removed at exit', async () => {
  const temp = makeTempDir();
  const pidfile = join(temp.dir, 'blockd.pid');
  const daemon = await runBlockd(['--qmp', `unix:${join(temp.dir, 'a.sock')}`, '--pidfile', pidfile]);
  assert.equal(readFileSync(pidfile, 'utf8'), `${daemon.child.pid}\n`);
  const second = runSync(['--qmp', `unix:${join(temp.dir, 'b.sock')}`, '--pidfile', pidfile]);
  assert.equal(second.status, 1);
  assert.match(second.stderr, /blockd: cannot create PID file: Cannot lock pid file: Resource temporarily unavailable/);
  assert.ok(!existsSync(join(temp.dir, 'b.sock')), 'the failed daemon left no socket behind');
  assert.deepEqual(await daemon.stop(), { code: 0, signal: null });
  assert.ok(!existsSync(pidfile));
  // A stale pid file (dead process) is simply overwritten.
  writeFileSync(pidfile, '999999\n');
  const third = await runBlockd(['--qmp', `unix:${join(temp.dir, 'c.sock')}`, '--pidfile', pidfile]);
  assert.equal(readFileSync(pidfile, 'utf8'), `${third.child.pid}\n`);
  await third.stop();
  const bad = runSync(['--qmp', `unix:${join(temp.dir, 'd.sock')}`, '--pidfile', '/nonexistent/x.pid']);
  assert.equal(bad.status, 1);
  assert.match(bad.stderr, /blockd: cannot create PID file: Could not create '\/nonexistent\/x\.pid': No such file or directory/);
  temp.cleanup();
});

test('quit answers, then the daemon exits 0 and removes its socket and pid file', async () => {
  const temp = makeTempDir();
  const socket = join(temp.dir, 'q.sock');
  const pidfile = join(temp.dir, 'q.pid');
  const daemon = await runBlockd(['--chardev', `socket,id=m,path=${socket},server=on,wait=off`, '--monitor', 'm', '--pidfile', pidfile]);
  const client = await QmpClient.connect(socket);
  assert.deepEqual(await client.execute('quit'), {});
  assert.deepEqual(await daemon.exited, { code: 0, signal: null });
  assert.ok(!existsSync(socket) && !existsSync(pidfile));
  temp.cleanup();
});

test('a stale socket file is replaced; a live socket or a regular file is not touched', async () => {
  const temp = makeTempDir();
  const stale = join(temp.dir, 'stale.sock');
  // Leave a socket file nobody listens on: bind in a child that exits without closing.
  spawnSync(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(stale)}, () => process.exit(0))`]);
  assert.ok(existsSync(stale));
  const daemon = await runBlockd(['--qmp', `unix:${stale}`]);
  const client = await QmpClient.connect(stale);
  await client.execute('query-version');

  const second = runSync(['--qmp', `unix:${stale}`]);
  assert.equal(second.status, 1);
  assert.match(second.stderr, new RegExp(`Failed to bind socket to ${stale}: Address already in use`));
  await client.execute('query-version'); // the first daemon still serves
  await client.close();
  await daemon.stop();

  const regular = join(temp.dir, 'regular');
  writeFileSync(regular, 'keep me');
  const third = runSync(['--qmp', `unix:${regular}`]);
  assert.equal(third.status, 1);
  assert.match(third.stderr, /the path exists and is not a socket/);
  assert.equal(readFileSync(regular, 'utf8'), 'keep me');
  temp.cleanup();
});

test('--daemonize: the parent exits 0 once ready; the daemon serves until SIGTERM', async () => {
  const temp = makeTempDir();
  const socket = join(temp.dir, 'd.sock');
  const pidfile = join(temp.dir, 'd.pid');
  const parent = runSync(['--chardev', `socket,id=m,path=${socket},server=on,wait=off`, '--monitor', 'm', '--pidfile', pidfile, '--daemonize']);
  assert.equal(parent.status, 0, parent.stderr);
  assert.ok(existsSync(pidfile), 'pid file exists when the parent returns');
  const pid = Number(readFileSync(pidfile, 'utf8'));
  const client = await QmpClient.connect(socket);
  assert.equal((await client.execute('query-version')).qemu.minor, 2);
  await client.close();
  process.kill(pid, 'SIGTERM');
  await waitFor(() => !existsSync(pidfile) && !existsSync(socket), 'daemon cleanup');

  const failing = runSync(['--monitor', 'nope', '--daemonize']);
  assert.equal(failing.status, 1);
  assert.match(failing.stderr, /blockd: --monitor nope: chardev "nope" not found/);
  temp.cleanup();
});

test('without wait=off, startup waits for a first client before writing the pid file', async () => {
  const temp = makeTempDir();
  const socket = join(temp.dir, 'w.sock');
  const pidfile = join(temp.dir, 'w.pid');
  const daemon = await runBlockd(['--chardev', `socket,id=m,path=${socket},server=on`, '--monitor', 'm', '--pidfile', pidfile], { noWait: true });
  await waitFor(() => existsSync(socket), 'socket');
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.ok(!existsSync(pidfile), 'not ready before a client connects');
  const client = await QmpClient.connect(socket);
  await waitFor(() => existsSync(pidfile), 'pid file');
  await client.close();
  await daemon.stop();
  temp.cleanup();
});

test('a stdio monitor answers piped commands; EOF does not stop the daemon', async () => {
  const child = spawn(process.execPath, [BLOCKD_BIN, '--chardev', 'stdio,id=s', '--monitor', 's', '--log-level', 'silent'], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stdout = '';
  child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stdin.end('{"execute":"qmp_capabilities"}\n{"execute":"query-version","id":1}\n');
  await waitFor(() => stdout.split('\r\n').length >= 4, 'replies');
  const lines = stdout.split('\r\n');
  assert.match(lines[0]!, /^\{"QMP": /);
  assert.equal(lines[1], '{"return": {}}');
  assert.match(lines[2]!, /^\{"return": \{"qemu": .*"id": 1\}$/);
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.equal(child.exitCode, null, 'still running after EOF on stdin');
  child.kill('SIGTERM');
  const [code] = await new Promise<[number | null]>((resolve) => child.on('exit', (c) => resolve([c])));
  assert.equal(code, 0);
});

test('TCP binds loopback by default; several monitors share one daemon', async () => {
  const temp = makeTempDir();
  const daemon = await runBlockd(['--chardev', 'socket,id=t,port=0,server=on,wait=off', '--monitor', 't', '--qmp', `unix:${join(temp.dir, 'u.sock')}`, '--log-level', 'debug']);
  const tcp = daemon.addresses.find((address) => address.startsWith('tcp:'))!;
  assert.match(tcp, /^tcp:127\.0\.0\.1:\d+$/);
  const client = await QmpClient.connect(tcp);
  await client.execute('query-version');
  await client.close();
  await waitFor(() => daemon.stderr().includes('"msg":"client disconnected"'), 'debug logs');
  const record = JSON.parse(daemon.stderr().split('\n').find((line) => line.includes('client connected'))!);
  assert.equal(record.component, 'qmp');
  assert.equal(typeof record.session, 'number');
  await daemon.stop();
  temp.cleanup();
});

test('--blockdev: keyval and JSON forms, with the same errors as qemu-storage-daemon', async () => {
  const temp = makeTempDir();
  writeFileSync(join(temp.dir, 'x.raw'), Buffer.alloc(4096));
  const daemon = await runBlockd([
    '--blockdev', `driver=file,node-name=f,filename=${join(temp.dir, 'x.raw')}`,
    '--blockdev', 'raw,node-name=r,file=f,size=0x800',
    '--blockdev', '{"driver":"null-co","node-name":"n","size":4096}',
    '--qmp', `unix:${join(temp.dir, 'q.sock')}`,
  ]);
  const client = await QmpClient.connect(join(temp.dir, 'q.sock'));
  const nodes = await client.execute('query-named-block-nodes', { flat: true });
  assert.deepEqual(nodes.map((node) => [node['node-name'], node.drv, node.image['virtual-size']]), [['n', 'null-co', 4096], ['r', 'raw', 2048], ['f', 'file', 4096]]);
  await client.close();
  await daemon.stop();
  const cases = [
    'null-co,node-name=n,size=1M', 'null-co,node-name=n,read-only=1', 'driver=file,node-name=f,filename=/nonexist',
    'null-co,size=1', 'bogus,node-name=x', 'null-co,node-name=n,cache.direct=on,cache.bogus=1', 'help', '{"driver":1}',
    'raw,node-name=x,file=nonode', 'null-co,node-name=x,cache=on', 'null-co,node-name=x,size=0x',
  ];
  const objectCases = ['bogus,id=x', 'throttle-group,id=1x', 'throttle-group,id=t,limits.bps-total=x', 'throttle-group,id=t,limits.bps-total=1,limits.bps-read=1'];
  for (const [option, value] of [...cases.map((c) => ['--blockdev', c]), ...objectCases.map((c) => ['--object', c])] as [string, string][]) {
    const ours = runSync([option, value]).stderr.trim().replace(/^blockd: /, '');
    const theirs = spawnSync('qemu-storage-daemon', [option, value], { encoding: 'utf8' }).stderr.trim().replace(/^qemu-storage-daemon: /, '');
    assert.equal(ours, theirs, `${option} ${value}`);
  }
  temp.cleanup();
});
