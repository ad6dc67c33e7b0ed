/*
 * C printf formats qemu-img's text output depends on, reproduced exactly: %.Nf and %.Ng
 * round the double's exact binary value half-to-even (JS toFixed rounds ties up), and
 * size_to_str's "64 MiB" / "348 KiB" / "1.5 GiB".
 */

/** x = numerator / denominator exactly (x finite and >= 0; the denominator a power of two). */
function exactFraction(x: number): [bigint, bigint] {
  const view = new DataView(new ArrayBuffer(8));
  view.setFloat64(0, x);
  const bits = view.getBigUint64(0);
  const biased = Number((bits >> 52n) & 0x7ffn);
  const mantissa = (bits & ((1n << 52n) - 1n)) | (biased === 0 ? 0n : 1n << 52n);
  const exponent = (biased === 0 ? 1 : biased) - 1075;
  return exponent >= 0 ? [mantissa << BigInt(exponent), 1n] : [mantissa, 1n << BigInt(-exponent)];
}

/** round(x * 10^decimals), ties to even, computed without rounding errors. */
function scaledRound(x: number, decimals: number): bigint {
  let [numerator, denominator] = exactFraction(x);
  if (decimals >= 0) numerator *= 10n ** BigInt(decimals);
  else denominator *= 10n ** BigInt(-decimals);
  const quotient = numerator / denominator;
  const twiceRemainder = 2n * (numerator % denominator);
  if (twiceRemainder > denominator || (twiceRemainder === denominator && quotient % 2n === 1n)) return quotient + 1n;
  return quotient;
}

/** The digits of `scaled` with a decimal point `decimals` places from the right. */
function withPoint(scaled: bigint, decimals: number): string {
  if (decimals <= 0) return (scaled * 10n ** BigInt(-decimals)).toString();
  const digits = scaled.toString().padStart(decimals + 1, '0');
  return `${digits.slice(0, -decimals)}.${digits.slice(-decimals)}`;
}

/** printf("%.<decimals>f", x) for x >= 0. */
export function formatFixed(x: number, decimals: number): string {
  return withPoint(scaledRound(x, decimals), decimals);
}

/** printf("%.<precision>g", x) for x >= 0. */
export function formatGeneral(x: number, precision: number): string {
  if (x === 0) return '0';
  let exponent = Math.floor(Math.log10(x));
  let scaled = scaledRound(x, precision - 1 - exponent);
  const limit = 10n ** BigInt(precision);
  if (scaled >= limit) scaled = scaledRound(x, precision - 1 - ++exponent);
  else if (scaled < limit / 10n) scaled = scaledRound(x, precision - 1 - --exponent);
  const trim = (text: string) => (text.includes('.') ? text.replace(/0+$/, '').replace(/\.$/, '') : text);
  if (exponent < -4 || exponent >= precision) {
    const mantissa = trim(withPoint(scaled, precision - 1));
    return `${mantissa}e${exponent < 0 ? '-' : '+'}${String(Math.abs(exponent)).padStart(2, '0')}`;
  }
  return trim(withPoint(scaled, precision - 1 - exponent));
}

const IEC_PREFIXES = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];

/** QEMU's size_to_str: the binary unit under which the value stays below 1000. */
export function sizeToString(bytes: number): string {
  // frexp's exponent of bytes * 1024 / 1000, minus one, rounded down to a multiple of 10 (C division).
  const scaled = bytes / (1000 / 1024);
  let floorLog2 = Math.floor(Math.log2(scaled));
  if (2 ** floorLog2 > scaled) floorLog2--; // log2 may round up just below a power of two
  const frexpExponent = scaled === 0 ? 0 : floorLog2 + 1;
  const power = Math.trunc((frexpExponent - 1) / 10) * 10;
  return `${formatGeneral(bytes / 2 ** power, 3)} ${IEC_PREFIXES[power / 10]}B`;
}

/** printf("%#-16" PRIx64): "0x" prefix except for zero, left-justified. */
export function hexColumn(value: number): string {
  return (value === 0 ? '0' : `0x${value.toString(16)}`).padEnd(16);
}
