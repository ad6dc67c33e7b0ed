/*
 * Test data for compressed writes, from a seeded generator so a failure replays: data deflate
 * shrinks to a small stream, and data it cannot shrink at all (which qcow2 then stores plainly).
 */
import { createCipheriv } from 'node:crypto';
import type { SeededRandom } from './qemu-tools.js';

/** A short random phrase repeated, with a few bytes changed: deflates to a small stream. */
export function compressible(random: SeededRandom, length: number): Buffer {
  const phrase = random.bytes(16 + random.int(48));
  const data = Buffer.alloc(length);
  for (let i = 0; i < length; i += phrase.length) phrase.copy(data, i);
  for (let i = 0; i < Math.max(1, length / 512); i++) data[random.int(length)] = random.int(256);
  return data;
}

/** An AES-CTR keystream keyed from the generator: deflate cannot shrink it (SeededRandom's own bytes it can). */
export function incompressible(random: SeededRandom, length: number): Buffer {
  const cipher = createCipheriv('aes-128-ctr', random.bytes(16), Buffer.alloc(16));
  return Buffer.concat([cipher.update(Buffer.alloc(length)), cipher.final()]);
}
