/* govllm C shim: the C ABI that Go loads with purego. See shim.c for the contracts. */
#ifndef GOVLLM_SHIM_H
#define GOVLLM_SHIM_H

#include <stdint.h>

/* The numbers the three languages share. Go has them in engine/shim.go (cmd*) and
 * engine/event.go (ev*, finishReasons), the bridge in engine/python/govllm/bridge.py (CMD_*,
 * EV_*, FINISH_CODES); engine/codes_test.go checks that all three agree. */

/* Commands from Go to the bridge: shim_send's kind. */
enum shim_cmd {
  SHIM_CMD_SUBMIT = 1,   /* data: the request as JSON */
  SHIM_CMD_ABORT = 2,    /* stop the request; its END follows */
  SHIM_CMD_SHUTDOWN = 3, /* end the bridge's loop */
  SHIM_CMD_STATS = 4,    /* answered with a SHIM_EV_STATS record of the same req_id */
  SHIM_CMD_STOP_CHOICE = 5, /* data: a choice index (decimal); Go matched a stop string: stop that choice */
  SHIM_CMD_PARSE = 6,    /* data: JSON {index, text, token_ids, finished, whole}: parse a choice's output */
  SHIM_CMD_TOKENIZE = 7, /* data: JSON tokenize/detokenize request; answered with SHIM_EV_TOKENIZED or SHIM_EV_ERROR */
  SHIM_CMD_EMBED = 8,    /* data: JSON embedding request; answered with SHIM_EV_EMBEDDING or SHIM_EV_ERROR */
};

/* Records from the bridge to Go: the kind byte of a record header. */
enum shim_ev {
  SHIM_EV_DELTA = 1, /* tokens (and, from backends without a Go tokenizer, text) of one choice (emit, relay) */
  SHIM_EV_END = 2,   /* the request finished */
  SHIM_EV_ERROR = 3, /* the request failed */
  SHIM_EV_READY = 4, /* the engine started */
  SHIM_EV_FATAL = 5, /* the engine died */
  SHIM_EV_LOG = 6,   /* a log line */
  SHIM_EV_STATS = 7, /* the answer to SHIM_CMD_STATS */
  SHIM_EV_PROMPT = 8, /* the request's prompt token ids (meta: little-endian int32s), before its deltas */
  SHIM_EV_PARSED = 9, /* the answer to SHIM_CMD_PARSE: meta JSON {index, content, reasoning, tool_calls, tools_called} */
  SHIM_EV_TOKENIZED = 10, /* the answer to SHIM_CMD_TOKENIZE: meta JSON */
  SHIM_EV_EMBEDDING = 11, /* the answer to SHIM_CMD_EMBED: meta JSON header + little-endian float32s */
  SHIM_EV_PROMPT_LOGPROBS = 12, /* a request's prompt logprobs (prompt_logprobs, echo with logprobs): meta JSON, before its deltas */
};

/* A delta's finish byte: why its choice ended, if it did (OpenAI's finish_reason). */
enum shim_finish {
  SHIM_FINISH_NONE = 0,
  SHIM_FINISH_STOP = 1,       /* EOS or a stop token id: the last token's text is not output */
  SHIM_FINISH_LENGTH = 2,     /* max_tokens or the context */
  SHIM_FINISH_ABORT = 3,
  SHIM_FINISH_ERROR = 4,      /* the engine failed the request (a 500) */
  SHIM_FINISH_REPETITION = 5, /* vLLM's repetition detection: "stop", the last token's text kept */
};

/* The most queue_bytes that shim_init takes (larger values are clamped): each of the two event
 * buffers then holds at most 2 GiB, so a record and each of its parts fit the u32 lengths of
 * the record format. engine/shim.go's maxQueueBytes is the same number. */
#define SHIM_MAX_QUEUE_BYTES ((int64_t)1 << 32)

/* shim_init initializes the interpreter on the calling thread, which becomes Python's main
 * thread. queue_bytes sizes the Python->Go event ring (two buffers of half of it, at least
 * 64 KiB and at most SHIM_MAX_QUEUE_BYTES / 2 each). Returns 0, or -1 (see shim_last_error). */
int32_t shim_init(const char *program_name, const char *python_home, int64_t queue_bytes);

/* shim_open (re)opens the queues for the next engine; call it before starting its poller and
 * its shim_run, after the previous engine's poller has seen the queue closed. */
void shim_open(void);

/* shim_run executes the boot code (which runs the bridge's loop) on the main thread and returns
 * when it ends: 0 on a clean exit, -1 on an exception. Afterwards the queues are closed until
 * the next shim_open. */
int32_t shim_run(const char *code);

/* shim_send queues a command (a SHIM_CMD_* kind) for the bridge without the GIL. */
int32_t shim_send(int32_t kind, int64_t req_id, const char *data, int64_t len);

/* shim_poll waits up to timeout_ms (-1: forever) for events and takes the whole batch; when it
 * had to wait, it lets a burst gather for coalesce_us first. Returns the batch's size in bytes
 * and stores where its records are in *batch (they stay there until the next shim_poll call);
 * 0 on timeout; -1 when closed and drained (*batch is then NULL). One poller at a time. */
int64_t shim_poll(int32_t timeout_ms, int32_t coalesce_us, uint8_t **batch);

/* shim_last_error copies the last error text (Python exceptions include their traceback) into
 * buf, truncated to cap-1 bytes and NUL-terminated (nothing is written when cap is 0), and
 * returns the text's full length: a result >= cap means it was cut short. Safe to call from any
 * thread, concurrently with errors being set. */
int64_t shim_last_error(char *buf, int64_t cap);

/* A prompt encoder: writes at most cap token ids of text[0:len] to out and returns how many there
 * are (more than cap: call again with room for them), or -1 when there is no encoder. */
typedef int64_t (*shim_encode_fn)(const char *text, int64_t len, int64_t add_special, int32_t *out, int64_t cap);

/* shim_set_encoder makes fn the encoder behind _govllm_shim.encode (NULL: none). It is called on
 * the bridge's thread with the GIL held, so it must never wait for Python. */
void shim_set_encoder(shim_encode_fn fn);

#endif
