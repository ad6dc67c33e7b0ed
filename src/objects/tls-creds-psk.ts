/*
 * tls-creds-psk: pre-shared keys in dir/keys.psk, one `username:hexkey` line
 * per user (psktool's format). A client picks its key when the object is
 * created (username, default "qemu"); a server looks the client's username up
 * in the file at every handshake, as GnuTLS does, so keys can be added or
 * revoked without restarting it.
 */
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import type { TlsCredsPskProperties } from '../generated/qapi-types.js';
import { genericError } from '../errors.js';
import { describeErrno, errnoOf } from '../blockdev/io-error.js';
import { CredsFile, TlsCreds } from './tls-creds.js';

const DEFAULT_USERNAME = 'qemu';
/**
 * TLS 1.3 suites (SHA-256 ones first: OpenSSL's PSK callbacks hash with SHA-256), then the PSK
 * suites of TLS 1.2, which OpenSSL's default list leaves out.
 */
const PSK_CIPHERS = [
  'TLS_AES_128_GCM_SHA256', 'TLS_CHACHA20_POLY1305_SHA256', 'TLS_AES_256_GCM_SHA384',
  'ECDHE-PSK-CHACHA20-POLY1305', 'ECDHE-PSK-AES256-CBC-SHA384', 'ECDHE-PSK-AES128-CBC-SHA256',
  'DHE-PSK-AES256-GCM-SHA384', 'DHE-PSK-AES128-GCM-SHA256', 'PSK-AES256-GCM-SHA384', 'PSK-AES128-GCM-SHA256',
].join(':');

/** The hex key of `username` in the contents of a keys.psk file. */
function keyOf(contents: string, username: string): string | undefined {
  const prefix = `${username}:`;
  return contents.split('\n').find((line) => line.startsWith(prefix))?.slice(prefix.length);
}

function decodeKey(hex: string): Buffer | undefined {
  return /^([0-9a-fA-F]{2})+$/.test(hex) ? Buffer.from(hex, 'hex') : undefined;
}

export class TlsCredsPsk extends TlsCreds {
  /** Client: who we say we are, and our key. */
  username = DEFAULT_USERNAME;
  key: Buffer | undefined;
  private pskFile = '';

  private constructor(id: string, private readonly properties: TlsCredsPskProperties) {
    super(id, 'tls-creds-psk', properties);
  }

  static async create(id: string, properties: TlsCredsPskProperties): Promise<TlsCredsPsk> {
    const creds = new TlsCredsPsk(id, properties);
    await creds.load();
    return creds;
  }

  private async load(): Promise<void> {
    this.contextOptions = { ...this.versions, ciphers: PSK_CIPHERS };
    const { username } = this.properties;
    if (this.endpoint === 'server') {
      if (username !== undefined) throw genericError('username should not be set when endpoint=server');
      await this.credentialFile(CredsFile.DH_PARAMS, false);
      this.pskFile = (await this.credentialFile(CredsFile.PSK, true))!;
      return;
    }
    this.pskFile = (await this.credentialFile(CredsFile.PSK, true))!;
    this.username = username ?? DEFAULT_USERNAME;
    let contents: string;
    try {
      contents = await readFile(this.pskFile, 'latin1');
    } catch (error) {
      throw genericError(`Cannot read PSK file ${this.pskFile}: Failed to open file “${this.pskFile}”: ${describeErrno(errnoOf(error))}`);
    }
    const hex = keyOf(contents, this.username);
    if (hex === undefined) throw genericError(`Username ${this.username} not found in PSK file ${this.pskFile}`);
    this.key = decodeKey(hex);
    if (!this.key) throw genericError(`The key of username ${this.username} in PSK file ${this.pskFile} is not hexadecimal`);
  }

  /**
   * Server: the key of a client's username, or undefined (the handshake then fails). Read in
   * the handshake callback, which cannot wait: the file is a few lines.
   */
  keyFor(username: string): Buffer | undefined {
    let contents: string;
    try {
      contents = readFileSync(this.pskFile, 'latin1');
    } catch {
      return undefined;
    }
    const hex = keyOf(contents, username);
    return hex === undefined ? undefined : decodeKey(hex);
  }
}
