/*
 * blockd-img: the one-shot image tool on blockd's own block layer, qemu-img's peer for
 * info, check, compare, map and create, with the same output shapes and exit statuses so
 * that scripts and tests can compare the two. bin/blockd-img runs main().
 */
import { BLOCKD_VERSION, QMP_LEVEL } from '../version.js';
import { ImgError } from './img-args.js';
import { checkCommand } from './img-check.js';
import { compareCommand } from './img-compare.js';
import { createCommand } from './img-create.js';
import { infoCommand } from './img-info.js';
import { mapCommand } from './img-map.js';

const COMMANDS: Record<string, (argv: string[]) => Promise<number>> = {
  check: checkCommand,
  compare: compareCommand,
  create: createCommand,
  info: infoCommand,
  map: mapCommand,
};

const USAGE = `Usage: blockd-img command [command options]
blockd's image tool: qemu-img's output formats and exit statuses, on blockd's block layer.

Commands:
  check [--output=human|json] [-f FMT] [-q] [-U] FILE
      qcow2 consistency check (read-only; -r is not supported). Exit status: 0 clean,
      1 check failed, 2 corruptions, 3 leaked clusters only, 63 format without checks
  compare [-f FMT] [-F FMT] [-s] [-q] [-U] FILE1 FILE2
      compare disk contents (-s: also sizes and allocation). Exit status: 0 identical,
      1 different, 2 and above errors
  create [-f raw|qcow2] [-o OPTION=VALUE,...] [-b BACKING -F FMT] [-u] [-q] FILE [SIZE]
      new image; qcow2 options: compat, cluster_size, refcount_bits, lazy_refcounts,
      extended_l2, compression_type, backing_file, backing_fmt, preallocation=off
      (-o help lists them). SIZE takes k, M, G, T, P, E suffixes
  info [--output=human|json] [-f FMT] [--backing-chain] [-U] FILE
      image information
  map [--output=human|json] [-f FMT] [-s OFFSET] [-l LENGTH] [-U] FILE
      where each range of the disk is stored, through the backing chain

  -f FMT      image format (qcow2 or raw); probed when absent
  -U          force share: take no lock that would conflict with a writer
  -h, --help  this help; -V, --version  the version
`;

/** Runs one command line; returns the exit status. Errors go to stderr as "blockd-img: ...". */
export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    if (command === '-h' || command === '--help' || rest.includes('-h') || rest.includes('--help')) {
      process.stdout.write(USAGE);
      return 0;
    }
    if (command === '-V' || command === '--version') {
      process.stdout.write(`blockd-img version ${BLOCKD_VERSION} (qemu-img of QEMU ${QMP_LEVEL.major}.${QMP_LEVEL.minor})\n`);
      return 0;
    }
    if (command === undefined) throw new ImgError('Not enough arguments', 1, true);
    const run = COMMANDS[command];
    if (!run) throw new ImgError(`Command not found: ${command}`);
    return await run(rest);
  } catch (error) {
    const imgError = error instanceof ImgError ? error : new ImgError((error as Error).message ?? String(error));
    const hint = imgError.usageHint ? "\nTry 'blockd-img --help' for more information" : '';
    process.stderr.write(`blockd-img: ${imgError.message}${hint}\n`);
    return imgError.status;
  }
}
