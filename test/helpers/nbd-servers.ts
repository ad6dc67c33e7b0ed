/*
 * Real NBD servers for the nbd client tests: qemu-nbd, qemu-storage-daemon's
 * NBD export and nbdkit, each started on a unix socket (or a TCP port) and
 * ready to accept connections when the start function resolves.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';
import { join } from 'node:path';
import { startQsd } from './qsd-process.js';

export interface NbdServer {
  /** `nbd+unix:///disk?socket=...` or `nbd://127.0.0.1:PORT/disk`, as QEMU's tools take it. */
  uri: string;
  /** The QAPI SocketAddress of the server. */
  address: { type: 'unix'; path: string } | { type: 'inet'; host: string; port: string };
  /** Ends the server and waits until it has exited. */
  stop(signal?: NodeJS.Signals): Promise<void>;
}

function connectable(address: NbdServer['address']): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = address.type === 'unix' ? net.connect(address.path) : net.connect(Number(address.port), address.host);
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

async function waitUntilListening(child: ChildProcess, address: NbdServer['address'], stderr: () => string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!(await connectable(address))) {
    if (child.exitCode !== null) throw new Error(`NBD server exited: ${stderr()}`);
    if (Date.now() > deadline) throw new Error(`NBD server not listening after 10 s: ${stderr()}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

function uriOf(address: NbdServer['address'], name: string): string {
  return address.type === 'unix' ? `nbd+unix:///${name}?socket=${address.path}` : `nbd://${address.host}:${address.port}/${name}`;
}

async function serve(command: string, args: string[], address: NbdServer['address'], name = 'disk'): Promise<NbdServer> {
  const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  await waitUntilListening(child, address, () => stderr);
  return {
    uri: uriOf(address, name),
    address,
    stop: async (signal = 'SIGTERM') => {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      // A server that waits for its clients must not hang the test run.
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/** A free TCP port on 127.0.0.1 (released again, for a server to take). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** `qemu-nbd -t -e 4 -f FORMAT -x disk` on a unix socket, or on 127.0.0.1:port. */
export function startQemuNbd(image: string, where: { socket: string } | { port: number }, extra: string[] = [], format = 'qcow2'): Promise<NbdServer> {
  const address: NbdServer['address'] = 'socket' in where ? { type: 'unix', path: where.socket } : { type: 'inet', host: '127.0.0.1', port: String(where.port) };
  const listen = 'socket' in where ? ['-k', where.socket] : ['-b', '127.0.0.1', '-p', String(where.port)];
  return serve('qemu-nbd', ['-t', '-e', '4', '-f', format, '-x', 'disk', ...listen, ...extra, image], address);
}

/** nbdkit serving `plugin args` (e.g. file, filters) on a unix socket, export name "disk". */
export function startNbdkit(socket: string, args: string[]): Promise<NbdServer> {
  return serve('nbdkit', ['-f', '-U', socket, '-e', 'disk', ...args], { type: 'unix', path: socket });
}

/** qemu-storage-daemon exporting a qcow2 image writable as "disk" (discard=unmap on the exported node). */
export async function startQsdExport(dir: string, image: string): Promise<NbdServer> {
  const socket = join(dir, 'qsd-nbd.sock');
  const qsd = await startQsd(dir, [
    '--blockdev', `driver=file,node-name=file0,filename=${image},discard=unmap`,
    '--blockdev', 'driver=qcow2,node-name=fmt0,file=file0,discard=unmap',
    '--nbd-server', `addr.type=unix,addr.path=${socket}`,
    '--export', 'type=nbd,id=e0,node-name=fmt0,name=disk,writable=on',
  ]);
  const address = { type: 'unix', path: socket } as const;
  return { uri: uriOf(address, 'disk'), address, stop: () => qsd.stop() };
}
