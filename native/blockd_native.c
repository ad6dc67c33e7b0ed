/*
 * blockd's native addon: the file syscalls Node's fs lacks (SEEK_DATA/SEEK_HOLE, fallocate,
 * OFD byte-range locks, sync_file_range, copy_file_range), batched pwrite, and a read that never waits for the
 * disk and an lseek, both on the calling thread. Every call but those two runs on the libuv thread pool and returns a promise;
 * src/blockdev/native/native-file-ops.ts is its only user.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include <node_api.h>

enum op { OP_SEEK_DATA, OP_SEEK_HOLE, OP_FALLOCATE, OP_OFD_LOCK, OP_OFD_TEST, OP_START_WRITEBACK, OP_COPY_FILE_RANGE };

/* JS name, syscall named in error messages, number of integer arguments after the fd. */
static const struct { const char *name; const char *syscall; size_t nargs; } ops[] = {
  [OP_SEEK_DATA] = { "seekData", "lseek", 1 },        /* (fd, offset) */
  [OP_SEEK_HOLE] = { "seekHole", "lseek", 1 },        /* (fd, offset) */
  [OP_FALLOCATE] = { "fallocate", "fallocate", 3 },   /* (fd, mode, offset, length) */
  [OP_OFD_LOCK] = { "ofdLock", "fcntl", 3 },          /* (fd, start, length, shared ? 1 : 0) */
  [OP_OFD_TEST] = { "ofdTestConflict", "fcntl", 2 },  /* (fd, start, length) */
  [OP_START_WRITEBACK] = { "startWriteback", "sync_file_range", 2 }, /* (fd, offset, length) */
  [OP_COPY_FILE_RANGE] = { "copyFileRange", "copy_file_range", 4 }, /* (fd_in, offset_in, fd_out, offset_out, length) */
};

struct work {
  enum op op;
  int fd;
  int64_t arg[4];
  int64_t result;
  int err; /* errno, 0 on success */
  napi_async_work async;
  napi_deferred deferred;
};

#define TRY(call) do { napi_status s_ = (call); if (s_ != napi_ok) return s_; } while (0)

/* Runs on a pool thread: no N-API calls here. */
static void execute(napi_env env, void *data) {
  struct work *w = data;
  (void)env;
  do {
    /* OFD locks require l_pid == 0, which the initializer guarantees. */
    struct flock fl = { .l_whence = SEEK_SET, .l_start = w->arg[0], .l_len = w->arg[1] };
    switch (w->op) {
    case OP_SEEK_DATA:
    case OP_SEEK_HOLE:
      w->result = lseek(w->fd, w->arg[0], w->op == OP_SEEK_DATA ? SEEK_DATA : SEEK_HOLE);
      break;
    case OP_FALLOCATE:
      w->result = fallocate(w->fd, (int)w->arg[0], w->arg[1], w->arg[2]);
      break;
    case OP_OFD_LOCK:
      fl.l_type = w->arg[2] ? F_RDLCK : F_UNLCK;
      w->result = fcntl(w->fd, F_OFD_SETLK, &fl);
      break;
    case OP_OFD_TEST:
      /* GETLK reports only locks of other open file descriptions, never our own. */
      fl.l_type = F_WRLCK;
      w->result = fcntl(w->fd, F_OFD_GETLK, &fl);
      if (w->result == 0) w->result = fl.l_type != F_UNLCK;
      break;
    case OP_START_WRITEBACK:
      /* Starts writing the range's dirty pages to disk and returns: a later fdatasync finds less to do. */
      w->result = sync_file_range(w->fd, w->arg[0], w->arg[1], SYNC_FILE_RANGE_WRITE);
      break;
    case OP_COPY_FILE_RANGE: {
      /* One call of the kernel's in-file copy; it may copy less than asked (the caller loops). */
      loff_t in = w->arg[0], out = w->arg[2];
      w->result = copy_file_range(w->fd, &in, (int)w->arg[1], &out, (size_t)w->arg[3], 0);
      break;
    }
    }
    w->err = w->result < 0 ? errno : 0;
  } while (w->err == EINTR);
}

/*
 * The errno's symbolic name. glibc 2.32 added strerrorname_np; older C libraries (and a
 * build with BLOCKD_ERRNO_TABLE, which the tests use to check this path) name the errors
 * the file operations can return from a table of our own.
 */
#if !defined(BLOCKD_ERRNO_TABLE) && defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
static const char *errno_name(int err) { return strerrorname_np(err); }
#else
static const char *errno_name(int err) {
#define NAME(e) case e: return #e;
  switch (err) {
  NAME(EPERM) NAME(ENOENT) NAME(EINTR) NAME(EIO) NAME(ENXIO) NAME(EBADF) NAME(EAGAIN) NAME(ENOMEM)
  NAME(EACCES) NAME(EFAULT) NAME(EBUSY) NAME(EEXIST) NAME(ENODEV) NAME(EISDIR) NAME(EINVAL) NAME(ENFILE)
  NAME(EMFILE) NAME(ETXTBSY) NAME(EFBIG) NAME(ENOSPC) NAME(ESPIPE) NAME(EROFS) NAME(EDEADLK) NAME(ENOLCK)
  NAME(ENOSYS) NAME(EOVERFLOW) NAME(EOPNOTSUPP) NAME(EDQUOT)
  default: return NULL;
  }
#undef NAME
}
#endif

/* An Error with .code = errno name and .errno = number, as Node's fs errors have. */
static napi_status errno_error(napi_env env, const struct work *w, napi_value *error) {
  char fallback[16], message[128];
  const char *code = errno_name(w->err);
  napi_value code_value, message_value, errno_value;
  if (code == NULL) {
    snprintf(fallback, sizeof fallback, "E%d", w->err);
    code = fallback;
  }
  snprintf(message, sizeof message, "%s: %s", ops[w->op].syscall, strerror(w->err));
  TRY(napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &code_value));
  TRY(napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &message_value));
  TRY(napi_create_error(env, code_value, message_value, error));
  TRY(napi_create_int32(env, w->err, &errno_value));
  return napi_set_named_property(env, *error, "errno", errno_value);
}

static napi_status settle(napi_env env, const struct work *w) {
  napi_value value;
  int seek = w->op == OP_SEEK_DATA || w->op == OP_SEEK_HOLE;
  if (w->err != 0 && !(seek && w->err == ENXIO)) {
    TRY(errno_error(env, w, &value));
    return napi_reject_deferred(env, w->deferred, value);
  }
  if (seek) /* ENXIO: no data (or hole) at or after the offset */
    TRY(w->err ? napi_get_null(env, &value) : napi_create_double(env, (double)w->result, &value));
  else if (w->op == OP_COPY_FILE_RANGE) /* the bytes copied */
    TRY(napi_create_double(env, (double)w->result, &value));
  else if (w->op == OP_OFD_TEST)
    TRY(napi_get_boolean(env, w->result != 0, &value));
  else
    TRY(napi_get_undefined(env, &value));
  return napi_resolve_deferred(env, w->deferred, value);
}

/* Back on the main thread: settle the promise and free the work in every case. */
static void complete(napi_env env, napi_status status, void *data) {
  struct work *w = data;
  napi_status settled = status == napi_ok ? settle(env, w) : status;
  napi_status deleted = napi_delete_async_work(env, w->async);
  free(w);
  /* Surfaces as an uncaught exception rather than a promise that silently never settles. */
  if (settled != napi_ok || deleted != napi_ok)
    napi_throw_error(env, "ERR_BLOCKD_NATIVE", "blockd_native: could not settle a promise");
}

/* Host offsets are JS numbers: accept only integers that a double holds exactly. */
static napi_status get_int64(napi_env env, napi_value value, int64_t *out) {
  double d;
  TRY(napi_get_value_double(env, value, &d));
  if (!(d >= -9007199254740992.0 && d <= 9007199254740992.0) || d != (double)(int64_t)d)
    return napi_invalid_arg;
  *out = (int64_t)d;
  return napi_ok;
}

/* Queues `execute` on the pool with a promise that `complete` settles. */
static napi_status queue_with_promise(napi_env env, const char *name, napi_async_execute_callback execute,
                                      napi_async_complete_callback complete, void *data, napi_async_work *async,
                                      napi_deferred *deferred, napi_value *promise) {
  napi_value resource;
  TRY(napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &resource));
  TRY(napi_create_async_work(env, NULL, resource, execute, complete, data, async));
  TRY(napi_create_promise(env, deferred, promise));
  return napi_queue_async_work(env, *async);
}

/* A call that could not start: a TypeError for bad arguments, else an Error. */
static void throw_failure(napi_env env, napi_status status, const char *message) {
  if (status == napi_invalid_arg || status == napi_number_expected || status == napi_array_expected)
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", message);
  else
    napi_throw_error(env, "ERR_BLOCKD_NATIVE", "blockd_native: N-API call failed");
}

static napi_status start(napi_env env, napi_callback_info info, struct work *w, napi_value *promise) {
  napi_value argv[5];
  size_t argc = 5;
  void *data;
  TRY(napi_get_cb_info(env, info, &argc, argv, NULL, &data));
  w->op = (enum op)(intptr_t)data;
  if (argc < 1 + ops[w->op].nargs) return napi_invalid_arg;
  TRY(napi_get_value_int32(env, argv[0], &w->fd));
  for (size_t i = 0; i < ops[w->op].nargs; i++) TRY(get_int64(env, argv[1 + i], &w->arg[i]));
  return queue_with_promise(env, ops[w->op].name, execute, complete, w, &w->async, &w->deferred, promise);
}

/* The one entry point of the single-syscall functions; the op comes in as the function's data. */
static napi_value call(napi_env env, napi_callback_info info) {
  struct work *w = calloc(1, sizeof *w);
  napi_value promise = NULL, undefined;
  napi_status status = w ? start(env, info, w, &promise) : napi_generic_failure;
  char message[96];
  if (status == napi_ok) return promise;
  /* Cleanup is best effort: a failure here leaves nothing more to undo. */
  if (w && w->async) napi_delete_async_work(env, w->async);
  if (w && w->deferred && napi_get_undefined(env, &undefined) == napi_ok)
    napi_resolve_deferred(env, w->deferred, undefined); /* frees the deferred; nobody holds it */
  snprintf(message, sizeof message, "%s: expected an fd and %zu integer arguments",
           w ? ops[w->op].name : "blockd_native", w ? ops[w->op].nargs : (size_t)0);
  free(w);
  throw_failure(env, status, message);
  return NULL;
}

/*
 * writeBatch(fds: Int32Array, offsets: Float64Array, buffers: Uint8Array[], results: Float64Array): Promise<void>
 * Runs the n pwrites one after the other on one pool thread: one thread hand-off for the
 * batch instead of one per write, which is what small buffered writes cost most.
 * results[i] becomes the bytes written or -errno.
 */
struct pending_write {
  int fd;
  int64_t offset;
  uint8_t *data;
  size_t length;
};

struct batch {
  size_t n;
  struct pending_write *writes;
  double *results;
  napi_ref keep[2]; /* the buffers array and the results array stay alive while threads use them */
  napi_async_work async;
  napi_deferred deferred;
};

static void execute_batch(napi_env env, void *data) {
  struct batch *b = data;
  (void)env;
  for (size_t i = 0; i < b->n; i++) {
    const struct pending_write *t = &b->writes[i];
    size_t done = 0;
    double result = 0;
    while (done < t->length) {
      ssize_t r = pwrite(t->fd, t->data + done, t->length - done, t->offset + (int64_t)done);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        result = -(double)errno;
        break;
      }
      if (r == 0) break; /* nothing written: the caller reports it */
      done += (size_t)r;
    }
    b->results[i] = result < 0 ? result : (double)done;
  }
}

static void free_batch(napi_env env, struct batch *b) {
  for (int i = 0; i < 2; i++) if (b->keep[i]) napi_delete_reference(env, b->keep[i]);
  if (b->async) napi_delete_async_work(env, b->async);
  free(b->writes);
  free(b);
}

static void complete_batch(napi_env env, napi_status status, void *data) {
  struct batch *b = data;
  napi_value undefined;
  napi_status settled = napi_get_undefined(env, &undefined);
  if (settled == napi_ok) settled = status == napi_ok ? napi_resolve_deferred(env, b->deferred, undefined)
                                                      : napi_reject_deferred(env, b->deferred, undefined);
  free_batch(env, b);
  if (settled != napi_ok) napi_throw_error(env, "ERR_BLOCKD_NATIVE", "blockd_native: could not settle a promise");
}

/* A typed array's elements and count, checked to be of `type` and at least `n` long. */
static napi_status typed_elements(napi_env env, napi_value value, napi_typedarray_type type, size_t n, void **out, size_t *length) {
  napi_typedarray_type actual;
  bool is_typed;
  TRY(napi_is_typedarray(env, value, &is_typed));
  if (!is_typed) return napi_invalid_arg;
  TRY(napi_get_typedarray_info(env, value, &actual, length, out, NULL, NULL));
  return actual == type && *length >= n ? napi_ok : napi_invalid_arg;
}

static napi_status start_batch(napi_env env, napi_callback_info info, struct batch *b, napi_value *promise) {
  napi_value argv[4], buffer;
  size_t argc = 4;
  uint32_t n;
  int32_t *fds;
  double *offsets;
  size_t length;
  bool is_array;
  TRY(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 4) return napi_invalid_arg;
  TRY(napi_is_array(env, argv[2], &is_array));
  if (!is_array) return napi_invalid_arg;
  TRY(napi_get_array_length(env, argv[2], &n));
  TRY(typed_elements(env, argv[0], napi_int32_array, n, (void **)&fds, &length));
  TRY(typed_elements(env, argv[1], napi_float64_array, n, (void **)&offsets, &length));
  TRY(typed_elements(env, argv[3], napi_float64_array, n, (void **)&b->results, &length));
  b->writes = calloc(n ? n : 1, sizeof *b->writes);
  if (!b->writes) return napi_generic_failure;
  b->n = n;
  for (uint32_t i = 0; i < n; i++) {
    struct pending_write *t = &b->writes[i];
    TRY(napi_get_element(env, argv[2], i, &buffer));
    TRY(typed_elements(env, buffer, napi_uint8_array, 0, (void **)&t->data, &t->length));
    if (!(offsets[i] >= 0 && offsets[i] <= 9007199254740992.0) || offsets[i] != (double)(int64_t)offsets[i]) return napi_invalid_arg;
    t->fd = fds[i];
    t->offset = (int64_t)offsets[i];
  }
  TRY(napi_create_reference(env, argv[2], 1, &b->keep[0]));
  TRY(napi_create_reference(env, argv[3], 1, &b->keep[1]));
  return queue_with_promise(env, "writeBatch", execute_batch, complete_batch, b, &b->async, &b->deferred, promise);
}

static napi_value write_batch(napi_env env, napi_callback_info info) {
  struct batch *b = calloc(1, sizeof *b);
  napi_value promise = NULL, undefined;
  napi_status status = b ? start_batch(env, info, b, &promise) : napi_generic_failure;
  if (status == napi_ok) return promise;
  if (b && b->deferred && napi_get_undefined(env, &undefined) == napi_ok) napi_resolve_deferred(env, b->deferred, undefined);
  if (b) free_batch(env, b);
  throw_failure(env, status, "writeBatch: expected fds, offsets, buffers and results of one length");
  return NULL;
}

/*
 * readCached(fd: number, buffer: Uint8Array, offset: number): number
 * One preadv2 with RWF_NOWAIT on the calling thread: what the page cache holds is copied at
 * once, without the thread hand-off an fs read costs; nothing waits for the disk. Returns the
 * bytes read (fewer than asked when only a first part is cached, 0 at the end of the file) or
 * -errno (-EAGAIN: not cached; -EOPNOTSUPP: the file system cannot read without waiting).
 */
static napi_value read_cached(napi_env env, napi_callback_info info) {
  napi_value argv[3], result;
  size_t argc = 3, length;
  int32_t fd;
  int64_t offset;
  void *data;
  ssize_t r;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      typed_elements(env, argv[1], napi_uint8_array, 0, &data, &length) != napi_ok ||
      get_int64(env, argv[2], &offset) != napi_ok || offset < 0) {
    throw_failure(env, napi_invalid_arg, "readCached: expected an fd, a buffer and an offset");
    return NULL;
  }
  struct iovec iov = { .iov_base = data, .iov_len = length };
  do {
    r = preadv2(fd, &iov, 1, offset, RWF_NOWAIT);
  } while (r < 0 && errno == EINTR);
  if (napi_create_double(env, r < 0 ? -(double)errno : (double)r, &result) != napi_ok) return NULL;
  return result;
}

/*
 * seekNow(fd: number, offset: number, hole: 0 | 1): number
 * lseek(SEEK_DATA, or SEEK_HOLE with hole = 1) on the calling thread: the offset found or
 * -errno (-ENXIO: none at or after offset). QEMU's block status calls lseek in its coroutine
 * too: on a local file system it costs less than the thread hand-off an async call pays.
 */
static napi_value seek_now(napi_env env, napi_callback_info info) {
  napi_value argv[3], result;
  size_t argc = 3;
  int32_t fd, hole;
  int64_t offset;
  off_t r;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      get_int64(env, argv[1], &offset) != napi_ok || offset < 0 ||
      napi_get_value_int32(env, argv[2], &hole) != napi_ok) {
    throw_failure(env, napi_invalid_arg, "seekNow: expected an fd, an offset and 0 or 1");
    return NULL;
  }
  r = lseek(fd, offset, hole ? SEEK_HOLE : SEEK_DATA);
  if (napi_create_double(env, r < 0 ? -(double)errno : (double)r, &result) != napi_ok) return NULL;
  return result;
}

NAPI_MODULE_INIT() {
  napi_value batch_fn, read_fn, seek_fn;
  if (napi_create_function(env, "writeBatch", NAPI_AUTO_LENGTH, write_batch, NULL, &batch_fn) != napi_ok ||
      napi_set_named_property(env, exports, "writeBatch", batch_fn) != napi_ok ||
      napi_create_function(env, "readCached", NAPI_AUTO_LENGTH, read_cached, NULL, &read_fn) != napi_ok ||
      napi_set_named_property(env, exports, "readCached", read_fn) != napi_ok ||
      napi_create_function(env, "seekNow", NAPI_AUTO_LENGTH, seek_now, NULL, &seek_fn) != napi_ok ||
      napi_set_named_property(env, exports, "seekNow", seek_fn) != napi_ok)
    return NULL;
  for (size_t op = 0; op < sizeof ops / sizeof ops[0]; op++) {
    napi_value fn;
    if (napi_create_function(env, ops[op].name, NAPI_AUTO_LENGTH, call, (void *)(intptr_t)op, &fn) != napi_ok ||
        napi_set_named_property(env, exports, ops[op].name, fn) != napi_ok)
      return NULL;
  }
  return exports;
}
