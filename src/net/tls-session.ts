/*
 * Starts TLS on a socket that is already connected (NBD's STARTTLS), as
 * either end, with tls-creds-x509 or tls-creds-psk credentials, and checks
 * the peer as QEMU's TLS sessions do once the handshake is done: with x509
 * and verify-peer, the peer's chain against our CA (a client that sent no
 * certificate is refused), then on a server its distinguished name against
 * the tls-authz object, on a client the server's certificate against the
 * hostname. PSK sessions are authenticated by the key itself. Failures carry
 * QEMU's texts (a failed handshake GnuTLS's, chosen by what the peer did), and
 * the connection ends without a TLS goodbye, as QEMU's does.
 */
import type { X509Certificate } from 'node:crypto';
import { isIP, type Socket } from 'node:net';
import { connect, createServer, type TLSSocket } from 'node:tls';
import { authzAllows } from '../objects/authz-simple.js';
import type { TlsCreds } from '../objects/tls-creds.js';
import { TlsCredsPsk } from '../objects/tls-creds-psk.js';

/** Why TLS could not start, in QEMU's words. */
export class TlsFailure extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TlsFailure';
  }
}

/** OpenSSL's verdicts on a peer's chain, as GnuTLS's verification status reads them. */
const CHAIN_ERRORS: Record<string, string> = {
  UNABLE_TO_GET_ISSUER_CERT: "The certificate hasn't got a known issuer",
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "The certificate hasn't got a known issuer",
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: "The certificate hasn't got a known issuer",
  SELF_SIGNED_CERT_IN_CHAIN: "The certificate hasn't got a known issuer",
  DEPTH_ZERO_SELF_SIGNED_CERT: "The certificate hasn't got a known issuer",
  CERT_REVOKED: 'The certificate has been revoked',
  CA_MD_TOO_WEAK: 'The certificate uses an insecure algorithm',
  EE_KEY_TOO_SMALL: 'The certificate uses an insecure algorithm',
  CA_KEY_TOO_SMALL: 'The certificate uses an insecure algorithm',
};

/** A distinguished name as GnuTLS writes it (RDNs in certificate order, e-mail as EMAIL), which authz identities name. */
export function distinguishedName(certificate: X509Certificate): string {
  return certificate.subject.split('\n').map((rdn) => rdn.replaceAll(' + ', '+').replace(/^emailAddress=/, 'EMAIL=')).join(',');
}

/**
 * A handshake that failed, in GnuTLS's words for what happened: the peer reset the connection (a
 * read or write of the socket failed), hung up (Node reports that as a reset too, with no system
 * call), or sent an alert.
 */
function handshakeFailure(error: (Error & { code?: string; reason?: string; syscall?: string }) | undefined): TlsFailure {
  let why: string;
  if (error?.syscall === 'read') why = 'Error in the pull function.';
  else if (error?.syscall === 'write') why = 'Error in the push function.';
  else if (error === undefined || error.code === 'ECONNRESET') why = 'The TLS connection was non-properly terminated.';
  else if (/alert/i.test(error.reason ?? '')) why = 'A TLS fatal alert has been received.';
  else why = error.reason ?? error.message;
  return new TlsFailure(`TLS handshake failed: ${why}`);
}

/** A client's handshake: resolves once it is done; rejects with the handshake failure otherwise. */
function handshake(tls: TLSSocket): Promise<void> {
  return new Promise((resolve, reject) => {
    let failure: Error | undefined;
    const onError = (error: Error) => (failure ??= error);
    const onClose = () => reject(handshakeFailure(failure));
    tls.on('error', onError);
    tls.once('close', onClose);
    tls.once('secureConnect', () => {
      tls.off('close', onClose);
      resolve();
    });
  });
}

/** QEMU's check of an x509 peer (qcrypto_tls_session_check_certificate); undefined when it passes. */
function checkPeer(tls: TLSSocket, expect: { authz?: (dn: string) => string | undefined; hostname?: string; isClient: boolean }): string | undefined {
  const certificate = tls.getPeerX509Certificate();
  if (!certificate) return 'Verify failed: No certificate was found.';
  if (!tls.authorized) return CHAIN_ERRORS[String(tls.authorizationError)] ?? 'The certificate is not trusted';
  const refusal = expect.authz?.(distinguishedName(certificate));
  if (refusal) return refusal;
  if (expect.hostname !== undefined) {
    const matches = isIP(expect.hostname) ? certificate.checkIP(expect.hostname) : certificate.checkHost(expect.hostname);
    if (matches === undefined) return `Certificate does not match the hostname ${expect.hostname}`;
  } else if (expect.isClient) {
    return 'No hostname for certificate validation';
  }
  return undefined;
}

/** Errors after the handshake reach whoever reads the socket; one nobody listens to must not end the process. */
function guarded(tls: TLSSocket): TLSSocket {
  tls.on('error', () => {});
  return tls;
}

/**
 * Ends a session refused after its handshake as QEMU's server does: the connection is shut down
 * first (the client reads an end without TLS goodbye) and closed after, so that what the client
 * sent meanwhile cannot turn the end into a reset.
 */
function hangUp(tls: TLSSocket, plain: Socket): void {
  guarded(tls);
  plain.end(() => tls.destroy());
  setTimeout(() => tls.destroy(), 1000).unref();
}

/** A client's session once its handshake is done and `check` finds nothing wrong with the server. */
async function established(tls: TLSSocket, check: () => string | undefined): Promise<TLSSocket> {
  guarded(tls);
  try {
    await handshake(tls);
    const refusal = check();
    if (refusal !== undefined) throw new TlsFailure(refusal);
    return tls;
  } catch (error) {
    tls.destroy();
    throw error;
  }
}

/**
 * The server end, once STARTTLS has been acknowledged. `authzId` names the object that vets x509
 * clients. The socket goes through a tls.Server of its own (never listening): only that way
 * does Node verify a client's chain and call pskCallback.
 */
export function acceptTls(socket: Socket, creds: TlsCreds, authzId: string | undefined, findObject: (id: string) => unknown): Promise<TLSSocket> {
  const psk = creds instanceof TlsCredsPsk;
  const server = createServer({
    ...creds.contextOptions,
    ...(psk
      ? { pskCallback: (_socket: TLSSocket, username: string) => creds.keyFor(username) ?? null }
      // A client certificate is always asked for; the check after the handshake decides, as in QEMU.
      : { requestCert: true, rejectUnauthorized: false }),
  });
  const authz = (dn: string) => {
    if (authzId === undefined) return undefined;
    const allowed = authzAllows(findObject, authzId, dn);
    if (typeof allowed === 'object') return allowed.error;
    return allowed ? undefined : `TLS x509 authz check for ${dn} is denied`;
  };
  return new Promise((resolve, reject) => {
    server.once('secureConnection', (tls: TLSSocket) => {
      server.removeAllListeners('tlsClientError');
      const refusal = !psk && creds.verifyPeer ? checkPeer(tls, { authz, isClient: false }) : undefined;
      if (refusal === undefined) return resolve(guarded(tls));
      hangUp(tls, socket);
      reject(new TlsFailure(refusal));
    });
    server.once('tlsClientError', (error: Error, tls: TLSSocket) => {
      tls.destroy();
      reject(handshakeFailure(error));
    });
    server.emit('connection', socket);
  });
}

/** The client end, once the server acknowledged STARTTLS; `hostname` is what the server's certificate must name. */
export function connectTls(socket: Socket, creds: TlsCreds, hostname: string | undefined): Promise<TLSSocket> {
  // Node's own checks are off: QEMU's come after the handshake, with its texts.
  const common = { socket, rejectUnauthorized: false, checkServerIdentity: () => undefined };
  if (creds instanceof TlsCredsPsk) {
    const tls = connect({ ...common, ...creds.contextOptions, pskCallback: () => ({ psk: creds.key!, identity: creds.username }) });
    // A server that answered with a certificate instead of our key is not one we share a key with.
    return established(tls, () => (tls.getPeerX509Certificate() ? 'TLS handshake failed: Insufficient credentials for that request.' : undefined));
  }
  const tls = connect({ ...common, ...creds.contextOptions });
  return established(tls, () => (creds.verifyPeer ? checkPeer(tls, { hostname, isClient: true }) : undefined));
}
