/*
 * Listening sockets as QMP and the NBD server both need them: a UNIX socket
 * created mode 0600 (only the owner may drive the daemon or reach its disks),
 * a stale socket file (nobody listening) replaced, a live one or a non-socket
 * file at the path refused, and bind errors worded as QEMU words them.
 */
import { chmodSync, existsSync, lstatSync, unlinkSync } from 'node:fs';
import { dirname } from 'node:path';
import net from 'node:net';

async function isLiveSocket(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
}

export async function removeStaleSocket(path: string): Promise<void> {
  if (!existsSync(dirname(path))) throw new Error(`Failed to bind socket to ${path}: No such file or directory`);
  let stats;
  try {
    stats = lstatSync(path);
  } catch {
    return; // nothing there
  }
  if (!stats.isSocket()) throw new Error(`Failed to bind socket to ${path}: the path exists and is not a socket`);
  if (await isLiveSocket(path)) throw new Error(`Failed to bind socket to ${path}: Address already in use`);
  unlinkSync(path);
}

/** Listens on a UNIX socket that only the owner can connect to, replacing a stale socket file. */
export async function listenUnixPrivate(server: net.Server, path: string): Promise<void> {
  await removeStaleSocket(path);
  const previousUmask = process.umask(0o177); // the socket file is created 0600
  try {
    await listenOn(server, { path });
  } finally {
    process.umask(previousUmask);
  }
  chmodSync(path, 0o600);
}

export function listenOn(server: net.Server, options: net.ListenOptions): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (error: NodeJS.ErrnoException) => {
      const where = options.path ?? `${options.host}:${options.port}`;
      reject(new Error(`Failed to bind socket to ${where}: ${describeSocketError(error)}`));
    };
    server.once('error', onError);
    server.listen(options, () => {
      server.off('error', onError);
      resolve();
    });
  });
}

export function describeSocketError(error: NodeJS.ErrnoException): string {
  const texts: Record<string, string> = {
    EADDRINUSE: 'Address already in use',
    EACCES: 'Permission denied',
    ENOENT: 'No such file or directory',
    EADDRNOTAVAIL: 'Cannot assign requested address',
    ENAMETOOLONG: 'File name too long',
  };
  return (error.code && texts[error.code]) ?? error.message;
}
