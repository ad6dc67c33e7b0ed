/*
 * The QMP server in-process, on real sockets: events reach every negotiated
 * client on every transport with QEMU's shape and a creation-time timestamp,
 * and never a client still negotiating; the typed client matches replies by
 * id, reports errors with their class, waits for events, and fails pending
 * requests when the connection drops.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { pino } from 'pino';
import { wallClockTimestamp, type RaisedEvent } from '../../src/event-bus.js';
import { CommandRegistry } from '../../src/qmp/command-registry.js';
import { registerControlCommands } from '../../src/qmp/control-commands.js';
import { QmpServer } from '../../src/qmp/server.js';
import { QmpClient, QmpCommandError } from '../../src/qmp/client.js';
import { versionInfo } from '../../src/version.js';
import { Daemon } from '../../src/daemon.js';
import { makeTempDir } from '../helpers/paths.js';
import { RawConnection } from '../helpers/raw-connection.js';

const temp = makeTempDir();
const registry = new CommandRegistry();
let quits = 0;
registerControlCommands(registry, { stopServices: async () => {}, shutdown: () => quits++ });
const server = new QmpServer({ registry, log: pino({ level: 'silent' }), version: versionInfo });
const unixAddress = `unix:${join(temp.dir, 'server.sock')}`;
let wsAddress: string;
let tcpAddress: string;

before(async () => {
  await server.listen({ address: { type: 'unix', path: join(temp.dir, 'server.sock') } });
  wsAddress = (await server.listen({ address: { type: 'ws', host: '127.0.0.1', port: 0 } })).address;
  tcpAddress = (await server.listen({ address: { type: 'tcp', host: '127.0.0.1', port: 0 } })).address;
});

after(async () => {
  await server.close();
  temp.cleanup();
});

test('every schema command has a handler, and handlers need a schema entry', async () => {
  const daemon = new Daemon(pino({ level: 'silent' })); // throws if a schema command has no handler
  assert.deepEqual(daemon.registry.missingHandlers(), []);
  await daemon.shutdown('test');
  // @ts-expect-error: not a schema command
  assert.throws(() => registry.register('no-such-command', () => undefined), /not declared in schema/);
  assert.throws(() => registry.register('quit', () => undefined), /registered twice/);
});

test('events go to every negotiated client, on every transport, and never to a negotiating one', async () => {
  const unixClient = await RawConnection.open(unixAddress);
  const wsClient = await RawConnection.open(wsAddress);
  const tcpClient = await RawConnection.open(tcpAddress);
  const negotiating = await RawConnection.open(unixAddress);
  for (const connection of [unixClient, wsClient, tcpClient, negotiating]) await connection.readLine();
  for (const connection of [unixClient, wsClient, tcpClient]) {
    connection.send('{"execute":"qmp_capabilities"}');
    assert.equal(await connection.readLine(), '{"return": {}}');
  }
  const event: RaisedEvent = { event: 'TEST_EVENT', data: { id: 'j1', status: 'created' }, timestamp: { seconds: 1795313061, microseconds: 957308 } };
  server.broadcast(event);
  const expected = '{"timestamp": {"seconds": 1795313061, "microseconds": 957308}, "event": "TEST_EVENT", "data": {"status": "created", "id": "j1"}}';
  assert.equal(await unixClient.readLine(), expected);
  assert.equal(await wsClient.readLine(), expected);
  assert.equal(await tcpClient.readLine(), expected);
  await negotiating.expectNothingMore();
  server.broadcast({ event: 'NO_DATA', data: undefined, timestamp: { seconds: 1, microseconds: 2 } });
  assert.equal(await unixClient.readLine(), '{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "NO_DATA"}');
  negotiating.send('{"execute":"qmp_capabilities"}');
  assert.equal(await negotiating.readLine(), '{"return": {}}');
  server.broadcast(event);
  assert.equal(await negotiating.readLine(), expected);
  for (const connection of [unixClient, wsClient, tcpClient, negotiating]) connection.end();
});

test('timestamps are wall-clock seconds and microseconds', () => {
  const before = Date.now();
  const stamp = wallClockTimestamp();
  assert.ok(Number.isInteger(stamp.seconds) && Number.isInteger(stamp.microseconds));
  assert.ok(stamp.microseconds >= 0 && stamp.microseconds < 1e6);
  assert.ok(Math.abs(stamp.seconds * 1000 + stamp.microseconds / 1000 - before) < 1000);
});

test('the typed client: replies by id, error classes, OOB, events, quit', async () => {
  for (const address of [unixAddress, wsAddress]) {
    const client = await QmpClient.connect(address, { negotiate: ['oob'] });
    assert.deepEqual(client.greeting.QMP.capabilities, ['oob']);
    const [version, commands] = await Promise.all([client.execute('query-version'), client.execute('query-commands')]);
    assert.equal(version.qemu.major, 7);
    assert.ok(commands.some((entry) => entry.name === 'quit'));
    assert.equal((await client.executeOob('query-version')).qemu.minor, 2);
    await assert.rejects(client.executeRaw('no-such'), (error: QmpCommandError) =>
      error instanceof QmpCommandError && error.errorClass === 'CommandNotFound' && error.desc === 'The command no-such has not been found');
    await assert.rejects(client.execute('qmp_capabilities'), (error: QmpCommandError) => error.errorClass === 'CommandNotFound');
    const waiting = client.waitForEvent('JOB_STATUS_CHANGE', (event) => event.data?.id === 'b');
    server.broadcast({ event: 'JOB_STATUS_CHANGE', data: { id: 'a' }, timestamp: wallClockTimestamp() });
    server.broadcast({ event: 'JOB_STATUS_CHANGE', data: { id: 'b' }, timestamp: wallClockTimestamp() });
    assert.deepEqual((await waiting).data, { id: 'b' });
    assert.deepEqual(client.receivedEvents().map((event) => event.data), [{ id: 'a' }]);
    await assert.rejects(client.waitForEvent('NEVER', undefined, 50), /timed out/);
    assert.deepEqual(await client.execute('quit'), {});
    await client.close();
    await assert.rejects(client.execute('query-version'));
  }
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(quits, 2);
});
