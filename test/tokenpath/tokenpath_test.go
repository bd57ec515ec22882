// Package tokenpath benchmarks the path of a token from an engine step to an SSE client, without a
// model: the steps backend (test/backends/steps.py) makes one engine step per event-loop
// iteration, giving every running request its next token id, and hands the step to Go with one
// relay call, as the vLLM backend does with vLLM's EngineCoreOutputs.
package tokenpath_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/engine"
	"github.com/govllm/govllm/server"
)

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(filepath.Dir(file)))
}

func openSteps(tb testing.TB, detokenize bool, stepMS int) *engine.Engine {
	tb.Helper()
	root := repoRoot()
	tok := ""
	if detokenize {
		tok = filepath.Join(root, "models", "SmolLM2-135M-Instruct")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e, err := engine.Open(ctx, engine.Config{
		Model:      filepath.Join(root, "test", "testdata", "model"),
		Engine:     "steps:create",
		PythonPath: []string{filepath.Join(root, "test", "backends")},
		Extra:      map[string]any{"tokenizer": tok, "step_ms": stepMS},
		Logger:     slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	require.NoError(tb, err)
	return e
}

// cpuTime is this process's user+system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

const (
	streams   = 256
	perStream = 256 // tokens per request
)

// BenchmarkTokenPath reports, for steps of 256 requests, wall and CPU nanoseconds per token
// and tokens per CPU-second (≥ 200k is the target) for three paths:
//
//	engine        relay → shim → poller → Stream → a Go reader (records' text taken as is)
//	engine+detok  the same with Go detokenizing every token (detok.Output, no stop strings)
//	http+detok    the same, then the server: chat-completion SSE chunks (JSON) written to 256
//	              HTTP connections, read by 256 clients in this process (their cost included)
//	paced/...     the same with a step every 2 ms (128k tokens/s): readers keep up, so every
//	              token is its own SSE chunk and write, as behind a real engine
//
// At full speed the readers fall behind and a choice's unread deltas merge, so the HTTP rows
// also report SSE chunks per token. The differences between rows are the detokenizer's and the
// HTTP layer's cost.
func BenchmarkTokenPath(b *testing.B) {
	for _, path := range []string{"engine", "engine+detok", "http+detok", "paced/engine+detok", "paced/http+detok"} {
		b.Run(path, func(b *testing.B) {
			stepMS := 0
			if strings.HasPrefix(path, "paced/") {
				stepMS = 2
			}
			e := openSteps(b, path != "engine", stepMS)
			defer e.Close()
			run := readEngine
			var chunks int
			if strings.HasSuffix(path, "http+detok") {
				srv := httptest.NewServer(server.New(server.Config{Backend: e,
					Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}))
				defer srv.Close()
				client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: streams}}
				run = func(tb testing.TB, _ *engine.Engine) int { return readHTTP(tb, client, srv.URL, &chunks) }
			}
			run(b, e) // warm up: connections, the interpreter's caches
			chunks = 0
			b.ResetTimer()
			cpu0, tokens := cpuTime(), 0
			for i := 0; i < b.N; i++ {
				tokens += run(b, e)
			}
			cpu := cpuTime() - cpu0
			b.StopTimer()
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(tokens), "wall-ns/token")
			b.ReportMetric(float64(cpu.Nanoseconds())/float64(tokens), "cpu-ns/token")
			b.ReportMetric(float64(tokens)/cpu.Seconds(), "tokens/cpu-s")
			if chunks > 0 {
				// Below 1 when readers fall behind and deltas merge (as vLLM's collector merges).
				b.ReportMetric(float64(chunks)/float64(tokens), "chunks/token")
			}
			b.ReportMetric(0, "ns/op")
		})
	}
}

// readEngine runs `streams` requests of perStream tokens, read straight from their Streams.
func readEngine(tb testing.TB, e *engine.Engine) int {
	var wg sync.WaitGroup
	counts := make([]int, streams)
	errs := make([]error, streams)
	for i := 0; i < streams; i++ {
		st, err := e.Generate(context.Background(), engine.Request{Prompt: "x",
			Sampling: engine.SamplingParams{MaxTokens: perStream}})
		require.NoError(tb, err)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer st.Close()
			for {
				d, err := st.Recv()
				if err != nil {
					if !errors.Is(err, io.EOF) {
						errs[i] = err
					}
					return
				}
				counts[i] += len(d.TokenIDs)
			}
		}()
	}
	wg.Wait()
	return checkCounts(tb, counts, errs)
}

func checkCounts(tb testing.TB, counts []int, errs []error) int {
	total := 0
	for i, n := range counts {
		require.NoError(tb, errs[i])
		require.Equal(tb, perStream, n, "stream %d", i)
		total += n
	}
	return total
}

// readHTTP runs `streams` streaming chat completions and counts the content chunks.
func readHTTP(tb testing.TB, client *http.Client, url string, chunks *int) int {
	body, err := json.Marshal(map[string]any{"model": "model", "stream": true, "max_tokens": perStream,
		"stream_options": map[string]bool{"include_usage": true},
		"messages":       []map[string]string{{"role": "user", "content": "x"}}})
	require.NoError(tb, err)
	var wg sync.WaitGroup
	counts := make([]int, streams)
	seen := make([]int, streams)
	errs := make([]error, streams)
	for i := 0; i < streams; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := client.Post(url+"/v1/chat/completions", "application/json", bytes.NewReader(body))
			if err != nil {
				errs[i] = err
				return
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				b, _ := io.ReadAll(resp.Body)
				errs[i] = fmt.Errorf("HTTP %d: %s", resp.StatusCode, b)
				return
			}
			sc := bufio.NewScanner(resp.Body)
			for sc.Scan() {
				line := sc.Bytes()
				if bytes.HasPrefix(line, []byte(`data: {`)) {
					seen[i]++
				}
				// Merged deltas carry several tokens a chunk: tokens are the usage chunk's count.
				if bytes.HasPrefix(line, []byte("data: {")) && bytes.Contains(line, []byte(`"usage":{`)) {
					var chunk struct {
						Usage struct {
							CompletionTokens int `json:"completion_tokens"`
						} `json:"usage"`
					}
					if json.Unmarshal(line[len("data: "):], &chunk) == nil {
						counts[i] = chunk.Usage.CompletionTokens
					}
				}
			}
			errs[i] = sc.Err()
		}()
	}
	wg.Wait()
	for _, n := range seen {
		*chunks += n
	}
	return checkCounts(tb, counts, errs)
}
