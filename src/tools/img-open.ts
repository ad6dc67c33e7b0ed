/*
 * Opening images for blockd-img commands through the block layer (image-session.ts),
 * with qemu-img's "Could not open 'FILE': ..." wording and its locking: read-only,
 * sharing only reads unless -U shares everything.
 */
import { describeErrno, errnoOf } from '../blockdev/io-error.js';
import { openImage, probeImageFormat, type ImageSession } from '../blockdev/image-session.js';
import { ImgError } from './img-args.js';

export interface ToolOpenOptions {
  format?: string;
  forceShare?: boolean;
  /** Open only this image, not its backing chain (qemu-img info). */
  noBacking?: boolean;
}

function openFailure(path: string, error: unknown, status: number): ImgError {
  return new ImgError(`Could not open '${path}': ${(error as Error).message}`, status);
}

/** The format given with -f, or the probed one (qcow2 magic, else raw). */
export async function imageFormat(path: string, format: string | undefined, status = 1): Promise<string> {
  if (format !== undefined) return format;
  try {
    return await probeImageFormat(path);
  } catch (error) {
    // Worded as the file driver words it, which qemu-img then prefixes once more.
    throw new ImgError(`Could not open '${path}': Could not open '${path}': ${describeErrno(errnoOf(error))}`, status);
  }
}

/** Opens an image read-only; failures become ImgError with exit status `status`. */
export async function openTool(path: string, options: ToolOpenOptions, status = 1): Promise<ImageSession> {
  const format = await imageFormat(path, options.format, status);
  try {
    return await openImage(path, {
      format,
      forceShare: options.forceShare,
      ...(options.noBacking && format === 'qcow2' ? { formatOptions: { backing: null } } : {}),
    });
  } catch (error) {
    throw openFailure(path, error, status);
  }
}

/** Runs `use` on an open image and closes it whatever happens. */
export async function withImage<T>(path: string, options: ToolOpenOptions, use: (session: ImageSession) => Promise<T>, status = 1): Promise<T> {
  const session = await openTool(path, options, status);
  try {
    return await use(session);
  } finally {
    await session.close();
  }
}

/** QEMU's path_combine: a relative backing name is relative to the directory of the image as named. */
export function combinePath(imagePath: string, name: string): string {
  if (name.startsWith('/') || /^[^/:]*:/.test(name)) return name; // absolute, or a protocol ("nbd:...", "json:...")
  const slash = imagePath.lastIndexOf('/');
  return slash < 0 ? name : imagePath.slice(0, slash + 1) + name;
}
