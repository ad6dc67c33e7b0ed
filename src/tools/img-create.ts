/*
 * blockd-img create: raw (a sparse file) and qcow2 (create.ts) images, with qemu-img
 * create's option syntax (-o key=value,...), its checks in bdrv_img_create's order and
 * its "Formatting 'FILE', fmt=... " line, options listed in QEMU's order.
 */
import { unlink } from 'node:fs/promises';
import { ImageTooLargeError, createQcow2, type Qcow2CreateOptions } from '../blockdev/drivers/qcow2/create.js';
import { createImageFile } from '../blockdev/image-file-creation.js';
import { openImage, probeImageFormat } from '../blockdev/image-session.js';
import type { PreallocMode } from '../generated/qapi-types.js';
import { describeErrno, errnoOf } from '../blockdev/io-error.js';
import { QmpError } from '../errors.js';
import { ImgError, getopt, hasOption, lastOption, parseSize, short, sizeOperand, usageError } from './img-args.js';
import { combinePath } from './img-open.js';

type OptionType = 'string' | 'size' | 'number' | 'bool';
interface CreateOption { name: string; type: OptionType; default?: string; supported?: boolean }

const ENCRYPT_OPTIONS: CreateOption[] = [
  { name: 'encrypt', type: 'bool' }, { name: 'encrypt.format', type: 'string' }, { name: 'encrypt.key-secret', type: 'string' },
  ...['cipher-alg', 'cipher-mode', 'ivgen-alg', 'ivgen-hash-alg', 'hash-alg'].map((name): CreateOption => ({ name: `encrypt.${name}`, type: 'string' })),
  { name: 'encrypt.iter-time', type: 'number' },
];
/** The file protocol's creation options, appended after the format's (duplicates dropped). */
const FILE_OPTIONS: CreateOption[] = [
  { name: 'size', type: 'size', supported: true }, { name: 'nocow', type: 'bool' },
  { name: 'preallocation', type: 'string', supported: true }, { name: 'extent_size_hint', type: 'size' },
];
const QCOW2_OPTIONS: CreateOption[] = [
  ...ENCRYPT_OPTIONS,
  { name: 'cluster_size', type: 'size', default: '65536', supported: true },
  { name: 'extended_l2', type: 'bool', default: 'off', supported: true },
  { name: 'preallocation', type: 'string', supported: true },
  { name: 'compression_type', type: 'string', default: 'zlib', supported: true },
  { name: 'size', type: 'size', supported: true },
  { name: 'compat', type: 'string', supported: true },
  { name: 'backing_file', type: 'string', supported: true },
  { name: 'backing_fmt', type: 'string', supported: true },
  { name: 'data_file', type: 'string' }, { name: 'data_file_raw', type: 'bool' },
  { name: 'lazy_refcounts', type: 'bool', default: 'off', supported: true },
  { name: 'refcount_bits', type: 'number', default: '16', supported: true },
  ...FILE_OPTIONS.filter((option) => option.name !== 'size' && option.name !== 'preallocation'),
];
const FORMAT_OPTIONS: Record<string, CreateOption[]> = { raw: FILE_OPTIONS, qcow2: QCOW2_OPTIONS };
const BOOLEANS: Record<string, boolean> = { on: true, yes: true, true: true, y: true, off: false, no: false, false: false, n: false };

/** A parsed option: the text as given, and its value for size and number options. */
interface OptionValue { text: string; number?: number; flag?: boolean }

/** Splits "a=1,b=x,,y" at single commas; ",," stands for a comma. */
function splitOptions(text: string): string[] {
  const parts: string[] = [];
  let current = '';
  for (let i = 0; i < text.length; i++) {
    if (text[i] !== ',') current += text[i];
    else if (text[i + 1] === ',') current += text[i++];
    else {
      parts.push(current);
      current = '';
    }
  }
  return text === '' ? [] : [...parts, current];
}

/** qemu_opts_do_parse: "flag" alone means on; the last value given wins. */
function parseOptions(text: string, known: CreateOption[]): Map<string, OptionValue> {
  const values = new Map<string, OptionValue>();
  for (const part of splitOptions(text)) {
    const eq = part.indexOf('=');
    const [name, value] = eq < 0 ? [part, 'on'] : [part.slice(0, eq), part.slice(eq + 1)];
    const option = known.find((candidate) => candidate.name === name);
    if (!option) throw new Error(`Invalid parameter '${name}'`);
    values.set(name, parseValue(option, value));
  }
  return values;
}

function parseValue(option: CreateOption, text: string): OptionValue {
  if (option.type === 'bool') {
    if (!(text in BOOLEANS)) throw new Error(`Parameter '${option.name}' expects 'on' or 'off'`);
    return { text, flag: BOOLEANS[text] };
  }
  if (option.type === 'string') return { text };
  const parsed = option.type === 'size' ? parseSize(text) : /^(0[xX][0-9a-fA-F]+|\d+)$/.test(text) ? BigInt(text) : 'invalid';
  if (parsed === 'range' || (typeof parsed === 'bigint' && parsed >= 1n << 64n)) throw new Error(`Value '${text}' is out of range for parameter '${option.name}'`);
  if (parsed === 'invalid') {
    throw new Error(option.type === 'number' ? `Parameter '${option.name}' expects a number`
      : `Parameter '${option.name}' expects a non-negative number below 2^64\n`
        + 'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.');
  }
  return { text, number: Number(parsed) };
}

/** qemu_opts_print: every option that has a value or a default, in the driver's order. */
function formattingLine(filename: string, format: string, values: Map<string, OptionValue>): string {
  const items = FORMAT_OPTIONS[format]!.flatMap((option) => {
    const given = values.get(option.name);
    if (!given && option.default === undefined) return [];
    if (option.type === 'string') return [`${option.name}=${(given?.text ?? option.default!).replace(/,/g, ',,')}`];
    return [`${option.name}=${given?.number ?? given?.text ?? option.default}`];
  });
  return `Formatting '${filename}', fmt=${format} ${items.join(' ')}\n`;
}

/** The backing file's size, after checking it opens (qemu-img does, unless -u). */
async function backingSize(filename: string, backing: string, format: string | undefined): Promise<{ size: number; detected: string }> {
  const path = combinePath(filename, backing);
  try {
    const detected = format ?? (await probeImageFormat(path).catch((error: unknown) => {
      throw new Error(`Could not open '${path}': ${describeErrno(errnoOf(error))}`);
    }));
    const session = await openImage(path, { format: detected, forceShare: true, ...(detected === 'qcow2' ? { formatOptions: { backing: null } } : {}) });
    const size = session.node.length();
    await session.close();
    return { size, detected };
  } catch (error) {
    throw new Error(`${(error as Error).message}\nCould not open backing image.`);
  }
}

function qcow2Options(values: Map<string, OptionValue>, size: number): Qcow2CreateOptions {
  const enumValue = <T extends string>(name: string, qapiName: string, accepted: Record<string, T>): T | undefined => {
    const text = values.get(name)?.text;
    if (text === undefined) return undefined;
    if (!(text in accepted)) throw new Error(`Parameter '${qapiName}' does not accept value '${text}'`);
    return accepted[text];
  };
  const preallocation = enumValue('preallocation', 'preallocation', { off: 'off', metadata: 'metadata', falloc: 'falloc', full: 'full' });
  if (preallocation === 'falloc' || preallocation === 'full') throw new Error(`preallocation=${preallocation} is not supported by blockd-img`);
  const version = enumValue('compat', 'version', { '0.10': 'v2', v2: 'v2', '1.1': 'v3', v3: 'v3' });
  return {
    size: Math.ceil(size / 512) * 512, // qcow2_co_create_opts rounds up silently
    clusterSize: values.get('cluster_size')?.number,
    refcountBits: values.get('refcount_bits')?.number,
    version: version === undefined ? undefined : version === 'v2' ? 2 : 3,
    lazyRefcounts: values.get('lazy_refcounts')?.flag,
    extendedL2: values.get('extended_l2')?.flag,
    compressionType: enumValue('compression_type', 'compression-type', { zlib: 'zlib', zstd: 'zstd' }),
    backingFile: values.get('backing_file')?.text,
    backingFormat: values.get('backing_fmt')?.text,
    preallocation,
  };
}

/** A raw image's preallocation, parsed as the file protocol parses it (before the file is touched). */
function rawPreallocation(values: Map<string, OptionValue>): PreallocMode {
  const text = values.get('preallocation')?.text ?? 'off';
  if (text !== 'off' && text !== 'metadata' && text !== 'falloc' && text !== 'full') throw new Error(`invalid parameter value: ${text}`);
  return text;
}

/**
 * The file first, as QEMU creates it before the format parses its options: refused,
 * unchanged, when another user holds it. A format refusing its options then deletes
 * the file, as QEMU does.
 */
async function createImage(filename: string, format: string, values: Map<string, OptionValue>, size: number): Promise<void> {
  const handle = format === 'qcow2'
    ? await createImageFile(filename, { size: 0 })
    : await createImageFile(filename, { size: Math.ceil(size / 512) * 512, preallocation: rawPreallocation(values) });
  try {
    if (format === 'qcow2') await createQcow2(handle, qcow2Options(values, size));
  } catch (error) {
    if (!(error instanceof Error) || 'code' in error) throw new Error(`Could not create '${filename}': ${describeErrno(errnoOf(error))}`);
    await unlink(filename).catch(() => {});
    if (!(error instanceof ImageTooLargeError)) throw error;
    const hint = values.has('cluster_size') ? ' (try using a larger cluster size)' : '';
    throw new Error(`The image size is too large for file format '${format}'${hint}`);
  } finally {
    await handle.close();
  }
}

interface CreateFlags { backing?: string; backingFormat?: string; unsafe: boolean; quiet: boolean }

/** bdrv_img_create's steps; every failure is reported as "FILE: reason". */
async function run(filename: string, format: string, optionText: string, sizeText: string | undefined, flags: CreateFlags): Promise<void> {
  const known = FORMAT_OPTIONS[format];
  if (!known) throw new Error(`Unknown file format '${format}'`);
  const values = parseOptions(optionText, known);
  const unsupported = [...values.keys()].find((name) => !known.find((option) => option.name === name)!.supported);
  if (unsupported) throw new Error(`Parameter '${unsupported}' is not supported by blockd-img`);
  if (sizeText !== undefined && values.has('size')) throw new Error('The image size must be specified only once');
  if (flags.backing !== undefined) {
    if (format !== 'qcow2') throw new Error(`Backing file not supported for file format '${format}'`);
    values.set('backing_file', { text: flags.backing });
  }
  if (flags.backingFormat !== undefined) {
    if (format !== 'qcow2') throw new Error(`Backing file format not supported for file format '${format}'`);
    values.set('backing_fmt', { text: flags.backingFormat });
  }
  let size = sizeText === undefined ? values.get('size')?.number : sizeOperand('image size', sizeText);
  const backing = values.get('backing_file')?.text;
  const backingFormat = values.get('backing_fmt')?.text;
  if (backing !== undefined) {
    if (backing === filename) throw new Error('Error: Trying to create an image with the same filename as the backing file');
    if (backing === '') throw new Error('Expected backing file name, got empty string');
    if (!flags.unsafe) {
      const opened = await backingSize(filename, backing, backingFormat);
      if (backingFormat === undefined) throw new Error(`Backing file specified without backing format\nDetected format of ${opened.detected}.`);
      size ??= opened.size;
    }
  }
  if (backing !== undefined && backingFormat === undefined) throw new Error('Backing file specified without backing format');
  if (size === undefined) throw new Error('Image creation needs a size parameter');
  values.set('size', { text: String(size), number: size });
  if (!flags.quiet) process.stdout.write(formattingLine(filename, format, values));
  await createImage(filename, format, values, size);
}

export async function createCommand(argv: string[]): Promise<number> {
  const args = getopt(argv, [short('f', true), short('F', true), short('b', true), short('o', true), short('q'), short('u')]);
  const [filename, sizeText, extra] = args.operands;
  if (filename === undefined) throw usageError('Expecting image file name');
  if (extra !== undefined) throw usageError(`Unexpected argument: ${extra}`);
  const optionText = args.options.filter(([key]) => key === 'o').map(([, value]) => value).join(',');
  if (splitOptions(optionText).some((part) => part === 'help' || part === '?')) {
    const format = lastOption(args, 'f') ?? 'raw';
    const supported = (FORMAT_OPTIONS[format] ?? []).filter((option) => option.supported);
    process.stdout.write(`Supported options:\n${supported.map((option) => `  ${option.name}=<${option.type}>\n`).join('')}`);
    return 0;
  }
  const flags = { backing: lastOption(args, 'b'), backingFormat: lastOption(args, 'F'), unsafe: hasOption(args, 'u'), quiet: hasOption(args, 'q') };
  if (sizeText !== undefined) sizeOperand('image size', sizeText); // checked before anything else, as qemu-img does
  try {
    await run(filename, lastOption(args, 'f') ?? 'raw', optionText, sizeText, flags);
  } catch (error) {
    if (error instanceof ImgError) throw error;
    const hint = error instanceof QmpError && error.hint ? `\n${error.hint}` : '';
    throw new ImgError(`${filename}: ${(error as Error).message}${hint}`);
  }
  return 0;
}
