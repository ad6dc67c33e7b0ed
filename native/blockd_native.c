/*
 * blockd's native addon: the file syscalls Node's fs lacks (SEEK_DATA/SEEK_HOLE, fallocate,
 * OFD byte-range locks). Every call runs on the libuv thread pool through one async-work
 * helper and returns a promise; src/blockdev/native/native-file-ops.ts is its only user.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <node_api.h>

enum op { OP_SEEK_DATA, OP_SEEK_HOLE, OP_FALLOCATE, OP_OFD_LOCK, OP_OFD_TEST };

/* JS name, syscall named in error messages, number of integer arguments after the fd. */
static const struct { const char *name; const char *syscall; size_t nargs; } ops[] = {
  [OP_SEEK_DATA] = { "seekData", "lseek", 1 },        /* (fd, offset) */
  [OP_SEEK_HOLE] = { "seekHole", "lseek", 1 },        /* (fd, offset) */
  [OP_FALLOCATE] = { "fallocate", "fallocate", 3 },   /* (fd, mode, offset, length) */
  [OP_OFD_LOCK] = { "ofdLock", "fcntl", 3 },          /* (fd, start, length, shared ? 1 : 0) */
  [OP_OFD_TEST] = { "ofdTestConflict", "fcntl", 2 },  /* (fd, start, length) */
};

struct work {
  enum op op;
  int fd;
  int64_t arg[3];
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
    }
    w->err = w->result < 0 ? errno : 0;
  } while (w->err == EINTR);
}

/* An Error with .code = errno name and .errno = number, as Node's fs errors have. */
static napi_status errno_error(napi_env env, const struct work *w, napi_value *error) {
  char fallback[16], message[128];
  const char *code = strerrorname_np(w->err);
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

static napi_status start(napi_env env, napi_callback_info info, struct work *w, napi_value *promise) {
  napi_value argv[4], resource;
  size_t argc = 4;
  void *data;
  TRY(napi_get_cb_info(env, info, &argc, argv, NULL, &data));
  w->op = (enum op)(intptr_t)data;
  if (argc < 1 + ops[w->op].nargs) return napi_invalid_arg;
  TRY(napi_get_value_int32(env, argv[0], &w->fd));
  for (size_t i = 0; i < ops[w->op].nargs; i++) TRY(get_int64(env, argv[1 + i], &w->arg[i]));
  TRY(napi_create_string_utf8(env, ops[w->op].name, NAPI_AUTO_LENGTH, &resource));
  TRY(napi_create_async_work(env, NULL, resource, execute, complete, w, &w->async));
  TRY(napi_create_promise(env, &w->deferred, promise));
  return napi_queue_async_work(env, w->async);
}

/* The one entry point of all five functions; the op comes in as the function's data. */
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
  if (status == napi_invalid_arg || status == napi_number_expected)
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", message);
  else
    napi_throw_error(env, "ERR_BLOCKD_NATIVE", "blockd_native: N-API call failed");
  return NULL;
}

NAPI_MODULE_INIT() {
  for (size_t op = 0; op < sizeof ops / sizeof ops[0]; op++) {
    napi_value fn;
    if (napi_create_function(env, ops[op].name, NAPI_AUTO_LENGTH, call, (void *)(intptr_t)op, &fn) != napi_ok ||
        napi_set_named_property(env, exports, ops[op].name, fn) != napi_ok)
      return NULL;
  }
  return exports;
}
