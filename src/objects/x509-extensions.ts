/*
 * The three certificate extensions QEMU's sanity check reads (basic
 * constraints, key usage, extended key usage), with whether each is critical:
 * Node's X509Certificate tells neither the key usage bits nor criticality. A
 * small DER walker over the certificate's bytes, just enough for these.
 */

interface Tlv {
  tag: number;
  /** The value's bytes. */
  content: Buffer;
  /** Where the next element starts. */
  end: number;
}

class DerError extends Error {}

function readTlv(data: Buffer, offset: number): Tlv {
  if (offset + 2 > data.length) throw new DerError('truncated');
  const tag = data[offset]!;
  let length = data[offset + 1]!;
  let start = offset + 2;
  if (length & 0x80) {
    const bytes = length & 0x7f;
    if (bytes === 0 || bytes > 4 || start + bytes > data.length) throw new DerError('bad length');
    length = 0;
    for (let i = 0; i < bytes; i++) length = length * 256 + data[start + i]!;
    start += bytes;
  }
  if (start + length > data.length) throw new DerError('truncated');
  return { tag, content: data.subarray(start, start + length), end: start + length };
}

function children(data: Buffer): Tlv[] {
  const out: Tlv[] = [];
  for (let offset = 0; offset < data.length; ) {
    const tlv = readTlv(data, offset);
    out.push(tlv);
    offset = tlv.end;
  }
  return out;
}

function decodeOid(data: Buffer): string {
  const parts = [Math.floor(data[0]! / 40), data[0]! % 40];
  let value = 0;
  for (const byte of data.subarray(1)) {
    value = value * 128 + (byte & 0x7f);
    if (!(byte & 0x80)) {
      parts.push(value);
      value = 0;
    }
  }
  return parts.join('.');
}

const TAG_BOOLEAN = 0x01;
const TAG_OID = 0x06;
const TAG_EXTENSIONS = 0xa3;

export const KeyUsage = { DIGITAL_SIGNATURE: 0x80, KEY_ENCIPHERMENT: 0x20, KEY_CERT_SIGN: 0x04 } as const;
export const KeyPurpose = { SERVER: '1.3.6.1.5.5.7.3.1', CLIENT: '1.3.6.1.5.5.7.3.2', ANY: '2.5.29.37.0' } as const;

export interface CertificateExtensions {
  /** Absent when the certificate has no basicConstraints. */
  basicConstraints?: { ca: boolean };
  /** The first byte of the keyUsage bits (KeyUsage flags). */
  keyUsage?: { bits: number; critical: boolean };
  extendedKeyUsage?: { purposes: string[]; critical: boolean };
}

/** Reads the extensions of a DER certificate; throws on a malformed one. */
export function certificateExtensions(der: Buffer): CertificateExtensions {
  try {
    const certificate = readTlv(der, 0);
    const tbs = readTlv(certificate.content, 0);
    const extensions = children(tbs.content).find((element) => element.tag === TAG_EXTENSIONS);
    const found: CertificateExtensions = {};
    if (!extensions) return found;
    for (const extension of children(readTlv(extensions.content, 0).content)) {
      const [id, ...rest] = children(extension.content);
      if (!id || id.tag !== TAG_OID) continue;
      const critical = rest.length > 1 && rest[0]!.tag === TAG_BOOLEAN && rest[0]!.content[0] !== 0;
      const value = rest[rest.length - 1]!.content;
      switch (decodeOid(id.content)) {
        case '2.5.29.19': {
          const [first] = children(readTlv(value, 0).content);
          found.basicConstraints = { ca: first?.tag === TAG_BOOLEAN && first.content[0] !== 0 };
          break;
        }
        case '2.5.29.15': {
          const bits = readTlv(value, 0).content;
          found.keyUsage = { bits: bits[1] ?? 0, critical };
          break;
        }
        case '2.5.29.37':
          found.extendedKeyUsage = { purposes: children(readTlv(value, 0).content).map((oid) => decodeOid(oid.content)), critical };
          break;
      }
    }
    return found;
  } catch (error) {
    if (error instanceof DerError) throw new Error(`malformed certificate: ${error.message}`);
    throw error;
  }
}
