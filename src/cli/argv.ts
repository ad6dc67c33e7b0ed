/*
 * getopt_long-style splitting of argv, as qemu-storage-daemon does it:
 * "--opt value" and "--opt=value", unambiguous prefixes of long options,
 * -h/-V/-T short options, and its exact messages for unknown options,
 * missing arguments and positional arguments.
 */
import { CliError } from './cli-error.js';

export interface OptionSpec {
  name: string;
  short?: string;
  takesValue: boolean;
}

export interface ParsedOption {
  name: string;
  value?: string;
  /** How the option is quoted in error messages: "--chardev socket,id=c". */
  text: string;
}

export function splitArgv(argv: string[], specs: OptionSpec[]): ParsedOption[] {
  const options: ParsedOption[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    let spec: OptionSpec | undefined;
    let inlineValue: string | undefined;
    let typedName: string;
    if (arg.startsWith('--') && arg.length > 2) {
      const eq = arg.indexOf('=');
      typedName = eq >= 0 ? arg.slice(2, eq) : arg.slice(2);
      if (eq >= 0) inlineValue = arg.slice(eq + 1);
      spec = specs.find((candidate) => candidate.name === typedName);
      if (!spec) {
        const prefixed = specs.filter((candidate) => candidate.name.startsWith(typedName));
        if (prefixed.length > 1) {
          throw new CliError(`option '--${typedName}' is ambiguous; possibilities: ${prefixed.map((s) => `'--${s.name}'`).join(' ')}`);
        }
        spec = prefixed[0];
      }
      if (!spec) throw new CliError(`unrecognized option '${arg}'`);
      if (!spec.takesValue && inlineValue !== undefined) throw new CliError(`option '--${spec.name}' doesn't allow an argument`);
    } else if (arg.startsWith('-') && arg.length > 1 && arg !== '--') {
      const letter = arg[1]!;
      spec = specs.find((candidate) => candidate.short === letter);
      if (!spec) throw new CliError(`invalid option -- '${letter}'`);
      if (arg.length > 2) {
        if (!spec.takesValue) throw new CliError(`invalid option -- '${arg[2]}'`);
        inlineValue = arg.slice(2);
      }
    } else {
      throw new CliError('Unexpected argument', arg);
    }
    let value = inlineValue;
    if (spec.takesValue && value === undefined) {
      value = argv[++i];
      if (value === undefined) {
        throw new CliError(arg.startsWith('--') ? `option '--${spec.name}' requires an argument` : `option requires an argument -- '${spec.short}'`);
      }
    }
    options.push({ name: spec.name, value, text: value === undefined ? `--${spec.name}` : `--${spec.name} ${value}` });
  }
  return options;
}
