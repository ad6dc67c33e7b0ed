/*
 * Which nodes take compressed writes, against qemu-storage-daemon: the same graph (a qcow2
 * image, filters over it, a raw format, a file, null-co) is built in QSD and in an in-process
 * blockd. QSD's blockdev-backup with `compress` refuses a target up front exactly when
 * bdrv_supports_compressed_writes says no; blockd's node must say the same, take compressed
 * writes through the nodes that support them (stored compressed, by qemu-img map) and refuse
 * them elsewhere with ENOTSUP. Detected zeroes become a zero cluster, compressed or not, as
 * qemu-io shows on a node with detect-zeroes=on.
 */
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { pino } from 'pino';
import { Daemon } from '../../src/daemon.js';
import type { JsonObject } from '../../src/json/value.js';
import { QmpClient, QmpCommandError } from '../../src/qmp/client.js';
import { makeTempDir } from '../helpers/paths.js';
import { assertCheckClean, createQcow2, KiB, MiB, qemuImgMap, runQemuImg, runTool } from '../helpers/qemu-tools.js';
import { startQsd } from '../helpers/qsd-process.js';

const temp = makeTempDir('blockd-compress-support-');
after(() => temp.cleanup());

const CLUSTER = 64 * KiB;

/** blockdev-add arguments of the graph under test; `dir` holds its files. The first node is the qcow2 image the filters sit on. */
function graph(dir: string): JsonObject[] {
  const image = createQcow2(join(dir, 'target.qcow2'), 4 * MiB);
  const copies = createQcow2(join(dir, 'copies.qcow2'), 4 * MiB);
  runQemuImg('create', '-q', '-f', 'raw', join(dir, 'plain.raw'), String(MiB));
  writeFileSync(join(dir, 'writes.log'), '');
  return [
    { driver: 'qcow2', 'node-name': 'image', file: { driver: 'file', filename: image } },
    { driver: 'throttle', 'node-name': 'throttled', 'throttle-group': 'group', file: 'image' },
    { driver: 'copy-on-read', 'node-name': 'cor', file: 'image' },
    { driver: 'blkdebug', 'node-name': 'debug', image: 'image' },
    { driver: 'blklogwrites', 'node-name': 'logged', file: 'image', log: { driver: 'file', filename: join(dir, 'writes.log') } },
    { driver: 'qcow2', 'node-name': 'copies', file: { driver: 'file', filename: copies } },
    { driver: 'copy-before-write', 'node-name': 'cbw', file: 'image', target: 'copies' },
    { driver: 'raw', 'node-name': 'raw-over-qcow2', file: 'image' },
    { driver: 'file', 'node-name': 'plain-file', filename: join(dir, 'plain.raw') },
    { driver: 'null-co', 'node-name': 'null' },
  ];
}

const TARGETS = ['image', 'throttled', 'cor', 'debug', 'logged', 'cbw', 'raw-over-qcow2', 'plain-file', 'null'];

/** Per target: whether QSD's blockdev-backup with compress takes it (else its error text). */
async function qsdAnswers(): Promise<Record<string, string>> {
  const dir = join(temp.dir, 'qsd');
  mkdirSync(dir);
  const source = createQcow2(join(dir, 'source.qcow2'), 4 * MiB);
  const qsd = await startQsd(dir);
  const qmp = await QmpClient.connect(`unix:${qsd.socket}`);
  const answers: Record<string, string> = {};
  try {
    await qmp.executeRaw('object-add', { 'qom-type': 'throttle-group', id: 'group' });
    await qmp.executeRaw('blockdev-add', { driver: 'qcow2', 'node-name': 'source', file: { driver: 'file', filename: source } });
    for (const node of graph(dir)) await qmp.executeRaw('blockdev-add', node);
    for (const target of TARGETS) {
      try {
        await qmp.executeRaw('blockdev-backup', { 'job-id': `backup-${target}`, device: 'source', target, sync: 'full', compress: true });
        await qmp.waitForEvent('BLOCK_JOB_COMPLETED', (event) => event.data?.device === `backup-${target}`);
        answers[target] = 'taken';
      } catch (error) {
        if (!(error instanceof QmpCommandError)) throw error;
        answers[target] = `${error.errorClass}: ${error.desc}`;
      }
    }
  } finally {
    await qmp.close().catch(() => {});
    await qsd.stop();
  }
  return answers;
}

test('the nodes that take compressed writes are the ones qemu-storage-daemon backs up to with compress', async () => {
  const qsd = await qsdAnswers();
  for (const [target, answer] of Object.entries(qsd)) {
    assert.ok(answer === 'taken' || answer === 'GenericError: Compression is not supported for this drive ', `QSD on ${target}: ${answer}`);
  }

  assert.ok(TARGETS.some((target) => qsd[target] === 'taken') && TARGETS.some((target) => qsd[target] !== 'taken'), 'QSD takes some targets and refuses others');

  const dir = temp.dir;
  const daemon = new Daemon(pino({ level: 'silent' }));
  const outcomes: Record<string, string> = {};
  try {
    await daemon.runCommand('object-add', { 'qom-type': 'throttle-group', id: 'group' });
    for (const node of graph(dir)) await daemon.runCommand('blockdev-add', node);
    for (const [i, target] of TARGETS.entries()) {
      const node = daemon.graph.find(target)!;
      assert.equal(node.supportsCompressedWrites(), qsd[target] === 'taken', `${target}: blockd supports compressed writes when QSD does`);
      const disk = await daemon.graph.attachUser({ describe: () => 'test user' }, node, 'root', { perm: 0x3, shared: 0xf });
      const data = Buffer.alloc(CLUSTER, 0x40 + i);
      outcomes[target] = await disk.write(i * CLUSTER, data, { compress: true }).then(() => 'written', (error: { code: string }) => error.code);
      await daemon.graph.detach(disk);
    }
  } finally {
    await daemon.shutdown('test');
  }
  const expected = Object.fromEntries(TARGETS.map((target) => [target, qsd[target] === 'taken' ? 'written' : 'ENOTSUP']));
  assert.deepEqual(outcomes, expected);

  const image = join(dir, 'target.qcow2');
  assertCheckClean(image);
  const compressed = qemuImgMap(image).filter((extent) => extent.data && extent.offset === undefined).map((extent) => [extent.start, extent.length]);
  const written = TARGETS.flatMap((target, i) => (expected[target] === 'written' ? [i] : []));
  assert.deepEqual(compressed, mergeRuns(written).map(([first, count]) => [first * CLUSTER, count * CLUSTER]), 'what went through is stored compressed');
});

/** Consecutive cluster numbers as [first, count] runs (qemu-img map merges neighbours). */
function mergeRuns(clusters: number[]): [number, number][] {
  const runs: [number, number][] = [];
  for (const cluster of clusters) {
    const last = runs[runs.length - 1];
    if (last && last[0] + last[1] === cluster) last[1]++;
    else runs.push([cluster, 1]);
  }
  return runs;
}

test('with detect-zeroes=on, zeroes written compressed become a zero cluster, as in QEMU', async () => {
  const images = { qemu: createQcow2(join(temp.dir, 'zeroes-qemu.qcow2'), MiB), blockd: createQcow2(join(temp.dir, 'zeroes-blockd.qcow2'), MiB) };
  const io = runTool('qemu-io', ['--image-opts', '-c', `write -c -P 0 0 ${CLUSTER}`, '-c', `write -c -P 0x51 ${CLUSTER} ${CLUSTER}`,
    `driver=qcow2,detect-zeroes=on,file.driver=file,file.filename=${images.qemu}`]);
  assert.equal(io.status, 0, io.stderr);
  const daemon = new Daemon(pino({ level: 'silent' }));
  try {
    await daemon.runCommand('blockdev-add', { driver: 'qcow2', 'node-name': 'zeroes', 'detect-zeroes': 'on', file: { driver: 'file', filename: images.blockd } });
    const disk = await daemon.graph.attachUser({ describe: () => 'test user' }, daemon.graph.find('zeroes')!, 'root', { perm: 0x3, shared: 0xf });
    await disk.write(0, Buffer.alloc(CLUSTER), { compress: true });
    await disk.write(CLUSTER, Buffer.alloc(CLUSTER, 0x51), { compress: true });
    await daemon.graph.detach(disk);
  } finally {
    await daemon.shutdown('test');
  }
  const describeMap = (image: string) => qemuImgMap(image).map(({ start, length, zero, data, offset }) => ({ start, length, zero, data, compressed: data && offset === undefined }));
  for (const image of Object.values(images)) assertCheckClean(image);
  assert.deepEqual(describeMap(images.blockd), describeMap(images.qemu));
  assert.deepEqual(describeMap(images.blockd).slice(0, 2), [
    { start: 0, length: CLUSTER, zero: true, data: false, compressed: false },
    { start: CLUSTER, length: CLUSTER, zero: false, data: true, compressed: true },
  ]);
});
