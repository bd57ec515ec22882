package engine

import (
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/require"
)

// TestLastErrorConcurrent has 64 goroutines set the shim's error and read it back at once, as
// many requests failing together when an engine dies do. shim_init on the running interpreter
// only records "already initialized", so it is a safe way to call set_error from Go. A reader
// that the writers free the text under gets garbage (or, with an ASan-built shim, a
// use-after-free report).
func TestLastErrorConcurrent(t *testing.T) {
	interpMu.Lock()
	it := interp
	interpMu.Unlock()
	if it == nil {
		t.Skip("no interpreter in this process")
	}
	const want = "shim_init: the interpreter is already initialized in this process"
	const goroutines, rounds = 64, 500
	var wg sync.WaitGroup
	bad := make(chan string, goroutines)
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < rounds; i++ {
				if rc := it.api.init("", "", 0); rc != -1 {
					bad <- "shim_init succeeded on a running interpreter"
					return
				}
				if msg := it.api.lastError(); msg != want {
					bad <- msg
					return
				}
			}
		}()
	}
	wg.Wait()
	close(bad)
	for msg := range bad {
		require.Equal(t, want, msg)
	}
}

// TestLastErrorLongText: a text longer than the first buffer (a Python traceback) is asked for
// again with room for it, also when it changes in between.
func TestLastErrorLongText(t *testing.T) {
	texts := []string{strings.Repeat("a", 5000), strings.Repeat("b", 20000)}
	calls := 0
	api := &shimAPI{lastErrorInto: func(buf *byte, n int64) int64 {
		msg := texts[min(calls, len(texts)-1)]
		calls++
		dst := unsafe.Slice(buf, n)
		c := copy(dst[:n-1], msg)
		dst[c] = 0
		return int64(len(msg))
	}}
	require.Equal(t, texts[1], api.lastError())
	require.Equal(t, 3, calls, "1 KiB, then 5001 bytes (too small by then), then 20001")
}

// TestCoalesceMicros: PollCoalesce reaches shim_poll as int32 microseconds without wrapping
// (the shim splits a second or more into seconds and nanoseconds for nanosleep).
func TestCoalesceMicros(t *testing.T) {
	for _, tt := range []struct {
		d    time.Duration
		want int32
	}{
		{-time.Second, 0}, {0, 0}, {999 * time.Nanosecond, 0}, {100 * time.Microsecond, 100},
		{1500 * time.Millisecond, 1_500_000}, {time.Hour, math.MaxInt32}, {math.MaxInt64, math.MaxInt32},
	} {
		require.Equal(t, tt.want, coalesceMicros(tt.d), "%v", tt.d)
	}
}

// TestOpenShimMissingSymbol: a shim without one of the entry points (a stale file in the cache)
// is refused with ErrShim naming the symbol, where purego.RegisterLibFunc would panic.
func TestOpenShimMissingSymbol(t *testing.T) {
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		t.Skip("no gcc to build a stale shim with")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "stale.c")
	// Every entry point but shim_poll, as an older shim might lack a newer one.
	require.NoError(t, os.WriteFile(src, []byte(`#include <stdint.h>
int32_t shim_init(const char *a, const char *b, int64_t q) { return -1; }
void shim_open(void) {}
int32_t shim_run(const char *code) { return -1; }
int32_t shim_send(int32_t kind, int64_t id, const char *data, int64_t len) { return -1; }
int64_t shim_last_error(char *buf, int64_t cap) { return 0; }
`), 0o644))
	so := filepath.Join(dir, "libstale_shim.so")
	out, err := exec.Command(gcc, "-shared", "-fPIC", "-o", so, src).CombinedOutput()
	require.NoError(t, err, "%s", out)

	var api *shimAPI
	require.NotPanics(t, func() { api, err = openShim(so) })
	require.Nil(t, api)
	require.ErrorIs(t, err, ErrShim)
	require.ErrorContains(t, err, "shim_poll")
	require.ErrorContains(t, err, so)

	_, err = openShim(filepath.Join(dir, "missing.so"))
	require.ErrorIs(t, err, ErrShim)
}
