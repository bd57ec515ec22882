/* govllm C shim: the C ABI that Go loads with purego. See shim.c for the contracts. */
#ifndef GOVLLM_SHIM_H
#define GOVLLM_SHIM_H

#include <stdint.h>

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

/* shim_send queues a command for the bridge (1 submit, 2 abort, 3 shutdown) without the GIL. */
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

#endif
