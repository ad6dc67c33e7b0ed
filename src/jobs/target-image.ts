/*
 * The image file a drive-mirror or drive-backup makes for its target (mode=absolute-paths)
 * or finds (mode=existing): which formats can name a target, the file made with the
 * source's size and, when the copy relies on one, a header naming a backing image, and the
 * format of an existing file found by probing, with QEMU's texts.
 */
import { createQcow2File } from '../blockdev/drivers/qcow2/create.js';
import { driverFor } from '../blockdev/drivers/registry.js';
import { createImageFile } from '../blockdev/image-file-creation.js';
import { probeImageFormat } from '../blockdev/image-session.js';
import { describeErrno } from '../blockdev/io-error.js';
import { nodeFilename } from '../blockdev/node-filename.js';
import type { BlockNode } from '../blockdev/node.js';
import { genericError } from '../errors.js';

/** Whether `name` is a format (or the file protocol) a target can be opened as. */
export function isImageDriver(name: string): boolean {
  try {
    return driverFor(name).kind === 'format' || name === 'file';
  } catch {
    return false;
  }
}

/** Formats blockd can create a target in. */
const CREATABLE = ['qcow2', 'raw'];

/** Creates the target file: the source's size, and a header naming `backing` when there is one. */
export async function createTargetImage(path: string, format: string, size: number, backing: BlockNode | undefined): Promise<void> {
  if (!CREATABLE.includes(format)) throw genericError(`Creating ${format} images is not supported by blockd`);
  if (format === 'raw' && backing) throw genericError("Backing file not supported for file format 'raw'");
  if (format === 'qcow2') return createQcow2File(path, { size, backingFile: backing && nodeFilename(backing), backingFormat: backing?.driver.name });
  const handle = await createImageFile(path, { size });
  await handle.close();
}

/** The format of an existing target file, probed as QEMU's bdrv_open does without a driver. */
export async function probeTargetFormat(path: string): Promise<string> {
  try {
    return await probeImageFormat(path);
  } catch (error) {
    throw genericError(`Could not open '${path}': ${describeErrno((error as NodeJS.ErrnoException).code ?? 'EIO')}`);
  }
}
