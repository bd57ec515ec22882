package engine_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/govllm/govllm/engine"
	"github.com/govllm/govllm/llm"
)

// These tests drive the real shim, interpreter and bridge with the scripted test backend
// (test/backends/scripted.py), which fails, hangs and floods on cue. The real backends are
// tested end to end in test/.

var shared *engine.Engine

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(file))
}

func scriptedConfig() engine.Config {
	root := repoRoot()
	return engine.Config{
		Model:      filepath.Join(root, "test", "testdata", "model"),
		Engine:     "scripted:create",
		PythonPath: []string{filepath.Join(root, "test", "backends")},
		// Small enough for TestSlowConsumerIsCutOff to reach quickly, above BenchmarkShimPath's
		// 200k tokens a stream.
		MaxPendingTokens: 1 << 18,
	}
}

func TestMain(m *testing.M) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	e, err := engine.Open(ctx, scriptedConfig())
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "engine tests: open:", err)
		os.Exit(1)
	}
	shared = e
	code := m.Run()
	if shared != nil {
		shared.Close()
	}
	if code == 0 {
		// The interpreter's main thread and Python's own threads outlive engines by design.
		if err := goleak.Find(goleak.IgnoreTopFunction("github.com/govllm/govllm/engine.(*interpreter).mainThread")); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

func chat(content string, maxTokens int) engine.Request {
	return engine.Request{Messages: []engine.Message{{Role: "user", Content: content}}, Sampling: engine.SamplingParams{MaxTokens: maxTokens}}
}

// collect reads a stream to its end.
func collect(t testing.TB, s llm.TokenStream) (text string, deltas []engine.Delta, err error) {
	t.Helper()
	var b strings.Builder
	for {
		d, err := s.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = nil
			}
			return b.String(), deltas, err
		}
		deltas = append(deltas, d)
		b.WriteString(d.Text)
	}
}

func stats(t *testing.T, e *engine.Engine) (aborts, running int) {
	t.Helper()
	s, err := e.Generate(context.Background(), chat("stats", 0))
	require.NoError(t, err)
	text, _, err := collect(t, s)
	require.NoError(t, err)
	var v struct{ Aborts, Running int }
	require.NoError(t, json.Unmarshal([]byte(text), &v))
	return v.Aborts, v.Running
}

func TestSubmitStreamFinish(t *testing.T) {
	tests := []struct {
		name   string
		req    engine.Request
		text   string
		deltas int
		finish string
		usage  engine.Usage
	}{
		{"echo chat", chat("echo:hello", 0), "hello", 5, "stop", engine.Usage{PromptTokens: 10, CompletionTokens: 5}},
		{"max_tokens cuts", chat("echo:hello", 3), "hel", 3, "length", engine.Usage{PromptTokens: 10, CompletionTokens: 3}},
		{"completion prompt", engine.Request{Prompt: "count:3"}, " 0 1 2", 3, "stop", engine.Usage{PromptTokens: 7, CompletionTokens: 3}},
		{"token prompt", engine.Request{PromptTokenIDs: []int32{'c', 'o', 'u', 'n', 't', ':', '2'}}, " 0 1", 2, "stop", engine.Usage{PromptTokens: 7, CompletionTokens: 2}},
		{"unicode", chat("echo:héllo, 世界 🎉", 0), "héllo, 世界 🎉", 11, "stop", engine.Usage{PromptTokens: 24, CompletionTokens: 11}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := shared.Generate(context.Background(), tt.req)
			require.NoError(t, err)
			text, deltas, err := collect(t, s)
			require.NoError(t, err)
			require.Equal(t, tt.text, text)
			// A reader that lags gets merged deltas; the tokens are all there either way.
			tokens := 0
			for _, d := range deltas {
				tokens += len(d.TokenIDs)
			}
			require.Equal(t, tt.deltas, tokens)
			require.Equal(t, tt.finish, deltas[len(deltas)-1].FinishReason)
			for _, d := range deltas[:len(deltas)-1] {
				require.Empty(t, d.FinishReason)
			}
			require.Equal(t, tt.usage, s.Usage())
			// After the end, Recv keeps answering EOF.
			_, err = s.Recv()
			require.ErrorIs(t, err, io.EOF)
		})
	}
}

func TestDeltasArriveAsProduced(t *testing.T) {
	// The shim stages token records and hands them to Go once per loop iteration: a backend
	// that pauses between tokens must still deliver each one at once, not at the end.
	const pause = 300 * time.Millisecond
	start := time.Now()
	s, err := shared.Generate(context.Background(), chat("slow:4:300", 0))
	require.NoError(t, err)
	defer s.Close()
	var arrivals []time.Duration
	for {
		d, err := s.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		if len(d.TokenIDs) > 0 {
			arrivals = append(arrivals, time.Since(start))
		}
	}
	require.Len(t, arrivals, 4, "one delta per token: none waited for the next")
	// Delivered together, two deltas would arrive microseconds apart; a third of the
	// pause leaves room for a loaded CI machine delaying one delivery.
	for i := 1; i < len(arrivals); i++ {
		require.Greater(t, arrivals[i]-arrivals[i-1], pause/3, "delta %d arrived with the next", i)
	}
}

func TestTokenContainers(t *testing.T) {
	// The shim converts exact ints in place and anything int-like apart; one delta may be
	// larger than the staging buffer (64 KiB) and then goes to Go directly.
	for _, tt := range []struct {
		kind string
		n    int
	}{{"list", 1}, {"list", 100}, {"tuple", 3}, {"intlike", 5}, {"intlike", 100}, {"list", 20000}, {"tuple", 20000}} {
		t.Run(fmt.Sprintf("%s/%d", tt.kind, tt.n), func(t *testing.T) {
			s, err := shared.Generate(context.Background(), engine.Request{Prompt: fmt.Sprintf("tokens:%s:%d", tt.kind, tt.n)})
			require.NoError(t, err)
			text, deltas, err := collect(t, s)
			require.NoError(t, err)
			var ids []int32
			for _, d := range deltas {
				ids = append(ids, d.TokenIDs...)
			}
			require.Len(t, ids, tt.n)
			for i, id := range ids {
				require.EqualValues(t, i, id)
			}
			require.Equal(t, strings.Repeat("t", tt.n), text)
		})
	}
	s, err := shared.Generate(context.Background(), engine.Request{Prompt: "tokens:str:2"})
	require.NoError(t, err)
	_, _, err = collect(t, s)
	var re *engine.RequestError
	require.ErrorAs(t, err, &re)
	require.Equal(t, 500, re.Status, "a backend that emits a non-int token has a bug, not the client: %s", re.Message)
	require.Contains(t, re.Message, "TypeError")
	require.NoError(t, shared.Health())
}

func TestRequestErrors(t *testing.T) {
	tests := []struct {
		name   string
		req    engine.Request
		status int
		msg    string
	}{
		{"python exception", chat("raise:boom", 0), 500, "RuntimeError: boom"},
		{"backend refuses", chat("badrequest:too long", 0), 400, "too long"},
		{"bad sampling", engine.Request{Prompt: "count:1", Sampling: engine.SamplingParams{TopP: ptr(1.5)}}, 400, "top_p"},
		{"no prompt", engine.Request{}, 400, "exactly one of"},
		{"two prompts", engine.Request{Prompt: "a", PromptTokenIDs: []int32{1}}, 400, "exactly one of"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := shared.Generate(context.Background(), tt.req)
			if err == nil {
				_, _, err = collect(t, s)
			}
			var re *engine.RequestError
			require.ErrorAs(t, err, &re)
			require.Equal(t, tt.status, re.Status)
			require.Contains(t, re.Message, tt.msg)
		})
	}
	require.NoError(t, shared.Health(), "request errors must not hurt the engine")
}

func ptr[T any](v T) *T { return &v }

func TestExceptionFailsOnlyThatRequest(t *testing.T) {
	good, err := shared.Generate(context.Background(), chat("slow:20:2", 0))
	require.NoError(t, err)
	bad, err := shared.Generate(context.Background(), chat("raise:only me", 0))
	require.NoError(t, err)
	_, _, err = collect(t, bad)
	var re *engine.RequestError
	require.ErrorAs(t, err, &re)
	require.Equal(t, 500, re.Status)
	text, _, err := collect(t, good)
	require.NoError(t, err)
	require.Equal(t, " 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19", text)
}

func TestAbortOnContextCancel(t *testing.T) {
	before, _ := stats(t, shared)
	ctx, cancel := context.WithCancel(context.Background())
	s, err := shared.Generate(ctx, chat("hang", 0))
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() {
		_, err := s.Recv()
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		require.ErrorIs(t, err, context.Canceled)
	case <-time.After(5 * time.Second):
		t.Fatal("Recv did not return after cancel")
	}
	require.Eventually(t, func() bool {
		aborts, running := stats(t, shared)
		return aborts == before+1 && running == 0 && shared.Running() == 0
	}, 5*time.Second, 20*time.Millisecond, "the backend must see the abort")
	st, err := shared.Stats(context.Background())
	require.NoError(t, err)
	require.Equal(t, engine.Stats{BackendRunning: 0, BridgeRequests: 0}, st)
}

func TestStreamCloseAborts(t *testing.T) {
	before, _ := stats(t, shared)
	s, err := shared.Generate(context.Background(), chat("hang", 0))
	require.NoError(t, err)
	require.Eventually(t, func() bool { _, running := stats(t, shared); return running == 1 }, 5*time.Second, 10*time.Millisecond)
	s.Close()
	s.Close() // idempotent
	_, err = s.Recv()
	require.ErrorIs(t, err, engine.ErrClosed)
	require.Eventually(t, func() bool {
		aborts, running := stats(t, shared)
		return aborts == before+1 && running == 0 && shared.Running() == 0
	}, 5*time.Second, 20*time.Millisecond)
}

func TestAbortKeepsStream(t *testing.T) {
	// Abort stops the request in the backend but the stream goes on to its end: what was
	// generated before, then io.EOF, with the usage counted.
	before, _ := stats(t, shared)
	s, err := shared.Start(context.Background(), chat("slow:1000:5", 0))
	require.NoError(t, err)
	defer s.Close()
	d, err := s.Recv()
	require.NoError(t, err)
	require.Equal(t, " 0", d.Text)
	s.Abort()
	n := 1
	for {
		d, err := s.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		require.Empty(t, d.FinishReason)
		n += len(d.TokenIDs)
	}
	require.Less(t, n, 1000)
	require.Equal(t, engine.Usage{PromptTokens: len("slow:1000:5"), CompletionTokens: n}, s.Usage())
	s.Abort() // after the end: nothing to do
	require.Eventually(t, func() bool {
		aborts, running := stats(t, shared)
		return aborts == before+1 && running == 0 && shared.Running() == 0
	}, 5*time.Second, 20*time.Millisecond)
}

func TestCloseBeforeStartIsReaped(t *testing.T) {
	// Closed before the bridge ever ran it: the request still ends, and nothing lingers.
	for i := 0; i < 20; i++ {
		s, err := shared.Generate(context.Background(), chat("hang", 0))
		require.NoError(t, err)
		s.Close()
	}
	require.Eventually(t, func() bool { return shared.Running() == 0 }, 5*time.Second, 10*time.Millisecond)
}

func TestConcurrentStreamsIndependent(t *testing.T) {
	const streams = 64
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for i := 0; i < streams; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			n := 5 + i%17
			s, err := shared.Generate(context.Background(), chat(fmt.Sprintf("slow:%d:1", n), 0))
			if err != nil {
				errs <- err
				return
			}
			text, _, err := collect(t, s)
			var want strings.Builder
			for k := 0; k < n; k++ {
				fmt.Fprintf(&want, " %d", k)
			}
			if err == nil && text != want.String() {
				err = fmt.Errorf("stream %d: got %q, want %q", i, text, want.String())
			}
			if err != nil {
				errs <- err
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
}

func TestSlowConsumerIsCutOff(t *testing.T) {
	// A reader that never reads must not stall the poller: its request is aborted and others
	// keep flowing.
	stalled, err := shared.Generate(context.Background(), chat("flood:600000", 0))
	require.NoError(t, err)
	other, err := shared.Generate(context.Background(), chat("count:50", 0))
	require.NoError(t, err)
	text, _, err := collect(t, other)
	require.NoError(t, err)
	require.True(t, strings.HasSuffix(text, " 49"))
	require.Eventually(t, func() bool { return shared.Running() == 0 }, 5*time.Second, 10*time.Millisecond)
	_, _, err = collect(t, stalled)
	require.ErrorIs(t, err, engine.ErrSlowConsumer)
}

func TestGenerateAfterCancelledContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := shared.Generate(ctx, chat("count:1", 0))
	require.ErrorIs(t, err, context.Canceled)
}
