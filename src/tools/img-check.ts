/*
 * blockd-img check: consistency-check.ts on a qcow2 image, reported as qemu-img check
 * reports it (messages on stderr, summary or ImageCheck JSON on stdout) with its exit
 * statuses: 0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 no check for the format.
 */
import type { ChildEdge } from '../blockdev/child-edge.js';
import { checkBitmapsLoadable, checkQcow2, readQcow2Header, type Qcow2CheckResult } from '../blockdev/drivers/qcow2/consistency-check.js';
import { Qcow2FormatError } from '../blockdev/drivers/qcow2/format-constants.js';
import { serialize } from '../json/writer.js';
import { FORCE_SHARE_OPTION, FORMAT_OPTION, ImgError, OUTPUT_OPTION, getopt, hasOption, lastOption, outputFormat, short, usageError } from './img-args.js';
import { formatFixed } from './img-format.js';
import { openImage, probeImageFormat } from '../blockdev/image-session.js';
import { combinePath, imageFormat, withImage } from './img-open.js';

/** dump_human_image_check. */
function humanSummary(result: Qcow2CheckResult): string {
  let out = '';
  if (!(result.corruptions || result.leaks || result.checkErrors)) {
    out += 'No errors were found on the image.\n';
  } else {
    if (result.corruptions) out += `\n${result.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    if (result.leaks) out += `\n${result.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    if (result.checkErrors) out += `\n${result.checkErrors} internal errors have occurred during the check.\n`;
  }
  const { allocatedClusters: allocated, totalClusters: total } = result;
  if (total !== 0 && allocated !== 0) {
    const percent = (count: number, of: number) => formatFixed((count * 100) / of, 2);
    out += `${allocated}/${total} = ${percent(allocated, total)}% allocated, ${percent(result.fragmentedClusters, allocated)}% fragmented, `
      + `${percent(result.compressedClusters, allocated)}% compressed clusters\n`;
  }
  if (result.imageEndOffset) out += `Image end offset: ${result.imageEndOffset}\n`;
  return out;
}

/** The ImageCheck object: optional counters only when non-zero, as collect_image_check fills it. */
function jsonSummary(filename: string, result: Qcow2CheckResult): string {
  const optional = {
    corruptions: result.corruptions, leaks: result.leaks, 'image-end-offset': result.imageEndOffset,
    'total-clusters': result.totalClusters, 'allocated-clusters': result.allocatedClusters,
    'fragmented-clusters': result.fragmentedClusters, 'compressed-clusters': result.compressedClusters,
  };
  const present = Object.fromEntries(Object.entries(optional).filter(([, value]) => value !== 0));
  return `${serialize({ filename, format: 'qcow2', 'check-errors': result.checkErrors, ...present }, true)}\n`;
}

/** qemu-img check opens the image with its backing chain, so a missing backing file fails the check. */
async function requireBackingChain(filename: string, file: ChildEdge, forceShare: boolean): Promise<void> {
  const header = await readQcow2Header(file);
  if (header.backingFile === undefined) return;
  const path = combinePath(filename, header.backingFile);
  try {
    const format = header.backingFormat ?? (await probeImageFormat(path).catch(() => 'raw'));
    await (await openImage(path, { format, forceShare })).close();
  } catch (error) {
    throw new ImgError(`Could not open '${filename}': Could not open backing file: ${(error as Error).message}`);
  }
}

export async function checkCommand(argv: string[]): Promise<number> {
  const args = getopt(argv, [FORMAT_OPTION, OUTPUT_OPTION, FORCE_SHARE_OPTION, short('q'), { key: 'r', short: 'r', long: 'repair', takesValue: true }]);
  if (hasOption(args, 'r')) throw new ImgError('-r is not supported: blockd-img check only reads the image (repair it with qemu-img check -r)');
  if (args.operands.length !== 1) throw usageError('Expecting one image file name');
  const filename = args.operands[0]!;
  const output = outputFormat(args);
  const format = await imageFormat(filename, lastOption(args, 'f'));
  // Opened as raw over the file: the check reads the bytes itself, but takes the image locks qemu-img takes.
  const result = await withImage(filename, { format: format === 'qcow2' ? 'raw' : format, forceShare: hasOption(args, 'U') }, async (session) => {
    if (format !== 'qcow2') return undefined;
    try {
      await requireBackingChain(filename, session.disk, hasOption(args, 'U'));
      await checkBitmapsLoadable(session.disk);
      return await checkQcow2(session.disk);
    } catch (error) {
      if (error instanceof Qcow2FormatError) throw new ImgError(`Could not open '${filename}': ${error.message}`);
      throw error;
    }
  });
  if (!result) throw new ImgError('This image format does not support checks', 63);
  for (const message of result.messages) process.stderr.write(`${message}\n`);
  if (result.failure) throw new ImgError(`Check failed: ${result.failure}`);
  if (!hasOption(args, 'q')) process.stdout.write(output === 'json' ? jsonSummary(filename, result) : humanSummary(result));
  if (result.checkErrors) throw new ImgError('Check failed');
  return result.corruptions ? 2 : result.leaks ? 3 : 0;
}
