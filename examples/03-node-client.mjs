#!/usr/bin/env node
// The typed QMP client from TypeScript/JavaScript, over TCP and WebSocket, including a
// libvirt-style probe of query-qmp-schema ("does qmp_capabilities accept 'enable'?").
// Needs: npm run build.
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { QmpClient } from '../dist/src/qmp/client.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const daemon = spawn(join(root, 'bin', 'blockd'), ['--qmp', 'tcp:127.0.0.1:0', '--qmp', 'ws:127.0.0.1:0'], { stdio: ['ignore', 'ignore', 'pipe'] });

// blockd logs where it listens (JSON lines on stderr); port 0 picked free ports.
const addresses = await new Promise((resolve, reject) => {
  const found = [];
  daemon.stderr.on('data', (chunk) => {
    for (const line of chunk.toString().split('\n')) {
      if (!line.startsWith('{')) continue;
      const record = JSON.parse(line);
      if (record.msg === 'QMP monitor listening') found.push(record.address);
      if (record.msg === 'blockd ready') resolve(found);
    }
  });
  daemon.on('exit', () => reject(new Error('blockd exited early')));
});

for (const address of addresses) {
  const qmp = await QmpClient.connect(address);
  const version = await qmp.execute('query-version');
  console.log(`${address}: ${version.package}, QMP of QEMU ${version.qemu.major}.${version.qemu.minor}`);
  await qmp.close();
}

// Feature probe the way libvirt does it: command -> arg-type -> member.
const qmp = await QmpClient.connect(addresses[0]);
const schema = await qmp.execute('query-qmp-schema');
const byName = new Map(schema.map((entry) => [entry.name, entry]));
const argType = byName.get(byName.get('qmp_capabilities')['arg-type']);
const hasEnable = argType.members.some((member) => member.name === 'enable');
console.log(`qmp_capabilities/arg-type/*enable present: ${hasEnable}`);

try {
  await qmp.executeRaw('blockdev-add', { driver: 'null-co', 'node-name': 'n0' });
} catch (error) {
  console.log(`not there yet: ${error.errorClass}: ${error.desc}`);
}
await qmp.execute('quit');
await new Promise((resolve) => daemon.on('exit', resolve));
if (!hasEnable) process.exit(1);
