package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

// tickStream yields a token every tick (n of them, or forever when n is 0) until the context it
// was started with ends.
type tickStream struct {
	ctx      context.Context
	tick     time.Duration
	n        int
	text     string
	i        int
	aborted  chan struct{}
	abortOne sync.Once
	*fakeStream
}

func newTickStream(ctx context.Context, tick time.Duration, n int, text string) *tickStream {
	ts := &tickStream{ctx: ctx, tick: tick, n: n, text: text, aborted: make(chan struct{})}
	ts.fakeStream = newFakeStream(ts.recv, llm.Usage{})
	return ts
}

func (ts *tickStream) recv() (llm.Delta, error) {
	if ts.n > 0 && ts.i >= ts.n {
		return llm.Delta{}, io.EOF
	}
	if ts.i > 0 || ts.tick > 0 {
		select {
		case <-time.After(ts.tick):
		case <-ts.ctx.Done():
			return llm.Delta{}, ts.ctx.Err()
		case <-ts.aborted:
			// As an engine stream after Abort: the end, with the usage counted.
			ts.usage = llm.Usage{PromptTokens: 3, CompletionTokens: ts.i}
			return llm.Delta{}, io.EOF
		case <-ts.closed:
			return llm.Delta{}, llm.ErrClosed
		}
	}
	ts.i++
	d := llm.Delta{TokenIDs: []int32{int32(ts.i)}, Text: ts.text}
	if ts.n > 0 && ts.i == ts.n {
		d.FinishReason = "length"
	}
	return d, nil
}

// abortableStream is a tickStream that can be aborted as an engine stream can (llm.Aborter).
type abortableStream struct{ *tickStream }

func (a abortableStream) Abort() { a.abortOne.Do(func() { close(a.aborted) }) }

// tickBackend starts a tickStream per request; abortable makes them abortable.
func tickBackend(tick time.Duration, n int, abortable bool) *fakeBackend {
	return &fakeBackend{info: testInfo, generateFn: func(ctx context.Context, _ llm.Request) (llm.TokenStream, error) {
		ts := newTickStream(ctx, tick, n, "t")
		if abortable {
			return abortableStream{ts}, nil
		}
		return ts, nil
	}}
}

// metricValue reads one sample line's value from /metrics ("name{labels}" as written there).
func metricValue(t *testing.T, s http.Handler, series string) string {
	t.Helper()
	rec := do(s, http.MethodGet, "/metrics", "")
	for line := range strings.SplitSeq(rec.Body.String(), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			return v
		}
	}
	t.Fatalf("%s not in /metrics:\n%s", series, rec.Body.String())
	return ""
}

const lbl = `{engine="0",model_name="test-model"}`

func TestAdmissionQueue(t *testing.T) {
	t.Parallel()
	s := newTestServer(t, tickBackend(time.Hour, 0, false), func(c *Config) { c.MaxConcurrent, c.MaxQueue = 1, 1 })
	body := hello + `,"stream":true}`
	start := func() (context.CancelFunc, chan *httptest.ResponseRecorder) {
		ctx, cancel := context.WithCancel(t.Context())
		out := make(chan *httptest.ResponseRecorder, 1)
		go func() { out <- serve(s, newRequest(http.MethodPost, "/v1/chat/completions", body).WithContext(ctx)) }()
		return cancel, out
	}
	cancelRunning, running := start()
	require.Eventually(t, func() bool { return metricValue(t, s, "govllm:num_requests_running"+lbl) == "1" }, 5*time.Second, time.Millisecond)
	cancelQueued, queued := start()
	require.Eventually(t, func() bool { return metricValue(t, s, "govllm:num_requests_waiting"+lbl) == "1" }, 5*time.Second, time.Millisecond)

	// The queue is full: 429 with Retry-After, for chat and text completions alike.
	for path, body := range map[string]string{"/v1/chat/completions": hello + `}`, "/v1/completions": `{"prompt":"p"}`} {
		rec := do(s, http.MethodPost, path, body)
		msg := requireError(t, rec, http.StatusTooManyRequests, "RateLimitError", "")
		require.Contains(t, msg, "busy")
		require.Equal(t, "1", rec.Header().Get("Retry-After"))
	}

	// A queued client that leaves frees its place without ever running.
	cancelQueued()
	rec := <-queued
	require.Empty(t, rec.Body.String())
	require.Equal(t, "0", metricValue(t, s, "govllm:num_requests_waiting"+lbl))
	require.Equal(t, "1", metricValue(t, s, "govllm:num_requests_running"+lbl))

	cancelRunning()
	<-running
	require.Equal(t, "0", metricValue(t, s, "govllm:num_requests_running"+lbl))
}

func TestAdmissionQueueTimeout(t *testing.T) {
	t.Parallel()
	// The running request outlives its timeout: its stream ignores the abort until released.
	release := make(chan struct{})
	b := &fakeBackend{info: testInfo, generateFn: func(context.Context, llm.Request) (llm.TokenStream, error) {
		return newFakeStream(func() (llm.Delta, error) {
			<-release
			return llm.Delta{}, io.EOF
		}, llm.Usage{}), nil
	}}
	s := newTestServer(t, b, func(c *Config) {
		c.MaxConcurrent, c.MaxQueue, c.RequestTimeout = 1, 4, 300*time.Millisecond
	})
	s.now = time.Now
	done := make(chan struct{})
	go func() {
		defer close(done)
		serve(s, newRequest(http.MethodPost, "/v1/chat/completions", hello+`}`))
	}()
	defer func() {
		close(release)
		<-done
	}()
	require.Eventually(t, func() bool { return metricValue(t, s, "govllm:num_requests_running"+lbl) == "1" }, 5*time.Second, time.Millisecond)
	rec := do(s, http.MethodPost, "/v1/chat/completions", hello+`}`)
	msg := requireError(t, rec, http.StatusServiceUnavailable, "ServiceUnavailableError", "")
	require.Contains(t, msg, "queue")
	require.Equal(t, "1", rec.Header().Get("Retry-After"))
}

func TestRequestTimeoutAborts(t *testing.T) {
	t.Parallel()
	for _, abortable := range []bool{false, true} {
		for _, streaming := range []bool{true, false} {
			t.Run(fmt.Sprintf("abortable=%v/stream=%v", abortable, streaming), func(t *testing.T) {
				t.Parallel()
				s := newTestServer(t, tickBackend(20*time.Millisecond, 0, abortable), func(c *Config) { c.RequestTimeout = 200 * time.Millisecond })
				s.now = time.Now
				rec := do(s, http.MethodPost, "/v1/chat/completions",
					fmt.Sprintf(`%s,"n":1,"stream":%v%s}`, hello, streaming, map[bool]string{true: `,"stream_options":{"include_usage":true}`}[streaming]))
				require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
				var finish string
				var u usage
				var text string
				if streaming {
					events := strings.Split(strings.TrimSuffix(rec.Body.String(), "\n\n"), "\n\n")
					require.Equal(t, "data: [DONE]", events[len(events)-1])
					for _, ev := range events[:len(events)-1] {
						var c chatChunk
						require.NoError(t, json.Unmarshal([]byte(strings.TrimPrefix(ev, "data: ")), &c))
						if c.Usage != nil {
							u = *c.Usage
							continue
						}
						if c.Choices[0].Delta.Content != nil {
							text += *c.Choices[0].Delta.Content
						}
						if fr := c.Choices[0].FinishReason; fr != nil {
							finish = *fr
						}
					}
				} else {
					var c chatCompletion
					require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &c))
					finish, u, text = c.Choices[0].FinishReason, c.Usage, *c.Choices[0].Message.Content
				}
				require.Equal(t, "abort", finish)
				require.NotEmpty(t, text)
				require.Equal(t, len(text), u.CompletionTokens, "one token per character")
				if abortable {
					require.Equal(t, 3, u.PromptTokens, "the stream's own usage")
				}
				require.Equal(t, "1", metricValue(t, s, `vllm:request_success_total{engine="0",finished_reason="abort",model_name="test-model"}`))
			})
		}
	}
}

// sseServer serves s over HTTP and returns a function that starts a stream and reads it to its
// end, returning its events.
func sseServer(t *testing.T, s *Server) (*httptest.Server, func(ctx context.Context, body string) ([]string, error)) {
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return srv, func(ctx context.Context, body string) ([]string, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/chat/completions", strings.NewReader(body))
		if err != nil {
			return nil, err
		}
		resp, err := srv.Client().Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return strings.Split(strings.TrimSuffix(string(b), "\n\n"), "\n\n"), err
	}
}

func TestAbortRequests(t *testing.T) {
	t.Parallel()
	s := newTestServer(t, tickBackend(10*time.Millisecond, 0, true))
	_, stream := sseServer(t, s)
	const n = 4
	results := make(chan []string, n)
	for range n {
		go func() {
			events, err := stream(t.Context(), hello+`,"stream":true}`)
			require.NoError(t, err)
			results <- events
		}()
	}
	require.Eventually(t, func() bool { return metricValue(t, s, "govllm:num_requests_running"+lbl) == fmt.Sprint(n) }, 5*time.Second, time.Millisecond)
	time.Sleep(50 * time.Millisecond)
	s.AbortRequests()
	for range n {
		events := <-results
		require.GreaterOrEqual(t, len(events), 4, "role, some text, finish and [DONE]")
		require.Equal(t, "data: [DONE]", events[len(events)-1])
		require.Equal(t, finishChunk(0, "abort"), events[len(events)-2]+"\n\n")
	}
	// Later requests are refused.
	rec := do(s, http.MethodPost, "/v1/chat/completions", hello+`}`)
	requireError(t, rec, http.StatusServiceUnavailable, "ServiceUnavailableError", "")
	require.Equal(t, "0", metricValue(t, s, "govllm:num_requests_running"+lbl))
}

func TestSlowReaderDoesNotStallOthers(t *testing.T) {
	t.Parallel()
	big := strings.Repeat("x", 64<<10)
	streams := make(chan *tickStream, 2)
	b := &fakeBackend{info: testInfo, generateFn: func(ctx context.Context, req llm.Request) (llm.TokenStream, error) {
		if req.Messages[0].Content == "slow reader" {
			ts := newTickStream(ctx, 0, 0, big) // as fast as it can, forever
			streams <- ts
			return ts, nil
		}
		return newTickStream(ctx, time.Millisecond, 200, "y"), nil
	}}
	s := newTestServer(t, b, func(c *Config) { c.WriteTimeout = 200 * time.Millisecond })
	srv, stream := sseServer(t, s)

	// A client that sends its request and never reads.
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	require.NoError(t, err)
	defer conn.Close()
	body := `{"messages":[{"role":"user","content":"slow reader"}],"stream":true}`
	_, err = fmt.Fprintf(conn, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	require.NoError(t, err)
	slow := <-streams

	// Others are served meanwhile.
	for range 3 {
		events, err := stream(t.Context(), hello+`,"stream":true}`)
		require.NoError(t, err)
		require.Equal(t, "data: [DONE]", events[len(events)-1])
		require.Len(t, events, 1+200+1+1)
	}
	// The stalled write fails at its deadline: the handler returns and its stream is closed
	// (for an engine stream, the request is aborted).
	select {
	case <-slow.closed:
	case <-time.After(10 * time.Second):
		t.Fatal("the slow reader's stream was not closed")
	}
	require.Eventually(t, func() bool { return metricValue(t, s, "govllm:num_requests_running"+lbl) == "0" }, 5*time.Second, 10*time.Millisecond)
}

func TestMetricsCountRequests(t *testing.T) {
	t.Parallel()
	u := llm.Usage{PromptTokens: 5, CompletionTokens: 3}
	stream := scripted(u, nil,
		llm.Delta{Index: 0, Text: "a", TokenIDs: []int32{1}},
		llm.Delta{Index: 1, Text: "b", TokenIDs: []int32{2}, FinishReason: "length"},
		llm.Delta{Index: 0, Text: "c", TokenIDs: []int32{3}, FinishReason: "stop"},
	)
	s := newTestServer(t, backendWith(stream, nil))
	rec := do(s, http.MethodPost, "/v1/chat/completions", hello+`,"n":2,"stream":true}`)
	require.Equal(t, http.StatusOK, rec.Code)
	for series, want := range map[string]string{
		"vllm:time_to_first_token_seconds_count" + lbl:                                            "1",
		"vllm:inter_token_latency_seconds_count" + lbl:                                            "1", // choice 0's second token
		"vllm:e2e_request_latency_seconds_count" + lbl:                                            "1",
		"vllm:generation_tokens_total" + lbl:                                                      "3",
		"vllm:prompt_tokens_total" + lbl:                                                          "5",
		`vllm:request_success_total{engine="0",finished_reason="stop",model_name="test-model"}`:   "1",
		`vllm:request_success_total{engine="0",finished_reason="length",model_name="test-model"}`: "1",
		`vllm:request_success_total{engine="0",finished_reason="abort",model_name="test-model"}`:  "0",
		"govllm:num_requests_running" + lbl:                                                       "0",
		"govllm:num_requests_waiting" + lbl:                                                       "0",
	} {
		require.Equal(t, want, metricValue(t, s, series), series)
	}
	require.Contains(t, do(s, http.MethodGet, "/metrics", "").Body.String(), "\ngo_goroutines ")
}
