package server

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

const hello = `{"model":"test-model","messages":[{"role":"user","content":"hi"}]`

func TestChatStreamBytes(t *testing.T) {
	t.Parallel()
	u := llm.Usage{PromptTokens: 5, CompletionTokens: 3}
	tests := []struct {
		name   string
		body   string
		deltas []llm.Delta
		want   []string
	}{
		{
			name: "usage",
			body: hello + `,"stream":true,"stream_options":{"include_usage":true}}`,
			deltas: []llm.Delta{
				{Index: 0, TokenIDs: []int32{7}}, // a step with no text yet: skipped
				{Index: 0, Text: "Hel", TokenIDs: []int32{1}},
				{Index: 0, Text: "lo <b>&", TokenIDs: []int32{2}},
				{Index: 0, TokenIDs: []int32{3}, FinishReason: "stop"},
			},
			want: []string{
				roleChunk(0), textChunk(0, "Hel"),
				textChunk(0, "lo <b>&"),
				finishChunkU(0, "stop"),
				usageChunk(5, 3), doneEvent,
			},
		},
		{
			name: "no usage, text on the last delta",
			body: hello + `,"stream":true}`,
			deltas: []llm.Delta{
				{Index: 0, Text: "Hi"},
				{Index: 0, Text: " there", FinishReason: "length"},
			},
			want: []string{
				roleChunk(0), textChunk(0, "Hi"),
				textChunk(0, " there"), finishChunk(0, "length"),
				doneEvent,
			},
		},
		{
			name: "include_usage false",
			body: hello + `,"stream":true,"stream_options":{"include_usage":false}}`,
			deltas: []llm.Delta{
				{Index: 0, FinishReason: "stop"},
			},
			want: []string{roleChunk(0), finishChunk(0, "stop"), doneEvent},
		},
		{
			name: "n=2 interleaved",
			body: hello + `,"stream":true,"n":2,"stream_options":{"include_usage":true}}`,
			deltas: []llm.Delta{
				{Index: 1, Text: "B"},
				{Index: 0, Text: "A"},
				{Index: 1, Text: "b"},
				{Index: 0, Text: "a"},
				{Index: 1, FinishReason: "stop"},
				{Index: 0, Text: "!", FinishReason: "length"},
			},
			want: []string{
				roleChunk(1), textChunk(1, "B"),
				roleChunk(0), textChunk(0, "A"),
				textChunk(1, "b"),
				textChunk(0, "a"),
				finishChunkU(1, "stop"),
				textChunk(0, "!"), finishChunkU(0, "length"),
				usageChunk(5, 3), doneEvent,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			rec := httptest.NewRecorder()
			// Record what had been sent to the client each time the server asked for the next
			// delta: nothing before the first token, then one flushed batch per delta.
			var sentBefore []string
			var flushedBefore []bool
			inner := scripted(u, nil, tt.deltas...)
			stream := newFakeStream(func() (llm.Delta, error) {
				sentBefore = append(sentBefore, rec.Body.String())
				flushedBefore = append(flushedBefore, rec.Flushed)
				return inner.Recv()
			}, u)
			s := newTestServer(t, backendWith(stream, nil))

			req := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", strings.NewReader(tt.body))
			s.ServeHTTP(rec, req)

			require.Equal(t, http.StatusOK, rec.Code)
			require.Equal(t, "text/event-stream", rec.Header().Get("Content-Type"))
			require.Equal(t, "no-cache", rec.Header().Get("Cache-Control"))
			require.Equal(t, "keep-alive", rec.Header().Get("Connection"))
			require.Equal(t, strings.Join(tt.want, ""), rec.Body.String())
			require.True(t, stream.isClosed(), "stream not closed")

			require.Empty(t, sentBefore[0], "bytes sent before the first delta")
			firstText := 0
			for firstText < len(tt.deltas) && tt.deltas[firstText].Text == "" && tt.deltas[firstText].FinishReason == "" {
				firstText++
			}
			// The role chunk goes out with the first token, not earlier.
			require.Empty(t, sentBefore[firstText], "bytes sent before the first token")
			require.True(t, strings.HasPrefix(sentBefore[firstText+1], roleChunk(tt.deltas[firstText].Index)))
			require.True(t, flushedBefore[firstText+1], "first token not flushed")
		})
	}
}

func TestChatNonStream(t *testing.T) {
	t.Parallel()
	stream := scripted(llm.Usage{PromptTokens: 9, CompletionTokens: 4}, nil,
		llm.Delta{Index: 1, Text: "x"},
		llm.Delta{Index: 0, Text: "Hello"},
		llm.Delta{Index: 0, TokenIDs: []int32{5}},
		llm.Delta{Index: 1, Text: "y", FinishReason: "length"},
		llm.Delta{Index: 0, Text: " <world>", FinishReason: "stop"},
	)
	var got llm.Request
	s := newTestServer(t, backendWith(stream, &got))

	rec := do(s, http.MethodPost, "/v1/chat/completions", hello+`,"n":2}`)

	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	require.Equal(t, "application/json", rec.Header().Get("Content-Type"))
	require.JSONEq(t, `{
		"id":"chatcmpl-test","object":"chat.completion","created":1700000000,"model":"test-model",
		"choices":[
			{"index":0,"message":{"role":"assistant","content":"Hello <world>","tool_calls":[]},"logprobs":null,"finish_reason":"stop","stop_reason":null},
			{"index":1,"message":{"role":"assistant","content":"xy","tool_calls":[]},"logprobs":null,"finish_reason":"length","stop_reason":null}
		],
		"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13},
		"system_fingerprint":"govllm-fake"
	}`, rec.Body.String())
	require.Contains(t, rec.Body.String(), "Hello <world>", "HTML must not be escaped")
	require.True(t, stream.isClosed())
	require.Equal(t, testID, got.ID)
	require.Equal(t, 2, got.Sampling.N)
}

// TestChatRealID checks the default id generator through the handler.
func TestChatRealID(t *testing.T) {
	t.Parallel()
	newStream := func() llm.TokenStream { return scripted(llm.Usage{}, nil, llm.Delta{FinishReason: "stop"}) }
	b := &fakeBackend{info: testInfo, generateFn: func(context.Context, llm.Request) (llm.TokenStream, error) {
		return newStream(), nil
	}}
	s := New(Config{Backend: b})
	ids := map[string]bool{}
	for range 3 {
		rec := do(s, http.MethodPost, "/v1/chat/completions", hello+`}`)
		require.Equal(t, http.StatusOK, rec.Code)
		var resp struct {
			ID      string `json:"id"`
			Created int64  `json:"created"`
		}
		require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &resp))
		require.Regexp(t, `^chatcmpl-[0-9a-f]{16}$`, resp.ID)
		require.InDelta(t, time.Now().Unix(), resp.Created, 60)
		ids[resp.ID] = true
	}
	require.Len(t, ids, 3)
}

func TestChatStreamErrorAfterStart(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		err  error
		want string
	}{
		{
			name: "request error",
			err:  &llm.RequestError{Status: 500, Type: "InternalServerError", Message: "backend exploded"},
			want: `data: {"error":{"message":"backend exploded","type":"InternalServerError","param":null,"code":500}}` + "\n\n",
		},
		{
			name: "engine dead",
			err:  fmt.Errorf("poller: %w", llm.ErrEngineDead),
			want: `data: {"error":{"message":"poller: engine: engine is dead","type":"ServiceUnavailableError","param":null,"code":503}}` + "\n\n",
		},
		{
			name: "slow consumer",
			err:  llm.ErrSlowConsumer,
			want: `data: {"error":{"message":"engine: stream reader too slow, request aborted","type":"ServiceUnavailableError","param":null,"code":503}}` + "\n\n",
		},
		{
			name: "unknown error hides details",
			err:  errors.New("secret internals"),
			want: `data: {"error":{"message":"Internal server error","type":"InternalServerError","param":null,"code":500}}` + "\n\n",
		},
		{
			name: "stream ends with a choice unfinished",
			err:  io.EOF,
			want: `data: {"error":{"message":"Internal server error","type":"InternalServerError","param":null,"code":500}}` + "\n\n",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			stream := scripted(llm.Usage{}, tt.err, llm.Delta{Index: 0, Text: "A"})
			s := newTestServer(t, backendWith(stream, nil))

			rec := do(s, http.MethodPost, "/v1/chat/completions", hello+`,"stream":true,"stream_options":{"include_usage":true}}`)

			require.Equal(t, http.StatusOK, rec.Code)
			require.Equal(t, roleChunk(0)+textChunk(0, "A")+tt.want+doneEvent, rec.Body.String())
			require.True(t, stream.isClosed())
		})
	}
}

func TestChatBadDelta(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		deltas []llm.Delta
	}{
		{"index out of range", []llm.Delta{{Index: 1, Text: "x"}}},
		{"negative index", []llm.Delta{{Index: -1, Text: "x"}}},
		{"delta after finish", []llm.Delta{{FinishReason: "stop"}, {Text: "x"}}},
		{"no finish", []llm.Delta{{Text: "x"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			stream := scripted(llm.Usage{}, nil, tt.deltas...)
			s := newTestServer(t, backendWith(stream, nil))
			rec := do(s, http.MethodPost, "/v1/chat/completions", hello+`}`)
			msg := requireError(t, rec, http.StatusInternalServerError, "InternalServerError", "")
			require.Equal(t, "Internal server error", msg)
			require.True(t, stream.isClosed())
		})
	}
}

// Errors before any output, from Generate or the first Recv, get a real HTTP status even when
// streaming.
func TestChatEngineErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		err    error
		status int
		typ    string
		param  string
	}{
		{
			name:   "request error",
			err:    &llm.RequestError{Status: 400, Type: "BadRequestError", Param: "input_tokens", Message: "This model's maximum context length is 2048 tokens."},
			status: 400, typ: "BadRequestError", param: "input_tokens",
		},
		{
			name:   "request error without type",
			err:    fmt.Errorf("submit: %w", &llm.RequestError{Status: 429, Message: "queue full"}),
			status: 429, typ: "RateLimitError",
		},
		{
			name:   "request error without status",
			err:    &llm.RequestError{Message: "odd"},
			status: 500, typ: "InternalServerError",
		},
		{name: "engine dead", err: fmt.Errorf("x: %w", llm.ErrEngineDead), status: 503, typ: "ServiceUnavailableError"},
		{name: "engine closed", err: llm.ErrClosed, status: 503, typ: "ServiceUnavailableError"},
		{name: "other", err: errors.New("boom"), status: 500, typ: "InternalServerError"},
	}
	for _, tt := range tests {
		for _, where := range []string{"generate", "first recv"} {
			for _, streaming := range []bool{false, true} {
				t.Run(fmt.Sprintf("%s/%s/stream=%v", tt.name, where, streaming), func(t *testing.T) {
					t.Parallel()
					stream := scripted(llm.Usage{}, tt.err)
					b := &fakeBackend{info: testInfo, generateFn: func(context.Context, llm.Request) (llm.TokenStream, error) {
						if where == "generate" {
							return nil, tt.err
						}
						return stream, nil
					}}
					s := newTestServer(t, b)
					rec := do(s, http.MethodPost, "/v1/chat/completions", fmt.Sprintf(`%s,"stream":%v}`, hello, streaming))
					requireError(t, rec, tt.status, tt.typ, tt.param)
					if where != "generate" {
						require.True(t, stream.isClosed())
					}
				})
			}
		}
	}
}

func TestEngineDead(t *testing.T) {
	t.Parallel()
	dead := fmt.Errorf("engine: python raised: %w", llm.ErrEngineDead)
	b := &fakeBackend{
		info:     testInfo,
		healthFn: func() error { return dead },
		generateFn: func(context.Context, llm.Request) (llm.TokenStream, error) {
			return nil, dead
		},
	}
	s := newTestServer(t, b)

	rec := do(s, http.MethodPost, "/v1/chat/completions", hello+`,"stream":true}`)
	msg := requireError(t, rec, http.StatusServiceUnavailable, "ServiceUnavailableError", "")
	require.Contains(t, msg, "engine is dead")

	rec = do(s, http.MethodGet, "/health", "")
	msg = requireError(t, rec, http.StatusServiceUnavailable, "ServiceUnavailableError", "")
	require.Contains(t, msg, "engine is dead")
}

// blockingBackend's streams send the given deltas, then close blocked and wait until the
// request context is cancelled, and report that on sawCancel.
func blockingBackend(deltas []llm.Delta, stream **fakeStream, blocked chan<- struct{}, sawCancel chan<- error) *fakeBackend {
	return &fakeBackend{info: testInfo, generateFn: func(ctx context.Context, _ llm.Request) (llm.TokenStream, error) {
		i := 0
		*stream = newFakeStream(func() (llm.Delta, error) {
			if i < len(deltas) {
				i++
				return deltas[i-1], nil
			}
			close(blocked)
			<-ctx.Done()
			sawCancel <- ctx.Err()
			return llm.Delta{}, ctx.Err()
		}, llm.Usage{})
		return *stream, nil
	}}
}

func TestClientDisconnect(t *testing.T) {
	for _, streaming := range []bool{true, false} {
		t.Run(fmt.Sprintf("stream=%v", streaming), func(t *testing.T) {
			var stream *fakeStream
			sawCancel := make(chan error, 1)
			blocked := make(chan struct{})
			s := newTestServer(t, blockingBackend([]llm.Delta{{Index: 0, Text: "first"}}, &stream, blocked, sawCancel))
			returned := make(chan struct{})
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				defer close(returned)
				s.ServeHTTP(w, r)
			}))
			defer srv.Close()

			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			body := fmt.Sprintf(`%s,"stream":%v}`, hello, streaming)
			req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/chat/completions", strings.NewReader(body))
			require.NoError(t, err)

			if streaming {
				resp, err := srv.Client().Do(req)
				require.NoError(t, err)
				defer resp.Body.Close()
				require.Equal(t, http.StatusOK, resp.StatusCode)
				// Read up to the first token, then hang up.
				br := bufio.NewReader(resp.Body)
				for {
					line, err := br.ReadString('\n')
					require.NoError(t, err)
					if strings.Contains(line, `"content":"first"`) {
						break
					}
				}
				cancel()
			} else {
				errc := make(chan error, 1)
				go func() {
					resp, err := srv.Client().Do(req)
					if err == nil {
						resp.Body.Close()
					}
					errc <- err
				}()
				// Hang up while the server waits for the output.
				<-blocked
				cancel()
				require.ErrorIs(t, <-errc, context.Canceled)
			}

			select {
			case err := <-sawCancel:
				require.ErrorIs(t, err, context.Canceled)
			case <-time.After(10 * time.Second):
				t.Fatal("the stream never saw the request context cancelled")
			}
			select {
			case <-returned:
			case <-time.After(10 * time.Second):
				t.Fatal("the handler did not return")
			}
			require.True(t, stream.isClosed(), "stream not closed")
		})
	}
}
