/*
 * QMP over WebSocket refuses web pages: a browser sends its page's Origin with every
 * handshake, so any page open on the host could otherwise drive the daemon. A handshake
 * without Origin (a program) is served; one with an allowed origin (--qmp ws:...,origin=) is
 * served; any other is refused with 403 before a session exists.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import WebSocket from 'ws';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { waitUntil } from '../helpers/wait-until.js';

let daemon: BlockdProcess;
let url: string;

before(async () => {
  daemon = await runBlockd(['--qmp', 'ws:127.0.0.1:0,origin=http://localhost:8080,origin=https://console.example']);
  url = daemon.addresses[0]!.replace(/^ws:/, 'ws://');
});

after(async () => {
  await daemon.stop();
});

/** The first message the server sends (the greeting), or the HTTP status it refused with. */
function handshake(origin?: string): Promise<{ greeting?: string; status?: number }> {
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(url, origin === undefined ? {} : { origin });
    socket.once('message', (data) => {
      socket.close();
      resolve({ greeting: String(data) });
    });
    socket.once('unexpected-response', (_request, response) => {
      socket.terminate();
      resolve({ status: response.statusCode });
    });
    socket.once('error', reject);
  });
}

test('a client without Origin is served', async () => {
  assert.match((await handshake()).greeting ?? '', /^\{"QMP": /);
});

test('allowed origins are served, compared without regard to case', async () => {
  assert.match((await handshake('http://localhost:8080')).greeting ?? '', /^\{"QMP": /);
  assert.match((await handshake('HTTPS://console.example')).greeting ?? '', /^\{"QMP": /);
});

test('other origins are refused with 403 and the refusal is logged', async () => {
  for (const origin of ['http://evil.example', 'http://localhost:8081', 'null']) {
    assert.deepEqual(await handshake(origin), { status: 403 });
  }
  await waitUntil(() => daemon.stderr().includes('WebSocket handshake refused: origin not allowed'), 'the refusal is logged');
  assert.match((await handshake()).greeting ?? '', /^\{"QMP": /, 'the daemon still serves');
});
