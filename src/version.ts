/*
 * blockd's own version (from package.json) and the QEMU QMP level it follows,
 * which query-version and the QMP greeting report.
 */
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

function findPackageJson(): { name: string; version: string } {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    try {
      return JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as { name: string; version: string };
    } catch {
      const parent = dirname(dir);
      if (parent === dir) return { name: 'blockd', version: '0.0.0' };
      dir = parent;
    }
  }
}

const pkg = findPackageJson();

export const BLOCKD_VERSION = pkg.version;

/** The QEMU release whose QMP interface blockd follows (qemu-storage-daemon 7.2). */
export const QMP_LEVEL = { major: 7, minor: 2, micro: 0 } as const;

export function versionInfo(): { qemu: { major: number; minor: number; micro: number }; package: string } {
  return { qemu: { ...QMP_LEVEL }, package: `blockd ${BLOCKD_VERSION}` };
}
