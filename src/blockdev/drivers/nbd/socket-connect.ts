/*
 * Opens the stream socket an nbd node talks over, from a QAPI SocketAddress
 * (unix or inet), with QEMU's error texts. vsock and fd addresses are refused:
 * Node has no vsock sockets, and blockd has no monitor to pass descriptors.
 */
import { lookup } from 'node:dns/promises';
import { readFile } from 'node:fs/promises';
import net, { type Socket } from 'node:net';
import type { InetSocketAddress, SocketAddress, UnixSocketAddress } from '../../../generated/qapi-types.js';
import { genericError } from '../../../errors.js';
import { describeErrno, errnoOf } from '../../io-error.js';

/** getaddrinfo's messages for the failures Node reports by name. */
const RESOLUTION_ERRORS: Record<string, string> = {
  ENOTFOUND: 'Name or service not known',
  EAI_AGAIN: 'Temporary failure in name resolution',
  EAI_FAIL: 'Non-recoverable failure in name resolution',
  ENODATA: 'No address associated with hostname',
};

/** Connects to `address`; `signal` aborts an attempt still under way (open-timeout). */
export async function connectSocket(address: SocketAddress, signal?: AbortSignal): Promise<Socket> {
  switch (address.type) {
    case 'unix':
      return connectUnix(address as UnixSocketAddress & { type: 'unix' }, signal);
    case 'inet':
      return connectInet(address as InetSocketAddress & { type: 'inet' }, signal);
    case 'vsock':
      throw genericError('vsock socket addresses are not supported by blockd');
    default:
      // qemu-storage-daemon's own answer: it has no monitor that could have received the descriptor.
      throw genericError('only QEMU supports file descriptor passing');
  }
}

function connectUnix(address: UnixSocketAddress, signal?: AbortSignal): Promise<Socket> {
  if (address.tight === false) throw genericError("'tight=off' unix socket addresses are not supported by blockd");
  // Abstract names live in Linux's abstract namespace, which Node reaches through a leading NUL.
  const path = address.abstract ? `\0${address.path}` : address.path;
  return openStream({ path }, address.path, signal);
}

async function connectInet(address: InetSocketAddress, signal?: AbortSignal): Promise<Socket> {
  const { host, port } = address;
  if (address.mptcp) throw genericError('mptcp is not supported by blockd');
  const portNumber = await tcpPort(port);
  if (portNumber === undefined) throw genericError(`address resolution failed for ${host}:${port}: Servname not supported for ai_socktype`);
  const family = address.ipv4 && !address.ipv6 ? 4 : address.ipv6 && !address.ipv4 ? 6 : 0;
  let addresses: { address: string }[];
  try {
    if (address.numeric && net.isIP(host) === 0) throw Object.assign(new Error('not numeric'), { code: 'ENOTFOUND' });
    addresses = await lookup(host, { all: true, family });
  } catch (error) {
    const code = errnoOf(error);
    throw genericError(`address resolution failed for ${host}:${port}: ${RESOLUTION_ERRORS[code] ?? describeErrno(code)}`);
  }
  // Like QEMU, try each address the name resolves to and report the last failure.
  let failure: unknown;
  for (const { address: ip } of addresses) {
    try {
      const socket = await openStream({ host: ip, port: portNumber }, `${host}:${port}`, signal);
      if (address['keep-alive']) socket.setKeepAlive(true);
      return socket;
    } catch (error) {
      failure = error;
    }
  }
  throw failure;
}

/** A port number, or a service name looked up in /etc/services as getaddrinfo does ("nbd" is 10809). */
async function tcpPort(port: string): Promise<number | undefined> {
  if (/^[0-9]+$/.test(port)) return Number(port) <= 65535 ? Number(port) : undefined;
  const services = await readFile('/etc/services', 'utf8').catch(() => '');
  for (const line of services.split('\n')) {
    const [name, portAndProtocol, ...aliases] = line.replace(/#.*/, '').trim().split(/\s+/);
    const match = /^([0-9]+)\/tcp$/.exec(portAndProtocol ?? '');
    if (match && (name === port || aliases.includes(port))) return Number(match[1]);
  }
  return undefined;
}

function openStream(options: net.NetConnectOpts, described: string, signal?: AbortSignal): Promise<Socket> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(genericError('Connection attempt cancelled by timeout'));
    const socket = net.connect(options);
    const onAbort = () => socket.destroy(Object.assign(new Error('cancelled'), { code: 'ECANCELED' }));
    signal?.addEventListener('abort', onAbort, { once: true });
    socket.once('connect', () => {
      signal?.removeEventListener('abort', onAbort);
      socket.setNoDelay(true); // requests are small and latency-bound, as QEMU sets TCP_NODELAY
      resolve(socket);
    });
    socket.once('error', (error) => {
      signal?.removeEventListener('abort', onAbort);
      const code = errnoOf(error);
      reject(genericError(code === 'ECANCELED' ? 'Connection attempt cancelled by timeout' : `Failed to connect to '${described}': ${describeErrno(code)}`));
    });
  });
}
