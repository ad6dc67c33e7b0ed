/* Command-line parsing: getopt-style splitting, keyval, chardev/monitor/--qmp forms. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { splitArgv } from '../../src/cli/argv.js';
import { parseKeyval } from '../../src/cli/keyval.js';
import { parseChardev, parseMonitor, parseQmpAddress } from '../../src/cli/monitor-options.js';

const specs = [
  { name: 'help', short: 'h', takesValue: false },
  { name: 'pidfile', takesValue: true },
  { name: 'daemonize', takesValue: false },
  { name: 'chardev', takesValue: true },
  { name: 'monitor', takesValue: true },
];

test('argv: separate and inline values, prefixes, short options', () => {
  assert.deepEqual(splitArgv(['--pidfile', 'a', '--pid=b', '-h', '--daemon'], specs).map((o) => [o.name, o.value]), [
    ['pidfile', 'a'], ['pidfile', 'b'], ['help', undefined], ['daemonize', undefined],
  ]);
});

test('argv: errors worded like getopt', () => {
  assert.throws(() => splitArgv(['--bogus'], specs), /unrecognized option '--bogus'/);
  assert.throws(() => splitArgv(['--pidfile'], specs), /option '--pidfile' requires an argument/);
  assert.throws(() => splitArgv(['--daemonize=1'], specs), /doesn't allow an argument/);
  assert.throws(() => splitArgv(['foo'], specs), (error: Error & { optionText?: string }) => error.message === 'Unexpected argument' && error.optionText === 'foo');
  assert.throws(() => splitArgv(['-x'], specs), /invalid option -- 'x'/);
});

test('keyval: implied key, nesting, lists, escaped commas', () => {
  assert.deepEqual(parseKeyval('c,pretty=on', 'chardev'), { chardev: 'c', pretty: 'on' });
  assert.deepEqual(parseKeyval('file.driver=file,file.filename=a,,b'), { file: { driver: 'file', filename: 'a,b' } });
  assert.deepEqual(parseKeyval('bitmaps.0=a,bitmaps.1=b'), { bitmaps: ['a', 'b'] });
  assert.throws(() => parseKeyval('c,pretty', 'chardev'), /Expected '=' after parameter 'pretty'/);
  assert.throws(() => parseKeyval('a.0=x,a.b=y'), /Parameters 'a\.\*' used inconsistently/);
  assert.throws(() => parseKeyval('a.1=x'), /Parameter 'a\.0' missing/);
  assert.throws(() => parseKeyval('9x=1'), /Invalid parameter '9x'/);
});

test('chardev and monitor options', () => {
  assert.deepEqual(parseChardev('socket,id=c,path=/run/q.sock,server=on,wait=off'), { id: 'c', address: { type: 'unix', path: '/run/q.sock' }, wait: false });
  assert.deepEqual(parseChardev('socket,id=t,port=4444,server=on'), { id: 't', address: { type: 'tcp', host: '127.0.0.1', port: 4444 }, wait: true });
  assert.deepEqual(parseChardev('stdio,id=s'), { id: 's', address: { type: 'stdio' }, wait: false });
  assert.throws(() => parseChardev('bogus,id=c'), /'bogus' is not a valid char driver name/);
  assert.throws(() => parseChardev('socket,path=/x,server=on'), /chardev: no id specified/);
  assert.throws(() => parseChardev('socket,id=c,path=/x'), /server=on/);
  assert.deepEqual(parseMonitor('chardev=c,pretty=on'), { chardev: 'c', pretty: true });
  assert.deepEqual(parseMonitor('c'), { chardev: 'c', pretty: false });
  assert.throws(() => parseMonitor('c,mode=readline'), /Only QMP is supported/);
  assert.throws(() => parseMonitor('c,pretty=1'), /Parameter 'pretty' expects 'on' or 'off'/);
});

test('--qmp short forms', () => {
  assert.deepEqual(parseQmpAddress('unix:/run/b.sock'), { address: { type: 'unix', path: '/run/b.sock' }, pretty: false });
  assert.deepEqual(parseQmpAddress('tcp:127.0.0.1:0'), { address: { type: 'tcp', host: '127.0.0.1', port: 0 }, pretty: false });
  assert.deepEqual(parseQmpAddress('ws:[::1]:8080,pretty=on'), { address: { type: 'ws', host: '::1', port: 8080, origins: [] }, pretty: true });
  assert.deepEqual(parseQmpAddress('ws::8080,origin=http://localhost:3000,pretty=on,origin=https://ui.example'),
    { address: { type: 'ws', host: '127.0.0.1', port: 8080, origins: ['http://localhost:3000', 'https://ui.example'] }, pretty: true });
  assert.throws(() => parseQmpAddress('tcp::4444,origin=http://a'), /origin= is only for ws: monitors/);
  assert.throws(() => parseQmpAddress('ws::4444,origin='), /origin= needs a value/);
  assert.deepEqual(parseQmpAddress('tcp::4444').address, { type: 'tcp', host: '127.0.0.1', port: 4444 });
  assert.throws(() => parseQmpAddress('http:x'), /expected unix:PATH/);
});
