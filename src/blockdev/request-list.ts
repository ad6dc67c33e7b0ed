/*
 * Requests in flight over byte ranges, which others may wait out (QEMU's
 * BlockReqList): the copy-before-write filter lists the reads of its frozen
 * view that go to the live disk, and a guest write to such a range waits until
 * they are done. Unlike RangeLock nothing is refused or queued on adding: a
 * reader never waits here, only the writer that has to leave the range alone.
 */

interface Request {
  offset: number;
  end: number;
  done: Promise<void>;
}

export class RequestList {
  private readonly requests = new Set<Request>();

  /** Lists [offset, offset + length) as in flight; the returned function ends it. */
  add(offset: number, length: number): () => void {
    let finish!: () => void;
    const request: Request = { offset, end: offset + length, done: new Promise<void>((resolve) => (finish = resolve)) };
    this.requests.add(request);
    return () => {
      this.requests.delete(request);
      finish();
    };
  }

  /** Resolves once no listed request (one listed while waiting too) overlaps [offset, offset + length). */
  async waitAll(offset: number, length: number): Promise<void> {
    const end = offset + length;
    for (;;) {
      const overlapping = [...this.requests].find((request) => request.offset < end && offset < request.end);
      if (!overlapping) return;
      await overlapping.done;
    }
  }
}
