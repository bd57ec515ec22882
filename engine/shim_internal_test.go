package engine

import (
	"math"
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
