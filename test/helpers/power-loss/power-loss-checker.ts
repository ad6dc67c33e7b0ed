/*
 * The power-loss checker: replays a scenario's write logs onto copies of its
 * original files at the end of the logs, just after every flush, and at
 * random moments between flushes with random subsets of the writes not yet
 * durable left out; on every replay, `qemu-img check` must find no corruption
 * (leaks are fine), each image the scenario watches must read what its
 * guest model allows, and each of the scenario's probes (checks of its own,
 * such as the bitmaps a daemon loads) must find nothing wrong. The end of the
 * logs must also rebuild the files exactly as the run left them, which proves
 * the logs miss no write.
 */
import { mkdir, open, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { LOG_FLUSH, parseWriteLog, type ParsedLog } from '../../../src/blockdev/drivers/blklogwrites/log-format.js';
import { makeTempDir } from '../paths.js';
import { firstDifference, qemuImgCheck, runTool, SeededRandom } from '../qemu-tools.js';
import { appliedDataKey, dominatedBy, LogTimeline, type CrashState } from './crash-states.js';
import { includes, type GuestModel, type Witness } from './guest-model.js';
import { materialize, type ReplayFile } from './replay.js';

/** An image whose contents a model describes; before `from` is in a state, nothing is promised about it. */
export interface ImageView {
  image: string;
  model: GuestModel;
  from?: Witness;
}

/** A qcow2 image `qemu-img check` looks at; before `from`, a file that is no qcow2 image yet is fine (not a corrupt one). */
export interface CheckedImage {
  image: string;
  from?: Witness;
  /**
   * Errors `qemu-img check` may report that the format cannot avoid and the scenario's probes prove
   * harmless (internal snapshots: QEMU's own window between a refcount and a COPIED flag): a check whose
   * every ERROR line matches does not count as corruption.
   */
  tolerated?: RegExp;
}

/** A further check of each replayed state that includes `from`: problems found in the files in `dir`. */
export interface StateProbe {
  name: string;
  from?: Witness;
  check(dir: string, state: CrashState): Promise<string[]>;
}

export interface PowerLossScenario {
  name: string;
  /** Where the run left its files. */
  dir: string;
  /** The write logs, in the order witnesses number them. */
  logs: string[];
  files: ReplayFile[];
  checked: CheckedImage[];
  views: ImageView[];
  probes?: StateProbe[];
}

export interface CheckerOptions {
  seed: number;
  /** Random moments replayed in each epoch (default 1). */
  randomPerEpoch?: number;
  /** The epochs random moments are taken in (default: every epoch). */
  epochs?: readonly number[];
  /** Also replay the end of each of those epochs with each write not yet durable left out alone (default false). */
  singleDrops?: boolean;
  /** Replay just after every flush (default true). */
  flushPoints?: boolean;
  /** Logs to replay instead of the scenario's files (a test edits one to remove a flush). */
  parsedLogs?: ParsedLog[];
}

export interface PowerLossReport {
  scenario: string;
  seed: number;
  logs: number;
  points: number;
  corrupt: number;
  lost: number;
  /** States a probe found problems in. */
  probed: number;
  /** The first few problems, each with the state that showed it. */
  failures: string[];
}

export function describeReport(report: PowerLossReport): string {
  return `${report.scenario} (seed ${report.seed}): logs replayed ${report.logs}, replay points checked ${report.points}, ` +
    `corrupt ${report.corrupt}, lost data ${report.lost}${report.probed ? `, failed probes ${report.probed}` : ''}`;
}

/** The witness of a flush the guest saw acknowledged: the last flush its image's log holds now. */
export async function flushWitness(logPath: string, log: number): Promise<Witness> {
  const parsed = parseWriteLog(await readFile(logPath));
  const flushes = parsed.entries.filter((entry) => entry.flags & LOG_FLUSH);
  if (!flushes.length) throw new Error(`${logPath} holds no flush yet`);
  return { log, entry: flushes[flushes.length - 1]!.index };
}

async function isQcow2(path: string): Promise<boolean> {
  const handle = await open(path, 'r');
  try {
    const magic = Buffer.alloc(4);
    const { bytesRead } = await handle.read(magic, 0, 4, 0);
    return bytesRead === 4 && magic.readUInt32BE(0) === 0x514649fb;
  } finally {
    await handle.close();
  }
}

class Replayer {
  readonly report: PowerLossReport;
  /** States checked, by what they write. */
  private readonly checked = new Map<string, CrashState[]>();

  constructor(private readonly scenario: PowerLossScenario, private readonly logs: ParsedLog[], private readonly scratch: string, seed: number) {
    this.report = { scenario: scenario.name, seed, logs: logs.length, points: 0, corrupt: 0, lost: 0, probed: 0, failures: [] };
  }

  private fail(kind: 'corrupt' | 'lost' | 'probed', state: CrashState, problem: string): void {
    this.report[kind]++;
    if (this.report.failures.length < 8) this.report.failures.push(`${kind} at ${state.label}: ${problem}`);
  }

  /** Checks a state unless one that writes the same and includes at least as much was checked. */
  async check(state: CrashState): Promise<void> {
    const key = appliedDataKey(this.logs, state);
    const same = this.checked.get(key) ?? [];
    if (same.some((other) => dominatedBy(state, other))) return;
    this.checked.set(key, [...same, state]);
    this.report.points++;
    await materialize(this.scratch, this.scenario.files, this.logs, state);
    for (const { image, from, tolerated } of this.scenario.checked) {
      const path = join(this.scratch, image);
      const required = from === undefined || includes(state, from);
      if (!(await isQcow2(path))) {
        if (required) this.fail('corrupt', state, `${image} is not a qcow2 image`);
        continue;
      }
      const report = qemuImgCheck(path);
      const errors = report.output.split('\n').filter((line) => line.startsWith('ERROR'));
      const explained = tolerated !== undefined && report.checkErrors === 0 && errors.length === report.corruptions && errors.every((line) => tolerated.test(line));
      if (explained) continue;
      if (report.corruptions > 0 || report.checkErrors > 0 || (report.status !== 0 && report.status !== 3)) {
        this.fail('corrupt', state, `qemu-img check ${image}: ${report.output.trim().slice(0, 600)}`);
      }
    }
    for (const view of this.scenario.views) {
      if (view.from !== undefined && !includes(state, view.from)) continue;
      const raw = join(this.scratch, `${view.image}.read.raw`);
      const converted = runTool('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', join(this.scratch, view.image), raw]);
      if (converted.status !== 0) {
        this.fail('corrupt', state, `${view.image} cannot be read: ${converted.stderr.trim()}`);
        continue;
      }
      const problems = view.model.check(await readFile(raw), state);
      await rm(raw);
      if (problems.length) this.fail('lost', state, `${view.image}: ${problems.join('; ')}`);
    }
    for (const probe of this.scenario.probes ?? []) {
      if (probe.from !== undefined && !includes(state, probe.from)) continue;
      const problems = await probe.check(this.scratch, state);
      if (problems.length) this.fail('probed', state, `${probe.name}: ${problems.join('; ')}`);
    }
  }

  /** The whole logs rebuild each logged file as the run left it (a longer file only adds zeros). */
  async compareFinal(end: CrashState): Promise<void> {
    for (const file of this.scenario.files.filter((candidate) => candidate.log !== undefined)) {
      const replayed = await readFile(join(this.scratch, file.name));
      const real = await readFile(join(this.scenario.dir, file.name));
      const length = Math.max(replayed.length, real.length);
      const padded = (bytes: Buffer) => Buffer.concat([bytes, Buffer.alloc(length - bytes.length)]);
      if (!padded(replayed).equals(padded(real))) {
        const at = firstDifference(padded(replayed), padded(real));
        this.fail('lost', end, `replaying the whole log of ${file.name} differs from the file at byte ${at}: the log misses a write`);
      }
    }
  }
}

function sum(values: number[]): number {
  return values.reduce((total, value) => total + value, 0);
}

export async function checkPowerLoss(scenario: PowerLossScenario, options: CheckerOptions): Promise<PowerLossReport> {
  const logs = options.parsedLogs ?? (await Promise.all(scenario.logs.map(async (path) => parseWriteLog(await readFile(path)))));
  const timeline = new LogTimeline(logs);
  const temp = makeTempDir('blockd-power-loss-');
  try {
    const scratch = join(temp.dir, 'replay');
    await mkdir(scratch);
    const replayer = new Replayer(scenario, logs, scratch, options.seed);
    const end = timeline.finalState();
    await replayer.check(end);
    await replayer.compareFinal(end);
    // The latest first: an earlier flush with nothing written since adds no check of its own.
    const flushPoints = options.flushPoints === false ? [] : timeline.flushes().map((flush) => timeline.flushPoint(flush)).reverse();
    for (const state of flushPoints.sort((a, b) => sum(b.prefix) - sum(a.prefix))) await replayer.check(state);
    const random = new SeededRandom(options.seed);
    for (const epoch of options.epochs ?? timeline.allEpochs) {
      if (options.singleDrops) for (const state of timeline.singleDrops(epoch)) await replayer.check(state);
      for (let i = 0; i < (options.randomPerEpoch ?? 1); i++) await replayer.check(timeline.randomPoint(epoch, random));
    }
    return replayer.report;
  } finally {
    temp.cleanup();
  }
}
