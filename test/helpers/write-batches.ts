/*
 * A client's writes through an NBD export, as qemu-io sends them one after the other
 * (some zero writes, 4 KiB-aligned, in the first 60 MiB), applied alike to a raw model
 * file: a test compares an image with the model once a job has moved the data around.
 */
import { qemuIo, type SeededRandom } from './qemu-tools.js';

/** 25 random writes to `uri` (an nbd URI) and the same to `model`. */
export function writeBatch(random: SeededRandom, uri: string, model: string): void {
  const writes = Array.from({ length: 25 }, () => {
    const offset = random.int(60 * 16) * 64 * 1024 + random.int(16) * 4096;
    const length = (1 + random.int(16)) * 4096;
    return random.chance(0.2) ? `write -z ${offset} ${length}` : `write -P 0x${(0x40 + random.int(0x30)).toString(16)} ${offset} ${length}`;
  });
  qemuIo(uri, writes, ['-f', 'raw']);
  qemuIo(model, writes, ['-f', 'raw']);
}
