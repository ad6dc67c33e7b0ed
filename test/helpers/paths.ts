/* Locations tests need: the repository root and the daemon's launcher. */
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

function findRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json'))) dir = dirname(dir);
  return dir;
}

export const REPO_ROOT = findRoot();
export const BLOCKD_BIN = join(REPO_ROOT, 'bin', 'blockd');

/** A fresh temporary directory, removed by the returned cleanup function. */
export function makeTempDir(prefix = 'blockd-test-'): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}
