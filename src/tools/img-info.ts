/*
 * blockd-img info: qemu-img info's ImageInfo (node-info.ts, whose qcow2 data lists the bitmaps,
 * plus the snapshot list read from the image), as QEMU's pretty JSON or its human text, for one image or
 * the whole backing chain.
 */
import type { ImageInfo } from '../generated/qapi-types.js';
import { imageInfo } from '../blockdev/node-info.js';
import { readQcow2Metadata } from '../blockdev/drivers/qcow2/consistency-check.js';
import { snapshotInfo } from '../blockdev/drivers/qcow2/snapshot-table.js';
import { qdictOrder } from '../json/qdict-order.js';
import { serialize } from '../json/writer.js';
import type { JsonObject, JsonValue } from '../json/value.js';
import { FORCE_SHARE_OPTION, FORMAT_OPTION, ImgError, OUTPUT_OPTION, getopt, hasOption, lastOption, outputFormat, usageError } from './img-args.js';
import { sizeToString } from './img-format.js';
import { combinePath, withImage } from './img-open.js';

/** Member order of the QAPI structs: QEMU inserts members in it, which decides ties in its hash order. */
const IMAGE_INFO_ORDER = ['filename', 'format', 'dirty-flag', 'actual-size', 'virtual-size', 'cluster-size', 'encrypted',
  'compressed', 'backing-filename', 'full-backing-filename', 'backing-filename-format', 'snapshots', 'backing-image', 'format-specific'];
const QCOW2_INFO_ORDER = ['compat', 'data-file', 'data-file-raw', 'extended-l2', 'lazy-refcounts', 'corrupt', 'refcount-bits',
  'encrypt', 'bitmaps', 'compression-type'];

function ordered(object: Record<string, unknown>, order: string[]): Record<string, unknown> {
  return Object.fromEntries(order.filter((key) => object[key] !== undefined).map((key) => [key, object[key]]));
}

/** ImageInfo of one image, without its backing chain (qemu-img opens it with BDRV_O_NO_BACKING). */
async function collectOne(path: string, format: string | undefined, forceShare: boolean): Promise<ImageInfo> {
  return withImage(path, { format, forceShare, noBacking: true }, async (session) => {
    const info = (await imageInfo(session.node)) as ImageInfo & Record<string, unknown>;
    info.filename = path;
    if (info['backing-filename'] !== undefined) info['full-backing-filename'] = combinePath(path, info['backing-filename']);
    if (info.format === 'qcow2') {
      let metadata;
      try {
        metadata = await readQcow2Metadata(session.node.primaryChild()!);
      } catch (error) {
        throw new ImgError(`Could not open '${path}': ${(error as Error).message}`);
      }
      if (metadata.snapshots.length) info.snapshots = metadata.snapshots.map(snapshotInfo) as unknown as ImageInfo['snapshots'];
      const specific = info['format-specific'] as unknown as { type: string; data: Record<string, unknown> } | undefined;
      if (specific) {
        specific.data = ordered(specific.data, QCOW2_INFO_ORDER);
      }
    }
    return ordered(info, IMAGE_INFO_ORDER) as unknown as ImageInfo;
  });
}

async function collect(path: string, format: string | undefined, chain: boolean, forceShare: boolean): Promise<ImageInfo[]> {
  const list: ImageInfo[] = [];
  const seen = new Set<string>();
  for (let next: string | undefined = path; next !== undefined;) {
    if (seen.has(next)) throw new ImgError(`Backing file '${next}' creates an infinite loop.`);
    seen.add(next);
    const info = await collectOne(next, format, forceShare);
    list.push(info);
    next = chain ? info['full-backing-filename'] : undefined;
    format = info['backing-filename-format'];
  }
  return list;
}

/** dump_qdict/dump_qlist: "key: value" lines, dashes shown as spaces, nested levels indented by 4. */
function dumpValue(value: JsonValue, indent: number): string {
  const pad = ' '.repeat(indent * 4);
  const line = (label: string, item: JsonValue) => (typeof item === 'object' && item !== null
    ? `${pad}${label}:\n${dumpValue(item, indent + 1)}` : `${pad}${label}: ${String(item)}\n`);
  if (Array.isArray(value)) return value.map((item, i) => line(`[${i}]`, item)).join('');
  const object = value as JsonObject;
  return qdictOrder(Object.keys(object)).map((key) => line(key.replace(/-/g, ' '), object[key]!)).join('');
}

function snapshotLine(sn: JsonObject): string {
  const date = new Date(Number(sn['date-sec']) * 1000);
  const two = (n: number) => String(n).padStart(2, '0');
  const dateText = `${date.getFullYear()}-${two(date.getMonth() + 1)}-${two(date.getDate())} ${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}`;
  const seconds = Number(sn['vm-clock-sec']);
  const milliseconds = String(Math.floor(Number(sn['vm-clock-nsec']) / 1e6)).padStart(3, '0');
  const clock = `${two(Math.floor(seconds / 3600))}:${two(Math.floor(seconds / 60) % 60)}:${two(seconds % 60)}.${milliseconds}`;
  const icount = sn.icount === undefined ? '' : String(sn.icount);
  const size = sizeToString(Number(sn['vm-state-size']));
  return `${String(sn.id).padEnd(9)} ${String(sn.name).padEnd(16)} ${size.padStart(8)}${dateText.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}\n`;
}

/** bdrv_image_info_dump. */
export function humanInfo(info: ImageInfo): string {
  let out = `image: ${info.filename}\nfile format: ${info.format}\n`
    + `virtual size: ${sizeToString(info['virtual-size'])} (${info['virtual-size']} bytes)\n`
    + `disk size: ${info['actual-size'] === undefined ? 'unavailable' : sizeToString(info['actual-size'])}\n`;
  if (info.encrypted) out += 'encrypted: yes\n';
  if (info['cluster-size'] !== undefined) out += `cluster_size: ${info['cluster-size']}\n`;
  if (info['dirty-flag']) out += 'cleanly shut down: no\n';
  if (info['backing-filename'] !== undefined) {
    const full = info['full-backing-filename'];
    const actual = full === undefined ? ' (cannot determine actual path)' : full !== info['backing-filename'] ? ` (actual path: ${full})` : '';
    out += `backing file: ${info['backing-filename']}${actual}\n`;
    if (info['backing-filename-format'] !== undefined) out += `backing file format: ${info['backing-filename-format']}\n`;
  }
  if (info.snapshots) {
    out += `Snapshot list:\n${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}\n`;
    for (const sn of info.snapshots) out += snapshotLine(sn as unknown as JsonObject);
  }
  if (info['format-specific']) out += `Format specific information:\n${dumpValue((info['format-specific'] as unknown as JsonObject).data!, 1)}`;
  return out;
}

export async function infoCommand(argv: string[]): Promise<number> {
  const args = getopt(argv, [FORMAT_OPTION, OUTPUT_OPTION, FORCE_SHARE_OPTION, { key: 'chain', long: 'backing-chain', takesValue: false }]);
  if (args.operands.length !== 1) throw usageError('Expecting one image file name');
  const output = outputFormat(args);
  const chain = hasOption(args, 'chain');
  const list = await collect(args.operands[0]!, lastOption(args, 'f'), chain, hasOption(args, 'U'));
  if (output === 'json') {
    process.stdout.write(`${serialize((chain ? list : list[0]!) as unknown as JsonValue, true)}\n`);
  } else {
    process.stdout.write(list.map(humanInfo).join('\n'));
  }
  return 0;
}
