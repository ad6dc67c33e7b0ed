/*
 * Without the native addon (not built: no compiler, or `npm ci --ignore-scripts`) blockd has
 * no OFD image locks. It must never be silently weaker: the daemon says once why the addon is
 * missing, and a file node refuses to open unless locking=off. The package is copied without
 * native/build, as such an install leaves it. Also: the addon builds and names errno values
 * where the C library lacks strerrorname_np (glibc < 2.32).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, symlinkSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { after, before, test } from 'node:test';
import { QmpClient } from '../../src/qmp/client.js';
import type { QmpError } from '../../src/errors.js';
import { runBlockd, type BlockdProcess } from '../helpers/blockd-process.js';
import { REPO_ROOT, makeTempDir } from '../helpers/paths.js';
import { qemuIo, runQemuImg } from '../helpers/qemu-tools.js';

const temp = makeTempDir();
const pkg = join(temp.dir, 'package');
const image = join(temp.dir, 'disk.qcow2');
let blockd: BlockdProcess;
let qmp: QmpClient;

before(async () => {
  mkdirSync(pkg);
  for (const entry of ['package.json', 'bin', 'dist']) cpSync(join(REPO_ROOT, entry), join(pkg, entry), { recursive: true });
  symlinkSync(join(REPO_ROOT, 'node_modules'), join(pkg, 'node_modules'));
  runQemuImg('create', '-q', '-f', 'qcow2', image, '16M');
  qemuIo(image, ['write -P 0x5a 0 64k']);
  blockd = await runBlockd(['--qmp', `unix:${join(temp.dir, 'qmp.sock')}`], { bin: join(pkg, 'bin', 'blockd') });
  qmp = await QmpClient.connect(`unix:${join(temp.dir, 'qmp.sock')}`);
});

after(async () => {
  await qmp?.close();
  await blockd?.stop();
  temp.cleanup();
});

const fileNode = (locking?: string) => ({
  driver: 'qcow2', 'node-name': `n-${locking ?? 'default'}`,
  file: { driver: 'file', filename: image, ...(locking ? { locking } : {}) },
});

test('start-up says once why the addon is missing', () => {
  const warnings = blockd.stderr().split('\n').filter((line) => line.includes('native addon not loaded'));
  assert.equal(warnings.length, 1, blockd.stderr());
  assert.match(warnings[0]!, /blockd_native\.node is not built/);
});

test('locking=auto (the default) and locking=on refuse to open; locking=off opens and reads', async () => {
  for (const locking of [undefined, 'auto', 'on']) {
    await assert.rejects(qmp.execute('blockdev-add', fileNode(locking) as never), (error: QmpError) => {
      assert.equal(error.errorClass, 'GenericError');
      assert.match(error.desc, new RegExp(`^Could not open '${image}': image locking is unavailable \\(.*blockd_native\\.node is not built.*\\); use locking=off to open the image without locks$`));
      return true;
    });
  }
  await qmp.execute('blockdev-add', fileNode('off') as never);
  const nodes = (await qmp.execute('query-named-block-nodes', { flat: true })) as { 'node-name': string }[];
  assert.deepEqual(nodes.map((node) => node['node-name']).filter((name) => name.startsWith('n-')), ['n-off']);
  await qmp.execute('blockdev-del', { 'node-name': 'n-off' });
  qemuIo(image, ['read -P 0x5a 0 64k']);
});

test('the addon builds and names errno values without strerrorname_np', () => {
  const headers = join(dirname(dirname(process.execPath)), 'include', 'node');
  assert.ok(existsSync(join(headers, 'node_api.h')), `Node's headers are not at ${headers}`);
  const output = join(temp.dir, 'errno-table.node');
  const build = spawnSync('cc', ['-shared', '-fPIC', '-Wall', '-Wextra', '-Werror', '-DNAPI_VERSION=8', '-DBLOCKD_ERRNO_TABLE',
    `-I${headers}`, join(REPO_ROOT, 'native', 'blockd_native.c'), '-o', output], { encoding: 'utf8' });
  assert.equal(build.status, 0, build.stderr);
  const addon = createRequire(import.meta.url)(output) as { fallocate(fd: number, mode: number, offset: number, length: number): Promise<void> };
  return assert.rejects(addon.fallocate(1 << 20, 0, 0, 4096), (error: NodeJS.ErrnoException) => {
    assert.equal(error.code, 'EBADF');
    assert.equal(error.errno, 9);
    return true;
  });
});
