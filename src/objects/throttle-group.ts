/*
 * A throttle group: QEMU's leaky-bucket I/O limits (bytes and operations per
 * second, total or per direction, with bursts) shared by every throttle node
 * that names the group. A request that would overflow a bucket waits in its
 * direction's queue until the buckets have leaked enough; requests leave the
 * queue in order.
 */
import type { ThrottleLimits } from '../generated/qapi-types.js';
import { genericError } from '../errors.js';
import type { UserObject } from './object-registry.js';

const MAX_VALUE = 1_000_000_000_000_000;
const KINDS = ['bps', 'iops'] as const;
const SCOPES = ['total', 'read', 'write'] as const;

interface Bucket {
  avg: number;
  max: number;
  burstLength: number;
  level: number;
  burstLevel: number;
}

type BucketName = `${(typeof KINDS)[number]}-${(typeof SCOPES)[number]}`;

/** QEMU's checks on a set of limits, with its messages. */
function validate(buckets: Record<BucketName, Bucket>, opSize: number): void {
  for (const kind of KINDS) {
    const total = buckets[`${kind}-total`];
    const read = buckets[`${kind}-read`];
    const write = buckets[`${kind}-write`];
    if ((total.avg && (read.avg || write.avg)) || (total.max && (read.max || write.max))) {
      throw genericError('bps/iops/max total values and read/write values cannot be used at the same time');
    }
  }
  if (opSize && !buckets['iops-total'].avg && !buckets['iops-read'].avg && !buckets['iops-write'].avg) {
    throw genericError('iops size requires an iops value to be set');
  }
  for (const bucket of Object.values(buckets)) {
    if (bucket.avg > MAX_VALUE || bucket.max > MAX_VALUE) throw genericError(`bps/iops/max values must be within [0, ${MAX_VALUE}]`);
    if (!bucket.burstLength) throw genericError('the burst length cannot be 0');
    if (bucket.burstLength > 1 && !bucket.max) throw genericError('burst length set without burst rate');
    if (bucket.max && bucket.burstLength > MAX_VALUE / bucket.max) throw genericError('burst length too high for this burst rate');
    if (bucket.max && !bucket.avg) throw genericError('bps_max/iops_max require corresponding bps/iops values');
    if (bucket.max && bucket.max < bucket.avg) throw genericError('bps_max/iops_max cannot be lower than bps/iops');
  }
}

/** How long (ms) until the bucket can take more, 0 when it can now. */
function waitFor(bucket: Bucket): number {
  if (!bucket.avg) return 0;
  const size = bucket.max ? bucket.max * bucket.burstLength : bucket.avg / 10;
  const extra = bucket.level - size;
  if (extra > 0) return (extra * 1000) / bucket.avg;
  if (bucket.burstLength > 1) {
    const burstExtra = bucket.burstLevel - bucket.max / 10;
    if (burstExtra > 0) return (burstExtra * 1000) / bucket.max;
  }
  return 0;
}

export class ThrottleGroup implements UserObject {
  readonly type = 'throttle-group';
  users = 0;
  private readonly buckets: Record<BucketName, Bucket>;
  private readonly opSize: number;
  private lastLeak = performance.now();
  private readonly queues: [(() => void)[], (() => void)[]] = [[], []];
  private readonly timers: [NodeJS.Timeout | undefined, NodeJS.Timeout | undefined] = [undefined, undefined];

  constructor(readonly id: string, limits: ThrottleLimits = {}) {
    const l = limits as Record<string, number | undefined>;
    const bucket = (name: BucketName): Bucket => ({
      avg: l[name] ?? 0,
      max: l[`${name}-max`] ?? 0,
      burstLength: l[`${name}-max-length`] ?? 1,
      level: 0,
      burstLevel: 0,
    });
    this.buckets = Object.fromEntries(KINDS.flatMap((kind) => SCOPES.map((scope) => {
      const name = `${kind}-${scope}` as BucketName;
      return [name, bucket(name)];
    }))) as Record<BucketName, Bucket>;
    this.opSize = l['iops-size'] ?? 0;
    validate(this.buckets, this.opSize);
  }

  private leak(): void {
    const now = performance.now();
    const elapsed = (now - this.lastLeak) / 1000;
    this.lastLeak = now;
    for (const bucket of Object.values(this.buckets)) {
      bucket.level = Math.max(0, bucket.level - bucket.avg * elapsed);
      if (bucket.burstLength > 1) bucket.burstLevel = Math.max(0, bucket.burstLevel - bucket.max * elapsed);
    }
  }

  private relevant(isWrite: boolean): Bucket[] {
    const scope = isWrite ? 'write' : 'read';
    return [this.buckets['bps-total'], this.buckets[`bps-${scope}`], this.buckets['iops-total'], this.buckets[`iops-${scope}`]];
  }

  private wait(isWrite: boolean): number {
    this.leak();
    return Math.max(...this.relevant(isWrite).map(waitFor));
  }

  private account(isWrite: boolean, bytes: number): void {
    const units = this.opSize && bytes > this.opSize ? bytes / this.opSize : 1;
    const [bpsTotal, bpsScope, opsTotal, opsScope] = this.relevant(isWrite);
    for (const [bucket, amount] of [[bpsTotal, bytes], [bpsScope, bytes], [opsTotal, units], [opsScope, units]] as [Bucket, number][]) {
      bucket.level += amount;
      if (bucket.burstLength > 1) bucket.burstLevel += amount;
    }
  }

  /** Resolves when a request of `bytes` may go ahead; it is then counted. */
  async admit(isWrite: boolean, bytes: number): Promise<void> {
    const queue = this.queues[isWrite ? 1 : 0];
    if (queue.length === 0 && this.wait(isWrite) === 0) {
      this.account(isWrite, bytes);
      return;
    }
    await new Promise<void>((resolve) => {
      queue.push(() => {
        this.account(isWrite, bytes);
        resolve();
      });
      this.schedule(isWrite);
    });
  }

  private schedule(isWrite: boolean): void {
    const direction = isWrite ? 1 : 0;
    if (this.timers[direction]) return;
    const queue = this.queues[direction];
    const next = () => {
      this.timers[direction] = undefined;
      while (queue.length && this.wait(isWrite) === 0) queue.shift()!();
      if (queue.length) this.schedule(isWrite);
    };
    this.timers[direction] = setTimeout(next, Math.max(1, this.wait(isWrite)));
  }
}
