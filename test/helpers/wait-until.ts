/*
 * Polls state until a condition holds: for what has no event to wait for (a log line
 * on a child's stderr, a file a peer creates). Fails with what it waited for after
 * `timeoutMs`, so a broken expectation names itself instead of hanging the test.
 */
import { setTimeout as sleep } from 'node:timers/promises';

export async function waitUntil(check: () => boolean | Promise<boolean>, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting until ${what}`);
    await sleep(10);
  }
}
