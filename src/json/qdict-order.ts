/*
 * The member order QEMU puts on the wire. QEMU keeps objects in a QDict: a
 * 512-bucket hash table keyed with tdb_hash, each bucket a list with the newest
 * entry first, iterated bucket by bucket. Writing members in that order makes
 * our output byte-identical to qemu-storage-daemon's, and the envelope checks
 * that walk a request's members find problems in the same order QEMU does.
 */
import { encodeModifiedUtf8 } from './modified-utf8.js';

const BUCKETS = 512;

export function tdbHash(key: string): number {
  const bytes = encodeModifiedUtf8(key);
  let value = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) {
    value = (value + ((bytes[i]! << ((i * 5) % 24)) >>> 0)) >>> 0;
  }
  return (Math.imul(1103515243, value) + 12345) >>> 0;
}

const bucketCache = new Map<string, number>();

function bucketOf(key: string): number {
  let bucket = bucketCache.get(key);
  if (bucket === undefined) {
    bucket = tdbHash(key) % BUCKETS;
    if (bucketCache.size < 10_000) bucketCache.set(key, bucket);
  }
  return bucket;
}

/** Keys (given in insertion order) in QDict iteration order. */
export function qdictOrder(keys: readonly string[]): string[] {
  const indexed = keys.map((key, index) => ({ key, index, bucket: bucketOf(key) }));
  indexed.sort((a, b) => a.bucket - b.bucket || b.index - a.index);
  return indexed.map((entry) => entry.key);
}
