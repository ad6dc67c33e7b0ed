/*
 * blockd-img compare: content comparison of two disks as qemu-img compare does it. Block
 * status skips ranges that read as zeros on both sides; the rest is read in large chunks
 * and compared sector by sector, so the first mismatch is reported at qemu-img's offset.
 * Exit status: 0 identical, 1 different, 2 open or usage errors, 3 status errors, 4 read errors.
 */
import type { ImageSession } from '../blockdev/image-session.js';
import { isAllZero, type NodeExtent } from '../blockdev/node.js';
import { FORCE_SHARE_OPTION, ImgError, getopt, hasOption, lastOption, short } from './img-args.js';
import { openTool } from './img-open.js';
import { StatusWindow } from './img-status.js';

const CHUNK = 4 * 1024 * 1024;
const SECTOR = 512;

interface Side {
  filename: string;
  session: ImageSession;
  size: number;
  window: StatusWindow;
}

/** bdrv_block_status_above over the whole chain; exit status 3 when it fails. */
async function status(side: Side, offset: number): Promise<NodeExtent> {
  const requested = side.window.request(side.size - offset);
  try {
    const extent = await side.session.node.blockStatusAbove(offset, requested);
    side.window.answered(extent.length, requested);
    return extent;
  } catch {
    throw new ImgError(`Sector allocation test failed for ${side.filename}`, 3);
  }
}

async function read(side: Side, offset: number, length: number): Promise<Buffer> {
  const buffer = Buffer.alloc(length);
  try {
    await side.session.disk.read(offset, buffer);
  } catch (error) {
    throw new ImgError(`Error while reading offset ${offset} of ${side.filename}: ${(error as Error).message}`, 4);
  }
  return buffer;
}

/** Index of the first 512-byte sector that `differs` says is different, or -1. */
function firstSector(length: number, differs: (start: number, end: number) => boolean): number {
  if (!differs(0, length)) return -1;
  for (let start = 0; start < length; start += SECTOR) if (differs(start, Math.min(length, start + SECTOR))) return start;
  return -1;
}

/** What strict mode (-s) compares: the status flags QEMU's bdrv_block_status_above returns. */
function statusFlags(extent: NodeExtent, offset: number, size: number): string {
  return [extent.allocated, extent.data, extent.zero, extent.host !== undefined, offset + extent.length === size].join();
}

async function compare(one: Side, two: Side, strict: boolean, say: (text: string) => void): Promise<number> {
  const differ = (text: string) => {
    say(text);
    return 1;
  };
  if (strict && one.size !== two.size) return differ('Strict mode: Image size mismatch!\n');
  const total = Math.min(one.size, two.size);
  const mismatch = (at: number) => differ(`Content mismatch at offset ${at}!\n`);
  const nonZeroAt = async (side: Side, offset: number, length: number) => {
    const buffer = await read(side, offset, length);
    return firstSector(length, (start, end) => !isAllZero(buffer.subarray(start, end)));
  };
  let offset = 0;
  while (offset < total) {
    const [status1, status2] = [await status(one, offset), await status(two, offset)];
    let chunk = Math.min(status1.length, status2.length);
    if (strict && statusFlags(status1, offset, one.size) !== statusFlags(status2, offset, two.size)) {
      return differ(`Strict mode: Offset ${offset} block status mismatch!\n`);
    }
    if (!(status1.zero && status2.zero)) {
      chunk = Math.min(chunk, CHUNK);
      if (status1.allocated === status2.allocated) {
        if (status1.allocated) {
          const [buffer1, buffer2] = [await read(one, offset, chunk), await read(two, offset, chunk)];
          const at = firstSector(chunk, (start, end) => !buffer1.subarray(start, end).equals(buffer2.subarray(start, end)));
          if (at >= 0) return mismatch(offset + at);
        }
      } else {
        const at = await nonZeroAt(status1.allocated ? one : two, offset, chunk);
        if (at >= 0) return mismatch(offset + at);
      }
    }
    offset += chunk;
  }
  if (one.size !== two.size) {
    say('Warning: Image size mismatch!\n');
    const over = one.size > two.size ? one : two;
    while (offset < over.size) {
      const extent = await status(over, offset);
      let chunk = extent.length;
      if (extent.allocated && !extent.zero) {
        chunk = Math.min(chunk, CHUNK);
        const at = await nonZeroAt(over, offset, chunk);
        if (at >= 0) return mismatch(offset + at);
      }
      offset += chunk;
    }
  }
  say('Images are identical.\n');
  return 0;
}

export async function compareCommand(argv: string[]): Promise<number> {
  const args = getopt(argv, [short('f', true), short('F', true), short('T', true), short('p'), short('q'), short('s'), FORCE_SHARE_OPTION]);
  if (args.operands.length !== 2) throw new ImgError('Expecting two image file names', 1, true);
  const [filename1, filename2] = args.operands as [string, string];
  const forceShare = hasOption(args, 'U');
  const quiet = hasOption(args, 'q');
  const sessions: ImageSession[] = [];
  try {
    sessions.push(await openTool(filename1, { format: lastOption(args, 'f'), forceShare }, 2));
    sessions.push(await openTool(filename2, { format: lastOption(args, 'F'), forceShare }, 2));
    const side = (filename: string, session: ImageSession): Side => ({ filename, session, size: session.node.length(), window: new StatusWindow() });
    return await compare(side(filename1, sessions[0]!), side(filename2, sessions[1]!), hasOption(args, 's'), (text) => {
      if (!quiet) process.stdout.write(text);
    });
  } finally {
    for (const session of sessions.reverse()) await session.close();
  }
}
