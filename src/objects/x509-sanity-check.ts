/*
 * QEMU's sanity check of x509 credentials when they are loaded (sanity-check,
 * on by default), so that a wrong file is reported at object-add rather than
 * as a failed handshake later: every certificate in date, the CA certificates
 * marked as CAs and allowed to sign, our own certificate fit for its end
 * (key usage, purpose) and issued by one of the CAs. Messages are QEMU's.
 */
import { X509Certificate } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { genericError } from '../errors.js';
import { certificateExtensions, KeyPurpose, KeyUsage } from './x509-extensions.js';

/** GnuTLS reads at most this many CA certificates from ca-cert.pem. */
const MAX_CA_CERTS = 16;
const PEM_CERTIFICATE = /-----BEGIN (?:X509 )?CERTIFICATE-----[\s\S]*?-----END (?:X509 )?CERTIFICATE-----/g;

/** GnuTLS's words for a PEM file it cannot import. */
export function pemImportError(pem: string): string {
  return pem.includes('-----BEGIN') ? 'ASN1 parser: Error in DER parsing.' : 'Base64 unexpected header error.';
}

/** The first certificate of a PEM file, as GnuTLS imports our own certificate. */
export function importCertificate(pem: string, file: string, isServer: boolean): X509Certificate {
  const block = pem.match(PEM_CERTIFICATE)?.[0];
  try {
    if (block === undefined) throw new Error('no certificate');
    return new X509Certificate(block);
  } catch {
    throw genericError(`Unable to import ${isServer ? 'server' : 'client'} certificate ${file}: ${pemImportError(pem)}`);
  }
}

function importCaList(pem: string, file: string): X509Certificate[] {
  const blocks = pem.match(PEM_CERTIFICATE) ?? [];
  const fail = () => genericError(`Unable to import CA certificate list ${file}`);
  if (blocks.length === 0 || blocks.length > MAX_CA_CERTS) throw fail();
  try {
    return blocks.map((block) => new X509Certificate(block));
  } catch {
    throw fail();
  }
}

type Role = 'CA' | 'server' | 'client';

function checkTimes(cert: X509Certificate, file: string, role: Role): void {
  const now = Date.now();
  if (Date.parse(cert.validTo) < now) throw genericError(`The ${role} certificate ${file} has expired`);
  if (Date.parse(cert.validFrom) > now) throw genericError(`The ${role} certificate ${file} is not yet active`);
}

function checkCertificate(cert: X509Certificate, file: string, role: Role): void {
  checkTimes(cert, file, role);
  const extensions = certificateExtensions(cert.raw);
  const isCA = role === 'CA';
  const constraints = extensions.basicConstraints;
  if (constraints === undefined) {
    if (isCA) throw genericError(`The certificate ${file} is missing basic constraints for a CA`);
  } else if (constraints.ca && !isCA) {
    throw genericError(`The certificate ${file} basic constraints show a CA, but we need one for a ${role}`);
  } else if (!constraints.ca && isCA) {
    throw genericError(`The certificate ${file} basic constraints do not show a CA`);
  }
  // Like QEMU, a usage or purpose that is missing only matters when the extension is critical.
  const usage = extensions.keyUsage;
  if (usage?.critical) {
    if (isCA && !(usage.bits & KeyUsage.KEY_CERT_SIGN)) throw genericError(`Certificate ${file} usage does not permit certificate signing`);
    if (!isCA && !(usage.bits & KeyUsage.DIGITAL_SIGNATURE)) throw genericError(`Certificate ${file} usage does not permit digital signature`);
    if (!isCA && !(usage.bits & KeyUsage.KEY_ENCIPHERMENT)) throw genericError(`Certificate ${file} usage does not permit key encipherment`);
  }
  const purposes = extensions.extendedKeyUsage;
  if (!isCA && purposes?.critical) {
    const wanted = role === 'server' ? KeyPurpose.SERVER : KeyPurpose.CLIENT;
    if (!purposes.purposes.includes(wanted) && !purposes.purposes.includes(KeyPurpose.ANY)) {
      throw genericError(`Certificate ${file} purpose does not allow use with a TLS ${role}`);
    }
  }
}

function checkIssuedByOneOf(cert: X509Certificate, file: string, cas: X509Certificate[], caFile: string): void {
  const issuers = cas.filter((ca) => cert.checkIssued(ca));
  if (issuers.some((ca) => cert.verify(ca.publicKey))) return;
  const reason = issuers.length === 0 ? "The certificate hasn't got a known issuer" : 'The certificate is not trusted';
  throw genericError(`Our own certificate ${file} failed validation against ${caFile}: ${reason}`);
}

/** Files that cannot be read are left to the loading that follows, as QEMU does. */
async function readable(file: string | undefined): Promise<string | undefined> {
  if (file === undefined) return undefined;
  return readFile(file, 'latin1').catch(() => undefined);
}

export async function sanityCheckX509(caFile: string, certFile: string | undefined, isServer: boolean): Promise<void> {
  const certPem = await readable(certFile);
  const cert = certPem === undefined ? undefined : importCertificate(certPem, certFile!, isServer);
  const caPem = await readable(caFile);
  const cas = caPem === undefined ? [] : importCaList(caPem, caFile);
  const role = isServer ? 'server' : 'client';
  if (cert) checkCertificate(cert, certFile!, role);
  for (const ca of cas) checkCertificate(ca, caFile, 'CA');
  if (cert && cas.length) checkIssuedByOneOf(cert, certFile!, cas, caFile);
}
