/* govllm C shim: the C ABI that Go loads with purego. See shim.c for the contracts. */
#ifndef GOVLLM_SHIM_H
#define GOVLLM_SHIM_H

#include <stdint.h>

/* shim_init initializes the interpreter on the calling thread, which becomes Python's main
 * thread. queue_bytes sizes the Python->Go event ring. Returns 0, or -1 (see shim_last_error). */
int32_t shim_init(const char *program_name, const char *python_home, int64_t queue_bytes);

/* shim_run executes the boot code (which runs the bridge's loop) on the main thread and returns
 * when it ends: 0 on a clean exit, -1 on an exception. Afterwards the queues are closed; a
 * later shim_run (on the same thread) reopens them for the next engine. */
int32_t shim_run(const char *code);

/* shim_send queues a command for the bridge (1 submit, 2 abort, 3 shutdown) without the GIL. */
int32_t shim_send(int32_t kind, int64_t req_id, const char *data, int64_t len);

/* shim_poll copies whole event records into dst, waiting up to timeout_ms (-1: forever) for the
 * first. Returns the bytes copied; 0 on timeout; -1 when closed and drained; below -1, -(n+1)
 * where n is the size of a record that does not fit in cap. */
int64_t shim_poll(uint8_t *dst, int64_t cap, int32_t timeout_ms);

/* shim_last_error returns the last error text (Python exceptions include their traceback). */
const char *shim_last_error(void);

#endif
