/*
 * The crash test's child: writes, zeroes and discards distinct slots through blockd, many at once, flushing now
 * and then, and prints what started, was acknowledged and was flushed. With COMPRESSED=1 most slots (whole clusters
 * then) are written compressed. Args: IMAGE SEED SLOT_SIZE SLOT_COUNT IN_FLIGHT [COMPRESSED]
 */
import { fileURLToPath } from 'node:url';
import { openImage } from '../../src/blockdev/image-session.js';
import { SeededRandom } from './qemu-tools.js';

export type SlotOperation = 'write' | 'compress' | 'zero' | 'unmap' | 'discard';

export interface CrashPlan {
  image: string;
  seed: number;
  slotSize: number;
  slotCount: number;
  inFlight: number;
  /** Most slots are written compressed (slots are whole clusters, each written once: compression never overwrites). */
  compressed: boolean;
}

/** What a write puts into a slot: bytes unique to the seed and the slot. */
export function slotContents(seed: number, slot: number, slotSize: number): Buffer {
  return new SeededRandom(seed * 1_000_003 + slot).bytes(slotSize);
}

/** What a compressed write puts into a slot: every other slot a short phrase repeated (small streams), else slotContents. */
export function compressedSlotContents(seed: number, slot: number, slotSize: number): Buffer {
  const bytes = slotContents(seed, slot, slotSize);
  if (slot % 2 === 0) for (let i = 64; i < slotSize; i++) bytes[i] = bytes[i % 64]!;
  return bytes;
}

/** Every slot once, in random order, each with its operation. */
export function planOperations(seed: number, slotCount: number, compressed = false): { slot: number; operation: SlotOperation }[] {
  const random = new SeededRandom(seed);
  const slots = Array.from({ length: slotCount }, (_, i) => i);
  for (let i = slots.length - 1; i > 0; i--) {
    const j = random.int(i + 1);
    [slots[i], slots[j]] = [slots[j]!, slots[i]!];
  }
  return slots.map((slot) => {
    const roll = random.next();
    if (compressed && roll < 0.6) return { slot, operation: 'compress' as const };
    const operation: SlotOperation = roll < 0.7 ? 'write' : roll < 0.8 ? 'zero' : roll < 0.9 ? 'unmap' : 'discard';
    return { slot, operation };
  });
}

function say(line: string): void {
  // Writes to a pipe are synchronous on Linux: a printed line is never lost to SIGKILL.
  process.stdout.write(`${line}\n`);
}

async function run(plan: CrashPlan): Promise<void> {
  const session = await openImage(plan.image, { writable: true, formatOptions: { discard: 'unmap' } });
  const { disk } = session;
  const random = new SeededRandom(plan.seed ^ 0x5bd1e995);
  const operations = planOperations(plan.seed, plan.slotCount, plan.compressed);
  let next = 0;
  let flushes = 0;
  say('ready');
  const worker = async () => {
    while (next < operations.length) {
      const { slot, operation } = operations[next++]!;
      const offset = slot * plan.slotSize;
      say(`start ${slot} ${operation}`);
      switch (operation) {
        case 'write': await disk.write(offset, slotContents(plan.seed, slot, plan.slotSize)); break;
        case 'compress': await disk.write(offset, compressedSlotContents(plan.seed, slot, plan.slotSize), { compress: true }); break;
        case 'zero': await disk.writeZeroes(offset, plan.slotSize); break;
        case 'unmap': await disk.writeZeroes(offset, plan.slotSize, { mayUnmap: true }); break;
        case 'discard': await disk.discard(offset, plan.slotSize); break;
      }
      say(`ack ${slot} ${operation}`);
      if (random.chance(0.08)) {
        const flush = ++flushes;
        say(`flush ${flush}`);
        await disk.flush();
        say(`flushed ${flush}`);
      }
    }
  };
  await Promise.all(Array.from({ length: plan.inFlight }, worker));
  await disk.flush();
  say('done');
  setInterval(() => {}, 1 << 30); // wait for the kill
}

// Only as the crash test's child (with arguments): the test runner also loads every file under test/.
if (process.argv.length > 2 && fileURLToPath(import.meta.url) === process.argv[1]) {
  const [image, seed, slotSize, slotCount, inFlight, compressed] = process.argv.slice(2);
  run({ image: image!, seed: Number(seed), slotSize: Number(slotSize), slotCount: Number(slotCount), inFlight: Number(inFlight), compressed: compressed === '1' }).catch((error: unknown) => {
    say(`error ${(error as Error).stack ?? String(error)}`.replace(/\n/g, ' | '));
    process.exit(1);
  });
}
