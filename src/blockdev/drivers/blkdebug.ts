/*
 * The `blkdebug` filter: fault injection for tests (job error policies, I/O
 * error paths). Rules follow QEMU: an event arms the inject-error rules that
 * match the current state, and the next requests of a matching I/O type (and
 * offset, if a sector is given) fail with the rule's errno; `once` rules
 * disarm after firing; set-state rules move the state machine. blockd fires
 * read_aio, write_aio, flush_to_os and flush_to_disk itself; rules on other
 * events are refused rather than silently never firing.
 */
import type { BlkdebugInjectErrorOptions, BlkdebugSetStateOptions } from '../../generated/qapi-types.js';
import { genericError } from '../../errors.js';
import type { BlockDriver, WriteFlags, ZeroFlags } from '../block-driver.js';
import type { ChildEdge } from '../child-edge.js';
import { IoError } from '../io-error.js';
import type { BlockNode } from '../node.js';
import { permissionsFromQapi, type PermissionPair, defaultChildPermissions } from '../permissions.js';
import { jsonFilename } from '../node-filename.js';
import { PassThroughFilter } from './pass-through-filter.js';

interface BlkdebugOptions {
  config?: string;
  align?: number;
  'max-transfer'?: number;
  'opt-write-zero'?: number;
  'max-write-zero'?: number;
  'opt-discard'?: number;
  'max-discard'?: number;
  'inject-error'?: BlkdebugInjectErrorOptions[];
  'set-state'?: BlkdebugSetStateOptions[];
  'take-child-perms'?: string[];
  'unshare-child-perms'?: string[];
}

const FIRED_EVENTS = new Set(['read_aio', 'write_aio', 'flush_to_os', 'flush_to_disk']);
type IoType = 'read' | 'write' | 'write-zeroes' | 'discard' | 'flush' | 'block-status';
/** What a rule without `iotype` fails, as in QEMU: every request but block status. */
const DEFAULT_IO_TYPES: readonly IoType[] = ['read', 'write', 'write-zeroes', 'discard', 'flush'];

const ERRNO_NAMES: Record<number, string> = { 1: 'EPERM', 5: 'EIO', 12: 'ENOMEM', 22: 'EINVAL', 28: 'ENOSPC', 95: 'ENOTSUP', 122: 'EDQUOT' };

class BlkdebugState extends PassThroughFilter {
  private state = 1;
  private active: BlkdebugInjectErrorOptions[] = [];

  constructor(
    image: ChildEdge,
    node: BlockNode,
    private readonly injections: BlkdebugInjectErrorOptions[],
    private readonly transitions: BlkdebugSetStateOptions[],
    private readonly take: number,
    private readonly unshare: number,
  ) {
    super(image, node);
  }

  private event(name: string): void {
    const armed = this.injections.filter((rule) => rule.event === name && (rule.state === undefined || rule.state === this.state));
    if (armed.length) this.active = armed;
    for (const rule of this.transitions) {
      if (rule.event === name && (rule.state === undefined || rule.state === this.state)) {
        this.state = rule['new_state'];
        break;
      }
    }
  }

  private check(type: IoType, offset: number, length: number): void {
    const rule = this.active.find((candidate) => {
      const at = candidate.sector === undefined || candidate.sector < 0 ? -1 : candidate.sector * 512;
      const offsetMatches = at === -1 || (length > 0 && at >= offset && at < offset + length);
      return offsetMatches && (candidate.iotype === undefined ? DEFAULT_IO_TYPES.includes(type) : candidate.iotype === type);
    });
    if (!rule) return;
    if (rule.once) {
      this.active = this.active.filter((candidate) => candidate !== rule);
      this.injections.splice(this.injections.indexOf(rule), 1);
    }
    const errno = rule.errno ?? 5;
    throw new IoError(ERRNO_NAMES[errno] ?? `E${errno}`, `blkdebug: injected error ${errno}`);
  }

  override async read(offset: number, buffer: Buffer): Promise<void> {
    this.event('read_aio');
    this.check('read', offset, buffer.length);
    return this.filtered.read(offset, buffer);
  }

  override async write(offset: number, buffer: Buffer, flags: WriteFlags): Promise<void> {
    this.event('write_aio');
    this.check('write', offset, buffer.length);
    return this.filtered.write(offset, buffer, flags);
  }

  override async writeZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    this.check('write-zeroes', offset, length);
    return this.filtered.writeZeroes(offset, length, flags);
  }

  override async discard(offset: number, length: number): Promise<void> {
    this.check('discard', offset, length);
    return this.filtered.discard(offset, length);
  }

  async flush(): Promise<void> {
    this.event('flush_to_os');
    this.event('flush_to_disk');
    this.check('flush', 0, 0);
  }

  override async blockStatus(offset: number, length: number) {
    this.check('block-status', offset, length);
    return { length, delegate: this.filtered, offset };
  }

  /** blkdebug resizes its image child, which the generic filter rule (a `file` child) would refuse. */
  override truncate(size: number): Promise<void> {
    return this.filtered.truncate(size);
  }

  childPermissions(edge: ChildEdge, parents: PermissionPair): PermissionPair {
    const pair = defaultChildPermissions(edge.role, parents, !this.node.readOnly);
    return { perm: pair.perm | this.take, shared: pair.shared & ~this.unshare };
  }

  override info() {
    return { filename: jsonFilename(this.node) };
  }

  async allocatedSize(): Promise<undefined> {
    return undefined; // QEMU treats blkdebug like a protocol without a size of its own
  }
}

export const blkdebugDriver: BlockDriver<BlkdebugOptions> = {
  name: 'blkdebug',
  kind: 'filter',
  strongOptions: ['config', 'inject-error', 'set-state', 'align', 'max-transfer', 'opt-write-zero', 'max-write-zero', 'opt-discard', 'max-discard'],
  async open(context, options) {
    if (options.config !== undefined) throw genericError('blkdebug config files are not supported by blockd; use inject-error and set-state');
    for (const key of ['align', 'max-transfer', 'opt-write-zero', 'max-write-zero', 'opt-discard', 'max-discard'] as const) {
      if (options[key] !== undefined) throw genericError(`blkdebug option '${key}' is not supported by blockd`);
    }
    const rules = [...(options['inject-error'] ?? []), ...(options['set-state'] ?? [])];
    for (const rule of rules) {
      if (!FIRED_EVENTS.has(rule.event)) throw genericError(`blkdebug event '${rule.event}' is not supported by blockd (it fires ${[...FIRED_EVENTS].join(', ')})`);
    }
    const image = await context.openChild('image', { name: 'image', role: 'filtered' });
    return new BlkdebugState(
      image, context.node, [...(options['inject-error'] ?? [])], options['set-state'] ?? [],
      permissionsFromQapi(options['take-child-perms'] ?? []), permissionsFromQapi(options['unshare-child-perms'] ?? []),
    );
  },
};
