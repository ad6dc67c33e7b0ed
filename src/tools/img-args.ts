/*
 * Command-line plumbing shared by the blockd-img commands: getopt_long-style parsing
 * (options anywhere, clustered short flags, "--opt=value"), qemu-img's size syntax
 * (qemu_strtosz: k/M/G/T/P/E suffixes, fractions) and the error type that sets the exit status.
 */

/** An error the tool prints as "blockd-img: <message>" before exiting with `status`. */
export class ImgError extends Error {
  constructor(message: string, readonly status = 1, readonly usageHint = false) {
    super(message);
    this.name = 'ImgError';
  }
}

/** A usage mistake: qemu-img adds "Try '... --help'" and exits 1. */
export function usageError(message: string): ImgError {
  return new ImgError(message, 1, true);
}

export interface OptionDef {
  /** What the parsed option is reported as (e.g. 'f', 'output'). */
  key: string;
  short?: string;
  long?: string;
  takesValue: boolean;
}

/** Options several commands share, spelled as qemu-img spells them. */
export const FORMAT_OPTION: OptionDef = { key: 'f', short: 'f', long: 'format', takesValue: true };
export const OUTPUT_OPTION: OptionDef = { key: 'output', long: 'output', takesValue: true };
export const FORCE_SHARE_OPTION: OptionDef = { key: 'U', short: 'U', long: 'force-share', takesValue: false };

/** A short option: -x, or -x VALUE. */
export function short(letter: string, takesValue = false): OptionDef {
  return { key: letter, short: letter, takesValue };
}

export interface ParsedArgs {
  options: [string, string][];
  operands: string[];
}

/** Splits argv as GNU getopt_long does (permuting operands), with qemu-img's error texts. */
export function getopt(argv: string[], defs: OptionDef[]): ParsedArgs {
  const parsed: ParsedArgs = { options: [], operands: [] };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--') {
      parsed.operands.push(...argv.slice(i + 1));
      break;
    }
    if (arg.startsWith('--')) {
      const eq = arg.indexOf('=');
      const name = arg.slice(2, eq < 0 ? undefined : eq);
      const matches = defs.filter((def) => def.long?.startsWith(name));
      const def = matches.find((candidate) => candidate.long === name) ?? (matches.length === 1 ? matches[0] : undefined);
      if (!def) throw usageError(`unrecognized option '${arg}'`);
      if (!def.takesValue && eq >= 0) throw usageError(`option '--${def.long}' doesn't allow an argument`);
      let value = eq >= 0 ? arg.slice(eq + 1) : '';
      if (def.takesValue && eq < 0) {
        if (i + 1 >= argv.length) throw usageError(`missing argument for option '${arg}'`);
        value = argv[++i]!;
      }
      parsed.options.push([def.key, value]);
    } else if (arg.startsWith('-') && arg.length > 1) {
      for (let at = 1; at < arg.length; at++) {
        const def = defs.find((candidate) => candidate.short === arg[at]);
        if (!def) throw usageError(`unrecognized option '${arg}'`);
        if (!def.takesValue) {
          parsed.options.push([def.key, '']);
          continue;
        }
        let value = arg.slice(at + 1);
        if (value === '') {
          if (i + 1 >= argv.length) throw usageError(`missing argument for option '${arg}'`);
          value = argv[++i]!;
        }
        parsed.options.push([def.key, value]);
        break;
      }
    } else {
      parsed.operands.push(arg);
    }
  }
  return parsed;
}

/** The last value given for an option, as qemu-img's loops keep it. */
export function lastOption(args: ParsedArgs, key: string): string | undefined {
  return args.options.filter(([name]) => name === key).pop()?.[1];
}

export function hasOption(args: ParsedArgs, key: string): boolean {
  return args.options.some(([name]) => name === key);
}

/** --output=human|json, with qemu-img's message for anything else. */
export function outputFormat(args: ParsedArgs): 'human' | 'json' {
  const output = lastOption(args, 'output') ?? 'human';
  if (output !== 'human' && output !== 'json') throw new ImgError('--output must be used with human or json as argument.');
  return output;
}

const SUFFIX_POWERS: Record<string, number> = { b: 0, k: 1, m: 2, g: 3, t: 4, p: 5, e: 6 };
const INT64_MAX = (1n << 63n) - 1n;

/** qemu_strtosz: bytes for "64M", "1.5G", "4096", "0x1000"; 'invalid' when malformed, 'range' past 2^64. */
export function parseSize(text: string): bigint | 'invalid' | 'range' {
  const hexMatch = /^\s*0[xX]([0-9a-fA-F]+)$/.exec(text);
  if (hexMatch) return BigInt(`0x${hexMatch[1]}`);
  const match = /^\s*(\d+)(?:\.(\d*))?([bBkKmMgGtTpPeE]?)$/.exec(text);
  if (!match) return 'invalid';
  const [, whole, fraction = '', suffix] = match;
  const multiplier = 1024n ** BigInt(SUFFIX_POWERS[suffix!.toLowerCase() || 'b']!);
  if (/[1-9]/.test(fraction) && multiplier === 1n) return 'invalid'; // a fraction needs a scale
  const denominator = 10n ** BigInt(fraction.length);
  const scaledFraction = fraction ? BigInt(fraction) * multiplier : 0n;
  const value = BigInt(whole!) * multiplier + (2n * (scaledFraction % denominator) >= denominator ? 1n : 0n) + scaledFraction / denominator;
  return value < 1n << 64n ? value : 'range';
}

/** qemu-img's cvtnum: a size operand in [0, INT64_MAX] as a safe number, or its two-line error. */
export function sizeOperand(what: string, text: string): number {
  const value = parseSize(text);
  if (value === 'invalid') {
    throw new ImgError(`Invalid ${what} specified. You may use k, M, G, T, P or E suffixes for\n`
      + 'blockd-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.');
  }
  if (value === 'range' || value > INT64_MAX) throw new ImgError(`Invalid ${what} specified. Must be between 0 and ${INT64_MAX}.`);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw new ImgError(`Invalid ${what} specified: blockd-img handles sizes below 2^53`);
  return Number(value);
}
