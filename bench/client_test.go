package bench

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func client(t *testing.T, f *fake) (*Client, *fake) {
	t.Helper()
	srv := newFake(t, f)
	c := &Client{BaseURL: srv.URL, Model: "fake-model", Timeout: time.Minute}
	t.Cleanup(c.Close)
	return c, f
}

func chatRequest(stream bool) Request {
	return Request{Messages: []Message{{Role: "user", Content: "What is the capital of France?"}}, Stream: stream, MaxTokens: 32}
}

// requireConsistent checks the invariants of a successful result.
func requireConsistent(t *testing.T, r Result) {
	t.Helper()
	require.True(t, r.Success, r.Error)
	require.LessOrEqual(t, r.TTFT, r.E2EL)
	require.InDelta(t, float64(r.OutputTokens)/r.E2EL, r.TokensPerS, 1e-9)
	if r.Stream {
		require.Positive(t, r.TTFT)
		require.Len(t, r.ITL, r.ContentChunks-1)
		if r.OutputTokens > 1 {
			require.InDelta(t, (r.E2EL-r.TTFT)/float64(r.OutputTokens-1), r.TPOT, 1e-9)
		}
	}
}

func TestClientStream(t *testing.T) {
	c, f := client(t, &fake{delay: 5 * time.Millisecond})
	r := c.Do(t.Context(), chatRequest(true))
	requireConsistent(t, r)
	require.True(t, r.Done)
	require.Equal(t, "The capital of France is Paris.", r.Text)
	require.Equal(t, 7, r.ContentChunks)
	require.Equal(t, 9, r.Chunks, "7 tokens, the finish chunk and the usage chunk")
	require.Equal(t, 7, r.OutputTokens)
	require.Equal(t, "usage", r.OutputTokensFrom)
	require.Equal(t, "stop", r.FinishReason)
	require.Positive(t, r.PromptTokens)
	// The fake sleeps 5 ms before each chunk, so chunk k cannot arrive before
	// (k+1)·5 ms. Single gaps have no lower bound (a late chunk shortens the
	// next gap), but the arrival times rebuilt from TTFT and ITL do.
	require.GreaterOrEqual(t, r.TTFT, 0.005)
	arrival := r.TTFT
	for i, gap := range r.ITL {
		arrival += gap
		require.GreaterOrEqual(t, arrival, float64(i+2)*0.005, "content chunk %d", i+1)
	}
	require.GreaterOrEqual(t, r.E2EL, 8*0.005, "E2EL runs to the finish chunk, the 8th sent")
	require.Equal(t, 200, r.HTTPStatus)

	body := f.requests()[0]
	require.Equal(t, "fake-model", body["model"])
	require.Equal(t, true, body["stream"])
	require.Equal(t, map[string]any{"include_usage": true}, body["stream_options"])
	require.EqualValues(t, 32, body["max_tokens"])
	require.NotContains(t, body, "temperature", "the server's default unless asked")
	require.NotContains(t, body, "ignore_eos")
}

func TestClientRequests(t *testing.T) {
	temp, seed := 0.5, int64(7)
	for _, tc := range []struct {
		name   string
		mode   string
		allow  bool
		req    Request
		check  func(t *testing.T, r Result, f *fake)
		failed string // the error, when the request must fail
	}{
		{name: "unstreamed chat", req: chatRequest(false), check: func(t *testing.T, r Result, _ *fake) {
			requireConsistent(t, r)
			require.Equal(t, "The capital of France is Paris.", r.Text)
			require.Zero(t, r.TTFT)
			require.Empty(t, r.ITL)
			require.Zero(t, r.Chunks)
			require.Equal(t, 7, r.OutputTokens)
			require.Equal(t, "stop", r.FinishReason)
		}},
		{name: "text completion streamed", req: Request{Prompt: "The capital of France is", Stream: true, MaxTokens: 3},
			check: func(t *testing.T, r Result, f *fake) {
				requireConsistent(t, r)
				require.Equal(t, "The capital of", r.Text)
				require.Equal(t, "length", r.FinishReason)
				require.Equal(t, 3, r.ContentChunks)
				require.Equal(t, "The capital of France is", f.requests()[0]["prompt"])
			}},
		{name: "options sent", req: Request{Messages: []Message{{Role: "user", Content: "hi"}}, Stream: true, Temperature: &temp, Seed: &seed, IgnoreEOS: true},
			check: func(t *testing.T, r Result, f *fake) {
				requireConsistent(t, r)
				b := f.requests()[0]
				require.EqualValues(t, 0.5, b["temperature"])
				require.EqualValues(t, 7, b["seed"])
				require.Equal(t, true, b["ignore_eos"])
				require.NotContains(t, b, "max_tokens")
			}},
		{name: "no usage: tokens counted as content chunks", mode: "nousage", req: chatRequest(true),
			check: func(t *testing.T, r Result, _ *fake) {
				requireConsistent(t, r)
				require.Equal(t, "chunks", r.OutputTokensFrom)
				require.Equal(t, 7, r.OutputTokens)
				require.Zero(t, r.PromptTokens)
			}},
		{name: "dropped stream without [DONE]", mode: "drop", req: chatRequest(true),
			failed: "stream ended without data: [DONE] after 3 chunks", check: func(t *testing.T, r Result, _ *fake) {
				require.False(t, r.Done)
				require.Equal(t, 3, r.ContentChunks)
				require.Equal(t, "The capital of", r.Text)
			}},
		{name: "dropped stream is an error even when [DONE] may be missing", mode: "drop", allow: true,
			req: chatRequest(true), failed: "stream ended without data: [DONE]"},
		{name: "finished stream without [DONE] is an error by default", mode: "nodone", req: chatRequest(true),
			failed: `stream ended without data: [DONE] after 9 chunks (finish_reason "stop")`},
		{name: "finished stream without [DONE] passes with AllowMissingDone", mode: "nodone", allow: true,
			req: chatRequest(true), check: func(t *testing.T, r Result, _ *fake) {
				requireConsistent(t, r)
				require.False(t, r.Done)
				require.Equal(t, 7, r.OutputTokens)
			}},
		{name: "HTTP 500 with an OpenAI error", mode: "500", req: chatRequest(true),
			failed: "HTTP 500 Internal Server Error: engine is dead", check: func(t *testing.T, r Result, _ *fake) {
				require.Equal(t, 500, r.HTTPStatus)
				require.Zero(t, r.Chunks)
			}},
		{name: "HTTP 500 unstreamed", mode: "500", req: chatRequest(false), failed: "HTTP 500 Internal Server Error: engine is dead"},
		{name: "error event in the stream", mode: "error-event", req: chatRequest(true),
			failed: "error event in the stream: engine died mid-stream", check: func(t *testing.T, r Result, _ *fake) {
				require.True(t, r.Done)
				require.Equal(t, 2, r.ContentChunks)
				require.Equal(t, 3, r.Chunks)
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, f := client(t, &fake{mode: tc.mode})
			c.AllowMissingDone = tc.allow
			r := c.Do(t.Context(), tc.req)
			if tc.failed != "" {
				require.False(t, r.Success)
				require.Contains(t, r.Error, tc.failed)
			}
			if tc.check != nil {
				tc.check(t, r, f)
			}
		})
	}
}

func TestClientTransportErrors(t *testing.T) {
	c := &Client{BaseURL: "http://127.0.0.1:1", Model: "m"}
	defer c.Close()
	r := c.Do(t.Context(), chatRequest(true))
	require.False(t, r.Success)
	require.Contains(t, r.Error, "connection refused")

	c2, _ := client(t, &fake{delay: 200 * time.Millisecond})
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	r = c2.Do(ctx, chatRequest(true))
	require.False(t, r.Success)
	require.Contains(t, r.Error, "context deadline exceeded")

	_, err := c.Models(t.Context())
	require.ErrorContains(t, err, "connection refused")
}

func TestClientModels(t *testing.T) {
	c, _ := client(t, &fake{})
	ids, err := c.Models(t.Context())
	require.NoError(t, err)
	require.Equal(t, []string{"fake-model", "other"}, ids)
}
