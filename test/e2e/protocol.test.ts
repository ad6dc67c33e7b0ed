/*
 * End to end: bin/blockd runs as a process with a UNIX, a TCP and a WebSocket
 * monitor, and every protocol case is checked byte for byte over each of them,
 * plus what only a live server shows: per-client negotiation with several
 * clients at once, OOB overtaking queued in-band requests, pretty output,
 * introspection navigable as libvirt navigates it, and quit.
 */
import assert from 'node:assert/strict';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { RawConnection } from '../helpers/raw-connection.js';
import { QmpClient } from '../../src/qmp/client.js';
import { commandCatalogue } from '../../src/generated/qapi-catalogue.js';
import { COMMAND_MODE_STEPS, NEGOTIATION_STEPS, type ProtocolStep } from './protocol-cases.js';

const temp = makeTempDir();
let daemon: BlockdProcess;
let version: string;

before(async () => {
  daemon = await runBlockd([
    '--qmp', `unix:${join(temp.dir, 'qmp.sock')}`,
    '--qmp', 'tcp:127.0.0.1:0',
    '--qmp', 'ws:127.0.0.1:0',
    '--chardev', `socket,id=pretty,path=${join(temp.dir, 'pretty.sock')},server=on,wait=off`,
    '--monitor', 'chardev=pretty,pretty=on',
  ]);
  const client = await QmpClient.connect(daemon.addresses[0]!);
  const info = await client.execute('query-version');
  version = `{"qemu": {"micro": ${info.qemu.micro}, "minor": ${info.qemu.minor}, "major": ${info.qemu.major}}, "package": "${info.package}"}`;
  await client.close();
});

after(async () => {
  await daemon.stop();
  temp.cleanup();
});

async function replay(connection: RawConnection, steps: ProtocolStep[]): Promise<void> {
  for (const step of steps) {
    connection.send(step.send);
    const lines = await connection.readLines(step.expect.length);
    assert.deepEqual(lines, step.expect.map((line) => line.replaceAll('$VERSION', version)), step.name);
  }
}

for (const transport of ['unix', 'tcp', 'ws']) {
  describe(`QMP over ${transport}`, () => {
    const address = () => daemon.addresses.find((candidate) => candidate.startsWith(`${transport}:`))!;

    test('greeting, then every protocol case, byte for byte', async () => {
      const connection = await RawConnection.open(address());
      assert.equal(await connection.readLine(), `{"QMP": {"version": ${version}, "capabilities": ["oob"]}}`);
      await replay(connection, NEGOTIATION_STEPS);
      await replay(connection, COMMAND_MODE_STEPS);
      await connection.expectNothingMore();
      connection.end();
    });

    test('each client negotiates on its own', async () => {
      const first = await RawConnection.open(address());
      const second = await RawConnection.open(address());
      await first.readLine();
      await second.readLine();
      first.send('{"execute":"qmp_capabilities"}');
      assert.equal(await first.readLine(), '{"return": {}}');
      second.send('{"execute":"query-version"}');
      assert.match(await second.readLine(), /Expecting capabilities negotiation/);
      first.send('{"execute":"query-version","id":1}');
      assert.match(await first.readLine(), /^\{"return": \{"qemu"/);
      first.end();
      second.end();
    });
  });
}

test('exec-oob runs ahead of queued in-band requests', async () => {
  const connection = await RawConnection.open(daemon.addresses[0]!);
  await connection.readLine();
  connection.send('{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}');
  assert.equal(await connection.readLine(), '{"return": {}}');
  const inBand = Array.from({ length: 6 }, (_, i) => `{"execute":"query-qmp-schema","id":"in-${i}"}`).join('');
  connection.send(`${inBand}{"exec-oob":"query-version","id":"oob"}`);
  const lines = await connection.readLines(7, 10_000);
  const order = lines.map((line) => /"id": "([^"]+)"/.exec(line)![1]);
  assert.equal(order[0], 'oob', `the OOB reply comes first: ${order.join(',')}`);
  assert.deepEqual(order.slice(1), ['in-0', 'in-1', 'in-2', 'in-3', 'in-4', 'in-5'], 'in-band replies keep request order');
  connection.send('{"exec-oob":"query-commands","id":"x"}');
  assert.equal(await connection.readLine(), '{"id": "x", "error": {"class": "GenericError", "desc": "The command query-commands does not support OOB"}}');
  connection.send('{"exec-oob":"nope","id":"y"}');
  assert.equal(await connection.readLine(), '{"id": "y", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}');
  connection.send('{"execute":"query-version","exec-oob":"query-version","id":"z"}');
  assert.equal(await connection.readLine(), `{"id": "z", "error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}`);
  connection.end();
});

test('a pretty monitor indents like QEMU, every line ending in CRLF', async () => {
  const connection = await RawConnection.open(`unix:${join(temp.dir, 'pretty.sock')}`);
  const greeting = await connection.readLines(15);
  assert.deepEqual(greeting, [
    '{', '    "QMP": {', '        "version": {', '            "qemu": {', '                "micro": 0,',
    '                "minor": 2,', '                "major": 7', '            },',
    greeting[8]!, '        },', '        "capabilities": [', '            "oob"', '        ]', '    }', '}',
  ]);
  assert.match(greeting[8]!, /^ {12}"package": "blockd [0-9.]+"$/);
  connection.send('{"execute":"qmp_capabilities","id":[1,{}]}');
  assert.deepEqual(await connection.readLines(9), [
    '{', '    "return": {', '    },', '    "id": [', '        1,', '        {', '        }', '    ]', '}',
  ]);
  connection.end();
});

test('the UNIX socket is created mode 0600', () => {
  assert.equal(statSync(join(temp.dir, 'qmp.sock')).mode & 0o777, 0o600);
});

test('query-commands lists every command; query-qmp-schema is navigable and compact', async () => {
  const client = await QmpClient.connect(daemon.addresses[0]!);
  const commands = (await client.execute('query-commands')).map((entry) => entry.name).sort();
  assert.deepEqual(commands, commandCatalogue.map((entry) => entry.name).sort());
  assert.ok(commands.includes('qmp_capabilities') && commands.includes('blockdev-add'));

  const connection = await RawConnection.open(daemon.addresses[0]!);
  await connection.readLine();
  connection.send('{"execute":"qmp_capabilities"}{"execute":"query-qmp-schema"}');
  await connection.readLine();
  const raw = await connection.readLine();
  assert.ok(raw.length < 256 * 1024, `query-qmp-schema is ${raw.length} bytes on one line`);
  connection.end();

  // libvirt-style probing: command -> arg-type -> member -> enum values; ret-type -> members
  const schema = await client.execute('query-qmp-schema');
  const byName = new Map(schema.map((entry) => [entry.name, entry]));
  const capabilities = byName.get('qmp_capabilities')!;
  assert.equal(capabilities['meta-type'], 'command');
  const argType = byName.get((capabilities as { 'arg-type': string })['arg-type'])!;
  const enable = (argType as { members: { name: string; type: string; default?: null }[] }).members[0]!;
  assert.deepEqual({ name: enable.name, default: enable.default }, { name: 'enable', default: null });
  const list = byName.get(enable.type) as { 'element-type': string };
  const capabilityEnum = byName.get(list['element-type']) as { values: string[] };
  assert.deepEqual(capabilityEnum.values, ['oob']);
  const versionType = byName.get((byName.get('query-version') as { 'ret-type': string })['ret-type']) as { members: { name: string }[] };
  assert.deepEqual(versionType.members.map((member) => member.name), ['qemu', 'package']);
  assert.equal((byName.get('query-version') as { 'allow-oob'?: boolean })['allow-oob'], true);
  const schemaInfo = byName.get((byName.get('query-qmp-schema') as { 'ret-type': string })['ret-type'].slice(1, -1)) as { tag: string; variants: { case: string }[] };
  assert.equal(schemaInfo.tag, 'meta-type');
  assert.deepEqual(schemaInfo.variants.map((variant) => variant.case), ['builtin', 'enum', 'array', 'object', 'alternate', 'command', 'event']);
  await client.close();
});
