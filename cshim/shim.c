/*
 * govllm C shim: embeds CPython (stable ABI, 3.10+) and moves events between Python and Go.
 *
 * The shim is built with Py_LIMITED_API=0x030A0000 and does NOT link libpython: Go dlopens the
 * chosen interpreter's libpython with RTLD_GLOBAL first, then this library, so the Py* symbols
 * resolve at load time and one build serves every Python from 3.10 on.
 *
 * Two queues, neither of which makes Go touch the GIL on the hot path:
 *   outbox  Python -> Go. _govllm_shim.emit() appends a length-prefixed binary record to one of
 *           two bounded buffers (on the bridge loop's thread, by way of a staging buffer that
 *           is moved over once per loop iteration: see "staging"); Go's poller takes the
 *           whole buffer with shim_poll() (which blocks on a condition variable without the
 *           GIL) and the buffers swap. When the buffer is full, emit() waits with the GIL
 *           released (backpressure on Python, never on Go).
 *   inbox   Go -> Python. shim_send() appends a command (submit/abort/shutdown) and bumps an
 *           eventfd that the bridge's asyncio loop watches with add_reader(); the loop drains the
 *           inbox with _govllm_shim.take().
 * The thread that calls shim_init() becomes Python's main thread and must also call shim_run(),
 * once per engine: after a run ends, another may start on the same interpreter.
 *
 * Why one file of this length: it is one translation unit so that the per-token path (py_relay
 * and py_emit -> emit_delta -> stage_reserve/stage_commit -> frame_record, store_exact_ints,
 * st32) inlines into emit_delta
 * without link-time optimization, and so that the queues' state (outbox, stage, inbox) stays
 * static, private to the few functions that keep its locking rules. It reads top to bottom in
 * sections: last error, outbox, staging, poll, inbox, the _govllm_shim module, lifecycle.
 */
#define Py_LIMITED_API 0x030A0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "shim.h"

/* ---------------------------------------------------------------- last error */

static pthread_mutex_t err_mu = PTHREAD_MUTEX_INITIALIZER;
static char *last_error;

static void set_error(const char *msg) {
  pthread_mutex_lock(&err_mu);
  free(last_error);
  last_error = strdup(msg ? msg : "unknown error");
  pthread_mutex_unlock(&err_mu);
}

int64_t shim_last_error(char *buf, int64_t cap) {
  /* Copied under the lock: another thread's set_error frees the text it replaces. */
  pthread_mutex_lock(&err_mu);
  size_t n = last_error ? strlen(last_error) : 0;
  if (buf != NULL && cap > 0) {
    size_t c = n < (size_t)cap ? n : (size_t)cap - 1;
    if (c) memcpy(buf, last_error, c);
    buf[c] = 0;
  }
  pthread_mutex_unlock(&err_mu);
  return (int64_t)n;
}

/* Format the pending Python exception (type, message, traceback) into last_error and clear it.
 * Must be called with the GIL held. */
static void set_error_from_python(const char *context) {
  PyObject *type = NULL, *value = NULL, *tb = NULL;
  PyErr_Fetch(&type, &value, &tb);
  if (type == NULL) {
    set_error(context);
    return;
  }
  PyErr_NormalizeException(&type, &value, &tb);
  char *text = NULL;
  PyObject *mod = PyImport_ImportModule("traceback");
  if (mod != NULL) {
    PyObject *lines = PyObject_CallMethod(mod, "format_exception", "OOO", type, value ? value : Py_None, tb ? tb : Py_None);
    if (lines != NULL) {
      PyObject *empty = PyUnicode_FromString("");
      PyObject *joined = empty ? PyUnicode_Join(empty, lines) : NULL;
      if (joined != NULL) {
        Py_ssize_t n = 0;
        const char *s = PyUnicode_AsUTF8AndSize(joined, &n);
        if (s != NULL) {
          size_t clen = strlen(context);
          text = malloc(clen + 2 + (size_t)n + 1);
          if (text) {
            memcpy(text, context, clen);
            memcpy(text + clen, ": ", 2);
            memcpy(text + clen + 2, s, (size_t)n);
            text[clen + 2 + n] = 0;
          }
        }
        Py_DECREF(joined);
      }
      Py_XDECREF(empty);
      Py_DECREF(lines);
    }
    Py_DECREF(mod);
  }
  PyErr_Clear();
  if (text == NULL) {
    set_error(context);
  } else {
    set_error(text);
    free(text);
  }
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(tb);
}

/* ---------------------------------------------------------------- outbox */

enum { HDR = 24 }; /* bytes in a record header (see make_header) */

/* Little-endian stores, as the record format wants (engine/event.go): plain moves on x86 and
 * arm64, where byte-by-byte shifts would cost the hot path a dozen instructions per field. */
static inline void st32(uint8_t *p, uint32_t v) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap32(v);
#endif
  memcpy(p, &v, 4);
}
static inline void st64(uint8_t *p, uint64_t v) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap64(v);
#endif
  memcpy(p, &v, 8);
}

/* Two buffers: emitters append records to bufs[w]; shim_poll hands the whole of bufs[w] to Go
 * and swaps, so neither side copies or parses under the lock. The buffer handed out stays
 * Go's until its next shim_poll call. */
typedef struct {
  pthread_mutex_t mu;
  pthread_cond_t readable; /* the poller waits here */
  pthread_cond_t writable; /* emitters wait here when bufs[w] is full */
  uint8_t *bufs[2];
  size_t lens[2];
  size_t cap; /* of each buffer */
  int w;      /* the buffer emitters append to */
  int closed;
  int pollers_waiting, emitters_waiting;
  int woken; /* the waiting poller was signalled and has not run yet: no need to signal again */
} outbox_t;

static outbox_t outbox = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER};

/* Reserve `total` bytes at the end of the write buffer, waiting for room without the GIL when
 * it is full. Called with the GIL held; on success returns with outbox.mu held and the caller
 * writes the bytes and calls outbox_commit. Returns NULL with a Python exception set. */
static uint8_t *outbox_reserve(size_t total) {
  if (total > outbox.cap) {
    PyErr_Format(PyExc_ValueError, "event of %zu bytes exceeds the shim queue limit (%zu)", total, outbox.cap);
    return NULL;
  }
  pthread_mutex_lock(&outbox.mu);
  while (outbox.cap - outbox.lens[outbox.w] < total && !outbox.closed) {
    /* Full: wait without the GIL so the poller (and the rest of Python) keep running. */
    pthread_mutex_unlock(&outbox.mu);
    PyThreadState *ts = PyEval_SaveThread();
    pthread_mutex_lock(&outbox.mu);
    while (outbox.cap - outbox.lens[outbox.w] < total && !outbox.closed) {
      outbox.emitters_waiting++;
      if (outbox.pollers_waiting) pthread_cond_signal(&outbox.readable);
      pthread_cond_wait(&outbox.writable, &outbox.mu);
      outbox.emitters_waiting--;
    }
    pthread_mutex_unlock(&outbox.mu);
    PyEval_RestoreThread(ts);
    pthread_mutex_lock(&outbox.mu); /* another emitter may have filled it meanwhile: check again */
  }
  if (outbox.closed) {
    pthread_mutex_unlock(&outbox.mu);
    PyErr_SetString(PyExc_RuntimeError, "govllm shim: event queue closed");
    return NULL;
  }
  return outbox.bufs[outbox.w] + outbox.lens[outbox.w];
}

/* Publish the bytes written after outbox_reserve and release the lock. */
static void outbox_commit(size_t total) {
  outbox.lens[outbox.w] += total;
  if (outbox.pollers_waiting && !outbox.woken) {
    outbox.woken = 1; /* one futex wake per batch, not one per record */
    pthread_cond_signal(&outbox.readable);
  }
  pthread_mutex_unlock(&outbox.mu);
}

/* Frame one record into p: a 4-byte length, the header, then tokens, text and meta. toks NULL:
 * the ntok tokens are already in place (emit converts them straight into the staging buffer). */
static inline void frame_record(uint8_t *p, const uint8_t *hdr, size_t hlen, const int32_t *toks, size_t ntok,
                                const char *text, size_t tlen, const char *meta, size_t mlen) {
  st32(p, (uint32_t)(hlen + ntok * 4 + tlen + mlen));
  p += 4;
  memcpy(p, hdr, hlen);
  p += hlen;
  if (ntok && toks) memcpy(p, toks, ntok * 4);
  p += ntok * 4;
  if (tlen <= 8) {
    /* A detokenized delta is a few bytes: a call to memcpy would cost more than the copy. */
    for (size_t i = 0; i < tlen; i++) p[i] = (uint8_t)text[i];
  } else {
    memcpy(p, text, tlen);
  }
  p += tlen;
  if (mlen) memcpy(p, meta, mlen);
}

/* Append one record straight to the outbox. Called with the GIL held; returns -1 with a Python
 * exception set. */
static int outbox_put(const uint8_t *hdr, size_t hlen, const int32_t *toks, size_t ntok, const char *text,
                      size_t tlen, const char *meta, size_t mlen) {
  size_t total = 4 + hlen + ntok * 4 + tlen + mlen;
  uint8_t *p = outbox_reserve(total);
  if (p == NULL) return -1;
  frame_record(p, hdr, hlen, toks, ntok, text, tlen, meta, mlen);
  outbox_commit(total);
  return 0;
}

/* ---------------------------------------------------------------- staging */

/* Token records emitted on the bridge loop's thread are framed into a private buffer, guarded by
 * the GIL alone (no lock, no atomics, no wakeup), and moved into the outbox in one piece: by the
 * flush callback that the first record after a flush schedules on the loop (set_flush_hook), when
 * the buffer holds stage.limit bytes, and before any control event (end, error, ...), so records
 * keep their order. An engine step that emits a token for each of its requests thus costs the
 * outbox one lock and the poller one wakeup, instead of one per token. */
typedef struct {
  uint8_t *buf;
  size_t len, limit;
  int flushing;        /* a flush is waiting for room in the outbox with the GIL released */
  int scheduled;       /* the hook ran and its flush has not yet */
  pthread_t owner;     /* the thread whose token records are staged (set_flush_hook's caller) */
  PyObject *hook;      /* called (no arguments) on the first record after a flush */
} stage_t;

static stage_t stage;

/* stage_owned reports whether the calling thread's token records are staged. pthread_self is a
 * register read; a __thread variable in a -fPIC library would cost a __tls_get_addr call. */
static inline int stage_owned(void) { return stage.hook != NULL && pthread_equal(stage.owner, pthread_self()); }

/* Wait (GIL released in short sleeps) for a flush on another thread that is waiting for room. */
static void stage_wait_flushing(void) {
  while (stage.flushing) {
    PyThreadState *ts = PyEval_SaveThread();
    struct timespec pause = {0, 20000};
    nanosleep(&pause, NULL);
    PyEval_RestoreThread(ts);
  }
}

/* Copy n bytes into the outbox without pulling its lines into this core's cache: the poller reads
 * them on another core, so ordinary stores would first fetch each line back from that core (a
 * cross-core transfer per 64 bytes, on the Python thread's time). Non-temporal stores skip that. */
static void copy_to_outbox(uint8_t *dst, const uint8_t *src, size_t n) {
#if defined(__SSE2__)
  size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
  if (head > n) head = n;
  memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  size_t blocks = n / 16;
  for (size_t i = 0; i < blocks; i++) {
    __m128i v = _mm_loadu_si128((const __m128i *)(src + 16 * i));
    _mm_stream_si128((__m128i *)(dst + 16 * i), v);
  }
  _mm_sfence(); /* order the streaming stores before the length that publishes them */
  memcpy(dst + 16 * blocks, src + 16 * blocks, n - 16 * blocks);
#else
  memcpy(dst, src, n);
#endif
}

/* Move the staged records into the outbox. GIL held; -1 with a Python exception set. */
static int stage_flush(void) {
  stage_wait_flushing();
  if (stage.len == 0) return 0;
  stage.flushing = 1;
  size_t n = stage.len;
  uint8_t *p = outbox_reserve(n);
  if (p != NULL) {
    copy_to_outbox(p, stage.buf, n);
    outbox_commit(n);
  }
  /* Records staged while this waited cannot exist: staging waits for flushing to clear. */
  stage.len = 0;
  stage.flushing = 0;
  return p == NULL ? -1 : 0;
}

/* Room for a record of `total` bytes at the end of the staging buffer (the staging thread only,
 * total <= stage.limit), flushing first when it is full. NULL with a Python exception set on
 * error. The record is written there and published by stage_commit, with no Python code run in
 * between: Python code could emit, and its record would land in the same place. */
static inline uint8_t *stage_reserve(size_t total) {
  if (__builtin_expect(stage.flushing, 0)) stage_wait_flushing();
  if (__builtin_expect(stage.len + total > stage.limit, 0) && stage_flush() < 0) return NULL;
  return stage.buf + stage.len;
}

/* Publish the record written after stage_reserve, and have the hook schedule a flush if none is
 * pending. -1 with a Python exception set on error. */
static int stage_schedule(void);

static inline int stage_commit(size_t total) {
  stage.len += total;
  return __builtin_expect(stage.scheduled, 1) ? 0 : stage_schedule();
}

/* Have the hook arrange a flush (the first record since the last one). */
static int stage_schedule(void) {
  stage.scheduled = 1;
  PyObject *r = PyObject_CallObject(stage.hook, NULL);
  if (r == NULL) {
    /* The loop cannot take the callback (closing): deliver now instead. */
    PyErr_Clear();
    stage.scheduled = 0;
    return stage_flush();
  }
  Py_DECREF(r);
  return 0;
}

/* Stage one record if the calling thread owns the staging buffer. Returns 1 when staged, 0 when
 * the caller must put it directly (after stage_flush, to keep the order), -1 on error. */
static int stage_put(const uint8_t *hdr, const int32_t *toks, size_t ntok, const char *text, size_t tlen,
                     const char *meta, size_t mlen) {
  size_t total = 4 + HDR + ntok * 4 + tlen + mlen;
  if (!stage_owned() || total > stage.limit) return 0;
  uint8_t *p = stage_reserve(total);
  if (p == NULL) return -1;
  frame_record(p, hdr, HDR, toks, ntok, text, tlen, meta, mlen);
  return stage_commit(total) < 0 ? -1 : 1;
}

/* ---------------------------------------------------------------- poll */

static void outbox_close(void) {
  pthread_mutex_lock(&outbox.mu);
  outbox.closed = 1;
  pthread_cond_broadcast(&outbox.readable);
  pthread_cond_broadcast(&outbox.writable);
  pthread_mutex_unlock(&outbox.mu);
}

/* The poller's timed wait measures its deadline on CLOCK_MONOTONIC, which a step of the wall
 * clock (NTP, an operator) does not move; shim_init sets this up before the first poll. */
static pthread_once_t readable_clock_once = PTHREAD_ONCE_INIT;

static void readable_use_monotonic_clock(void) {
  pthread_condattr_t attr;
  pthread_condattr_init(&attr);
  pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
  pthread_cond_destroy(&outbox.readable);
  pthread_cond_init(&outbox.readable, &attr);
  pthread_condattr_destroy(&attr);
}

int64_t shim_poll(int32_t timeout_ms, int32_t coalesce_us, uint8_t **batch) {
  *batch = NULL;
  pthread_mutex_lock(&outbox.mu);
  outbox.lens[1 - outbox.w] = 0; /* Go is done with the buffer it had */
  int waited = 0;
  if (outbox.lens[outbox.w] == 0 && !outbox.closed && timeout_ms != 0) {
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
      deadline.tv_sec++;
      deadline.tv_nsec -= 1000000000L;
    }
    while (outbox.lens[outbox.w] == 0 && !outbox.closed) {
      outbox.pollers_waiting++;
      int rc = timeout_ms < 0 ? pthread_cond_wait(&outbox.readable, &outbox.mu)
                              : pthread_cond_timedwait(&outbox.readable, &outbox.mu, &deadline);
      outbox.pollers_waiting--;
      outbox.woken = 0;
      waited = 1;
      if (rc == ETIMEDOUT) break;
    }
  }
  if (waited && coalesce_us > 0 && outbox.lens[outbox.w] > 0 && outbox.lens[outbox.w] < outbox.cap / 4 &&
      !outbox.closed) {
    /* Woken by the first event of a burst (an engine step emits one per running request): let
     * the rest arrive before taking the batch, so that a producer slower than the poller does not
     * pay a futex wake per event. Emitters do not signal while no poller waits. */
    pthread_mutex_unlock(&outbox.mu);
    struct timespec pause = {coalesce_us / 1000000, (long)(coalesce_us % 1000000) * 1000L}; /* tv_nsec < 1e9 */
    while (nanosleep(&pause, &pause) < 0 && errno == EINTR) {
    }
    pthread_mutex_lock(&outbox.mu);
  }
  int64_t n = (int64_t)outbox.lens[outbox.w];
  if (n > 0) {
    *batch = outbox.bufs[outbox.w];
    outbox.w = 1 - outbox.w;
    if (outbox.emitters_waiting) pthread_cond_broadcast(&outbox.writable);
  } else if (outbox.closed) {
    n = -1;
  }
  pthread_mutex_unlock(&outbox.mu);
  return n;
}

/* ---------------------------------------------------------------- inbox */

typedef struct cmd {
  struct cmd *next;
  int32_t kind;
  int64_t req_id;
  size_t len;
  char data[];
} cmd_t;

static pthread_mutex_t inbox_mu = PTHREAD_MUTEX_INITIALIZER;
static cmd_t *inbox_head, *inbox_tail;
static int inbox_fd = -1;
static int inbox_closed;

int32_t shim_send(int32_t kind, int64_t req_id, const char *data, int64_t len) {
  if (len < 0) len = 0;
  cmd_t *c = malloc(sizeof(cmd_t) + (size_t)len);
  if (c == NULL) {
    set_error("shim_send: out of memory");
    return -1;
  }
  c->next = NULL;
  c->kind = kind;
  c->req_id = req_id;
  c->len = (size_t)len;
  if (len) memcpy(c->data, data, (size_t)len);
  pthread_mutex_lock(&inbox_mu);
  if (inbox_closed || inbox_fd < 0) {
    pthread_mutex_unlock(&inbox_mu);
    free(c);
    set_error("shim_send: engine not running");
    return -1;
  }
  int was_empty = inbox_head == NULL;
  if (inbox_tail) inbox_tail->next = c;
  else inbox_head = c;
  inbox_tail = c;
  if (was_empty) {
    uint64_t one = 1;
    ssize_t w;
    do {
      w = write(inbox_fd, &one, sizeof one);
    } while (w < 0 && errno == EINTR);
  }
  pthread_mutex_unlock(&inbox_mu);
  return 0;
}

/* ---------------------------------------------------------------- the _govllm_shim module */

enum { MAX_TOKENS_PER_EVENT = 1 << 16 };


/* Record header, little endian, 24 bytes:
 *   u8 kind | u8 finish | u16 index | u32 ntokens | u64 req_id | u32 text_len | u32 meta_len
 * followed by ntokens int32, the UTF-8 text and the meta bytes. See engine/event.go. */

static inline void make_header(uint8_t *h, int kind, int finish, int index, size_t ntok, int64_t req_id,
                               size_t tlen, size_t mlen) {
  st32(h, (uint32_t)(uint8_t)kind | (uint32_t)(uint8_t)finish << 8 | (uint32_t)(uint16_t)index << 16);
  st32(h + 4, (uint32_t)ntok);
  st64(h + 8, (uint64_t)req_id);
  st32(h + 16, (uint32_t)tlen);
  st32(h + 20, (uint32_t)mlen);
}

static PyObject *int_zero; /* the int 0 (a cached singleton in CPython), set at shim_init */

/* token_list_shrank replaces PyList_GetItem's IndexError with one that says what happened:
 * another thread shortened the tokens list while emit ran. Returns -1. */
static int token_list_shrank(void) {
  PyErr_SetString(PyExc_RuntimeError, "emit: the tokens list was shortened while emit was converting it");
  return -1;
}

/* Store tokens[0:n] as int32 at dst if every item is an exact int. Returns 1 when stored, 0 when
 * an item is not an exact int (whose __index__ could run Python code: the caller converts those
 * apart), -1 with a Python exception set on error. Runs no Python code, but its caller may have
 * released the GIL since it read n (stage_reserve waiting for room), and other threads may have
 * shortened a list meanwhile. */
static int store_exact_ints(uint8_t *dst, PyObject *seq, int is_list, Py_ssize_t n) {
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject *item = is_list ? PyList_GetItem(seq, i) : PyTuple_GetItem(seq, i);
    if (__builtin_expect(item == NULL, 0)) return token_list_shrank();
    if (Py_TYPE(item) != &PyLong_Type) return 0;
    long v = PyLong_AsLong(item);
    if (v == -1 && PyErr_Occurred()) return -1;
    st32(dst + 4 * i, (uint32_t)(int32_t)v);
  }
  return 1;
}

/* emit_delta frames one delta record (SHIM_EV_DELTA) of one choice: the hot path of emit() and
 * relay(). seq must be a list or tuple (checked by the caller; is_list says which). Returns 0, or
 * -1 with a Python exception set. */
static int emit_delta(long long req_id, long index, PyObject *seq, int is_list, const char *text, Py_ssize_t tlen,
                      long finish, const char *meta, Py_ssize_t mlen) {
  Py_ssize_t ntok = is_list ? PyList_Size(seq) : PyTuple_Size(seq);
  if (ntok > MAX_TOKENS_PER_EVENT) {
    PyErr_SetString(PyExc_ValueError, "too many tokens in one event");
    return -1;
  }
  size_t total = 4 + HDR + (size_t)ntok * 4 + (size_t)tlen + (size_t)mlen;

  /* The bridge thread's usual record goes straight into the staging buffer: the tokens are
   * converted in place and nothing is copied twice. */
  if (stage_owned() && total <= stage.limit) {
    uint8_t *p = stage_reserve(total);
    if (p == NULL) return -1;
    int stored = store_exact_ints(p + 4 + HDR, seq, is_list, ntok);
    if (stored < 0) return -1;
    if (stored) {
      uint8_t hdr[HDR];
      make_header(hdr, SHIM_EV_DELTA, (int)finish, (int)index, (size_t)ntok, req_id, (size_t)tlen, (size_t)mlen);
      frame_record(p, hdr, HDR, NULL, (size_t)ntok, text, (size_t)tlen, meta, (size_t)mlen);
      return stage_commit(total) < 0 ? -1 : 0;
    }
  }

  /* Any other thread, a record too big to stage, or tokens that are int-like objects. */
  int32_t small[64];
  int32_t *toks = small;
  if (ntok > 64) {
    toks = malloc(sizeof(int32_t) * (size_t)ntok);
    if (!toks) {
      PyErr_NoMemory();
      return -1;
    }
  }
  for (Py_ssize_t i = 0; i < ntok; i++) {
    /* An int-like item's __index__ is Python code, which may shorten the list and drop the
     * item: hold a reference while converting, and check the index is still there. */
    PyObject *item = is_list ? PyList_GetItem(seq, i) : PyTuple_GetItem(seq, i);
    if (item == NULL) {
      token_list_shrank();
      goto fail;
    }
    Py_INCREF(item);
    long v = PyLong_AsLong(item);
    Py_DECREF(item);
    if (v == -1 && PyErr_Occurred()) goto fail;
    toks[i] = (int32_t)v;
  }
  uint8_t hdr[HDR];
  make_header(hdr, SHIM_EV_DELTA, (int)finish, (int)index, (size_t)ntok, req_id, (size_t)tlen, (size_t)mlen);
  int staged = stage_put(hdr, toks, (size_t)ntok, text, (size_t)tlen, meta, (size_t)mlen);
  if (staged < 0) goto fail;
  if (!staged &&
      (stage_flush() < 0 || outbox_put(hdr, HDR, toks, (size_t)ntok, text, (size_t)tlen, meta, (size_t)mlen) < 0))
    goto fail;
  if (toks != small) free(toks);
  return 0;
fail:
  if (toks != small) free(toks);
  return -1;
}

/* token_seq tells whether seq is a list (1) or a tuple (0) of tokens; -1 with TypeError set for
 * anything else. Exact types first: in the limited API the *_Check macros are function calls. */
static int token_seq(PyObject *seq) {
  if (Py_TYPE(seq) == &PyList_Type) return 1;
  if (Py_TYPE(seq) == &PyTuple_Type) return 0;
  if (PyList_Check(seq)) return 1;
  if (PyTuple_Check(seq)) return 0;
  PyErr_SetString(PyExc_TypeError, "tokens must be a list or tuple of ints");
  return -1;
}

/* emit(req_id: int, index: int, tokens: list[int] | tuple[int, ...], text: str, finish: int) -> None
 * One delta of one choice. finish: a SHIM_FINISH_* code (shim.h). */
static PyObject *py_emit(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  (void)self;
  if (nargs != 5 && nargs != 6) {
    PyErr_SetString(PyExc_TypeError, "emit(req_id, index, tokens, text, finish[, meta]) takes 5 or 6 arguments");
    return NULL;
  }
  long long req_id = PyLong_AsLongLong(args[0]);
  if (req_id == -1 && PyErr_Occurred()) return NULL;
  /* index and finish are almost always 0: CPython's cached small int needs no conversion call. */
  long index = args[1] == int_zero ? 0 : PyLong_AsLong(args[1]);
  if (index == -1 && PyErr_Occurred()) return NULL;
  long finish = args[4] == int_zero ? 0 : PyLong_AsLong(args[4]);
  if (finish == -1 && PyErr_Occurred()) return NULL;
  int is_list = token_seq(args[2]);
  if (is_list < 0) return NULL;
  Py_ssize_t tlen = 0;
  const char *text = "";
  if (args[3] != Py_None) {
    text = PyUnicode_AsUTF8AndSize(args[3], &tlen);
    if (text == NULL) return NULL;
  }
  char *meta = NULL;
  Py_ssize_t mlen = 0;
  if (nargs == 6 && args[5] != Py_None) {
    if (PyBytes_AsStringAndSize(args[5], &meta, &mlen) < 0) return NULL;
  }
  if (emit_delta(req_id, index, args[2], is_list, text, tlen, finish, meta, mlen) < 0) return NULL;
  Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- encoder */

/* The prompt encoder Go registers (shim_set_encoder): a Go function, called on the bridge's
 * thread with the GIL held; it runs no Python code and never blocks. */
static shim_encode_fn encode_fn;

void shim_set_encoder(shim_encode_fn fn) { __atomic_store_n(&encode_fn, fn, __ATOMIC_RELEASE); }

/* encode(text: str, add_special_tokens: bool) -> list[int] | None: the prompt's token ids from
 * Go's tokenizer, or None when Go has none for this engine (the backend tokenizes then). */
static PyObject *py_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  (void)self;
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "encode(text, add_special_tokens) takes 2 arguments");
    return NULL;
  }
  shim_encode_fn fn = __atomic_load_n(&encode_fn, __ATOMIC_ACQUIRE);
  if (fn == NULL) Py_RETURN_NONE;
  Py_ssize_t n = 0;
  const char *text = PyUnicode_AsUTF8AndSize(args[0], &n);
  if (text == NULL) return NULL;
  int add = PyObject_IsTrue(args[1]);
  if (add < 0) return NULL;
  int32_t small[1024];
  int32_t *buf = small;
  int64_t cap = 1024;
  int64_t got = fn(text, (int64_t)n, add, buf, cap);
  if (got > cap) { /* the ids did not fit: Go said how many there are */
    cap = got;
    buf = malloc(sizeof(int32_t) * (size_t)cap);
    if (buf == NULL) return PyErr_NoMemory();
    got = fn(text, (int64_t)n, add, buf, cap);
  }
  PyObject *list = NULL;
  if (got < 0 || got > cap) {
    list = Py_None; /* no encoder (any more) */
    Py_INCREF(list);
    goto done;
  }
  list = PyList_New((Py_ssize_t)got);
  if (list == NULL) goto done;
  for (int64_t i = 0; i < got; i++) {
    PyObject *v = PyLong_FromLong(buf[i]);
    if (v == NULL) {
      Py_CLEAR(list);
      goto done;
    }
    PyList_SetItem(list, (Py_ssize_t)i, v);
  }
done:
  if (buf != small) free(buf);
  return list;
}

/* Attribute names relay() reads, interned once (shim_init). */
static PyObject *s_request_id, *s_new_token_ids, *s_finish_reason, *s_new_logprobs, *s_new_prompt_logprobs, *s_events;

/* relay_one frames the delta of one engine output (see py_relay). Returns 1 when the output
 * finished its choice, 0 when not (or it belongs to no route), -1 with an exception set. */
static int relay_one(PyObject *out, PyObject *routes, PyObject *finish_codes, PyObject *logprobs_meta,
                     PyObject *prompt_hook, PyObject *finished, PyObject *noted) {
  int rc = -1;
  PyObject *rid = NULL, *toks = NULL, *reason = NULL, *lp = NULL, *meta = NULL, *plp = NULL, *pmeta = NULL, *events = NULL;
  if (noted != NULL) {
    /* The engine's stats: an output with state-change events (queued, scheduled, preempted) or a
     * finish reason goes to noted, routed or not; the others (one per token) cost one getattr. */
    events = PyObject_GetAttr(out, s_events);
    if (events == NULL) goto done;
    int note = events != Py_None;
    if (!note) {
      PyObject *fr = PyObject_GetAttr(out, s_finish_reason);
      if (fr == NULL) goto done;
      note = fr != Py_None;
      Py_DECREF(fr);
    }
    if (note && PyList_Append(noted, out) < 0) goto done;
  }
  rid = PyObject_GetAttr(out, s_request_id);
  if (rid == NULL) goto done;
  PyObject *key_obj = PyDict_GetItemWithError(routes, rid); /* borrowed */
  if (key_obj == NULL) {
    rc = PyErr_Occurred() ? -1 : 0; /* not routed: aborted or stopped by Go meanwhile */
    goto done;
  }
  long long key = PyLong_AsLongLong(key_obj);
  if (key == -1 && PyErr_Occurred()) goto done;
  toks = PyObject_GetAttr(out, s_new_token_ids);
  if (toks == NULL) goto done;
  int is_list = token_seq(toks);
  if (is_list < 0) goto done;
  reason = PyObject_GetAttr(out, s_finish_reason);
  if (reason == NULL) goto done;
  long finish = 0;
  if (reason != Py_None) {
    long r = PyLong_AsLong(reason);
    if (r == -1 && PyErr_Occurred()) goto done;
    Py_ssize_t ncodes = PyTuple_Size(finish_codes);
    finish = SHIM_FINISH_ERROR;
    if (r >= 0 && r < ncodes) {
      finish = PyLong_AsLong(PyTuple_GetItem(finish_codes, r));
      if (finish == -1 && PyErr_Occurred()) goto done;
    }
  }
  char *mbuf = NULL;
  Py_ssize_t mlen = 0;
  if (logprobs_meta != Py_None) {
    lp = PyObject_GetAttr(out, s_new_logprobs);
    if (lp == NULL) goto done;
    if (lp != Py_None) {
      meta = PyObject_CallFunctionObjArgs(logprobs_meta, out, NULL);
      if (meta == NULL) goto done;
      if (meta != Py_None && PyBytes_AsStringAndSize(meta, &mbuf, &mlen) < 0) goto done;
    }
  }
  if (prompt_hook != Py_None) {
    /* Prompt logprobs (rare: only while a request that asked for them runs): an EV_PROMPT_LOGPROBS
     * record with the hook's bytes, before this output's delta. */
    plp = PyObject_GetAttr(out, s_new_prompt_logprobs);
    if (plp == NULL) goto done;
    if (plp != Py_None) {
      PyObject *kobj = PyLong_FromLongLong(key); /* not the borrowed key_obj: the hook may change routes */
      if (kobj == NULL) goto done;
      pmeta = PyObject_CallFunctionObjArgs(prompt_hook, out, kobj, NULL);
      Py_DECREF(kobj);
      if (pmeta == NULL) goto done;
      if (pmeta != Py_None) {
        char *pbuf = NULL;
        Py_ssize_t plen = 0;
        if (PyBytes_AsStringAndSize(pmeta, &pbuf, &plen) < 0) goto done;
        uint8_t hdr[HDR];
        make_header(hdr, SHIM_EV_PROMPT_LOGPROBS, 0, 0, 0, key >> 16, 0, (size_t)plen);
        if (stage_flush() < 0 || outbox_put(hdr, HDR, NULL, 0, NULL, 0, pbuf, (size_t)plen) < 0) goto done;
      }
    }
  }
  if (emit_delta(key >> 16, (long)(key & 0xffff), toks, is_list, "", 0, finish, mbuf, mlen) < 0) goto done;
  rc = 0;
  if (reason != Py_None) {
    if (PyList_Append(finished, rid) < 0) goto done;
    rc = 1;
  }
done:
  Py_XDECREF(rid);
  Py_XDECREF(toks);
  Py_XDECREF(reason);
  Py_XDECREF(lp);
  Py_XDECREF(meta);
  Py_XDECREF(plp);
  Py_XDECREF(pmeta);
  Py_XDECREF(events);
  return rc;
}

/* relay(outputs: list, routes: dict[str, int], finish_codes: tuple[int, ...], logprobs_meta[, prompt_hook[, noted: list]])
 *   -> list[str]
 * One engine step for every request at once: for each output in outputs (objects with the
 * attributes of vLLM's EngineCoreOutput: request_id, new_token_ids, finish_reason (None or an
 * int), new_logprobs), routes[request_id] is the key go_id << 16 | choice index (outputs of
 * request ids not in routes are skipped), finish_codes[finish_reason] the SHIM_FINISH_* code
 * (SHIM_FINISH_ERROR for a reason outside it), and logprobs_meta (None: logprobs are never read)
 * is called with the output, when its new_logprobs is not None, for the record's meta bytes.
 * Frames one delta record per output with no text (Go detokenizes) and returns the request ids
 * that finished. prompt_hook (absent or None: never read) is called as prompt_hook(output, key)
 * when an output's new_prompt_logprobs_tensors is not None; bytes it returns go to Go as an
 * EV_PROMPT_LOGPROBS record of request key >> 16, before the output's delta (None: nothing).
 * With noted (a list), the outputs whose events attribute is not None or that carry a finish
 * reason are appended to it, routed or not (the engine's per-request timings).
 * No Python code runs per output except logprobs_meta. */
static PyObject *py_relay(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  (void)self;
  if (nargs < 4 || nargs > 6) {
    PyErr_SetString(PyExc_TypeError, "relay(outputs, routes, finish_codes, logprobs_meta[, prompt_hook[, noted]]) takes 4 to 6 arguments");
    return NULL;
  }
  PyObject *outputs = args[0], *routes = args[1], *finish_codes = args[2], *logprobs_meta = args[3];
  PyObject *prompt_hook = nargs >= 5 ? args[4] : Py_None;
  PyObject *noted = nargs == 6 && args[5] != Py_None ? args[5] : NULL;
  if (!PyList_Check(outputs) || !PyDict_Check(routes) || !PyTuple_Check(finish_codes) ||
      (noted != NULL && !PyList_Check(noted))) {
    PyErr_SetString(PyExc_TypeError, "relay: outputs must be a list, routes a dict, finish_codes a tuple, noted a list");
    return NULL;
  }
  PyObject *finished = PyList_New(0);
  if (finished == NULL) return NULL;
  /* Each iteration re-reads the size: logprobs_meta is Python code and could shorten the list. */
  for (Py_ssize_t i = 0; i < PyList_Size(outputs); i++) {
    PyObject *out = PyList_GetItem(outputs, i); /* borrowed */
    if (out == NULL) break;
    Py_INCREF(out);
    int rc = relay_one(out, routes, finish_codes, logprobs_meta, prompt_hook, finished, noted);
    Py_DECREF(out);
    if (rc < 0) {
      Py_DECREF(finished);
      return NULL;
    }
  }
  return finished;
}

/* emit_event(req_id: int, kind: int, payload: bytes) -> None: ready, end, error and log records. */
static PyObject *py_emit_event(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  (void)self;
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "emit_event(req_id, kind, payload) takes 3 arguments");
    return NULL;
  }
  long long req_id = PyLong_AsLongLong(args[0]);
  if (req_id == -1 && PyErr_Occurred()) return NULL;
  long kind = PyLong_AsLong(args[1]);
  if (kind == -1 && PyErr_Occurred()) return NULL;
  char *payload = NULL;
  Py_ssize_t plen = 0;
  if (PyBytes_AsStringAndSize(args[2], &payload, &plen) < 0) return NULL;
  uint8_t hdr[HDR];
  make_header(hdr, (int)kind, 0, 0, 0, req_id, 0, (size_t)plen);
  /* Control events are rare and must not wait for a flush: the staged tokens go first. */
  if (stage_flush() < 0 || outbox_put(hdr, HDR, NULL, 0, NULL, 0, payload, (size_t)plen) < 0) return NULL;
  Py_RETURN_NONE;
}

/* emit_null(...) -> None: accepts emit's arguments and does nothing. It ships only as the
 * baseline of BenchmarkShimPath (engine/bench_test.go: the same Python loop without the shim's
 * work); the bridge never calls it. */
static PyObject *py_emit_null(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  (void)self;
  (void)args;
  (void)nargs;
  Py_RETURN_NONE;
}

/* flush() -> None: move the staged token records into the outbox (the hook schedules this). */
static PyObject *py_flush(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  stage.scheduled = 0;
  if (stage_flush() < 0) return NULL;
  Py_RETURN_NONE;
}

/* set_flush_hook(hook: Callable[[], object] | None) -> None: stage the calling thread's token
 * records, calling hook once per batch (on the first record after a flush) to arrange for
 * flush() to run soon, e.g. functools.partial(loop.call_soon, flush). None stops staging after
 * flushing what is staged. */
static PyObject *py_set_flush_hook(PyObject *self, PyObject *hook) {
  (void)self;
  if (hook != Py_None && !PyCallable_Check(hook)) {
    PyErr_SetString(PyExc_TypeError, "set_flush_hook: hook must be callable or None");
    return NULL;
  }
  if (stage_flush() < 0) return NULL;
  Py_CLEAR(stage.hook);
  stage.scheduled = 0;
  if (hook == Py_None) Py_RETURN_NONE;
  if (stage.buf == NULL) {
    /* Large enough to batch a step of many requests, small enough to stay in cache, and never
     * more than a quarter of an outbox buffer so that a flush always fits. */
    stage.limit = outbox.cap / 4 < (64u << 10) ? outbox.cap / 4 : (64u << 10);
    stage.buf = malloc(stage.limit);
    if (stage.buf == NULL) return PyErr_NoMemory();
  }
  Py_INCREF(hook);
  stage.hook = hook;
  stage.owner = pthread_self();
  Py_RETURN_NONE;
}

/* inbox_fd() -> int: the eventfd that becomes readable when commands are waiting. */
static PyObject *py_inbox_fd(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  return PyLong_FromLong(inbox_fd);
}

/* Put the commands from c on back at the front of the inbox, in order, and make the eventfd
 * readable again so that the loop calls take() once more. */
static void inbox_requeue(cmd_t *c) {
  cmd_t *last = c;
  while (last->next != NULL) last = last->next;
  pthread_mutex_lock(&inbox_mu);
  last->next = inbox_head;
  inbox_head = c;
  if (inbox_tail == NULL) inbox_tail = last;
  uint64_t one = 1;
  ssize_t w;
  do {
    w = write(inbox_fd, &one, sizeof one);
  } while (w < 0 && errno == EINTR);
  pthread_mutex_unlock(&inbox_mu);
}

/* take() -> list[tuple[int, int, bytes]]: every waiting (kind, req_id, data) command, in order.
 * Out of memory part way, it returns the commands taken so far and leaves the rest queued for the
 * next take() (MemoryError when it could take none): a submit is never lost, which would leave
 * its request waiting for an END that never comes. */
static PyObject *py_take(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  uint64_t drain;
  while (read(inbox_fd, &drain, sizeof drain) < 0 && errno == EINTR) {
  }
  pthread_mutex_lock(&inbox_mu);
  cmd_t *c = inbox_head;
  inbox_head = inbox_tail = NULL;
  pthread_mutex_unlock(&inbox_mu);
  PyObject *out = PyList_New(0);
  while (c != NULL && out != NULL) {
    PyObject *item = Py_BuildValue("(iLy#)", (int)c->kind, (long long)c->req_id, c->data, (Py_ssize_t)c->len);
    if (item == NULL || PyList_Append(out, item) < 0) {
      Py_XDECREF(item);
      break;
    }
    Py_DECREF(item);
    cmd_t *next = c->next;
    free(c);
    c = next;
  }
  if (c != NULL) {
    inbox_requeue(c);
    if (out != NULL && PyList_Size(out) > 0) {
      PyErr_Clear(); /* deliver what was taken; the rest comes with the next take() */
    } else {
      if (!PyErr_Occurred()) PyErr_NoMemory();
      Py_CLEAR(out);
    }
  }
  return out;
}

static PyMethodDef shim_methods[] = {
    {"emit", (PyCFunction)(void (*)(void))py_emit, METH_FASTCALL, "emit(req_id, index, tokens, text, finish)"},
    {"encode", (PyCFunction)(void (*)(void))py_encode, METH_FASTCALL, "encode(text, add_special_tokens) -> list[int] | None"},
    {"relay", (PyCFunction)(void (*)(void))py_relay, METH_FASTCALL, "relay(outputs, routes, finish_codes, logprobs_meta[, prompt_hook[, noted]]) -> finished request ids"},
    {"emit_event", (PyCFunction)(void (*)(void))py_emit_event, METH_FASTCALL, "emit_event(req_id, kind, payload)"},
    {"emit_null", (PyCFunction)(void (*)(void))py_emit_null, METH_FASTCALL, "emit_null(...): does nothing; a benchmark baseline, not used by the bridge"},
    {"flush", py_flush, METH_NOARGS, "flush(): deliver the staged token records"},
    {"set_flush_hook", py_set_flush_hook, METH_O, "set_flush_hook(hook | None): stage this thread's emits"},
    {"inbox_fd", py_inbox_fd, METH_NOARGS, "inbox_fd() -> int"},
    {"take", py_take, METH_NOARGS, "take() -> list of (kind, req_id, data)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef shim_module = {
    PyModuleDef_HEAD_INIT, "_govllm_shim", "Events between the govllm bridge and Go.", -1, shim_methods,
    NULL, NULL, NULL, NULL,
};

/* ---------------------------------------------------------------- lifecycle */

static int initialized;
static int init_broken; /* shim_init failed after starting the interpreter */

/* A failure after Py_InitializeEx: the interpreter cannot be finalized and started again
 * (extension modules do not survive it), so it stays up but unusable, and later shim_init and
 * shim_run calls are refused. The GIL is released first: the calling thread returns to Go,
 * which ends it, and a GIL held by a thread that is gone would block every Python thread
 * forever. Returns -1. */
static int32_t init_failed_after_start(void) {
  initialized = 0;
  init_broken = 1;
  PyEval_SaveThread();
  return -1;
}

int32_t shim_init(const char *program_name, const char *python_home, int64_t queue_bytes) {
  if (initialized) {
    set_error("shim_init: the interpreter is already initialized in this process");
    return -1;
  }
  if (init_broken) {
    set_error("shim_init: an earlier shim_init failed after starting the interpreter: restart the process");
    return -1;
  }
  pthread_once(&readable_clock_once, readable_use_monotonic_clock);
  if (queue_bytes < (1 << 17)) queue_bytes = 1 << 17;
  if (queue_bytes > SHIM_MAX_QUEUE_BYTES) queue_bytes = SHIM_MAX_QUEUE_BYTES; /* u32 record lengths */
  outbox.cap = (size_t)queue_bytes / 2;
  outbox.bufs[0] = malloc(outbox.cap);
  outbox.bufs[1] = malloc(outbox.cap);
  if (outbox.bufs[0] == NULL || outbox.bufs[1] == NULL) {
    set_error("shim_init: out of memory for the event queue");
    return -1;
  }
  inbox_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (inbox_fd < 0) {
    set_error("shim_init: eventfd failed");
    return -1;
  }
  /* Py_SetProgramName/Py_SetPythonHome are deprecated since 3.11 but stay in the stable ABI; they
   * are what lets one shim binary serve 3.10 to 3.15 (PyConfig is not in the limited API). The
   * strings must outlive the interpreter, so they are never freed. */
  if (program_name && *program_name) {
    wchar_t *w = Py_DecodeLocale(program_name, NULL);
    if (w) Py_SetProgramName(w);
  }
  if (python_home && *python_home) {
    wchar_t *w = Py_DecodeLocale(python_home, NULL);
    if (w) Py_SetPythonHome(w);
  }
  Py_InitializeEx(0); /* 0: no Python signal handlers; Go owns SIGINT/SIGTERM. */
  if (!Py_IsInitialized()) {
    set_error("shim_init: Py_InitializeEx failed");
    return -1;
  }
  initialized = 1;
  int_zero = PyLong_FromLong(0); /* never released: lives as long as the interpreter */
  s_request_id = PyUnicode_InternFromString("request_id"); /* likewise */
  s_new_token_ids = PyUnicode_InternFromString("new_token_ids");
  s_finish_reason = PyUnicode_InternFromString("finish_reason");
  s_new_logprobs = PyUnicode_InternFromString("new_logprobs");
  s_new_prompt_logprobs = PyUnicode_InternFromString("new_prompt_logprobs_tensors");
  s_events = PyUnicode_InternFromString("events");
  if (!int_zero || !s_request_id || !s_new_token_ids || !s_finish_reason || !s_new_logprobs || !s_new_prompt_logprobs || !s_events) {
    set_error_from_python("shim_init: interning names");
    return init_failed_after_start();
  }
  PyObject *mod = PyModule_Create(&shim_module);
  if (mod == NULL) {
    set_error_from_python("shim_init: creating _govllm_shim");
    return init_failed_after_start();
  }
  PyObject *modules = PyImport_GetModuleDict();
  int rc = PyDict_SetItemString(modules, "_govllm_shim", mod);
  Py_DECREF(mod);
  if (rc < 0) {
    set_error_from_python("shim_init: registering _govllm_shim");
    return init_failed_after_start();
  }
  return 0;
}

static PyThreadState *main_ts; /* the main thread's state between runs */

void shim_open(void) {
  pthread_mutex_lock(&inbox_mu);
  while (inbox_head != NULL) {
    cmd_t *next = inbox_head->next;
    free(inbox_head);
    inbox_head = next;
  }
  inbox_tail = NULL;
  inbox_closed = 0;
  pthread_mutex_unlock(&inbox_mu);
  pthread_mutex_lock(&outbox.mu);
  outbox.closed = 0;
  outbox.lens[0] = outbox.lens[1] = 0;
  pthread_mutex_unlock(&outbox.mu);
}

int32_t shim_run(const char *code) {
  int32_t rc = 0;
  if (!initialized) {
    set_error("shim_run: shim_init has not succeeded");
    return -1;
  }
  if (main_ts != NULL) {
    PyEval_RestoreThread(main_ts); /* a later run: take the GIL back */
    main_ts = NULL;
  }
  PyObject *compiled = Py_CompileString(code, "<govllm-boot>", Py_file_input);
  if (compiled == NULL) {
    set_error_from_python("shim_run: compile");
    rc = -1;
  } else {
    PyObject *globals = PyDict_New();
    PyObject *builtins = PyImport_ImportModule("builtins");
    PyObject *name = PyUnicode_FromString("__govllm__"); /* PyDict_SetItemString does not steal it */
    if (globals == NULL || builtins == NULL || name == NULL ||
        PyDict_SetItemString(globals, "__builtins__", builtins) < 0 || PyDict_SetItemString(globals, "__name__", name) < 0) {
      set_error_from_python("shim_run: boot globals");
      rc = -1;
    } else {
      PyObject *res = PyEval_EvalCode(compiled, globals, globals);
      if (res == NULL) {
        set_error_from_python("python");
        rc = -1;
      }
      Py_XDECREF(res);
    }
    Py_XDECREF(name);
    Py_XDECREF(builtins);
    Py_XDECREF(globals);
    Py_DECREF(compiled);
  }
  /* Whatever the bridge staged last is delivered before the queue closes. */
  if (stage_flush() < 0) PyErr_Clear();
  Py_CLEAR(stage.hook);
  stage.scheduled = 0;
  pthread_mutex_lock(&inbox_mu);
  inbox_closed = 1;
  pthread_mutex_unlock(&inbox_mu);
  outbox_close();
  /* Never Py_Finalize (extension modules do not survive it): release the GIL so Python threads
   * still running can go on, until a later shim_run takes it back. */
  main_ts = PyEval_SaveThread();
  return rc;
}
