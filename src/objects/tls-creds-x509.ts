/*
 * tls-creds-x509: certificates in QEMU's directory layout, loaded once when
 * the object is created, as QEMU loads them. A server needs ca-cert.pem,
 * server-cert.pem and server-key.pem (ca-crl.pem and dh-params.pem are
 * optional); a client needs ca-cert.pem and may have client-cert.pem with
 * client-key.pem. The result is one secure context every TLS session of these
 * credentials uses.
 */
import { createPrivateKey, X509Certificate, type KeyObject } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { createSecureContext, type SecureContextOptions } from 'node:tls';
import type { TlsCredsX509Properties } from '../generated/qapi-types.js';
import { genericError } from '../errors.js';
import { describeErrno, errnoOf } from '../blockdev/io-error.js';
import { CredsFile, TlsCreds } from './tls-creds.js';
import { importCertificate, pemImportError, sanityCheckX509 } from './x509-sanity-check.js';

/** Reads a credentials file (a small PEM). */
async function contents(path: string, failure: (reason: string) => string): Promise<string> {
  try {
    return await readFile(path, 'latin1');
  } catch (error) {
    throw genericError(failure(describeErrno(errnoOf(error))));
  }
}

/** Builds a context from one option, to tell which file a failure belongs to. */
function tryContext(options: SecureContextOptions, failure: (reason: string) => string): void {
  try {
    createSecureContext(options);
  } catch (error) {
    throw genericError(failure((error as Error).message));
  }
}

export class TlsCredsX509 extends TlsCreds {
  private constructor(id: string, private readonly properties: TlsCredsX509Properties) {
    super(id, 'tls-creds-x509', properties);
  }

  /** Creates and loads the credentials, failing with QEMU's texts. */
  static async create(id: string, properties: TlsCredsX509Properties): Promise<TlsCredsX509> {
    const creds = new TlsCredsX509(id, properties);
    await creds.load();
    return creds;
  }

  private async load(): Promise<void> {
    const server = this.endpoint === 'server';
    const ca = (await this.credentialFile(CredsFile.CA_CERT, true))!;
    const crl = server ? await this.credentialFile(CredsFile.CA_CRL, false) : undefined;
    const cert = await this.credentialFile(server ? CredsFile.SERVER_CERT : CredsFile.CLIENT_CERT, server);
    const key = await this.credentialFile(server ? CredsFile.SERVER_KEY : CredsFile.CLIENT_KEY, server);
    const dhparams = server ? await this.credentialFile(CredsFile.DH_PARAMS, false) : undefined;

    if (this.properties['sanity-check'] ?? true) await sanityCheckX509(ca, cert, server);

    const options: SecureContextOptions = { ...this.versions };
    options.ca = await contents(ca, (reason) => `Cannot load CA certificate '${ca}': ${reason}`);
    tryContext({ ca: options.ca }, (reason) => `Cannot load CA certificate '${ca}': ${reason}`);
    if (cert !== undefined && key !== undefined) {
      // An encrypted key needs its password from a secret object, which blockd does not have.
      const passwordId = this.properties.passwordid;
      if (passwordId !== undefined) throw genericError(`No secret with id '${passwordId}' (blockd has no secret objects: give an unencrypted key)`);
      const failure = (reason: string) => `Cannot load certificate '${cert}' & key '${key}': ${reason}`;
      options.cert = await contents(cert, failure);
      options.key = await contents(key, failure);
      const certificate = importCertificateOrFail(options.cert, failure);
      if (!certificate.checkPrivateKey(privateKeyOrFail(options.key, failure))) throw genericError(failure('The certificate and the given key do not match.'));
    }
    if (crl !== undefined) {
      options.crl = await contents(crl, (reason) => `Cannot load CRL '${crl}': ${reason}`);
      tryContext({ crl: options.crl }, (reason) => `Cannot load CRL '${crl}': ${reason}`);
    }
    if (dhparams !== undefined) {
      options.dhparam = await contents(dhparams, (reason) => `Unable to load DH parameters from ${dhparams}: ${reason}`);
      tryContext({ dhparam: options.dhparam }, (reason) => `Unable to load DH parameters from ${dhparams}: ${reason}`);
    }
    tryContext(options, (reason) => `Cannot allocate credentials: '${reason}'`);
    this.contextOptions = options;
  }
}

function importCertificateOrFail(pem: string, failure: (reason: string) => string): X509Certificate {
  try {
    return importCertificate(pem, '', false);
  } catch {
    throw genericError(failure(pemImportError(pem)));
  }
}

function privateKeyOrFail(pem: string, failure: (reason: string) => string): KeyObject {
  try {
    return createPrivateKey(pem);
  } catch (error) {
    const encrypted = (error as { code?: string }).code === 'ERR_MISSING_PASSPHRASE';
    throw genericError(failure(encrypted ? 'the key is encrypted and no passwordid was given' : pemImportError(pem)));
  }
}
