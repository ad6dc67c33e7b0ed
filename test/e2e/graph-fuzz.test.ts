/*
 * Graph fuzz: thousands of graph-building commands (blockdev-add/del, snapshots, blockdev-create,
 * stream, commit, job control, queries) with real node names and real file names, some of them
 * held by another process (qemu-storage-daemon, read-write or read-only), one whose header names
 * itself as backing, sent in pipelined batches with arguments sometimes mangled. Every reply must
 * come (no hang), be well formed with QMP's error classes and no internal error text (no stack
 * overflow, no JavaScript error), the daemon must survive, and afterwards every image another
 * process held, and every file no command named, must be byte for byte as it was; every qcow2
 * image left in the directory must pass `qemu-img check`.
 * Seeds are fixed for reproducibility; BLOCKD_MODEL_SEED adds one more.
 */
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, openSync, readdirSync, readSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { runBlockd } from '../helpers/blockd-process.js';
import { makeTempDir } from '../helpers/paths.js';
import { createQcow2, MiB, qemuImgCheck, qemuIo, runQemuImg, SeededRandom, sha256File, testSeeds } from '../helpers/qemu-tools.js';
import { startQsd } from '../helpers/qsd-process.js';
import { RawConnection } from '../helpers/raw-connection.js';
import { waitUntil } from '../helpers/wait-until.js';

const MESSAGES_PER_SEED = 5000;
const BATCH = 16;

/** Images the fuzz may name; held-* are opened by qemu-storage-daemon for the whole run. */
const FILES = [
  'p0.qcow2', 'p1.qcow2', 'p2.qcow2', 'p3.qcow2', 'r0.raw', 'loop.qcow2',
  'new0.qcow2', 'new1.qcow2', 'new2.raw', 'no-such-dir/x.qcow2',
  'held-rw.qcow2', 'held-ro.qcow2',
];
const HELD = ['held-rw.qcow2', 'held-ro.qcow2'];
/** Never named by any command: must never change. */
const UNNAMED = ['sentinel.qcow2', 'sentinel.raw'];
const NODES = ['n0', 'n1', 'n2', 'n3', 'n4', 'n5', 'held', 'f0', 'f1'];
const JOBS = ['j0', 'j1', 'j2'];
const SIZES = [0, 512, MiB, 16 * MiB, 16 * MiB + 512, -1, 2 ** 53, 2 ** 63, 1e300];
const INTERNAL_ERROR = /Maximum call stack|RangeError|TypeError|ReferenceError|SyntaxError|Cannot read prop|is not a function|is not iterable|\bundefined\b|\bNaN\b|\[object /;

function makeImages(dir: string): void {
  createQcow2(join(dir, 'p0.qcow2'), 16 * MiB);
  qemuIo(join(dir, 'p0.qcow2'), ['write -P 0x10 0 4M'], ['-f', 'qcow2']);
  createQcow2(join(dir, 'p1.qcow2'), undefined, { backing: { path: 'p0.qcow2', format: 'qcow2' } });
  qemuIo(join(dir, 'p1.qcow2'), ['write -P 0x11 2M 4M'], ['-f', 'qcow2']);
  createQcow2(join(dir, 'p2.qcow2'), undefined, { backing: { path: 'p1.qcow2', format: 'qcow2' } });
  createQcow2(join(dir, 'p3.qcow2'), 16 * MiB);
  runQemuImg('create', '-q', '-f', 'raw', join(dir, 'r0.raw'), String(16 * MiB));
  // A header that names its own file as backing: any image can carry one.
  createQcow2(join(dir, 'loop.qcow2'), 16 * MiB);
  runQemuImg('rebase', '-u', '-f', 'qcow2', '-b', 'loop.qcow2', '-F', 'qcow2', join(dir, 'loop.qcow2'));
  for (const name of HELD) {
    createQcow2(join(dir, name), 16 * MiB);
    qemuIo(join(dir, name), ['write -P 0x5a 0 1M'], ['-f', 'qcow2']);
  }
  createQcow2(join(dir, 'sentinel.qcow2'), 16 * MiB, { backing: { path: 'p0.qcow2', format: 'qcow2' } });
  runQemuImg('create', '-q', '-f', 'raw', join(dir, 'sentinel.raw'), String(MiB));
}

function generator(random: SeededRandom, dir: string) {
  const file = () => join(dir, random.pick(FILES));
  const node = () => random.pick(NODES);
  const job = () => random.pick(JOBS);
  const size = () => random.pick(SIZES);
  const fileNode = () => ({ driver: 'file', filename: file(), ...(random.chance(0.3) ? { 'node-name': node() } : {}) });
  const wrongValue = () => random.pick<unknown>([null, -1, 1.5, 'x', '', true, [], {}, 2 ** 64, [node()], { 'node-name': node() }]);

  const commands: (() => [string, Record<string, unknown>])[] = [
    () => ['blockdev-add', {
      driver: 'qcow2', 'node-name': node(),
      file: random.chance(0.8) ? fileNode() : node(),
      ...(random.chance(0.5) ? { backing: random.chance(0.4) ? null : node() } : {}),
      ...(random.chance(0.4) ? { 'read-only': random.chance(0.5) } : {}),
    }],
    () => ['blockdev-add', { driver: 'file', 'node-name': node(), filename: file(), ...(random.chance(0.4) ? { 'read-only': random.chance(0.5) } : {}) }],
    () => ['blockdev-add', { driver: 'raw', 'node-name': node(), file: random.chance(0.5) ? node() : fileNode() }],
    () => ['blockdev-add', { driver: 'null-co', 'node-name': node(), ...(random.chance(0.5) ? { size: size() } : {}) }],
    () => ['blockdev-del', { 'node-name': node() }],
    () => ['blockdev-del', { 'node-name': node() }],
    () => ['blockdev-snapshot-sync', {
      ...(random.chance(0.5) ? { 'node-name': node() } : { device: node() }),
      'snapshot-file': file(), format: random.chance(0.9) ? 'qcow2' : 'raw',
      ...(random.chance(0.6) ? { 'snapshot-node-name': node() } : {}),
      ...(random.chance(0.3) ? { mode: random.pick(['existing', 'absolute-paths']) } : {}),
    }],
    () => ['blockdev-snapshot', { node: node(), overlay: node() }],
    () => ['blockdev-create', {
      'job-id': job(),
      options: random.chance(0.5)
        ? { driver: 'file', filename: file(), size: size(), ...(random.chance(0.5) ? { preallocation: random.pick(['off', 'falloc', 'full', 'metadata']) } : {}) }
        : {
          driver: 'qcow2', file: random.chance(0.7) ? node() : file(), size: size(),
          ...(random.chance(0.4) ? { 'backing-file': random.pick([...FILES, 'no-such.qcow2']), 'backing-fmt': 'qcow2' } : {}),
          ...(random.chance(0.2) ? { 'cluster-size': random.pick([512, 65536, 2 * MiB, 3000]) } : {}),
        },
    }],
    () => ['block-stream', {
      'job-id': job(), device: node(),
      ...(random.chance(0.4) ? { 'base-node': node() } : {}),
      ...(random.chance(0.2) ? { bottom: node() } : {}),
      ...(random.chance(0.3) ? { speed: random.pick([0, 1, MiB]) } : {}),
    }],
    () => ['block-commit', {
      'job-id': job(), device: node(),
      ...(random.chance(0.5) ? { 'top-node': node() } : {}),
      ...(random.chance(0.5) ? { 'base-node': node() } : {}),
      ...(random.chance(0.3) ? { speed: random.pick([0, 1, MiB]) } : {}),
      ...(random.chance(0.2) ? { 'auto-finalize': false } : {}),
      ...(random.chance(0.2) ? { 'auto-dismiss': false } : {}),
    }],
    () => [random.pick(['job-cancel', 'job-pause', 'job-resume', 'job-complete', 'job-dismiss', 'job-finalize']), { id: job() }],
    () => ['block-job-cancel', { device: job(), ...(random.chance(0.5) ? { force: random.chance(0.5) } : {}) }],
    () => ['block-job-set-speed', { device: job(), speed: random.pick([0, 1, MiB]) }],
    () => ['query-named-block-nodes', random.chance(0.5) ? { flat: random.chance(0.5) } : {}],
    () => ['query-block', {}],
    () => [random.pick(['query-jobs', 'query-block-jobs']), {}],
  ];

  return (): string => {
    const [execute, args] = random.pick(commands)();
    // Sometimes an argument goes missing or gets a value of the wrong type.
    const keys = Object.keys(args);
    if (keys.length && random.chance(0.1)) {
      const key = random.pick(keys);
      if (random.chance(0.5)) delete args[key];
      else args[key] = wrongValue();
    }
    const cleaned = Object.fromEntries(Object.entries(args).filter(([, value]) => value !== undefined));
    return JSON.stringify({ execute, arguments: cleaned });
  };
}

function checkReply(line: string, request: string): void {
  const reply = JSON.parse(line) as { return?: unknown; error?: { class: string; desc: string } };
  if (reply.error) {
    assert.ok(['GenericError', 'CommandNotFound', 'DeviceNotFound', 'DeviceNotActive'].includes(reply.error.class), `odd class in ${line} for ${request}`);
    assert.doesNotMatch(reply.error.desc, INTERNAL_ERROR, `internal error text in ${line} for ${request}`);
  } else {
    assert.ok('return' in reply, `neither return nor error: ${line}`);
  }
}

/** Sends the batch with ids and waits for every reply; events in between are skipped. */
async function exchange(connection: RawConnection, requests: string[], first: number): Promise<void> {
  connection.send(requests.map((request, index) => `${request.slice(0, -1)}, "id": ${first + index}}`).join('\n'));
  const unanswered = new Set(requests.keys());
  while (unanswered.size) {
    const line = await connection.readLine(60_000).catch((error: Error) => {
      throw new Error(`${error.message}; no reply to: ${[...unanswered].map((index) => requests[index]).join('\n')}\n(the batch: ${requests.join('\n')})`);
    });
    if (line.startsWith('{"timestamp"')) continue;
    const index = (JSON.parse(line) as { id?: number }).id! - first;
    assert.ok(unanswered.delete(index), `a reply without a request waiting for it: ${line}`);
    checkReply(line, requests[index]!);
  }
}

async function ask(connection: RawConnection, execute: string, args: object = {}): Promise<{ return?: unknown; error?: { desc: string } }> {
  connection.send(JSON.stringify({ execute, arguments: args, id: 'ask' }));
  for (;;) {
    const line = await connection.readLine(60_000);
    if (line.includes('"id": "ask"')) return JSON.parse(line) as { return?: unknown; error?: { desc: string } };
  }
}

/** Ends every job and removes every node the fuzz added: the graph must let go of everything. */
async function tearDown(connection: RawConnection): Promise<void> {
  await waitUntil(async () => {
    const jobs = (await ask(connection, 'query-jobs')).return as { id: string; status: string }[];
    for (const job of jobs) {
      if (job.status === 'concluded') await ask(connection, 'job-dismiss', { id: job.id });
      else if (job.status === 'pending') await ask(connection, 'job-finalize', { id: job.id });
      else await ask(connection, 'block-job-cancel', { device: job.id, force: true }).then((reply) =>
        reply.error ? ask(connection, 'job-cancel', { id: job.id }) : reply);
    }
    return jobs.length === 0;
  }, 'every job has ended', 120_000);
  await waitUntil(async () => {
    const nodes = (await ask(connection, 'query-named-block-nodes', { flat: true })).return as { 'node-name': string }[];
    for (const node of nodes) await ask(connection, 'blockdev-del', { 'node-name': node['node-name'] });
    return nodes.length === 0;
  }, 'every node is gone', 60_000);
}

function isQcow2(path: string): boolean {
  const fd = openSync(path, 'r');
  try {
    const magic = Buffer.alloc(4);
    return readSync(fd, magic, 0, 4, 0) === 4 && magic.toString('latin1') === 'QFI\xfb';
  } finally {
    closeSync(fd);
  }
}

for (const seed of testSeeds([1, 2, 3, 4])) {
  test(`${MESSAGES_PER_SEED} graph-building messages with real nodes and files (seed ${seed}): no hang, no crash, no image changed that no command named`, async () => {
    const temp = makeTempDir('blockd-graph-fuzz-');
    const { dir } = temp;
    makeImages(dir);
    mkdirSync(join(dir, 'qsd'));
    const qsd = await startQsd(join(dir, 'qsd'), [
      '--blockdev', `driver=file,node-name=held-rw-file,filename=${join(dir, 'held-rw.qcow2')}`,
      '--blockdev', 'driver=qcow2,node-name=held-rw,file=held-rw-file',
      '--blockdev', `driver=file,node-name=held-ro-file,filename=${join(dir, 'held-ro.qcow2')},read-only=on`,
      '--blockdev', 'driver=qcow2,node-name=held-ro,file=held-ro-file,read-only=on',
    ]);
    const untouchable = [...HELD, ...UNNAMED];
    const before = new Map(untouchable.map((name) => [name, sha256File(join(dir, name))]));
    const socket = join(dir, 'blockd.sock');
    const daemon = await runBlockd(['--qmp', `unix:${socket}`]);
    const fuzzed = (async () => {
      const connection = await RawConnection.negotiated(socket);
      const next = generator(new SeededRandom(seed), dir);
      for (let sent = 0; sent < MESSAGES_PER_SEED; sent += BATCH) {
        await exchange(connection, Array.from({ length: Math.min(BATCH, MESSAGES_PER_SEED - sent) }, next), sent);
      }
      await tearDown(connection);
      assert.match(JSON.stringify((await ask(connection, 'query-version')).return), /"package":"blockd/);
      connection.end();
    })();
    const outcome = await fuzzed.then(() => undefined, (error: Error) => error);
    // A daemon stuck in a command would not honour SIGTERM: it is killed, and the test fails.
    const exit = await daemon.stop('SIGTERM', 15_000);
    await qsd.stop();
    if (outcome) throw new Error(`${outcome.message}\nblockd said: ${daemon.stderr().slice(-2000)}`);
    assert.equal(exit.signal, null, `blockd did not end on SIGTERM: ${daemon.stderr().slice(-2000)}`);
    assert.doesNotMatch(daemon.stderr(), /Maximum call stack|unhandled|uncaught/i, daemon.stderr().slice(-2000));
    for (const name of untouchable) assert.equal(sha256File(join(dir, name)), before.get(name), `${name} changed, though no command could write it`);
    for (const name of readdirSync(dir)) {
      const path = join(dir, name);
      if (!name.endsWith('.sock') && existsSync(path) && !name.startsWith('qsd') && isQcow2(path)) {
        // The header's backing may name anything (even itself): check this image alone.
        const report = qemuImgCheck(`json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: path }, backing: null })}`);
        assert.equal(report.corruptions, 0, `${name}: ${report.output}`);
        assert.ok(report.status === 0 || report.status === 3, `${name}: qemu-img check exit ${report.status}: ${report.output}`);
      }
    }
    temp.cleanup();
  });
}
